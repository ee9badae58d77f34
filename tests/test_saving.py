"""Saving and resuming: model.save / load_model keep the K-FAC state; mixed precision."""

import keras
import numpy as np
import pytest

import keras_kfac


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int32")


def _model():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])


def _token_model():
    """Embedding (a diagonal Ā) and Conv1D blocks."""
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.Conv1D(3, 2, padding="causal"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )


@pytest.mark.parametrize(
    "adaptive, tokens, inverse_update_period",
    [(False, False, 10), (False, False, 2), (True, False, 10), (True, True, 10)],
)
def test_load_model_resumes_exactly_where_training_stopped(tmp_path, adaptive, tokens, inverse_update_period):
    """With T₃ = 2 the output layer's Ā (9 ≥ 2·2) is kept as a Cholesky factor."""
    x, y = _data()
    if tokens:
        x = np.abs(x * 5).astype("int32") % 20
    keras.utils.set_random_seed(0)
    model = _token_model() if tokens else _model()
    kwargs = dict(adaptive=True, damping_adaptation_period=2) if adaptive else dict(learning_rate=0.05, damping=0.01)
    opt = keras_kfac.KFAC(model=model, seed=7, inverse_update_period=inverse_update_period, **kwargs)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, keras_kfac.KFAC)
    assert restored.optimizer.get_config() == opt.get_config()
    for saved, loaded in zip(opt.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())
    assert float(restored.optimizer.damping.numpy()) == float(opt.damping.numpy())

    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    restored.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_an_explicit_inverse_saved_where_a_cholesky_factor_is_kept_loads_as_that_factor():
    """A save that holds (Ā + πγI)⁻¹ where this KFAC keeps L (LLᵀ = Ā + πγI) loads as L."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = _model()
    opt = keras_kfac.KFAC(model=model, learning_rate=0.05, damping=0.01, inverse_update_period=2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    factor = opt.blocks[1].input_factor
    assert isinstance(factor, keras_kfac.curvature.CholeskyFactor)
    saved = [v.numpy() for v in opt.variables]
    root = factor.inverse.numpy().astype(np.float64)
    index = next(i for i, v in enumerate(opt.variables) if v is factor.inverse)
    old = list(saved)
    old[index] = np.linalg.inv(root @ root.T).astype(np.float32)
    opt.load_own_variables({str(i): value for i, value in enumerate(old)})
    for i, (before, after) in enumerate(zip(saved, opt.variables)):
        np.testing.assert_allclose(after.numpy(), before, rtol=1e-4, atol=1e-5 if i == index else 0)


@keras.saving.register_keras_serializable(package="keras_kfac_tests")
def _custom_cross_entropy(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def test_hand_made_layer_collection_is_saved_and_resumes_exactly(tmp_path):
    """A subset of the layers and a registered loss (the compiled one is custom) survive load_model."""
    x, y = _data()

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.Dense(2),
            ]
        )
        collection = keras_kfac.LayerCollection()
        collection.register_model(model)
        collection.register_dense(model.layers[2])
        collection.register_dense(model.layers[0])
        collection.register_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.compile(
            optimizer=keras_kfac.KFAC(layer_collection=collection, learning_rate=0.05, damping=0.01, seed=2),
            loss=_custom_cross_entropy,
        )
        return model

    with pytest.warns(UserWarning, match="no curvature block"):
        uninterrupted = make()
        uninterrupted.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        model = make()
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="no curvature block"):  # the optimizer is built as it loads
        restored = keras.models.load_model(tmp_path / "model.keras")
    restored.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert [b.layer.name for b in restored.optimizer.blocks] == [model.layers[2].name, model.layers[0].name]
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    assert int(restored.optimizer.iterations.numpy()) == 8
    for a, b in zip(uninterrupted.weights, restored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_mixed_precision_keeps_factors_in_float32():
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        opt = keras_kfac.KFAC(model=model, learning_rate=0.05, damping=0.01)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert history.history["loss"][-1] < history.history["loss"][0]
    for block in opt.blocks:
        assert block.input_factor.cov.dtype == "float32"
        assert np.all(np.isfinite(block.output_factor.inverse.numpy()))


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated preemption")


def test_backup_and_restore_resumes_an_interrupted_fit_exactly(tmp_path):
    """BackupAndRestore brings back K-FAC's factors, λ, γ and step counter with the weights."""
    x, y = _data()

    def compiled():
        keras.utils.set_random_seed(0)
        model = _model()
        model.compile(
            optimizer=keras_kfac.KFAC(model=model, adaptive=True, damping_adaptation_period=2, seed=3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    fit = dict(batch_size=32, epochs=4, shuffle=False, verbose=0)
    interrupted = compiled()
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(tmp_path), _Interrupt()], **fit)
    assert int(interrupted.optimizer.iterations.numpy()) == 8

    resumed = compiled()
    resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(tmp_path)], **fit)
    uninterrupted = compiled()
    uninterrupted.fit(x, y, **fit)
    assert int(resumed.optimizer.iterations.numpy()) == 16
    assert float(resumed.optimizer.damping.numpy()) == float(uninterrupted.optimizer.damping.numpy())
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
