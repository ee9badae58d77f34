"""Block-tridiagonal inverse Fisher for a chain of layers [KFAC §4.3, App. B].

The block-diagonal approximation ignores the curvature between layers. The
block-tridiagonal one keeps the Fisher blocks of consecutive layers of a chain of
L blocks (i = 0 … L−1), each Kronecker-factored:

    F̃_ii      = Â_i ⊗ Ĝ_i,   Â_i = Ā_i + π_i γ I,   Ĝ_i = G_i + (γ/π_i) I,
    F̃_{i,i+1} = Ā_{i,i+1} ⊗ G_{i,i+1},  Ā_{i,i+1} = E[ā_i ā_{i+1}ᵀ],  G_{i,i+1} = E[g_i g_{i+1}ᵀ],

with factored Tikhonov damping on the diagonal factors only [KFAC §6.3]. Its
inverse is taken to be that of a directed Gaussian graphical model whose
covariance agrees with F̃ on the tridiagonal blocks [KFAC §4.3]:

    F̂⁻¹ = Ξᵀ Λ Ξ,   Ξ block upper-bidiagonal (I on the diagonal, −Ψ_{i,i+1} above),
    Ψ_{i,i+1} = F̃_{i,i+1} F̃_{i+1,i+1}⁻¹ = (Ā_{i,i+1} Â_{i+1}⁻¹) ⊗ (G_{i,i+1} Ĝ_{i+1}⁻¹),
    Λ = diag(Σ_{0|1}⁻¹, …, Σ_{L−2|L−1}⁻¹, Σ_{L−1}⁻¹),
    Σ_{i|i+1} = F̃_ii − Ψ_{i,i+1} F̃_{i+1,i+1} Ψ_{i,i+1}ᵀ = Â_i ⊗ Ĝ_i − C_i ⊗ D_i,
    Σ_{L−1} = F̃_{L−1,L−1},
    C_i = Ā_{i,i+1} Â_{i+1}⁻¹ Ā_{i,i+1}ᵀ,   D_i = G_{i,i+1} Ĝ_{i+1}⁻¹ G_{i,i+1}ᵀ.

Layout (the package's): block i's weights W̄_i are (n_i, d_i) — inputs plus the
homogeneous 1 by outputs — vectorised row-major, so ``(P ⊗ Q) vec(V) = vec(P V Qᵀ)``
and no Kronecker product is ever formed. Σ_{i|i+1}, a difference of Kronecker
products, is inverted through two small eigendecompositions [KFAC App. B]: with
R_A R_Aᵀ = Â⁻¹, R_G R_Gᵀ = Ĝ⁻¹ (R = U diag(λ^{-1/2}) from ``eigh``),
R_Aᵀ C R_A = E₁ diag(s₁) E₁ᵀ, R_Gᵀ D R_G = E₂ diag(s₂) E₂ᵀ, K₁ = R_A E₁, K₂ = R_G E₂:

    Σ⁻¹ vec(X) = vec(K₁ [(K₁ᵀ X K₂) ⊘ (1 − s₁ s₂ᵀ)] K₂ᵀ).

(The paper writes R_A = Â^{-1/2}; any R with R Rᵀ = Â⁻¹ gives the same Σ⁻¹.)

Positive definiteness. When Ā_i, Ā_{i+1}, Ā_{i,i+1} are (moving averages of)
second moments of the same rows, [[Â_i, Ā_{i,i+1}], [Ā_{i,i+1}ᵀ, Â_{i+1}]] is
positive definite, so its Schur complement Â_i − C_i is too, i.e. s₁ < 1; likewise
s₂ < 1, so every 1 − s₁ s₂ᵀ > 0 and Σ_{i|i+1} is positive definite. Round-off,
or statistics not taken from the same rows, can break this; the denominators are
therefore clipped at ``_MIN_DENOMINATOR``, which keeps the result finite (and
positive definite) at the cost of exactness in those directions only.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from keras_kfac import curvature

# Denominators 1 − s₁ s₂ᵀ are clipped at this value (they lie in (0, 1] in exact
# arithmetic for consistent statistics; see the module docstring).
_MIN_DENOMINATOR = 1e-6
# Eigenvalues of the damped factors are clipped at this fraction of the largest
# one (float32 eigh is not more accurate than that) ...
_RELATIVE_EIGENVALUE_FLOOR = 1e-7
# ... and at this absolute value, so an all-zero undamped factor stays finite.
_ABSOLUTE_EIGENVALUE_FLOOR = 1e-30

_FIELDS = ("input_links", "output_links", "input_bases", "output_bases", "denominators")


@dataclasses.dataclass(eq=False)  # fields hold tensors: compare them explicitly
class TridiagonalInverse:
    """The factors of F̂⁻¹ = Ξᵀ Λ Ξ for a chain of L blocks [KFAC §4.3].

    Attributes (all float32):
        input_links: P_i = Ā_{i,i+1} Â_{i+1}⁻¹, shape (n_i, n_{i+1}), i = 0 … L−2.
        output_links: Q_i = G_{i,i+1} Ĝ_{i+1}⁻¹, shape (d_i, d_{i+1}), i = 0 … L−2.
            Together Ψ_{i,i+1} = P_i ⊗ Q_i.
        input_bases: K₁ of block i's Σ, shape (n_i, n_i), i = 0 … L−1.
        output_bases: K₂ of block i's Σ, shape (d_i, d_i), i = 0 … L−1.
        denominators: max(1 − s₁ s₂ᵀ, 1e-6), shape (n_i, d_i), i = 0 … L−1;
            Σ_i⁻¹ vec(X) = vec(K₁ [(K₁ᵀ X K₂) ⊘ denominators] K₂ᵀ) [KFAC App. B].
            The last block has no link (Σ_{L−1} = Â ⊗ Ĝ): its bases are
            U diag(λ^{-1/2}) of Â and Ĝ and its denominators are ones.

    As tensors (``to_tensors``), the fields are concatenated in the order above:
    [P_0 … P_{L−2}, Q_0 … Q_{L−2}, K₁_0 … K₁_{L−1}, K₂_0 … K₂_{L−1},
    den_0 … den_{L−1}] — 5L − 2 tensors, whose shapes ``tensor_shapes`` gives from
    the block sizes alone, so the optimizer can create one variable per tensor
    before any statistics exist (initialised from ``identity(...).to_tensors()``)
    and rebuild the inverse with ``from_tensors(variables)``.
    """

    input_links: list[tf.Tensor]
    output_links: list[tf.Tensor]
    input_bases: list[tf.Tensor]
    output_bases: list[tf.Tensor]
    denominators: list[tf.Tensor]

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks of the chain."""
        return len(self.denominators)

    def to_tensors(self) -> list[tf.Tensor]:
        """The 5L − 2 tensors, in the order documented on the class.

        Returns:
            A list of float32 tensors, of the shapes ``tensor_shapes`` gives.
        """
        return [t for field in _FIELDS for t in getattr(self, field)]

    @classmethod
    def from_tensors(cls, tensors: list) -> TridiagonalInverse:
        """Inverse of ``to_tensors`` (accepts variables; L is inferred from the count).

        Args:
            tensors: 5L − 2 tensors or variables, for some L ≥ 1.

        Returns:
            The ``TridiagonalInverse`` they represent.
        """
        tensors = list(tensors)
        if len(tensors) < 3 or (len(tensors) + 2) % 5:
            raise ValueError(f"Expected 5L − 2 tensors for a chain of L ≥ 1 blocks; got {len(tensors)}.")
        num_blocks = (len(tensors) + 2) // 5
        sizes = [num_blocks - 1] * 2 + [num_blocks] * 3
        parts, start = [], 0
        for size in sizes:
            parts.append([tf.convert_to_tensor(t) for t in tensors[start : start + size]])
            start += size
        return cls(*parts)

    @staticmethod
    def tensor_shapes(input_dims: list[int], output_dims: list[int]) -> list[tuple[int, int]]:
        """Shapes of ``to_tensors()`` for blocks of sizes (n_i, d_i).

        Args:
            input_dims: n_i, the rows of each block's W̄ (inputs plus the homogeneous 1).
            output_dims: d_i, the outputs of each block.

        Returns:
            The 5L − 2 shapes, as (rows, columns) pairs.
        """
        _check_lengths(input_dims, output_dims)
        pairs = zip(input_dims[:-1], input_dims[1:])
        out_pairs = zip(output_dims[:-1], output_dims[1:])
        return (
            [(n, m) for n, m in pairs]
            + [(d, e) for d, e in out_pairs]
            + [(n, n) for n in input_dims]
            + [(d, d) for d in output_dims]
            + [(n, d) for n, d in zip(input_dims, output_dims)]
        )

    @classmethod
    def identity(cls, input_dims: list[int], output_dims: list[int]) -> TridiagonalInverse:
        """F̂⁻¹ = I: zero links, identity bases, unit denominators (an initial value).

        Args:
            input_dims: n_i, the rows of each block's W̄ (inputs plus the homogeneous 1).
            output_dims: d_i, the outputs of each block.

        Returns:
            The identity ``TridiagonalInverse``.
        """
        _check_lengths(input_dims, output_dims)
        links_a = [tf.zeros((n, m)) for n, m in zip(input_dims[:-1], input_dims[1:])]
        links_g = [tf.zeros((d, e)) for d, e in zip(output_dims[:-1], output_dims[1:])]
        return cls(
            links_a,
            links_g,
            [tf.eye(n) for n in input_dims],
            [tf.eye(d) for d in output_dims],
            [tf.ones((n, d)) for n, d in zip(input_dims, output_dims)],
        )


