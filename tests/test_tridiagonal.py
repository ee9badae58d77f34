"""Block-tridiagonal inverse Fisher [KFAC §4.3, App. B] against dense float64 references.

The references form every Kronecker product explicitly (np.kron), build the dense
Ξ and Λ matrices and invert with np.linalg.inv; they share no code with
keras_kfac.tridiagonal.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_kfac import tridiagonal

# Layer widths of the chain 3 → 4 → 5 → 2: blocks (n_i, d_i) = (4, 4), (5, 5), (6, 2).
_WIDTHS = (3, 4, 5, 2)
# float32 computation against float64 references: relative error in the Frobenius
# norm. Observed errors are 1e-6 to 3e-6 (dense F̂⁻¹ condition numbers up to ~2e3
# for γ = 0.01); the bound leaves a 10× margin.
_RTOL = 3e-5


def _chain_samples(seed=0, widths=_WIDTHS, examples=256, noise=0.3):
    """Per-example rows (ā_i, g_i) of a tanh chain, correlated between layers.

    Forward: h_{i+1} = tanh(ā_i W̄_i + noise), ā_i = [h_i, 1]. Backward:
    g_i = (g_{i+1} W_{i+1}ᵀ) ⊙ tanh'(·) + noise, g_{L-1} random — so consecutive
    layers' rows are strongly (but not perfectly) correlated.
    """
    rng = np.random.default_rng(seed)
    layers = len(widths) - 1
    weights = [rng.normal(size=(widths[i] + 1, widths[i + 1])) / np.sqrt(widths[i]) for i in range(layers)]
    h = rng.normal(size=(examples, widths[0]))
    inputs, hidden = [], []
    for w in weights:
        a = np.concatenate([h, np.ones((examples, 1))], axis=1)
        inputs.append(a)
        h = np.tanh(a @ w + noise * rng.normal(size=(examples, w.shape[1])))
        hidden.append(h)
    outputs = [None] * layers
    outputs[-1] = rng.normal(size=(examples, widths[-1]))
    for i in range(layers - 2, -1, -1):
        back = outputs[i + 1] @ weights[i + 1][:-1].T
        outputs[i] = back * (1.0 - hidden[i] ** 2) + noise * rng.normal(size=back.shape)
    return inputs, outputs


def _statistics(inputs, outputs, batch_size=None):
    """Ā_i, G_i and the cross statistics, float64, from aligned rows."""
    n = inputs[0].shape[0]
    b = n if batch_size is None else batch_size
    a = [x.T @ x / n for x in inputs]
    g = [y.T @ y / b for y in outputs]
    a_cross = [inputs[i].T @ inputs[i + 1] / n for i in range(len(inputs) - 1)]
    g_cross = [outputs[i].T @ outputs[i + 1] / b for i in range(len(outputs) - 1)]
    return a, g, a_cross, g_cross


def _pis(a, g):
    return [np.sqrt((np.trace(x) / len(x)) / (np.trace(y) / len(y))) for x, y in zip(a, g)]


def _damped(a, g, pis, gamma):
    a_hat = [x + pi * gamma * np.eye(len(x)) for x, pi in zip(a, pis)]
    g_hat = [y + gamma / pi * np.eye(len(y)) for y, pi in zip(g, pis)]
    return a_hat, g_hat


def _dense_tridiagonal_inverse(a, g, a_cross, g_cross, pis, gamma):
    """Dense Ξᵀ Λ Ξ (float64), plus the dense F̃ blocks it is built from."""
    a_hat, g_hat = _damped(a, g, pis, gamma)
    diagonal = [np.kron(x, y) for x, y in zip(a_hat, g_hat)]
    off = [np.kron(x, y) for x, y in zip(a_cross, g_cross)]
    psi = [off[i] @ np.linalg.inv(diagonal[i + 1]) for i in range(len(off))]
    sigma = [diagonal[i] - psi[i] @ diagonal[i + 1] @ psi[i].T for i in range(len(off))]
    sigma.append(diagonal[-1])
    sizes = [len(f) for f in diagonal]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = starts[-1]
    xi = np.eye(total)
    lam = np.zeros((total, total))
    for i, s in enumerate(sigma):
        block = slice(starts[i], starts[i + 1])
        lam[block, block] = np.linalg.inv(s)
        if i < len(psi):
            xi[block, starts[i + 1] : starts[i + 2]] = -psi[i]
    return xi.T @ lam @ xi, diagonal, off, starts


def _vec(matrices):
    return np.concatenate([m.reshape(-1) for m in matrices])  # row-major vec


def _unvec(vector, shapes):
    out, start = [], 0
    for n, d in shapes:
        out.append(vector[start : start + n * d].reshape(n, d))
        start += n * d
    return out


def _tf(matrices):
    return [tf.constant(m, tf.float32) for m in matrices]


def _relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _problem(seed=0, gamma=0.1, widths=_WIDTHS):
    inputs, outputs = _chain_samples(seed, widths)
    a, g, a_cross, g_cross = _statistics(inputs, outputs)
    pis = _pis(a, g)
    shapes = [(x.shape[0], y.shape[0]) for x, y in zip(a, g)]
    gradients = [np.random.default_rng(seed + 1).normal(size=s) for s in shapes]
    return a, g, a_cross, g_cross, pis, gamma, shapes, gradients


def _tf_inverse(a, g, a_cross, g_cross, pis, gamma):
    return tridiagonal.tridiagonal_inverse(
        _tf(a),
        _tf(g),
        _tf(a_cross),
        _tf(g_cross),
        [tf.constant(p, tf.float32) for p in pis],
        tf.constant(gamma, tf.float32),
    )


@pytest.mark.parametrize("gamma", [0.3, 0.1, 0.03, 0.01])
def test_matches_dense_xi_lambda_xi(gamma):
    a, g, a_cross, g_cross, pis, gamma, shapes, gradients = _problem(gamma=gamma)
    dense, diagonal, _, starts = _dense_tridiagonal_inverse(a, g, a_cross, g_cross, pis, gamma)
    expected = _unvec(dense @ _vec(gradients), shapes)

    inverse = _tf_inverse(a, g, a_cross, g_cross, pis, gamma)
    actual = [r.numpy() for r in tridiagonal.apply_tridiagonal_inverse(inverse, _tf(gradients))]

    assert [r.shape for r in actual] == shapes
    for r, e in zip(actual, expected):
        assert _relative_error(r, e) < _RTOL
    # The denominators were not clipped: the test checks the exact formula.
    assert min(float(tf.reduce_min(d)) for d in inverse.denominators) > 1e-3
    # And the links matter: the block-diagonal inverse differs by ~7-9 % here,
    # hundreds of times the tolerance.
    block_diagonal = [np.linalg.solve(f, v.reshape(-1)).reshape(v.shape) for f, v in zip(diagonal, gradients)]
    assert _relative_error(_vec(block_diagonal), _vec(expected)) > 0.03


def test_dense_reference_agrees_with_the_tridiagonal_blocks():
    """The reference's (Ξᵀ Λ Ξ)⁻¹ reproduces F̃ on the tridiagonal blocks [KFAC §4.3]."""
    a, g, a_cross, g_cross, pis, gamma, _, _ = _problem()
    dense, diagonal, off, starts = _dense_tridiagonal_inverse(a, g, a_cross, g_cross, pis, gamma)
    fisher = np.linalg.inv(dense)
    block = [slice(starts[i], starts[i + 1]) for i in range(len(diagonal))]
    for i, f in enumerate(diagonal):
        np.testing.assert_allclose(fisher[block[i], block[i]], f, atol=1e-9)
    for i, f in enumerate(off):
        np.testing.assert_allclose(fisher[block[i], block[i + 1]], f, atol=1e-9)


