"""The exact-Fisher quadratic model: step size, momentum and reduction ratio.

K-FAC chooses the final update ``δ = αΔ + μδ₀`` — Δ the preconditioned proposal,
δ₀ the previous update — by minimising the local quadratic model [KFAC §7]

    M(δ) = ½ δᵀ (F + (λ + η) I) δ + ∇hᵀ δ

with F the EXACT Fisher (generalised Gauss-Newton) of the mini-batch, not its
Kronecker approximation. F enters only through products ``(J u)ᵀ H (J v)``
(J the Jacobian of the network output z in the parameters, H the loss Hessian in
z), and ``J v`` is a forward-mode product computed here by differentiating a
reverse-mode product [KFAC §7; Pearlmutter 1994]. The same model gives the
reduction ratio ρ of the Levenberg–Marquardt rule [KFAC §6.5].
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac.losses import RegisteredLoss

# The 2×2 system is solved only when 1 − cos²(Δ, δ₀), measured in the metric C,
# exceeds this: below it the determinant is float32 rounding noise (Δ and δ₀
# nearly parallel, as on the second step when the gradient barely changed) and
# the "solution" is an arbitrarily large α, μ pair of opposite signs.
MIN_RELATIVE_DETERMINANT = 1e-5


def jacobian_vector_products(z: tf.Tensor, variables: list, directions: list[list[tf.Tensor]]) -> list[tf.Tensor]:
    """``J d`` for each direction d (one tensor per variable), shaped like z.

    ``u ↦ Jᵀu`` is linear in u, so ``J d = ∂⟨Jᵀu, d⟩/∂u``: two reverse-mode
    passes instead of a forward-mode one, which reuses the recorded graph.

    Args:
        z: the network output, computed from ``variables`` in the current graph.
        variables: the parameters J differentiates z in.
        directions: the directions d, each a list of one tensor per variable.

    Returns:
        One ``J d`` per direction, each shaped like z.
    """
    u = tf.zeros_like(z)
    transposed = tf.gradients(z, variables, grad_ys=u)
    # An embedding's gradient is sparse (IndexedSlices): made dense, it is a
    # tensor that the second pass can differentiate in u.
    transposed = [tf.zeros_like(v) if t is None else tf.convert_to_tensor(t) for t, v in zip(transposed, variables)]
    products = []
    for direction in directions:
        (product,) = tf.gradients(transposed, u, grad_ys=[tf.cast(d, t.dtype) for d, t in zip(direction, transposed)])
        products.append(tf.zeros_like(z) if product is None else product)
    return products


def fisher_gram(loss: RegisteredLoss, z: tf.Tensor, products: list[tf.Tensor], sample_weight) -> tf.Tensor:
    """The matrix ``[d_iᵀ F d_j]`` from the products ``J d_i`` (float32).

    F is the exact Fisher of the loss as Keras reduces it (``reduced_hessian_product``).

    Args:
        loss: the registered loss, whose Hessian in z gives F.
        z: the network output.
        products: ``J d_i`` for each direction, shaped like z.
        sample_weight: the weights of z's values, or None.

    Returns:
        A float32 matrix of shape (k, k) for k directions.
    """
    z = tf.cast(z, tf.float32)
    products = [tf.cast(p, tf.float32) for p in products]
    hessian_products = [loss.reduced_hessian_product(z, p, sample_weight) for p in products]
    return tf.stack([tf.stack([tf.reduce_sum(p * hp) for hp in hessian_products]) for p in products])


def dot_gram(directions: list[list[tf.Tensor]]) -> tf.Tensor:
    """The matrix ``[d_iᵀ d_j]`` (float32).

    Args:
        directions: k directions, each a list of one tensor per variable.

    Returns:
        A float32 matrix of shape (k, k).
    """
    return tf.stack([tf.stack([inner(a, b) for b in directions]) for a in directions])


def inner(a: list[tf.Tensor], b: list[tf.Tensor]) -> tf.Tensor:
    """Σ over variables of ⟨a, b⟩ (float32).

    Args:
        a: one tensor per variable.
        b: one tensor per variable, shaped like those of ``a``.

    Returns:
        A float32 scalar (0 for empty lists).
    """
    return tf.add_n(
        [tf.reduce_sum(tf.cast(x, tf.float32) * tf.cast(y, tf.float32)) for x, y in zip(a, b)] or [tf.constant(0.0)]
    )


def solve_coefficients(
    curvature: tf.Tensor,
    linear: tf.Tensor,
    has_previous: tf.Tensor,
    max_momentum: float | None = None,
    max_alpha: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Minimiser x = (α, μ) of ``M(x) = ½ xᵀ C x + bᵀ x``, and its value M.

    ``curvature`` is the 2×2 matrix C = [d_iᵀ (F + (λ+η)I) d_j] for d = (Δ, δ₀)
    and ``linear`` is b = [∇hᵀΔ, ∇hᵀδ₀] [KFAC §7]. Without a previous update
    (first step, or δ₀ = 0), or when Δ and δ₀ are numerically parallel
    (``MIN_RELATIVE_DETERMINANT``), the problem is 1×1 in α and μ = 0.
    With ``max_momentum`` or ``max_alpha`` the minimum is taken over the box
    0 ≤ α ≤ max_alpha, 0 ≤ μ ≤ max_momentum (μ free without
    ``max_momentum``): M is convex, so it is the lowest value among the
    unconstrained minimiser (when it lies in the box) and the minimisers on
    the box's edges.

    Args:
        curvature: C, a float32 (2, 2) matrix.
        linear: b, a float32 vector of length 2.
        has_previous: a scalar bool tensor, false without a previous update.
        max_momentum: the upper bound of μ in the box, or None.
        max_alpha: the upper bound of α in the box (a float32 scalar), or None.

    Returns:
        (x, M(x)): the coefficients (α, μ) as a float32 vector of length 2, and
        the model's value there.
    """
    tiny = tf.constant(1e-30, tf.float32)
    alpha_only = -linear[0] / tf.maximum(curvature[0, 0], tiny)
    determinant = curvature[0, 0] * curvature[1, 1] - curvature[0, 1] * curvature[1, 0]
    solvable = tf.logical_and(has_previous, determinant > MIN_RELATIVE_DETERMINANT * curvature[0, 0] * curvature[1, 1])
    safe_det = tf.where(solvable, determinant, 1.0)
    alpha_2 = -(curvature[1, 1] * linear[0] - curvature[0, 1] * linear[1]) / safe_det
    mu_2 = -(curvature[0, 0] * linear[1] - curvature[1, 0] * linear[0]) / safe_det
    coefficients = tf.where(solvable, tf.stack([alpha_2, mu_2]), tf.stack([alpha_only, tf.constant(0.0)]))
    if max_momentum is None and max_alpha is None:
        return coefficients, model_value(curvature, linear, coefficients)
    inf = tf.constant(float("inf"))
    alpha_top = inf if max_alpha is None else tf.cast(max_alpha, tf.float32)
    mu_low, mu_top = (-inf, inf) if max_momentum is None else (tf.constant(0.0), tf.constant(max_momentum, tf.float32))

    def best_alpha(mu: tf.Tensor) -> tf.Tensor:  # on the edge μ = mu
        alpha = -(linear[0] + mu * curvature[0, 1]) / tf.maximum(curvature[0, 0], tiny)
        return tf.clip_by_value(alpha, 0.0, alpha_top)

    def best_mu(alpha: tf.Tensor) -> tf.Tensor:  # on the edge α = alpha
        mu = -(linear[1] + alpha * curvature[1, 0]) / tf.maximum(curvature[1, 1], tiny)
        return tf.clip_by_value(mu, mu_low, mu_top)

    edges = [tf.stack([0.0, best_mu(tf.constant(0.0))])]
    if max_momentum is not None:
        edges += [tf.stack([best_alpha(mu_low), mu_low]), tf.stack([best_alpha(mu_top), mu_top])]
    if max_alpha is not None:
        edges.append(tf.stack([alpha_top, best_mu(alpha_top)]))
    # Without a previous update μ is 0: the only candidate is α on [0, max_alpha].
    alone = tf.stack([best_alpha(tf.constant(0.0)), 0.0])
    edges = tf.stack([tf.where(has_previous, e, alone) for e in edges] + [alone])
    values = tf.stack([model_value(curvature, linear, e) for e in tf.unstack(edges)])
    best = tf.gather(edges, tf.argmin(tf.where(tf.math.is_finite(values), values, inf)))
    inside = tf.logical_and(
        tf.logical_and(coefficients[0] >= 0.0, coefficients[0] <= alpha_top),
        tf.logical_and(coefficients[1] >= mu_low, coefficients[1] <= mu_top),
    )
    coefficients = tf.where(inside, coefficients, best)
    return coefficients, model_value(curvature, linear, coefficients)


