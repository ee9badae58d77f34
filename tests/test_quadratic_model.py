"""The quadratic model's α/μ solve, the LM rule and their float64 references [KFAC §6.5, §7]."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_kfac import quadratic_model


def _spd(n, rng, condition=50.0):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T


def _solve(c, b, has_previous):
    coefficients, change = quadratic_model.solve_coefficients(
        tf.constant(c, tf.float32), tf.constant(b, tf.float32), tf.constant(has_previous)
    )
    return coefficients.numpy().astype(np.float64), float(change)


def test_two_by_two_solve_matches_numpy_and_first_step_is_one_by_one():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(2, 2))
    c = m @ m.T + np.eye(2)
    b = rng.normal(size=2)
    coefficients, change = _solve(c, b, True)
    expected = -np.linalg.solve(c, b)
    np.testing.assert_allclose(coefficients, expected, rtol=1e-5)
    np.testing.assert_allclose(change, 0.5 * expected @ c @ expected + b @ expected, rtol=1e-5)
    coefficients, change = _solve(c, b, False)
    np.testing.assert_allclose(coefficients, [-b[0] / c[0, 0], 0.0], rtol=1e-6)
    np.testing.assert_allclose(change, -0.5 * b[0] ** 2 / c[0, 0], rtol=1e-5)


def _box_minimum_by_active_sets(c, b, alpha_top, mu_low, mu_top):
    """min ½xᵀCx + bᵀx over 0 ≤ α ≤ alpha_top, mu_low ≤ μ ≤ mu_top in float64, by trying every active set."""
    bounds = [(0.0, alpha_top), (mu_low, mu_top)]
    candidates = [np.linalg.solve(c, -b)]
    for index in (0, 1):  # one coordinate held at a finite bound, the other free
        for value in (v for v in bounds[index] if np.isfinite(v)):
            free = 1 - index
            x = np.zeros(2)
            x[index] = value
            x[free] = -(b[free] + c[free, index] * value) / c[free, free]
            candidates.append(x)
    candidates += [np.array([a, m]) for a in bounds[0] for m in bounds[1] if np.isfinite(a) and np.isfinite(m)]
    feasible = [x for x in candidates if all(lo - 1e-12 <= v <= hi + 1e-12 for v, (lo, hi) in zip(x, bounds))]
    return min(feasible, key=lambda x: 0.5 * x @ c @ x + b @ x)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_alpha, max_momentum", [(None, 1.0), (0.3, 1.0), (0.3, None)])
def test_bounded_solve_is_the_box_minimum(seed, max_alpha, max_momentum):
    """With max_momentum and/or max_alpha the minimiser is over 0 ≤ α ≤ max_alpha, 0 ≤ μ ≤ max_momentum
    (μ free without max_momentum)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(2, 2))
    c = m @ m.T + 0.1 * np.eye(2)
    b = 3.0 * rng.normal(size=2)
    bound = None if max_alpha is None else tf.constant(max_alpha, tf.float32)
    alpha_top = np.inf if max_alpha is None else max_alpha
    mu_low, mu_top = (-np.inf, np.inf) if max_momentum is None else (0.0, max_momentum)
    coefficients, change = quadratic_model.solve_coefficients(
        tf.constant(c, tf.float32), tf.constant(b, tf.float32), tf.constant(True), max_momentum, bound
    )
    expected = _box_minimum_by_active_sets(c, b, alpha_top, mu_low, mu_top)
    np.testing.assert_allclose(coefficients.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(change), 0.5 * expected @ c @ expected + b @ expected, rtol=1e-4, atol=1e-6)
    # Without a previous update μ = 0, α = −b₀/C₀₀ clipped to [0, max_alpha].
    coefficients, _ = quadratic_model.solve_coefficients(
        tf.constant(c, tf.float32), tf.constant(b, tf.float32), tf.constant(False), max_momentum, bound
    )
    np.testing.assert_allclose(
        coefficients.numpy(), [np.clip(-b[0] / c[0, 0], 0.0, alpha_top), 0.0], rtol=1e-5, atol=1e-7
    )