def _check_lengths(input_dims: list, output_dims: list) -> None:
    if not input_dims or len(input_dims) != len(output_dims):
        raise ValueError(
            "Need one input and one output size per block (at least one block); got "
            f"{len(input_dims)} and {len(output_dims)}."
        )


def _symmetric(matrix: tf.Tensor) -> tf.Tensor:
    return 0.5 * (matrix + tf.transpose(matrix))


def damped_inverse_root(cov: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
    """R with R Rᵀ = (cov + damping·I)⁻¹: R = U diag(λ^{-1/2}) from ``eigh`` [KFAC App. B].

    The eigenvalues are clipped at a tiny positive floor (1e-7 of the largest),
    so a rank-deficient undamped factor gives a large but finite root.

    Args:
        cov: a factor, Ā or G, shape (n, n); symmetrised first.
        damping: the damping added to its diagonal, e.g. πγ or γ/π.

    Returns:
        R, a float32 (n, n) matrix.
    """
    cov = tf.cast(cov, tf.float32)
    dim = tf.shape(cov)[0]
    damped = _symmetric(cov) + tf.cast(damping, tf.float32) * tf.eye(dim)
    values, vectors = tf.linalg.eigh(damped)
    floor = tf.maximum(_RELATIVE_EIGENVALUE_FLOOR * tf.reduce_max(tf.abs(values)), _ABSOLUTE_EIGENVALUE_FLOOR)
    return vectors * tf.math.rsqrt(tf.maximum(values, floor))[tf.newaxis, :]


def _whitened_basis(root: tf.Tensor, whitened: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(K = R E, s) from Rᵀ C R = E diag(s) Eᵀ (``whitened`` = Rᵀ C R)."""
    values, vectors = tf.linalg.eigh(_symmetric(whitened))
    return tf.matmul(root, vectors), values


def _denominators(input_values: tf.Tensor, output_values: tf.Tensor) -> tf.Tensor:
    """max(1 − s₁ s₂ᵀ, 1e-6): positive in exact arithmetic; clipped against round-off."""
    products = input_values[:, tf.newaxis] * output_values[tf.newaxis, :]
    return tf.maximum(1.0 - products, _MIN_DENOMINATOR)


def kronecker_difference_inverse(
    input_root: tf.Tensor, output_root: tf.Tensor, c: tf.Tensor, d: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(K₁, K₂, denominators) representing (Â ⊗ Ĝ − C ⊗ D)⁻¹ [KFAC App. B].

    Args:
        input_root: R_A with R_A R_Aᵀ = Â⁻¹ (see ``damped_inverse_root``), (n, n).
        output_root: R_G with R_G R_Gᵀ = Ĝ⁻¹, (d, d).
        c: symmetric positive semi-definite (n, n).
        d: symmetric positive semi-definite (d, d).

    Returns:
        (K₁ (n, n), K₂ (d, d), denominators max(1 − s₁ s₂ᵀ, 1e-6) (n, d)), to
        use with ``apply_kronecker_difference_inverse``.
    """
    c = tf.cast(c, tf.float32)
    d = tf.cast(d, tf.float32)
    k1, s1 = _whitened_basis(input_root, _congruence(input_root, c))
    k2, s2 = _whitened_basis(output_root, _congruence(output_root, d))
    return k1, k2, _denominators(s1, s2)


def _congruence(root: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Rᵀ M R."""
    return tf.matmul(root, tf.matmul(matrix, root), transpose_a=True)


def apply_kronecker_difference_inverse(
    input_basis: tf.Tensor, output_basis: tf.Tensor, denominators: tf.Tensor, x: tf.Tensor
) -> tf.Tensor:
    """vec⁻¹ of Σ⁻¹ vec(X) = K₁ [(K₁ᵀ X K₂) ⊘ denominators] K₂ᵀ [KFAC App. B].

    Args:
        input_basis: K₁, (n, n).
        output_basis: K₂, (d, d).
        denominators: (n, d), from ``kronecker_difference_inverse``.
        x: X, (n, d), or (..., n, d) for several matrices at once.

    Returns:
        Σ⁻¹ applied to X, shaped like ``x``.
    """
    rotated = tf.matmul(tf.matmul(input_basis, x, transpose_a=True), output_basis)
    return tf.matmul(tf.matmul(input_basis, rotated / denominators), output_basis, transpose_b=True)


def tridiagonal_inverse(
    input_covs: list[tf.Tensor],
    output_covs: list[tf.Tensor],
    input_cross: list[tf.Tensor],
    output_cross: list[tf.Tensor],
    pis: list[tf.Tensor],
    gamma: tf.Tensor,
) -> TridiagonalInverse:
    """Factors of the block-tridiagonal F̂⁻¹ = Ξᵀ Λ Ξ [KFAC §4.3, App. B].

    Args:
        input_covs: Ā_i, (n_i, n_i), for the L blocks of the chain, in order.
        output_covs: G_i, (d_i, d_i).
        input_cross: Ā_{i,i+1} = E[ā_i ā_{i+1}ᵀ], (n_i, n_{i+1}), i = 0 … L−2.
        output_cross: G_{i,i+1} = E[g_i g_{i+1}ᵀ], (d_i, d_{i+1}), i = 0 … L−2.
        pis: π_i of the factored Tikhonov damping, one per block.
        gamma: γ; the diagonal factors become Ā_i + π_i γ I and G_i + (γ/π_i) I
            (the cross statistics are not damped, as in [KFAC §6.3]).

    Costs one symmetric eigendecomposition per damped factor, plus one per factor
    of each link (its whitened Schur-complement term C_i or D_i) [KFAC App. B].

    Returns:
        The ``TridiagonalInverse`` of the chain.
    """
    num_blocks = len(input_covs)
    if num_blocks < 1 or len(output_covs) != num_blocks or len(pis) != num_blocks:
        raise ValueError(
            "Need as many input factors, output factors and π as blocks (≥ 1); got "
            f"{len(input_covs)}, {len(output_covs)}, {len(pis)}."
        )
    if len(input_cross) != num_blocks - 1 or len(output_cross) != num_blocks - 1:
        raise ValueError(
            f"A chain of {num_blocks} blocks has {num_blocks - 1} links; got "
            f"{len(input_cross)} input and {len(output_cross)} output cross statistics."
        )
    gamma = tf.cast(gamma, tf.float32)
    pis = [tf.cast(pi, tf.float32) for pi in pis]
    roots_a = [damped_inverse_root(a, pi * gamma) for a, pi in zip(input_covs, pis)]
    roots_g = [damped_inverse_root(g, gamma / pi) for g, pi in zip(output_covs, pis)]

    input_links, output_links, input_bases, output_bases, denominators = [], [], [], [], []
    for i in range(num_blocks - 1):
        p, k1, s1 = _link(roots_a[i], roots_a[i + 1], input_cross[i])
        q, k2, s2 = _link(roots_g[i], roots_g[i + 1], output_cross[i])
        input_links.append(p)
        output_links.append(q)
        input_bases.append(k1)
        output_bases.append(k2)
        denominators.append(_denominators(s1, s2))
    # Σ_{L−1} = Â ⊗ Ĝ: s₁ = s₂ = 0.
    input_bases.append(roots_a[-1])
    output_bases.append(roots_g[-1])
    denominators.append(tf.ones([tf.shape(roots_a[-1])[0], tf.shape(roots_g[-1])[0]]))
    return TridiagonalInverse(input_links, output_links, input_bases, output_bases, denominators)


def _link(root: tf.Tensor, next_root: tf.Tensor, cross: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """For one factor of a link: (X M̂_{i+1}⁻¹, K, s) with Rᵀ X M̂_{i+1}⁻¹ Xᵀ R = E diag(s) Eᵀ.

    ``X`` is the cross statistic, M̂ the damped factor (Â or Ĝ) and R, R' the roots
    of blocks i and i+1. With B = Rᵀ X R', the whitened C is B Bᵀ — positive
    semi-definite by construction — and the link is (X R') R'ᵀ.
    """
    cross = tf.cast(cross, tf.float32)
    cross_root = tf.matmul(cross, next_root)
    link = tf.matmul(cross_root, next_root, transpose_b=True)
    whitened_cross = tf.matmul(root, cross_root, transpose_a=True)
    whitened = tf.matmul(whitened_cross, whitened_cross, transpose_b=True)
    basis, values = _whitened_basis(root, whitened)
    return link, basis, values


def apply_tridiagonal_inverse(inverse: TridiagonalInverse, gradients: list[tf.Tensor]) -> list[tf.Tensor]:
    """F̂⁻¹ applied to the chain's gradients, blockwise: Ξᵀ Λ Ξ vec(V) [KFAC §4.3].

    In matrix form, with Ψ_{i,i+1} = P_i ⊗ Q_i:

        U_i = V_i − P_i V_{i+1} Q_iᵀ (U_{L−1} = V_{L−1}),   W_i = Σ_i⁻¹ U_i,
        R_0 = W_0,   R_i = W_i − P_{i−1}ᵀ W_{i−1} Q_{i−1}.

    Args:
        inverse: the factors of F̂⁻¹.
        gradients: V_i = ∇W̄_i of shape (n_i, d_i), one per block.

    Returns:
        The matrices R_i, float32, of the same shapes.
    """
    num_blocks = inverse.num_blocks
    if len(gradients) != num_blocks:
        raise ValueError(f"Expected {num_blocks} gradient matrices; got {len(gradients)}.")
    v = [tf.cast(g, tf.float32) for g in gradients]
    u = [
        v[i] - _kron_apply(inverse.input_links[i], inverse.output_links[i], v[i + 1]) for i in range(num_blocks - 1)
    ] + [v[-1]]
    w = [
        apply_kronecker_difference_inverse(
            inverse.input_bases[i], inverse.output_bases[i], inverse.denominators[i], u[i]
        )
        for i in range(num_blocks)
    ]
    p, q = inverse.input_links, inverse.output_links
    return [w[0]] + [w[i] - _kron_transpose_apply(p[i - 1], q[i - 1], w[i - 1]) for i in range(1, num_blocks)]


def _kron_apply(p: tf.Tensor, q: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """vec⁻¹ of (P ⊗ Q) vec(X) = P X Qᵀ (row-major vec)."""
    return tf.matmul(tf.matmul(p, x), q, transpose_b=True)


def _kron_transpose_apply(p: tf.Tensor, q: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """vec⁻¹ of (P ⊗ Q)ᵀ vec(X) = Pᵀ X Q (row-major vec)."""
    return tf.matmul(tf.matmul(p, x, transpose_a=True), q)


def chain_cross_statistics(
    input_rows: list[tf.Tensor], output_rows: list[tf.Tensor], batch_size, input_weights: tf.Tensor | None = None
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Batch estimates of Ā_{i,i+1} and G_{i,i+1} for consecutive blocks [KFAC §4.3].

    Args:
        input_rows: block i's rows ā_i (homogeneous 1 included), (N, n_i).
        output_rows: block i's back-propagated rows g_i, (M, d_i).
        batch_size: B.
        input_weights: the examples' weights w (N,), or ``None`` for equal weights.

    Rows must be aligned across blocks (row r of every block comes from the same
    example and, for output rows, the same sampled vector) — one row per example
    for a chain of Dense layers. The normalisations are those of the diagonal
    factors: Ā_{i,i+1} = Σ ā_i ā_{i+1}ᵀ / N (number of rows), or Σ w ā_i ā_{i+1}ᵀ / Σ w
    with weights, and G_{i,i+1} = Σ g_i g_{i+1}ᵀ / B.

    Returns:
        (input_cross, output_cross), each a list of L − 1 matrices.
    """
    if len(input_rows) != len(output_rows):
        raise ValueError(f"Got input rows for {len(input_rows)} blocks but output rows for {len(output_rows)}.")
    input_rows = [tf.cast(r, tf.float32) for r in input_rows]
    output_rows = [tf.cast(r, tf.float32) for r in output_rows]
    for rows in (input_rows, output_rows):
        counts = [r.shape[0] for r in rows]
        if len({c for c in counts if c is not None}) > 1:
            raise ValueError(f"Rows of consecutive blocks are not aligned: row counts {counts}.")
    input_cross, output_cross = [], []
    for i in range(len(input_rows) - 1):
        if input_weights is None:
            input_cross.append(curvature.cross_moment(input_rows[i], input_rows[i + 1], tf.shape(input_rows[i])[0]))
        else:
            input_cross.append(curvature.weighted_cross_moment(input_rows[i], input_rows[i + 1], input_weights))
        output_cross.append(curvature.cross_moment(output_rows[i], output_rows[i + 1], batch_size))
    return input_cross, output_cross
