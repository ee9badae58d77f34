"""Channel-wise blocks (normalization scale/shift, DepthwiseConv2D) against explicit float64 references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.blocks import DepthwiseConv2DBlock, ScaleShiftBlock

K = 3  # outputs of the linear head


def _collection(model: keras.Model) -> keras_kfac.LayerCollection:
    """Automatic registration with the normalization layers opted in."""
    collection = keras_kfac.LayerCollection()
    collection.auto_register_types += ScaleShiftBlock.layer_types
    collection.auto_register(model)
    return collection


def _exact_statistics(model: keras.Model, x: np.ndarray) -> keras_kfac.KFAC:
    """One step at learning rate 0 with the exact Fisher (MSE, linear head): the factors only."""
    opt = keras_kfac.KFAC(
        model=model, layer_collection=_collection(model), learning_rate=0.0, damping=1e-2, estimation_mode="exact"
    )
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, np.zeros((len(x), K), "float32"))
    return opt


def _head_vectors(head: keras.layers.Dense, shape: tuple) -> np.ndarray:
    """The exact MSE Fisher's output vectors back-propagated through the linear head: (K, *shape).

    MSE over K outputs has Hessian (2/K)·I, so its vectors are sqrt(2/K)·e_j and
    their back-propagated values are the head's columns, laid out as the head's input.
    """
    kernel = head.kernel.numpy().astype(np.float64)
    return np.sqrt(2.0 / K) * kernel.T.reshape((K, *shape))


def _normalized(x: np.ndarray, axes: tuple, epsilon: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon)


@pytest.mark.parametrize("kind", ["batch", "layer", "group"])
def test_scale_shift_factors_match_the_explicit_per_unit_blocks(kind):
    """Ā_u = mean over rows of (x̂_u, 1)(x̂_u, 1)ᵀ and G_u = (1/B) Σ_rows Σ_j ĝ_u², x̂ computed here from x."""
    rng = np.random.default_rng(0)
    batch, height, width, channels = 4, 3, 2, 4
    x = rng.normal(size=(batch, height, width, channels)) * 2.0 + 0.5
    if kind == "batch":
        layer = keras.layers.BatchNormalization(epsilon=1e-3)
        x_hat = _normalized(x, (0, 1, 2), 1e-3)
    elif kind == "layer":
        layer = keras.layers.LayerNormalization(epsilon=1e-3)
        x_hat = _normalized(x, (3,), 1e-3)
    else:
        layer = keras.layers.GroupNormalization(groups=2, epsilon=1e-3)
        grouped = x.reshape(batch, height, width, 2, 2)
        x_hat = _normalized(grouped, (1, 2, 4), 1e-3).reshape(x.shape)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input(x.shape[1:]), layer, keras.layers.Flatten(), head])
    gamma = rng.uniform(0.5, 1.5, size=channels)
    beta = rng.normal(size=channels)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    opt = _exact_statistics(model, x.astype("float32"))

    block = opt.layer_collection.block_for(layer)
    assert isinstance(block, ScaleShiftBlock)
    rows = np.stack([x_hat.reshape(-1, channels), np.ones((x_hat.size // channels, channels))], axis=-1)
    a = np.einsum("nci,ncj->cij", rows, rows) / len(rows)
    np.testing.assert_allclose(block.input_factor.cov.numpy(), a, rtol=1e-4, atol=1e-5)
    vectors = _head_vectors(head, x.shape[1:]).reshape(K, -1, channels)  # the same for every example
    g = batch * np.einsum("knc->c", vectors**2) / batch
    np.testing.assert_allclose(block.output_factor.cov.numpy()[:, 0, 0], g, rtol=1e-4, atol=1e-7)


def test_layer_normalization_over_two_axes_keeps_one_block_per_parameter():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 2)).astype("float32")
    layer = keras.layers.LayerNormalization(axis=(1, 2), epsilon=1e-3)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((3, 2)), layer, keras.layers.Flatten(), head])
    opt = _exact_statistics(model, x)
    block = opt.layer_collection.block_for(layer)
    assert block.channels == 6 and tuple(block.input_factor.cov.shape) == (6, 2, 2)
    x_hat = _normalized(x.astype(np.float64), (1, 2), 1e-3).reshape(5, 6)
    np.testing.assert_allclose(block.input_factor.cov.numpy()[:, 0, 0], (x_hat**2).mean(0), rtol=1e-4, atol=1e-5)
    vectors = _head_vectors(head, (6,))
    np.testing.assert_allclose(block.output_factor.cov.numpy()[:, 0, 0], (vectors**2).sum(0), rtol=1e-4, atol=1e-7)


def _patches(x: np.ndarray, size: int) -> np.ndarray:
    """Valid, stride-1 patches of every channel by explicit loops: (batch·locations, C, size·size)."""
    batch, height, width, channels = x.shape
    rows = []
    for n in range(batch):
        for i in range(height - size + 1):
            for j in range(width - size + 1):
                rows.append(x[n, i : i + size, j : j + size, :].reshape(size * size, channels).T)
    return np.array(rows)


def test_depthwise_factors_match_explicit_patches():
    rng = np.random.default_rng(2)
    batch, side, channels, multiplier, size = 3, 4, 2, 3, 2
    x = rng.normal(size=(batch, side, side, channels))
    layer = keras.layers.DepthwiseConv2D(size, depth_multiplier=multiplier)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((side, side, channels)), layer, keras.layers.Flatten(), head])
    opt = _exact_statistics(model, x.astype("float32"))
    block = opt.layer_collection.block_for(layer)
    assert isinstance(block, DepthwiseConv2DBlock)
    assert (block.channels, block.input_dim, block.output_dim) == (channels, size * size + 1, multiplier)

    patches = _patches(x, size)
    rows = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=-1)
    a = np.einsum("nci,ncj->cij", rows, rows) / len(rows)
    np.testing.assert_allclose(block.input_factor.cov.numpy(), a, rtol=1e-4, atol=1e-5)
    out = side - size + 1
    # Output channel c·M + m of each location; the vectors are the same for every example.
    vectors = _head_vectors(head, (out * out, channels, multiplier))
    g = batch * np.einsum("klci,klcj->cij", vectors, vectors) / batch
    np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-7)


def _explicit_preconditioned(block, gradients: list[np.ndarray], gamma: float) -> list[np.ndarray]:
    """(⊕_c (Ā_c + π_c γ I) ⊗ (G_c + γ/π_c I))⁻¹ vec(∇W̄_c), built densely in float64."""
    a = block.input_factor.cov.numpy().astype(np.float64)
    g = block.output_factor.cov.numpy().astype(np.float64)
    w = block.gradient_matrix([tf.constant(v) for v in gradients]).numpy().astype(np.float64)
    solved = np.empty_like(w)
    for c in range(block.channels):
        pi = np.sqrt((np.trace(a[c]) / len(a[c])) / (np.trace(g[c]) / len(g[c])))
        damped = np.kron(a[c] + pi * gamma * np.eye(len(a[c])), g[c] + gamma / pi * np.eye(len(g[c])))
        # Row-major vec of W̄_c (input_dim, output_dim) matches np.kron(Ā, G).
        solved[c] = np.linalg.solve(damped, w[c].reshape(-1)).reshape(w[c].shape)
    return [p.numpy() for p in block.split_matrix(tf.constant(solved, tf.float32))]


@pytest.mark.parametrize("kind", ["depthwise", "batch"])
def test_preconditioned_gradient_matches_the_explicit_matrix(kind):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4, 4, 2)).astype("float32")
    layer = (
        keras.layers.DepthwiseConv2D(2, depth_multiplier=2)
        if kind == "depthwise"
        else keras.layers.BatchNormalization()
    )
    model = keras.Sequential([keras.Input((4, 4, 2)), layer, keras.layers.Flatten(), keras.layers.Dense(K)])
    opt = _exact_statistics(model, x)
    block = opt.layer_collection.block_for(layer)
    gradients = [rng.normal(size=v.shape).astype("float32") for v in block.variables]
    gamma = 0.3
    got = block.precondition([tf.constant(v) for v in gradients], block.damped_inverses(tf.constant(gamma)))
    for mine, reference in zip(got, _explicit_preconditioned(block, gradients, gamma)):
        np.testing.assert_allclose(mine.numpy(), reference, rtol=2e-4, atol=1e-6)


def test_a_depthwise_convolution_with_one_location_and_one_channel_gives_the_dense_update():
    """DepthwiseConv2D(k, M) on a k×k×1 input is Dense(k·k → M) on the flattened input."""
    rng = np.random.default_rng(4)
    size, multiplier = 3, 4
    x = rng.normal(size=(16, size, size, 1)).astype("float32")
    y = rng.integers(0, K, size=16)
    kernel = rng.normal(size=(size, size, 1, multiplier)).astype("float32") * 0.5
    bias = rng.normal(size=multiplier).astype("float32") * 0.1
    head = [rng.normal(size=(multiplier, K)).astype("float32") * 0.5, np.zeros(K, "float32")]
    depthwise = keras.Sequential(
        [
            keras.Input((size, size, 1)),
            keras.layers.DepthwiseConv2D(size, depth_multiplier=multiplier, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(K),
        ]
    )
    depthwise.set_weights([kernel, bias, *head])
    dense = keras.Sequential(
        [
            keras.Input((size, size, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(multiplier, activation="tanh"),
            keras.layers.Dense(K),
        ]
    )
    dense.set_weights([kernel.reshape(size * size, multiplier), bias, *head])
    steps = []
    for model in (depthwise, dense):
        opt = keras_kfac.KFAC(model=model, learning_rate=0.5, damping=0.01, momentum=0.0, estimation_mode="exact")
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.numpy().copy() for w in model.trainable_weights]
        for _ in range(3):
            model.train_on_batch(x, y)
        steps.append([w.numpy() - b for w, b in zip(model.trainable_weights, before)])
    np.testing.assert_allclose(steps[0][0].reshape(size * size, multiplier), steps[1][0], rtol=1e-4, atol=1e-6)
    for mine, reference in zip(steps[0][1:], steps[1][1:]):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-6)


def test_default_kfac_trains_a_model_of_channelwise_layers():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, size=64)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 1),
            keras.layers.GroupNormalization(2),
            keras.layers.LayerNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    assert len(keras_kfac.KFAC(model=model).blocks) == 3  # normalization layers are opt-in
    opt = keras_kfac.KFAC(model=model, layer_collection=_collection(model))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert len(opt.blocks) == 6
    lines = []
    opt.layer_collection.summary(print_fn=lines.append)
    row = next(line.split() for line in lines if line.split()[:1] == [f"{model.name}/bn"])
    assert row[1:] == ["BatchNormalization", "scale_shift", "6×(Ā", "2", "G", "1)", "12"]  # γ_u, β_u per unit
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_a_normalization_layer_without_weights_is_refused():
    layer = keras.layers.LayerNormalization(center=False, scale=False)
    layer.build((None, 4))
    with pytest.raises(ValueError, match="neither a scale nor a shift"):
        ScaleShiftBlock(layer)


def test_opted_in_blocks_are_saved_and_resume_exactly(tmp_path):
    """The opt-in registration is part of the saved optimizer: the loaded one has the same blocks and step."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.DepthwiseConv2D(3),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras_kfac.KFAC(model=model, layer_collection=_collection(model)),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [type(b).__name__ for b in loaded.optimizer.blocks] == [type(b).__name__ for b in model.optimizer.blocks]
    for model_ in (model, loaded):
        model_.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for mine, reference in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)