@pytest.mark.parametrize("widths", [_WIDTHS, (3, 4)])
def test_zero_cross_statistics_give_block_diagonal_inverse(widths):
    a, g, a_cross, g_cross, pis, gamma, shapes, gradients = _problem(widths=widths)
    a_cross = [np.zeros_like(x) for x in a_cross]
    g_cross = [np.zeros_like(x) for x in g_cross]
    a_hat, g_hat = _damped(a, g, pis, gamma)

    inverse = _tf_inverse(a, g, a_cross, g_cross, pis, gamma)
    actual = tridiagonal.apply_tridiagonal_inverse(inverse, _tf(gradients))

    for r, x, y, v in zip(actual, a_hat, g_hat, gradients):
        expected = (np.linalg.inv(np.kron(x, y)) @ v.reshape(-1)).reshape(v.shape)
        assert _relative_error(r.numpy(), expected) < _RTOL


def test_kronecker_difference_inverse_matches_dense_inverse():
    """Σ⁻¹ through two eigendecompositions [KFAC App. B] = inv(Â ⊗ Ĝ − C ⊗ D)."""
    a, g, a_cross, g_cross, pis, gamma, _, _ = _problem()
    a_hat, g_hat = _damped(a, g, pis, gamma)
    c = a_cross[0] @ np.linalg.inv(a_hat[1]) @ a_cross[0].T
    d = g_cross[0] @ np.linalg.inv(g_hat[1]) @ g_cross[0].T
    sigma = np.kron(a_hat[0], g_hat[0]) - np.kron(c, d)
    expected = np.linalg.inv(sigma)

    root_a = tridiagonal.damped_inverse_root(tf.constant(a[0], tf.float32), pis[0] * gamma)
    root_g = tridiagonal.damped_inverse_root(tf.constant(g[0], tf.float32), gamma / pis[0])
    k1, k2, denominators = tridiagonal.kronecker_difference_inverse(root_a, root_g, *_tf([c, d]))
    n, dim = a[0].shape[0], g[0].shape[0]
    basis = tf.reshape(tf.eye(n * dim), (n * dim, n, dim))  # e_k as (n, d) matrices
    columns = tridiagonal.apply_kronecker_difference_inverse(k1, k2, denominators, basis)
    actual = tf.reshape(columns, (n * dim, n * dim)).numpy().T

    assert _relative_error(actual, expected) < _RTOL
    np.testing.assert_allclose(actual, actual.T, atol=1e-5 * np.abs(expected).max())
    # Σ is positive definite for consistent statistics: no denominator was clipped.
    assert float(tf.reduce_min(denominators)) > 1e-3


