"""Kronecker factors: moving averages and factored-Tikhonov-damped inverses.

A block's Fisher is approximated as ``Ā ⊗ G`` [KFAC §3]. Each factor is kept as an
exponential moving average of per-batch estimates [KFAC §5] and, on a schedule,
the inverse of its damped version [KFAC §6.3]:

    [(Ā + πγI) ⊗ (G + (γ/π)I)]⁻¹ vec(∇W) = vec((Ā + πγI)⁻¹ ∇W (G + (γ/π)I)⁻¹),

with ``π = sqrt((tr Ā / dim Ā) / (tr G / dim G))`` — two small inverses per layer,
never the Kronecker product itself. The inverses come from Cholesky
factorisations: on CPUs they are about five times faster than eigendecompositions
and, unlike them, fast under XLA too.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

# Smallest trace-per-dimension used in π, so a factor that is still all zeros (a
# layer whose output gradient vanished) gives a finite π.
_MIN_MEAN_EIGENVALUE = 1e-12
# Relative diagonal jitter keeping the Cholesky factorisation of an undamped
# (damping = 0), rank-deficient factor defined.
_JITTER = 1e-7


def moving_average_decay(num_updates: tf.Tensor, max_decay: float) -> tf.Tensor:
    """ε = min(1 − 1/k, ε_max) for the k-th statistics update [KFAC §5].

    The first update (k = 1) has ε = 0, so it replaces the initial value.

    Args:
        num_updates: k, the number of statistics updates so far, this one
            included (values below 1 count as 1).
        max_decay: ε_max, the largest decay.

    Returns:
        ε, a float32 scalar.
    """
    k = tf.cast(num_updates, tf.float32)
    return tf.minimum(1.0 - 1.0 / tf.maximum(k, 1.0), max_decay)


def all_finite(tensors: list[tf.Tensor]) -> tf.Tensor:
    """True when no element of any tensor is NaN or infinite.

    Args:
        tensors: a list of float tensors.

    Returns:
        A scalar bool tensor.
    """
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def cross_moment(left: tf.Tensor, right: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """leftᵀ right / count over aligned rows (0 for no rows): a batch estimate of E[l rᵀ] [KFAC §3].

    Args:
        left: rows l, shape (N, n).
        right: the aligned rows r, shape (N, m).
        count: the divisor, e.g. N or the number of examples (taken as 1 when 0).

    Returns:
        A float32 matrix of shape (n, m).
    """
    return tf.matmul(left, right, transpose_a=True) / tf.cast(tf.maximum(count, 1), tf.float32)


def weighted_cross_moment(left: tf.Tensor, right: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Σ w l rᵀ / Σ w over aligned rows l, r (0 when the weights sum to 0): E[l rᵀ] under the rows' weights.

    Args:
        left: rows l, shape (N, n).
        right: the aligned rows r, shape (N, m).
        weights: the rows' weights w, shape (N,).

    Returns:
        A matrix of shape (n, m).
    """
    weighted = tf.matmul(left * weights[:, tf.newaxis], right, transpose_a=True)
    return tf.math.divide_no_nan(weighted, tf.reduce_sum(weights))


def row_mass(rows: tf.Tensor, weights: tf.Tensor | None) -> tf.Tensor:
    """Σ w over the rows, or their number without weights: what a mean over them stands for.

    Args:
        rows: the rows, shape (N, ...).
        weights: their weights w, shape (N,), or None.

    Returns:
        A float32 scalar.
    """
    return tf.cast(tf.shape(rows)[0], tf.float32) if weights is None else tf.reduce_sum(weights)


def update_moving_average(variable: tf.Variable, estimate: tf.Tensor, decay: tf.Tensor, accept: tf.Tensor) -> None:
    """variable ← ε·variable + (1 − ε)·estimate [KFAC §5] when ``accept`` is true.

    The caller rejects a batch whose estimates or gradients are not all finite,
    so such a batch never enters the statistics.

    Args:
        variable: the moving average, updated in place.
        estimate: this batch's estimate, shaped like ``variable``.
        decay: ε, e.g. from ``moving_average_decay``.
        accept: a scalar bool tensor; when false ``variable`` is kept.
    """
    variable.assign(tf.where(accept, decay * variable + (1.0 - decay) * estimate, variable))


