"""Kronecker factors: moving averages, eigendecompositions and damped inverses.

A block's Fisher is approximated as ``Ā ⊗ G`` [KFAC §3]. Each factor is kept as an
exponential moving average of per-batch estimates [KFAC §5] and, on a schedule, its
eigendecomposition. With eigendecompositions the factored Tikhonov damping of
[KFAC §6.3] costs nothing to change:

    (Ā + πγI)⁻¹ X (G + (γ/π)I)⁻¹
        = Q_A [(Q_Aᵀ X Q_G) / ((d_A + πγ) (d_G + γ/π)ᵀ)] Q_Gᵀ,

with ``π = sqrt((tr Ā / dim Ā) / (tr G / dim G))`` computed from the same
decomposition that is applied.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Smallest trace-per-dimension used in π, so a factor that is still all zeros (a
# layer whose output gradient vanished) gives a finite π.
_MIN_MEAN_EIGENVALUE = 1e-12


def moving_average_decay(num_updates: tf.Tensor, max_decay: float) -> tf.Tensor:
    """ε = min(1 − 1/k, ε_max) for the k-th statistics update [KFAC §5].

    The first update (k = 1) has ε = 0, so it replaces the initial value.
    """
    k = tf.cast(num_updates, tf.float32)
    return tf.minimum(1.0 - 1.0 / tf.maximum(k, 1.0), max_decay)


def all_finite(tensors: list[tf.Tensor]) -> tf.Tensor:
    """True when no element of any tensor is NaN or infinite."""
    return tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(t)) for t in tensors]
    )


class KroneckerFactor:
    """One Kronecker factor (Ā or G) of a block, stored in optimizer variables.

    Holds the moving-average estimate ``cov`` and the eigendecomposition
    ``(eigenvalues, eigenvectors)`` last computed from it. The variables are
    created through ``optimizer.add_variable`` so they are saved with the
    optimizer.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, dim: int, name: str):
        self.dim = dim
        self.cov = optimizer.add_variable(
            (dim, dim), initializer="zeros", dtype="float32", name=f"{name}_cov"
        )
        self.eigenvalues = optimizer.add_variable(
            (dim,), initializer="zeros", dtype="float32", name=f"{name}_eigenvalues"
        )
        self.eigenvectors = optimizer.add_variable(
            (dim, dim),
            initializer="identity",
            dtype="float32",
            name=f"{name}_eigenvectors",
        )

    def update_moving_average(self, batch_cov: tf.Tensor, decay: tf.Tensor) -> None:
        """cov ← ε·cov + (1 − ε)·batch_cov; a non-finite batch estimate is skipped."""
        new_cov = decay * self.cov + (1.0 - decay) * batch_cov
        ok = tf.reduce_all(tf.math.is_finite(batch_cov))
        self.cov.assign(tf.where(ok, new_cov, self.cov))

    def update_eigendecomposition(self) -> None:
        """Recompute the eigendecomposition of ``cov`` (kept if it fails)."""
        cov = tf.convert_to_tensor(self.cov)
        eigenvalues, eigenvectors = tf.linalg.eigh(0.5 * (cov + tf.transpose(cov)))
        # The estimate is positive semi-definite; round-off can make tiny
        # eigenvalues negative.
        eigenvalues = tf.maximum(eigenvalues, 0.0)
        ok = all_finite([eigenvalues, eigenvectors])
        self.eigenvalues.assign(tf.where(ok, eigenvalues, self.eigenvalues))
        self.eigenvectors.assign(tf.where(ok, eigenvectors, self.eigenvectors))

    def mean_eigenvalue(self) -> tf.Tensor:
        """tr(factor) / dim, from the current eigendecomposition."""
        return tf.maximum(tf.reduce_mean(self.eigenvalues), _MIN_MEAN_EIGENVALUE)


def trace_norm_pi(input_factor: KroneckerFactor, output_factor: KroneckerFactor) -> tf.Tensor:
    """π = sqrt((tr Ā / dim Ā) / (tr G / dim G)) [KFAC §6.3]."""
    return tf.sqrt(input_factor.mean_eigenvalue() / output_factor.mean_eigenvalue())


def damped_kronecker_solve(
    input_factor: KroneckerFactor,
    output_factor: KroneckerFactor,
    gradient: tf.Tensor,
    gamma: tf.Tensor,
) -> tf.Tensor:
    """(Ā + πγI)⁻¹ ∇W (G + (γ/π)I)⁻¹ for ∇W of shape (dim Ā, dim G) [KFAC §6.3].

    This is ``[(Ā + πγI) ⊗ (G + (γ/π)I)]⁻¹ vec(∇W)`` with row-major ``vec`` —
    the factored Tikhonov damping of the block — computed with two small
    eigenbases, never the Kronecker product itself.
    """
    pi = trace_norm_pi(input_factor, output_factor)
    q_a, q_g = input_factor.eigenvectors, output_factor.eigenvectors
    rotated = tf.matmul(tf.matmul(q_a, gradient, transpose_a=True), q_g)
    denominator = tf.tensordot(
        input_factor.eigenvalues + pi * gamma,
        output_factor.eigenvalues + gamma / pi,
        axes=0,
    )
    return tf.matmul(tf.matmul(q_a, rotated / denominator), q_g, transpose_b=True)