def test_damped_inverse_root():
    a, _, _, _, _, _, _, _ = _problem()
    root = tridiagonal.damped_inverse_root(tf.constant(a[1], tf.float32), 0.05).numpy()
    expected = np.linalg.inv(a[1] + 0.05 * np.eye(len(a[1])))
    assert _relative_error(root @ root.T, expected) < _RTOL


def test_inconsistent_statistics_are_clipped_and_finite():
    """Cross statistics too large for the diagonal ones: Σ indefinite, kept finite by the clip."""
    a, g, a_cross, g_cross, pis, gamma, _, gradients = _problem()
    a_cross = [10.0 * x for x in a_cross]
    g_cross = [10.0 * y for y in g_cross]
    inverse = _tf_inverse(a, g, a_cross, g_cross, pis, gamma)
    assert np.isclose(min(float(tf.reduce_min(d)) for d in inverse.denominators), 1e-6)
    result = tridiagonal.apply_tridiagonal_inverse(inverse, _tf(gradients))
    assert all(np.all(np.isfinite(r.numpy())) for r in result)


@pytest.mark.parametrize("batch_size", [None, 64])
def test_chain_cross_statistics(batch_size):
    inputs, outputs = _chain_samples(examples=32)
    _, _, a_cross, g_cross = _statistics(inputs, outputs, batch_size)
    actual_a, actual_g = tridiagonal.chain_cross_statistics(
        _tf(inputs), _tf(outputs), 32 if batch_size is None else batch_size
    )
    assert len(actual_a) == len(actual_g) == len(inputs) - 1
    for actual, expected in zip(actual_a + actual_g, a_cross + g_cross):
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weighted_chain_cross_statistics():
    """Ā_{i,i+1} = Σ w ā_i ā_{i+1}ᵀ / Σ w under the examples' weights; G_{i,i+1} (weights inside g) unchanged."""
    inputs, outputs = _chain_samples(examples=32)
    weights = np.random.default_rng(3).uniform(0.0, 2.0, size=32)
    actual_a, actual_g = tridiagonal.chain_cross_statistics(
        _tf(inputs), _tf(outputs), 32, tf.constant(weights, tf.float32)
    )
    _, _, _, g_cross = _statistics(inputs, outputs)
    for i, actual in enumerate(actual_a):
        expected = (inputs[i].T * weights) @ inputs[i + 1] / weights.sum()
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-6)
    for actual, expected in zip(actual_g, g_cross):
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_chain_cross_statistics_of_an_empty_share_are_zero():
    """A replica's empty share of a last batch: no rows, zero (not 0/0) cross statistics, like the diagonal ones."""
    inputs, outputs = _chain_samples(examples=32)
    empty_inputs = [tf.zeros([0, x.shape[1]]) for x in inputs]
    empty_outputs = [tf.zeros([0, g.shape[1]]) for g in outputs]
    actual_a, actual_g = tridiagonal.chain_cross_statistics(empty_inputs, empty_outputs, 0)
    for actual in actual_a + actual_g:
        np.testing.assert_array_equal(actual.numpy(), np.zeros(actual.shape))