def test_separable_convolution_blocks_match_explicit_patches_and_intermediates():
    """Depthwise part: Ā_c over channel c's patches, G_c over ĝ Pᵀ; pointwise part: a Dense block on
    the intermediate u (computed here by loops) with ĝ the output's vectors."""
    rng = np.random.default_rng(7)
    batch, side, channels, multiplier, filters, size = 3, 4, 2, 2, 3, 2
    x = rng.normal(size=(batch, side, side, channels))
    layer = keras.layers.SeparableConv2D(filters, size, depth_multiplier=multiplier)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((side, side, channels)), layer, keras.layers.Flatten(), head])
    opt = _exact_statistics(model, x.astype("float32"))
    depthwise, pointwise = opt.blocks[:2]
    assert [type(b).__name__ for b in opt.blocks[:2]] == ["SeparableDepthwiseBlock", "SeparablePointwiseBlock"]

    patches = _patches(x, size)  # (rows, C, size²)
    a = np.einsum("nci,ncj->cij", patches, patches) / len(patches)
    np.testing.assert_allclose(depthwise.input_factor.cov.numpy(), a, rtol=1e-4, atol=1e-5)
    kernel = layer.depthwise_kernel.numpy().astype(np.float64).reshape(size * size, channels, multiplier)
    u = np.einsum("nck,kcm->ncm", patches, kernel).reshape(len(patches), channels * multiplier)
    rows = np.concatenate([u, np.ones((len(u), 1))], axis=1)
    np.testing.assert_allclose(pointwise.input_factor.cov.numpy(), rows.T @ rows / len(rows), rtol=1e-4, atol=1e-5)

    out = side - size + 1
    vectors = _head_vectors(head, (out * out, filters))  # the same for every example
    np.testing.assert_allclose(
        pointwise.output_factor.cov.numpy(), np.einsum("kli,klj->ij", vectors, vectors), rtol=1e-4, atol=1e-7
    )
    carried = vectors @ layer.pointwise_kernel.numpy().astype(np.float64).reshape(-1, filters).T
    carried = carried.reshape(K, out * out, channels, multiplier)
    np.testing.assert_allclose(
        depthwise.output_factor.cov.numpy(), np.einsum("klci,klcj->cij", carried, carried), rtol=1e-4, atol=1e-7
    )


def test_a_separable_convolution_trains_with_sample_weights():
    """Its depthwise block's rows are output locations whatever the number of filters (F ≠ C·M here)."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(16, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.SeparableConv2D(5, 3, depth_multiplier=2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    opt = keras_kfac.KFAC(model=model, learning_rate=0.1, momentum=0.0, damping=1e-2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, sample_weight=rng.uniform(size=16), batch_size=8, epochs=1, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert float(opt.blocks[0].input_factor.trace()) > 0.0