def model_value(curvature: tf.Tensor, linear: tf.Tensor, coefficients: tf.Tensor) -> tf.Tensor:
    """M(δ) = ½ xᵀ C x + bᵀ x for δ = x₀ d₀ + x₁ d₁.

    Args:
        curvature: C, a (2, 2) matrix.
        linear: b, a vector of length 2.
        coefficients: x, a vector of length 2.

    Returns:
        M(δ) − M(0), a scalar.
    """
    return 0.5 * tf.tensordot(coefficients, tf.linalg.matvec(curvature, coefficients), 1) + tf.tensordot(
        linear, coefficients, 1
    )


def reduction_ratio(loss_change: tf.Tensor, predicted_change: tf.Tensor) -> tf.Tensor:
    """ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0)) [KFAC §6.5].

    Args:
        loss_change: h(θ+δ) − h(θ).
        predicted_change: M(δ) − M(0); values above −1e-30 are taken as −1e-30.

    Returns:
        ρ, a scalar.
    """
    return loss_change / tf.minimum(predicted_change, -1e-30)


def levenberg_marquardt(damping: tf.Tensor, rho: tf.Tensor, omega: float, min_damping: float | tf.Tensor) -> tf.Tensor:
    """λ ← ω₁λ if ρ > 3/4, λ/ω₁ if ρ < 1/4 (ω₁ < 1), else λ [KFAC §6.5]; at least ``min_damping``.

    A non-finite ρ counts as a bad step (λ/ω₁).

    Args:
        damping: the current λ.
        rho: the reduction ratio ρ.
        omega: ω₁ < 1.
        min_damping: the floor of λ.

    Returns:
        The new λ.
    """
    new = tf.where(rho > 0.75, damping * omega, tf.where(rho < 0.25, damping / omega, damping))
    # A non-finite ρ (a diverging step) counts as a bad one.
    new = tf.where(tf.math.is_finite(rho), new, damping / omega)
    return tf.maximum(new, min_damping)