def test_numerically_parallel_directions_fall_back_to_the_one_by_one_solve():
    """Δ ∥ δ₀ makes C singular up to rounding: μ = 0 and α from the 1×1 model, not noise."""
    rng = np.random.default_rng(3)
    metric = _spd(4, rng)
    delta = rng.normal(size=4)
    previous = -0.3 * delta + 1e-4 * rng.normal(size=4)  # 1 − cos² ≈ 1e-6
    directions = np.stack([delta, previous])
    c = directions @ metric @ directions.T
    gradient = rng.normal(size=4)
    b = directions @ gradient
    coefficients, change = _solve(c, b, True)
    np.testing.assert_allclose(coefficients, [-b[0] / c[0, 0], 0.0], rtol=1e-5)
    np.testing.assert_allclose(change, -0.5 * b[0] ** 2 / c[0, 0], rtol=1e-5)
    # Clearly independent directions still get the 2×2 solution.
    previous = rng.normal(size=4)
    directions = np.stack([delta, previous])
    c = directions @ metric @ directions.T
    b = directions @ gradient
    coefficients, _ = _solve(c, b, True)
    np.testing.assert_allclose(coefficients, -np.linalg.solve(c, b), rtol=1e-4)


def test_momentum_scheme_reproduces_preconditioned_cg_on_a_fixed_quadratic():
    """δ = αΔ + μδ₀ with (α, μ) minimising the exact model is PCG [KFAC §7]."""
    rng = np.random.default_rng(1)
    n = 6
    a = _spd(n, rng)
    b = rng.normal(size=n)
    p = _spd(n, rng, condition=5.0)  # a fixed SPD preconditioner F̆
    p_inv = np.linalg.inv(p)

    # Reference: textbook PCG for a x = −b from x₀ = 0, float64.
    x = np.zeros(n)
    r = -b - a @ x
    z = p_inv @ r
    d = z.copy()
    pcg = []
    for _ in range(4):
        step = (r @ z) / (d @ a @ d)
        x = x + step * d
        r_new = r - step * a @ d
        z_new = p_inv @ r_new
        d = z_new + (r_new @ z_new) / (r @ z) * d
        r, z = r_new, z_new
        pcg.append(x.copy())

    theta, previous = np.zeros(n), np.zeros(n)
    for k in range(4):
        grad = a @ theta + b
        delta = -p_inv @ grad
        c = np.array([[delta @ a @ delta, delta @ a @ previous], [previous @ a @ delta, previous @ a @ previous]])
        coefficients, _ = _solve(c, np.array([grad @ delta, grad @ previous]), k > 0)
        previous = coefficients[0] * delta + coefficients[1] * previous
        theta = theta + previous
        np.testing.assert_allclose(theta, pcg[k], rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("rho, direction", [(0.9, "down"), (0.5, "same"), (0.1, "up"), (float("nan"), "up")])
def test_levenberg_marquardt_moves_damping_the_right_way(rho, direction):
    omega = (19 / 20) ** 5
    new = float(quadratic_model.levenberg_marquardt(tf.constant(2.0), tf.constant(rho), omega, 1e-8))
    expected = {"down": 2.0 * omega, "same": 2.0, "up": 2.0 / omega}[direction]
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    floor = float(quadratic_model.levenberg_marquardt(tf.constant(1e-8), tf.constant(0.9), omega, 1e-6))
    assert floor == pytest.approx(1e-6)


def test_reduction_ratio():
    assert float(quadratic_model.reduction_ratio(tf.constant(-0.5), tf.constant(-1.0))) == pytest.approx(0.5)


def _explicit_mlp_fisher_and_gradient(params, x, y):
    """Float64 F = Σ_n J_nᵀ H̃_n J_n and ∇h for z = [tanh(x̄W̄1), 1]W̄2 under Keras's MSE."""
    (k1, b1), (k2, b2) = params
    w1 = np.concatenate([k1, b1[None]], 0)
    w2 = np.concatenate([k2, b2[None]], 0)
    batch, outputs = len(x), k2.shape[1]
    hessian = 2.0 / (batch * outputs)
    fisher = 0.0
    grad = 0.0
    for xn, yn in zip(x, y):
        a0 = np.append(xn, 1.0)
        a1 = np.tanh(a0 @ w1)
        a1b = np.append(a1, 1.0)
        z = a1b @ w2
        jac1 = np.einsum("i,j,jk->kij", a0, 1 - a1**2, k2).reshape(outputs, -1)
        jac2 = np.einsum("i,jk->kij", a1b, np.eye(outputs)).reshape(outputs, -1)
        jac = np.concatenate([jac1, jac2], 1)
        fisher = fisher + hessian * jac.T @ jac
        grad = grad + hessian * jac.T @ (z - yn)
    return fisher, grad


def _block_inverse_step(block, grad_matrix, gamma):
    return np.linalg.solve(_block_kronecker(block, gamma), grad_matrix.reshape(-1))


def _block_kronecker(block, gamma):
    """The damped block Ā ⊗ G with factored Tikhonov damping, explicitly (float64)."""
    a = block.input_factor.cov.numpy().astype(np.float64)
    g = block.output_factor.cov.numpy().astype(np.float64)
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    return np.kron(a + pi * gamma * np.eye(len(a)), g + gamma / pi * np.eye(len(g)))


def _flat(ws):
    """The two Dense layers' weights as one vector, W̄ = [kernel; bias] row-stacked per layer."""
    return np.concatenate(
        [np.concatenate([ws[0], ws[1][None]], 0).ravel(), np.concatenate([ws[2], ws[3][None]], 0).ravel()]
    )


def _two_quadratic_model_steps(seed, **kfac_kwargs):
    """Two steps of K-FAC with the quadratic model on a 3-4-2 tanh MLP under MSE.

    Returns:
        (the optimizer, x, y, the float64 weights before, between and after the steps).
    """
    import keras

    import keras_kfac

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.normal(size=(24, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(model=model, use_quadratic_model=True, estimation_mode="exact", **kfac_kwargs)
    model.compile(optimizer=opt, loss="mse")
    weights = [[w.numpy().astype(np.float64) for w in model.trainable_weights]]
    for _ in range(2):
        model.train_on_batch(x, y)
        weights.append([w.numpy().astype(np.float64) for w in model.trainable_weights])
    return opt, x, y, *weights


@pytest.mark.parametrize("norm_constraint", [math.inf, 1e-5])
def test_alpha_mu_match_the_explicit_fisher_quadratic_model(norm_constraint):
    """(α, μ) minimise the exact-Fisher model; with a trust region C, over 0 ≤ α ≤ sqrt(C / ΔᵀF̆Δ)."""
    damping = 0.05
    opt, x, y, weights_0, weights_1, weights_2 = _two_quadratic_model_steps(
        3, damping=damping, norm_constraint=norm_constraint
    )
    previous = _flat(weights_1) - _flat(weights_0)
    fisher, grad = _explicit_mlp_fisher_and_gradient(
        [(weights_1[0], weights_1[1]), (weights_1[2], weights_1[3])], x.astype(np.float64), y.astype(np.float64)
    )
    sizes = [4 * 4, 5 * 2]
    gamma = np.sqrt(damping)
    delta = -np.concatenate(
        [
            _block_inverse_step(block, part.reshape(block.input_dim, block.output_dim), gamma)
            for block, part in zip(opt.blocks, np.split(grad, np.cumsum(sizes)[:-1]))
        ]
    )
    directions = [delta, previous]
    c = np.array([[u @ fisher @ v + damping * u @ v for v in directions] for u in directions])
    b = np.array([grad @ d for d in directions])
    parts = np.split(delta, np.cumsum(sizes)[:-1])
    # ΔᵀF̆Δ with F̆ the block-diagonal of explicit damped Kronecker products (rows of W̄ stacked).
    quadratic = sum(d @ _block_kronecker(block, gamma) @ d for block, d in zip(opt.blocks, parts))
    alpha_top = np.sqrt(norm_constraint / quadratic)
    expected = _box_minimum_by_active_sets(c, b, alpha_top, 0.0, 1.0)
    if math.isfinite(norm_constraint):  # the bound binds here, so the test sees it
        assert expected[0] == pytest.approx(alpha_top) and alpha_top < -np.linalg.solve(c, b)[0]
    np.testing.assert_allclose([float(opt.alpha.numpy()), float(opt.mu.numpy())], expected, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(
        _flat(weights_2) - _flat(weights_1), expected[0] * delta + expected[1] * previous, rtol=2e-3, atol=1e-6
    )
    np.testing.assert_allclose(
        float(opt.quadratic_change.numpy()), 0.5 * expected @ c @ expected + b @ expected, rtol=2e-3
    )


def test_fisher_products_equal_the_explicit_quadratic_form():
    """(JΔ)ᵀH̃(JΔ) from the double-backward product equals ΔᵀFΔ with F built explicitly."""
    import keras

    from keras_kfac import losses

    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    directions = [[rng.normal(size=w.shape).astype("float32") for w in model.trainable_weights] for _ in range(2)]
    loss = losses.resolve_loss("mean_squared_error")
    variables = [w.value for w in model.trainable_weights]

    @tf.function
    def gram():
        z = model(x)
        products = quadratic_model.jacobian_vector_products(z, variables, directions)
        return quadratic_model.fisher_gram(loss, z, products, None)

    ws = [w.numpy().astype(np.float64) for w in model.trainable_weights]
    fisher, _ = _explicit_mlp_fisher_and_gradient(
        [(ws[0], ws[1]), (ws[2], ws[3])], x.astype(np.float64), np.zeros((10, 2))
    )
    flat = [
        np.concatenate([np.concatenate([d[0], d[1][None]], 0).ravel(), np.concatenate([d[2], d[3][None]], 0).ravel()])
        for d in directions
    ]
    expected = np.array([[u @ fisher @ v for v in flat] for u in flat])
    np.testing.assert_allclose(gram().numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("damping", [0.05, 5.0])
def test_gamma_search_keeps_the_candidate_with_the_lowest_explicit_model_value(damping):
    """γ, ω₂γ, γ/ω₂ [KFAC §6.6]: each candidate's (α, μ) minimise the exact-Fisher model of its own Δ;
    the γ kept is the one whose minimum is lowest, and the step is taken with it."""
    opt, x, y, weights_0, weights_1, weights_2 = _two_quadratic_model_steps(
        5,
        adapt_gamma=True,
        gamma_adaptation_period=1,
        inverse_update_period=1,
        damping=damping,
        norm_constraint=math.inf,
    )  # the first search is on the second step: K-FAC's step count 1 is a multiple of T₂ = 1
    previous = _flat(weights_1) - _flat(weights_0)
    fisher, grad = _explicit_mlp_fisher_and_gradient(
        [(weights_1[0], weights_1[1]), (weights_1[2], weights_1[3])], x.astype(np.float64), y.astype(np.float64)
    )
    split = np.cumsum([4 * 4, 5 * 2])[:-1]
    omega = np.sqrt(19 / 20)
    gamma = np.sqrt(damping)
    minima = []
    for candidate in (gamma, gamma * omega, gamma / omega):
        delta = -np.concatenate(
            [
                _block_inverse_step(block, part.reshape(block.input_dim, block.output_dim), candidate)
                for block, part in zip(opt.blocks, np.split(grad, split))
            ]
        )
        directions = [delta, previous]
        c = np.array([[u @ fisher @ v + damping * u @ v for v in directions] for u in directions])
        b = np.array([grad @ d for d in directions])
        coefficients = _box_minimum_by_active_sets(c, b, np.inf, 0.0, 1.0)
        minima.append((0.5 * coefficients @ c @ coefficients + b @ coefficients, candidate, coefficients, delta))
    value, chosen, coefficients, delta = min(minima, key=lambda m: m[0])
    assert sorted(m[0] for m in minima)[1] - value > 2e-5 * abs(value)  # the choice is not a tie
    assert float(opt.gamma.numpy()) == pytest.approx(chosen, rel=1e-5)
    np.testing.assert_allclose([float(opt.alpha.numpy()), float(opt.mu.numpy())], coefficients, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(
        _flat(weights_2) - _flat(weights_1), coefficients[0] * delta + coefficients[1] * previous, rtol=2e-3, atol=1e-6
    )
    np.testing.assert_allclose(float(opt.quadratic_change.numpy()), value, rtol=2e-3)
