"""Properties of the K-FAC step that follow from the math (spec §6), in float64 numpy."""

import keras
import numpy as np
import pytest

import keras_kfac


def test_undamped_exact_step_solves_linear_least_squares():
    """Linear model + MSE: K-FAC = Gauss-Newton = Newton, so one step lands on the solution."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(64, 3)) + 0.5).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    opt = keras_kfac.KFAC(model=model, learning_rate=1.0, damping=0.0, momentum=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mean_squared_error")
    model.train_on_batch(x, y)
    design = np.concatenate([x, np.ones((64, 1))], 1).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
    layer = model.layers[0]
    np.testing.assert_allclose(layer.kernel.numpy(), solution[:-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(layer.bias.numpy(), solution[-1], rtol=1e-3, atol=1e-4)


def _train_once(model, x, y, loss, **kwargs):
    opt = keras_kfac.KFAC(model=model, momentum=0.0, estimation_mode="exact", **kwargs)
    model.compile(optimizer=opt, loss=loss)
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.train_on_batch(x, y)
    return opt, [w.numpy() - b for w, b in zip(model.trainable_weights, before)]


def _assert_same_training_step(conv_model, dense_model, conv_x, dense_x, y, loss):
    """Same factors and same update for a one-location convolution and its Dense twin."""
    conv_opt, conv_steps = _train_once(conv_model, conv_x, y, loss, learning_rate=0.5, damping=0.01)
    dense_opt, dense_steps = _train_once(dense_model, dense_x, y, loss, learning_rate=0.5, damping=0.01)
    conv_block, dense_block = conv_opt.blocks[0], dense_opt.blocks[0]
    np.testing.assert_allclose(
        conv_block.input_factor.cov.numpy(), dense_block.input_factor.cov.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        conv_block.output_factor.cov.numpy(), dense_block.output_factor.cov.numpy(), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(conv_steps[0].reshape(dense_steps[0].shape), dense_steps[0], rtol=1e-4, atol=1e-6)
    for conv_step, dense_step in zip(conv_steps[1:], dense_steps[1:]):
        np.testing.assert_allclose(conv_step, dense_step, rtol=1e-4, atol=1e-6)


def test_undamped_step_is_invariant_to_an_affine_change_of_the_input():
    """Spec §6: with no damping, block-diagonal K-FAC's function-space update does
    not change when a layer's input x becomes x Mᵀ + c and its weights follow.

    In homogeneous form [x', 1] = [x, 1] S with S = [[Mᵀ, 0], [c, 1]], so the
    twin's first layer [K'; b'] = S⁻¹ [K; b] computes the same function; its
    Ā' = Sᵀ Ā S and gradient S⁻¹ ∇ make its update S⁻¹ times the original's.
    A bias handled apart from the kernel would break this for c ≠ 0.
    """
    rng = np.random.default_rng(3)
    n, d, h, k = 64, 4, 6, 3
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, k)).astype("float32")
    m = (np.eye(d) + 0.5 * rng.normal(size=(d, d))).astype(np.float64)
    c = np.array([2.0, -1.0, 0.5, 3.0])
    s = np.block([[m.T, np.zeros((d, 1))], [c[None, :], np.ones((1, 1))]])
    assert np.linalg.cond(s) < 100
    x_twin = (x @ m.T + c).astype("float32")

    def build():
        return keras.Sequential([keras.Input((d,)), keras.layers.Dense(h, activation="tanh"), keras.layers.Dense(k)])

    model, twin = build(), build()
    kernel, bias = rng.normal(size=(d, h)) * 0.5, rng.normal(size=h) * 0.1
    head = [rng.normal(size=(h, k)).astype("float32") * 0.5, np.zeros(k, "float32")]
    model.set_weights([kernel.astype("float32"), bias.astype("float32"), *head])
    twin_first = np.linalg.solve(s, np.vstack([kernel, bias[None, :]]))
    twin.set_weights([twin_first[:-1].astype("float32"), twin_first[-1].astype("float32"), *head])
    x_test = rng.normal(size=(16, d)).astype("float32")
    x_test_twin = (x_test @ m.T + c).astype("float32")
    before = model.predict_on_batch(x_test).astype(np.float64)
    np.testing.assert_allclose(twin.predict_on_batch(x_test_twin), before, rtol=1e-5, atol=1e-5)

    steps = {}
    for name, net, inputs, test_inputs in (("model", model, x, x_test), ("twin", twin, x_twin, x_test_twin)):
        _train_once(net, inputs, y, "mean_squared_error", learning_rate=0.5, damping=0.0)
        steps[name] = net.predict_on_batch(test_inputs).astype(np.float64) - before
    assert np.abs(steps["model"]).max() > 1e-2  # a real step, not a vanishing one
    np.testing.assert_allclose(steps["twin"], steps["model"], rtol=2e-3, atol=2e-4)
    # The first layer's weights moved by S⁻¹ times the original's move.
    moved = np.vstack([model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()[None, :]]) - np.vstack(
        [kernel, bias[None, :]]
    )
    twin_moved = np.vstack([twin.layers[0].kernel.numpy(), twin.layers[0].bias.numpy()[None, :]]) - twin_first
    np.testing.assert_allclose(twin_moved, np.linalg.solve(s, moved), rtol=2e-3, atol=2e-4)


def test_conv_with_one_output_location_equals_dense_on_flattened_input():
    """KFC with |T| = 1 is exactly the Dense block on the flattened patch."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3, 3, 2)).astype("float32")
    y = rng.integers(0, 4, size=20).astype("int32")
    kernel = rng.normal(size=(3, 3, 2, 5)).astype("float32") * 0.3
    bias = rng.normal(size=5).astype("float32") * 0.1
    head_kernel = rng.normal(size=(5, 4)).astype("float32") * 0.3
    head_bias = np.zeros(4, "float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    conv_model = keras.Sequential(
        [
            keras.Input((3, 3, 2)),
            keras.layers.Conv2D(5, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    conv_model.set_weights([kernel, bias, head_kernel, head_bias])
    dense_model = keras.Sequential(
        [
            keras.Input((18,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(4),
        ]
    )
    dense_model.set_weights([kernel.reshape(18, 5), bias, head_kernel, head_bias])

    _assert_same_training_step(conv_model, dense_model, x, x.reshape(20, 18), y, loss)


def test_conv1d_with_one_output_step_equals_dense_on_flattened_input():
    """A Conv1D whose kernel spans the whole sequence ('valid') is the Dense block on the flattened input."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 4, 3)).astype("float32")
    y = rng.normal(size=(20, 2)).astype("float32")
    kernel = rng.normal(size=(4, 3, 5)).astype("float32") * 0.3
    bias = rng.normal(size=5).astype("float32") * 0.1
    head_kernel = rng.normal(size=(5, 2)).astype("float32") * 0.3
    head_bias = np.zeros(2, "float32")

    conv_model = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.Conv1D(5, 4, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    conv_model.set_weights([kernel, bias, head_kernel, head_bias])
    dense_model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    dense_model.set_weights([kernel.reshape(12, 5), bias, head_kernel, head_bias])

    _assert_same_training_step(conv_model, dense_model, x, x.reshape(20, 12), y, "mse")


@pytest.mark.parametrize("adaptive", [False, True])
def test_embedding_equals_dense_on_one_hot_inputs(adaptive):
    """An Embedding is a bias-free Dense layer on one-hot rows: same Ā (diagonal), G and steps."""
    rng = np.random.default_rng(3)
    vocabulary, steps = 6, 4
    ids = rng.integers(-vocabulary, vocabulary - 1, size=(24, steps)).astype("int32")  # negative ids too
    one_hot = np.eye(vocabulary, dtype="float32")[ids % vocabulary]
    y = rng.normal(size=(24, 2)).astype("float32")
    table = rng.normal(size=(vocabulary, 3)).astype("float32") * 0.5
    head_kernel = rng.normal(size=(steps * 3, 2)).astype("float32") * 0.3
    head_bias = np.zeros(2, "float32")
    embedding_model = keras.Sequential(
        [
            keras.Input((steps,), dtype="int32"),
            keras.layers.Embedding(vocabulary, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    embedding_model.set_weights([table, head_kernel, head_bias])
    dense_model = keras.Sequential(
        [
            keras.Input((steps, vocabulary)),
            keras.layers.Dense(3, use_bias=False),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    dense_model.set_weights([table, head_kernel, head_bias])
    options = dict(adaptive=True, damping=0.01) if adaptive else dict(learning_rate=0.5, damping=0.01, momentum=0.5)

    def train(model, x):
        opt = keras_kfac.KFAC(model=model, estimation_mode="exact", **options)
        model.compile(optimizer=opt, loss="mse")
        for _ in range(3):
            model.train_on_batch(x, y)
        return opt

    embedding_opt, dense_opt = train(embedding_model, ids), train(dense_model, one_hot)
    embedding_block, dense_block = embedding_opt.blocks[0], dense_opt.blocks[0]
    assert type(embedding_block).__name__ == "EmbeddingBlock"
    np.testing.assert_allclose(
        np.diag(embedding_block.input_factor.cov.numpy()), dense_block.input_factor.cov.numpy(), atol=1e-7
    )
    np.testing.assert_allclose(
        embedding_block.output_factor.cov.numpy(), dense_block.output_factor.cov.numpy(), rtol=1e-5, atol=1e-7
    )
    for name in ("alpha", "mu", "damping"):
        assert getattr(embedding_opt, name).numpy() == pytest.approx(
            getattr(dense_opt, name).numpy(), rel=1e-4, abs=1e-7
        )
    for embedding_weight, dense_weight in zip(embedding_model.get_weights(), dense_model.get_weights()):
        np.testing.assert_allclose(embedding_weight, dense_weight, rtol=1e-4, atol=1e-6)
    assert not np.allclose(embedding_model.get_weights()[0], table)


def _factor_g(mode, iterations, x, y, weights, ema_decay=0.999):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    model.set_weights(weights)
    opt = keras_kfac.KFAC(
        model=model,
        learning_rate=0.0,
        momentum=0.0,
        estimation_mode=mode,
        ema_decay=ema_decay,
        seed=5,
        inverse_update_period=1000,
    )
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(iterations):
        model.train_on_batch(x, y)
    return [b.output_factor.cov.numpy().astype(np.float64) for b in opt.blocks]


def test_sampled_fisher_converges_to_exact_and_empirical_does_not():
    """With ε = 1 − 1/k the moving average is the running mean of sampled G's."""
    rng = np.random.default_rng(2)
    # 8 distinct examples, each repeated: every row draws its own sample.
    x = np.tile(rng.normal(size=(8, 4)).astype("float32"), (32, 1))
    y = np.tile(rng.integers(0, 3, size=8).astype("int32"), 32)
    weights = [
        rng.normal(size=(4, 5)).astype("float32"),
        np.zeros(5, "float32"),
        rng.normal(size=(5, 3)).astype("float32"),
        np.zeros(3, "float32"),
    ]
    exact = _factor_g("exact", 1, x, y, weights)
    sampled_few = _factor_g("sampled", 1, x, y, weights)
    sampled_many = _factor_g("sampled", 100, x, y, weights)
    empirical = _factor_g("empirical", 5, x, y, weights)

    def error(estimate):
        return sum(np.linalg.norm(e - t) / np.linalg.norm(t) for e, t in zip(estimate, exact))

    assert error(sampled_many) < 0.04
    assert error(sampled_many) < 0.3 * error(sampled_few)
    # The empirical Fisher is a deterministic, different matrix (it does not converge).
    assert error(empirical) > 3 * error(sampled_many)