def test_chain_cross_statistics_rejects_misaligned_rows():
    inputs, outputs = _chain_samples(examples=32)
    with pytest.raises(ValueError, match="aligned"):
        tridiagonal.chain_cross_statistics(_tf([inputs[0], inputs[1][:16]]), _tf(outputs[:2]), 32)


def test_works_under_xla():
    inputs, outputs = _chain_samples(examples=64)
    a, g, a_cross, g_cross = _statistics(inputs, outputs)
    pis = _pis(a, g)
    shapes = [(x.shape[0], y.shape[0]) for x, y in zip(a, g)]
    gradients = _tf([np.random.default_rng(5).normal(size=s) for s in shapes])

    def precondition(input_rows, output_rows, gamma):
        covs_a = [tf.matmul(r, r, transpose_a=True) / 64.0 for r in input_rows]
        covs_g = [tf.matmul(r, r, transpose_a=True) / 64.0 for r in output_rows]
        batch_size = tf.shape(input_rows[0])[0]
        cross_a, cross_g = tridiagonal.chain_cross_statistics(input_rows, output_rows, batch_size)
        inverse = tridiagonal.tridiagonal_inverse(covs_a, covs_g, cross_a, cross_g, _tf(pis), gamma)
        return tridiagonal.apply_tridiagonal_inverse(inverse, gradients)

    compiled = tf.function(precondition, jit_compile=True)
    actual = compiled(_tf(inputs), _tf(outputs), tf.constant(0.1))
    dense, _, _, _ = _dense_tridiagonal_inverse(a, g, a_cross, g_cross, pis, 0.1)
    expected = _unvec(dense @ _vec([v.numpy() for v in gradients]), shapes)
    for r, e in zip(actual, expected):
        assert _relative_error(r.numpy(), e) < _RTOL


def test_tensor_round_trip_through_variables():
    a, g, a_cross, g_cross, pis, gamma, shapes, gradients = _problem()
    input_dims = [n for n, _ in shapes]
    output_dims = [d for _, d in shapes]
    expected_shapes = tridiagonal.TridiagonalInverse.tensor_shapes(input_dims, output_dims)
    assert len(expected_shapes) == 5 * len(shapes) - 2

    # The optimizer's pattern: variables initialised to the identity preconditioner ...
    initial = tridiagonal.TridiagonalInverse.identity(input_dims, output_dims)
    variables = [tf.Variable(t) for t in initial.to_tensors()]
    assert [tuple(v.shape) for v in variables] == expected_shapes
    identity = tridiagonal.TridiagonalInverse.from_tensors(variables)
    for r, v in zip(tridiagonal.apply_tridiagonal_inverse(identity, _tf(gradients)), gradients):
        np.testing.assert_allclose(r.numpy(), v, rtol=1e-6, atol=1e-6)

    # ... assigned on the inverse-update schedule, and read back when preconditioning.
    inverse = _tf_inverse(a, g, a_cross, g_cross, pis, gamma)
    tensors = inverse.to_tensors()
    assert [tuple(t.shape) for t in tensors] == expected_shapes

    @tf.function
    def assign():
        fresh = _tf_inverse(a, g, a_cross, g_cross, pis, gamma).to_tensors()
        for variable, value in zip(variables, fresh):
            variable.assign(value)
        return fresh

    assigned = assign()
    rebuilt = tridiagonal.TridiagonalInverse.from_tensors(variables)
    assert rebuilt.num_blocks == len(shapes)
    # Exactly what was assigned (eigenvectors are compared with the graph's own
    # values: their signs may differ between the graph's and eager eigh).
    for x, y in zip(rebuilt.to_tensors(), assigned):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    # The same preconditioner as the eager construction.
    for x, y in zip(
        tridiagonal.apply_tridiagonal_inverse(rebuilt, _tf(gradients)),
        tridiagonal.apply_tridiagonal_inverse(inverse, _tf(gradients)),
    ):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError):
        tridiagonal.TridiagonalInverse.from_tensors(tensors[:-1])