class KroneckerFactor:
    """One Kronecker factor (Ā or G) of a block, stored in optimizer variables.

    Holds the moving-average estimate ``cov`` and the damped inverse last
    computed from it, in the factor's form: here the matrix itself. The
    variables are created through ``optimizer.add_variable`` so they are saved
    with the optimizer.

    Args:
        optimizer: the optimizer that creates and saves the variables.
        dim: the factor's dimension; ``cov`` and ``inverse`` are (dim, dim).
        name: prefix of the variables' names (``<name>_cov``, ``<name>_inverse``).
    """

    # Suffix of the inverse's variable name.
    inverse_name = "inverse"

    def __init__(self, optimizer: keras.optimizers.Optimizer, dim: int, name: str):
        self.dim = dim
        self.cov = optimizer.add_variable((dim, dim), initializer="zeros", dtype="float32", name=f"{name}_cov")
        self.inverse = optimizer.add_variable(
            (dim, dim), initializer="identity", dtype="float32", name=f"{name}_{self.inverse_name}"
        )

    def trace(self) -> tf.Tensor:
        """tr(cov): 0 until a batch's statistics are accepted.

        Returns:
            A float32 scalar.
        """
        return tf.linalg.trace(self.cov)

    def mean_eigenvalue(self) -> tf.Tensor:
        """tr(cov) / dim, at least a tiny positive floor.

        Returns:
            A float32 scalar, at least 1e-12.
        """
        return tf.maximum(self.trace() / self.dim, _MIN_MEAN_EIGENVALUE)

    def damped_inverse(self, damping: tf.Tensor) -> tf.Tensor:
        """(cov + damping·I)⁻¹, symmetrised, through a Cholesky factorisation.

        A relative jitter of 1e-7·tr(cov)/dim is added to ``damping``, so an
        undamped, rank-deficient ``cov`` can still be factorised.

        Args:
            damping: the damping added to the diagonal, e.g. πγ or γ/π.

        Returns:
            A (dim, dim) float32 matrix; non-finite if the factorisation failed.
        """
        cov = tf.convert_to_tensor(self.cov)
        jitter = _JITTER * self.mean_eigenvalue()
        damped = 0.5 * (cov + tf.transpose(cov)) + (damping + jitter) * tf.eye(self.dim)
        inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(damped), tf.eye(self.dim))
        return 0.5 * (inverse + tf.transpose(inverse))

    def assign_inverse(self, inverse: tf.Tensor) -> None:
        """Stores ``inverse`` unless the factorisation failed (non-finite values).

        Args:
            inverse: a damped inverse, as ``damped_inverse`` returns it.
        """
        ok = tf.reduce_all(tf.math.is_finite(inverse))
        self.inverse.assign(tf.where(ok, inverse, self.inverse))

    @staticmethod
    def left_multiply(inverse: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
        """``inverse @ matrix`` for an inverse of this kind of factor.

        Args:
            inverse: an inverse of this factor's form, (dim, dim).
            matrix: a matrix with dim rows.

        Returns:
            The product, shaped like ``matrix``.
        """
        return tf.matmul(inverse, matrix)

    @staticmethod
    def right_multiply(matrix: tf.Tensor, inverse: tf.Tensor) -> tf.Tensor:
        """``matrix @ inverse`` for an inverse of this kind of factor.

        Args:
            matrix: a matrix with dim columns.
            inverse: an inverse of this factor's form, (dim, dim).

        Returns:
            The product, shaped like ``matrix``.
        """
        return tf.matmul(matrix, inverse)


class CholeskyFactor(KroneckerFactor):
    """A Kronecker factor whose damped inverse is kept as a Cholesky factor L, LLᵀ = cov + damping·I.

    Applying it takes two triangular solves (``cholesky_solve``) instead of a
    product with the inverse, about twice the time, but refreshing it costs one
    factorisation, n³/3 FLOPs, against 7n³/3 for L and the two solves that
    form the explicit inverse. ``inverse_form`` picks it for a factor much
    larger than the matrices it is applied to, such as the Ā of a Dense
    classifier on flattened convolution features (1601 inputs, 10 outputs).
    The product is exactly that of the inverse [KFAC §6.3], up to rounding.

    Args:
        optimizer: the optimizer that creates and saves the variables.
        dim: the factor's dimension; ``cov`` and ``inverse`` (holding L) are (dim, dim).
        name: prefix of the variables' names (``<name>_cov``, ``<name>_cholesky``).
    """

    inverse_name = "cholesky"

    def damped_inverse(self, damping: tf.Tensor) -> tf.Tensor:
        """L with LLᵀ = cov + (damping + jitter)·I, the jitter as in ``KroneckerFactor.damped_inverse``.

        Args:
            damping: the damping added to the diagonal, e.g. πγ or γ/π.

        Returns:
            The lower-triangular (dim, dim) float32 L; non-finite if the factorisation failed.
        """
        cov = tf.convert_to_tensor(self.cov)
        jitter = _JITTER * self.mean_eigenvalue()
        return tf.linalg.cholesky(0.5 * (cov + tf.transpose(cov)) + (damping + jitter) * tf.eye(self.dim))

    def restore_form(self) -> None:
        """Turns a loaded explicit inverse into L = chol(inverse⁻¹), the same preconditioner.

        Optimizers saved before this factor kept its Cholesky factor (or with
        a refresh period that chose the explicit inverse) hold a symmetric
        inverse here; L is lower-triangular, so entries above the diagonal
        tell them apart.
        """
        value = self.inverse.numpy().astype(np.float64)
        if np.any(np.triu(value, 1)):
            self.inverse.assign(np.linalg.cholesky(np.linalg.inv(value)).astype(np.float32))

    @staticmethod
    def left_multiply(inverse: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
        """(LLᵀ)⁻¹ ``matrix`` by two triangular solves.

        Args:
            inverse: L, as ``damped_inverse`` returns it.
            matrix: a matrix with dim rows.

        Returns:
            The product, shaped like ``matrix``.
        """
        return tf.linalg.cholesky_solve(inverse, matrix)

    @staticmethod
    def right_multiply(matrix: tf.Tensor, inverse: tf.Tensor) -> tf.Tensor:
        """``matrix`` (LLᵀ)⁻¹, the transpose of the solve against ``matrix``ᵀ (LLᵀ is symmetric).

        Args:
            matrix: a matrix with dim columns.
            inverse: L, as ``damped_inverse`` returns it.

        Returns:
            The product, shaped like ``matrix``.
        """
        return tf.transpose(tf.linalg.cholesky_solve(inverse, tf.transpose(matrix)))


def inverse_form(dim: int, applied_to: int, refresh_period: int) -> type[KroneckerFactor]:
    """The form of a dense factor's damped inverse: the matrix, or its Cholesky factor.

    Between two refreshes the inverse of a (dim, dim) factor is applied
    ``refresh_period`` times to a matrix of ``applied_to`` columns, about
    2·dim²·applied_to FLOPs each, twice that by triangular solves; one refresh
    costs 7·dim³/3 for the explicit inverse and dim³/3 for the Cholesky factor
    alone. The Cholesky factor is the cheaper when dim ≥ refresh_period ·
    applied_to (measured on 2 CPU cores: 1601² applied to 10 columns, a refresh
    of 234 ms against 59, a product of 1.9 ms against 3.8).

    Args:
        dim: the factor's dimension.
        applied_to: the number of columns (or rows) of the gradient it multiplies.
        refresh_period: T₃, steps between refreshes of the inverse.

    Returns:
        ``CholeskyFactor`` or ``KroneckerFactor``.
    """
    return CholeskyFactor if dim >= refresh_period * applied_to else KroneckerFactor


class DiagonalFactor(KroneckerFactor):
    """A Kronecker factor that is diagonal by construction, stored as its diagonal.

    An embedding's input ā is a one-hot row, so ``Ā = E[ā āᵀ]`` is the diagonal
    matrix of the tokens' frequencies [KFAC §3 with one-hot inputs]: its
    (vocabulary)² entries are never formed, and its damped inverse is
    elementwise. A block registered with ``approximation="diagonal"`` keeps
    only the diagonals of its Ā and G this way.

    Args:
        optimizer: the optimizer that creates and saves the variables.
        dim: the factor's dimension; ``cov`` and ``inverse`` are vectors of length dim.
        name: prefix of the variables' names (``<name>_cov``, ``<name>_inverse``).
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, dim: int, name: str):
        self.dim = dim
        self.cov = optimizer.add_variable((dim,), initializer="zeros", dtype="float32", name=f"{name}_cov")
        self.inverse = optimizer.add_variable((dim,), initializer="ones", dtype="float32", name=f"{name}_inverse")

    def trace(self) -> tf.Tensor:
        """tr(cov), the sum of the diagonal: 0 until a batch's statistics are accepted.

        Returns:
            A float32 scalar.
        """
        return tf.reduce_sum(self.cov)

    def mean_eigenvalue(self) -> tf.Tensor:
        """tr(cov) / dim, at least a tiny positive floor.

        Returns:
            A float32 scalar, at least 1e-12.
        """
        return tf.maximum(self.trace() / self.dim, _MIN_MEAN_EIGENVALUE)

    def damped_inverse(self, damping: tf.Tensor) -> tf.Tensor:
        """diag(cov + damping)⁻¹, as a vector.

        A relative jitter of 1e-7·tr(cov)/dim is added to ``damping``.

        Args:
            damping: the damping added to the diagonal, e.g. πγ.

        Returns:
            A float32 vector of length dim.
        """
        jitter = _JITTER * self.mean_eigenvalue()
        return 1.0 / (tf.convert_to_tensor(self.cov) + damping + jitter)

    @staticmethod
    def left_multiply(inverse: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
        """``diag(inverse) @ matrix``: each row of ``matrix`` scaled by its entry of ``inverse``.

        Args:
            inverse: the diagonal inverse, a vector of length dim.
            matrix: a matrix with dim rows.

        Returns:
            The product, shaped like ``matrix``.
        """
        return inverse[:, tf.newaxis] * matrix

    @staticmethod
    def right_multiply(matrix: tf.Tensor, inverse: tf.Tensor) -> tf.Tensor:
        """``matrix @ diag(inverse)``: each column of ``matrix`` scaled by its entry of ``inverse``.

        Args:
            matrix: a matrix with dim columns.
            inverse: the diagonal inverse, a vector of length dim.

        Returns:
            The product, shaped like ``matrix``.
        """
        return matrix * inverse


class ChannelFactor(KroneckerFactor):
    """One Kronecker factor per channel: a stack of C independent (dim, dim) factors.

    A layer whose channels have weights of their own (a depthwise convolution,
    the scale and shift of a normalization layer) has a block-diagonal Fisher,
    one Kronecker-factored block ``Ā_c ⊗ G_c`` per channel c [KFAC §3 applied to
    each channel's weights]. The C factors share one variable of shape
    (C, dim, dim) and are damped and inverted as a batch, each with its own π.

    Args:
        optimizer: the optimizer that creates and saves the variables.
        channels: C, the number of channels.
        dim: each factor's dimension.
        name: prefix of the variables' names (``<name>_cov``, ``<name>_inverse``).
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, channels: int, dim: int, name: str):
        self.dim = dim
        self.channels = channels
        shape = (channels, dim, dim)
        self.cov = optimizer.add_variable(shape, initializer="zeros", dtype="float32", name=f"{name}_cov")
        self.inverse = optimizer.add_variable(
            shape,
            initializer=lambda shape, dtype=None: tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype),
            dtype="float32",
            name=f"{name}_inverse",
        )

    def trace(self) -> tf.Tensor:
        """Σ_c tr(cov_c): 0 until a batch's statistics are accepted.

        Returns:
            A float32 scalar.
        """
        return tf.reduce_sum(tf.linalg.trace(self.cov))

    def mean_eigenvalue(self) -> tf.Tensor:
        """tr(cov_c) / dim of each channel, at least a tiny positive floor.

        Returns:
            A float32 vector of length C.
        """
        return tf.maximum(tf.linalg.trace(self.cov) / self.dim, _MIN_MEAN_EIGENVALUE)

    def damped_inverse(self, damping: tf.Tensor) -> tf.Tensor:
        """(cov_c + damping_c·I)⁻¹ of every channel, through batched Cholesky factorisations.

        Args:
            damping: a scalar, or one damping per channel (length C).

        Returns:
            A (C, dim, dim) float32 tensor; non-finite if a factorisation failed.
        """
        cov = tf.convert_to_tensor(self.cov)
        shift = tf.broadcast_to(damping + _JITTER * self.mean_eigenvalue(), [self.channels])
        eye = tf.eye(self.dim, batch_shape=[self.channels])
        damped = 0.5 * (cov + tf.linalg.matrix_transpose(cov)) + shift[:, None, None] * eye
        inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(damped), eye)
        return 0.5 * (inverse + tf.linalg.matrix_transpose(inverse))


def trace_norm_pi(input_factor: KroneckerFactor, output_factor: KroneckerFactor) -> tf.Tensor:
    """π = sqrt((tr Ā / dim Ā) / (tr G / dim G)) [KFAC §6.3].

    Args:
        input_factor: Ā.
        output_factor: G.

    Returns:
        π, a float32 scalar (one per channel for ``ChannelFactor``s), finite
        even while a factor is all zeros.
    """
    return tf.sqrt(input_factor.mean_eigenvalue() / output_factor.mean_eigenvalue())


def damped_inverses(
    input_factor: KroneckerFactor, output_factor: KroneckerFactor, gamma: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """((Ā + πγI)⁻¹, (G + (γ/π)I)⁻¹): factored Tikhonov damping [KFAC §6.3].

    Args:
        input_factor: Ā.
        output_factor: G.
        gamma: the factored Tikhonov damping γ.

    Returns:
        The pair of damped inverses, each in its factor's form (see ``damped_inverse``).
    """
    pi = trace_norm_pi(input_factor, output_factor)
    return input_factor.damped_inverse(pi * gamma), output_factor.damped_inverse(gamma / pi)