def test_optimizer_step_uses_the_dense_tridiagonal_inverse():
    """Inside model.fit: cross statistics from the step's rows, and U = Ξᵀ Λ Ξ ∇h."""
    import keras

    import keras_kfac

    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    opt = keras_kfac.KFAC(
        model=model,
        learning_rate=0.5,
        momentum=0.0,
        damping=0.05,
        estimation_mode="exact",
        approximation="block_tridiagonal",
    )
    model.compile(optimizer=opt, loss="mse")
    before = [w.numpy().astype(np.float64) for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_weights)]
    model.train_on_batch(x, y)
    after = [w.numpy().astype(np.float64) for w in model.trainable_weights]

    # The recorded inputs: ā of each layer, aligned per example.
    layers = model.layers
    h = x.astype(np.float64)
    inputs = []
    for i in range(len(layers)):
        inputs.append(np.concatenate([h, np.ones((64, 1))], 1))
        s = inputs[-1] @ np.concatenate([before[2 * i], before[2 * i + 1][None]], 0)
        h = np.tanh(s) if i < 2 else s
    a_cross = [inputs[i].T @ inputs[i + 1] / 64 for i in range(2)]
    chain = opt._estimator.preconditioner
    for variable, expected in zip(chain.input_cross, a_cross):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-6)

    a = [b.input_factor.cov.numpy().astype(np.float64) for b in opt.blocks]
    g = [b.output_factor.cov.numpy().astype(np.float64) for b in opt.blocks]
    g_cross = [v.numpy().astype(np.float64) for v in chain.output_cross]
    inverse = _dense_tridiagonal_inverse(a, g, a_cross, g_cross, _pis(a, g), np.sqrt(0.05))[0]
    matrices = [np.concatenate([grads[2 * i], grads[2 * i + 1][None]], 0) for i in range(3)]
    update = _unvec(inverse @ _vec(matrices), [m.shape for m in matrices])
    for i in range(3):
        step = np.concatenate([after[2 * i] - before[2 * i], (after[2 * i + 1] - before[2 * i + 1])[None]], 0)
        np.testing.assert_allclose(step, -0.5 * update[i], rtol=2e-3, atol=1e-6)


def test_tridiagonal_with_the_adaptive_recipe_and_clear_errors():
    import keras

    import keras_kfac

    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(3, 2))).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(model=model, adaptive=True, approximation="block_tridiagonal", gamma_adaptation_period=2)
    model.compile(optimizer=opt, loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]

    # Automatic registration takes the Dense layers as the chain; an embedding keeps the fallback rule.
    tokens = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(5, 2),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    opt = keras_kfac.KFAC(model=tokens, learning_rate=0.05, approximation="block_tridiagonal")
    tokens.compile(optimizer=opt, loss="mse")
    with pytest.warns(UserWarning, match="no curvature block.*: .*embeddings"):
        tokens.fit(rng.integers(0, 5, size=(16, 3)), y[:16], verbose=0)
    assert [type(b).__name__ for b in opt.blocks] == ["DenseBlock", "DenseBlock"]

    conv = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    conv.compile(optimizer=keras_kfac.KFAC(model=conv, approximation="block_tridiagonal"), loss="mse")
    with pytest.raises(ValueError, match="chain of at least two Dense"):
        conv.fit(np.zeros((4, 4, 4, 1), "float32"), np.zeros((4, 2), "float32"), verbose=0)


def test_dense_layers_that_do_not_feed_each_other_are_named_in_a_warning():
    """Parallel branches are no chain: the functional graph shows it, and a Sequential chain is not flagged."""
    import warnings

    import keras

    import keras_kfac

    inputs = keras.Input((3,))
    left, right = keras.layers.Dense(2, name="left")(inputs), keras.layers.Dense(2, name="right")(inputs)
    branches = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([left, right])))
    chain = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dropout(0.1), keras.layers.Dense(2)]
    )
    for model in (branches, chain):
        opt = keras_kfac.KFAC(model=model, approximation="block_tridiagonal")
        model.compile(optimizer=opt, loss="mse")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.build(model.trainable_variables)
        messages = [str(w.message) for w in caught if "block_tridiagonal" in str(w.message)]
        if model is branches:
            assert len(messages) == 1 and "'right' does not take its input from 'left'" in messages[0]
        else:
            assert messages == []
