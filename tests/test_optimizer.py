"""KFAC as a Keras optimizer: model kinds, jit modes, fit/evaluate/predict, config."""

import copy
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.losses import resolve_loss


def _data(n=96, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, classes))
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def _sequential(d=6, classes=3):
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(classes)])


def _functional(d=6, classes=3):
    inputs = keras.Input((d,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(classes, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


class SubclassedNet(keras.Model):
    def __init__(self, classes=3):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(classes)

    def call(self, x):
        return self.out(self.hidden(x))


MODELS = {"sequential": _sequential, "functional": _functional, "subclassed": lambda: SubclassedNet()}


def _loss_for(kind):
    from_logits = kind != "functional"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fit_reduces_loss_for_each_model_kind(kind, jit_compile):
    keras.utils.set_random_seed(1)
    x, y = _data()
    model = MODELS[kind]()  # the subclassed model is not built yet here
    opt = keras_kfac.KFAC(model=model, learning_rate=0.05, damping=1e-2, seed=3)
    model.compile(optimizer=opt, loss=_loss_for(kind), jit_compile=jit_compile)
    # 96 examples in batches of 40: the last batch is partial.
    history = model.fit(x, y, batch_size=40, epochs=6, verbose=0, validation_data=(x[:20], y[:20]))
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0]
    assert len(opt.blocks) == 2
    # Statistics were gathered: Ā's homogeneous corner is E[1·1] = 1.
    a = opt.blocks[0].input_factor.cov.numpy()
    np.testing.assert_allclose(a[-1, -1], 1.0, rtol=1e-5)


def _count_step_traces(monkeypatch) -> list:
    """A list that grows by one each time K-FAC's step is traced."""
    traces = []
    update_all = keras_kfac.KFAC.update_all
    monkeypatch.setattr(keras_kfac.KFAC, "update_all", lambda self, *a: traces.append(1) or update_all(self, *a))
    return traces


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("entry", ["fit", "train_on_batch"])
def test_the_kfac_step_is_traced_once(monkeypatch, entry, policy):
    """The optimizer is built before Keras makes the training function: one trace, not Keras's two."""
    traces = _count_step_traces(monkeypatch)
    keras.utils.set_random_seed(0)
    x, y = _data(n=32)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = _sequential()
        opt = keras_kfac.KFAC(model=model, seed=0)
        model.compile(optimizer=opt, loss=_loss_for("sequential"))
        assert not opt.built
        if entry == "fit":
            model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        else:
            for _ in range(3):
                model.train_on_batch(x, y)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert opt.built and int(opt.iterations.numpy()) > 0
    assert len(traces) == 1


def test_a_model_whose_layers_are_not_built_is_left_to_keras(monkeypatch):
    """build() on a subclassed model leaves its layers unbuilt: Keras builds the optimizer in the step."""
    traces = _count_step_traces(monkeypatch)
    keras.utils.set_random_seed(0)
    x, y = _data(n=32)
    model = SubclassedNet()
    with pytest.warns(UserWarning, match="build"):
        model.build((None, 6))
    opt = keras_kfac.KFAC(model=model, seed=0, learning_rate=0.05)
    model.compile(optimizer=opt, loss=_loss_for("subclassed"))
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert len(opt.blocks) == 2 and len(traces) == 2


def test_a_layer_frozen_after_the_optimizer_is_built_is_named():
    keras.utils.set_random_seed(0)
    x, y = _data(n=32)
    model = _sequential()
    opt = keras_kfac.KFAC(model=model, seed=0)
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.layers[0].trainable = False
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    with pytest.raises(ValueError, match="is it frozen"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_evaluate_and_predict_leave_statistics_alone():
    x, y = _data()
    model = _sequential()
    opt = keras_kfac.KFAC(model=model, learning_rate=0.1, damping=1e-2)
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    before = [v.numpy().copy() for v in opt.variables]
    model.evaluate(x * 3.0, y, verbose=0)
    model.predict(x * 3.0, verbose=0)
    model(x * 3.0)
    for old, new in zip(before, opt.variables):
        np.testing.assert_array_equal(old, new.numpy())
    # And training still works afterwards (retraced functions are not confused).
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert int(opt.iterations.numpy()) == 6


def test_run_eagerly_fails_with_a_clear_message():
    x, y = _data()
    model = _sequential()
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss=_loss_for("sequential"), run_eagerly=True)
    with pytest.raises(RuntimeError, match="run_eagerly"):
        model.fit(x, y, epochs=1, verbose=0)


def test_momentum_zero_step_is_exactly_minus_lr_times_update():
    """θ ← θ − lr·U with U the block's damped-inverse preconditioned gradient."""
    keras.utils.set_random_seed(2)
    x, y = _data(n=32)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.3, damping=0.05, momentum=0.0, estimation_mode="empirical")
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layer = model.layers[0]
    kernel0, bias0 = layer.kernel.numpy().copy(), layer.bias.numpy().copy()
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x))
    gk, gb = [g.numpy() for g in tape.gradient(loss, [layer.kernel, layer.bias])]
    model.train_on_batch(x, y)
    block = opt.layer_collection.block_for(layer)
    a = block.input_factor.cov.numpy().astype(np.float64)
    g = block.output_factor.cov.numpy().astype(np.float64)
    gamma = np.sqrt(0.05)
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    grad = np.concatenate([gk, gb[None]], 0).astype(np.float64)
    damped = np.kron(a + pi * gamma * np.eye(a.shape[0]), g + gamma / pi * np.eye(g.shape[0]))
    update = np.linalg.solve(damped, grad.reshape(-1)).reshape(grad.shape)
    np.testing.assert_allclose(layer.kernel.numpy(), kernel0 - 0.3 * update[:-1], rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(layer.bias.numpy(), bias0 - 0.3 * update[-1], rtol=2e-4, atol=2e-6)


def test_factors_much_larger_than_their_gradients_keep_a_cholesky_factor_and_give_the_same_step():
    """With T₃ = 10, Ā of Dense(40 → 2) (41 ≥ 10·2) and G of Dense(2 → 40) (40 ≥ 10·3) are
    kept as L with LLᵀ the damped factor, the others as inverses; the step is the dense
    float64 damped Kronecker solve either way."""
    keras.utils.set_random_seed(3)
    x, y = _data(n=64, d=40, classes=40, seed=3)
    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(2, activation="tanh"), keras.layers.Dense(40)])
    lr, damping = 0.3, 0.05
    opt = keras_kfac.KFAC(
        model=model,
        learning_rate=lr,
        damping=damping,
        momentum=0.0,
        estimation_mode="empirical",
        inverse_update_period=10,
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss_fn)
    before = [w.numpy().astype(np.float64) for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    gradients = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_weights)]
    model.train_on_batch(x, y)
    first, second = opt.blocks
    forms = [type(f) for f in (first.input_factor, first.output_factor, second.input_factor, second.output_factor)]
    cholesky, dense = keras_kfac.curvature.CholeskyFactor, keras_kfac.curvature.KroneckerFactor
    assert forms == [cholesky, dense, dense, cholesky]
    gamma = np.sqrt(damping)
    for i, block in enumerate(opt.blocks):
        a = block.input_factor.cov.numpy().astype(np.float64)
        g = block.output_factor.cov.numpy().astype(np.float64)
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        kept = block.input_factor if i == 0 else block.output_factor
        shift = pi * gamma if i == 0 else gamma / pi
        root = kept.inverse.numpy().astype(np.float64)
        np.testing.assert_array_equal(root, np.tril(root))
        factor = a if i == 0 else g
        np.testing.assert_allclose(root @ root.T, factor + shift * np.eye(len(factor)), rtol=1e-5, atol=1e-6)
        damped = np.kron(a + pi * gamma * np.eye(len(a)), g + gamma / pi * np.eye(len(g)))
        grad = np.concatenate([gradients[2 * i], gradients[2 * i + 1][None]], 0)
        update = np.linalg.solve(damped, grad.reshape(-1)).reshape(grad.shape)
        kernel, bias = model.layers[i].kernel.numpy(), model.layers[i].bias.numpy()
        np.testing.assert_allclose(kernel, before[2 * i] - lr * update[:-1], rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(bias, before[2 * i + 1] - lr * update[-1], rtol=2e-4, atol=2e-6)


def _dense_norm_dense():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(3)]
    )


def _dense_only(model) -> keras_kfac.LayerCollection:
    """Blocks for the Dense layers only: the normalization layer's γ and β are left to the fallback."""
    collection = keras_kfac.LayerCollection()
    collection.auto_register_types = (keras.layers.Dense,)
    collection.auto_register(model)
    return collection


def _norm_gradient(model, x, y):
    """The gradient of the compiled loss in BatchNormalization's γ and β at the current weights."""
    norm = model.layers[1]
    with tf.GradientTape() as tape:
        loss = _loss_for("sequential")(y, model(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, [norm.gamma, norm.beta])]


def test_unowned_variables_are_trained_by_adam_with_its_own_learning_rate():
    """The default fallback is Keras' Adam (lr 1e-3): its first step moves each
    variable by lr·g/(|g| + ε/sqrt(1 − β₂)), whatever K-FAC's own step size."""
    x, y = _data(n=32)
    model = _dense_norm_dense()
    norm = model.layers[1]
    gamma0, beta0 = norm.gamma.numpy().copy(), norm.beta.numpy().copy()
    grads = _norm_gradient(model, x, y)
    opt = keras_kfac.KFAC(model=model, layer_collection=_dense_only(model), learning_rate=0.5, damping=1e-2)
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    with pytest.warns(UserWarning, match="no curvature block.*Adam.*gamma") as record:
        model.train_on_batch(x, y)
    assert len([w for w in record if "no curvature block" in str(w.message)]) == 1
    for before, after, grad in zip((gamma0, beta0), (norm.gamma, norm.beta), grads):
        expected = before - 1e-3 * grad / (np.abs(grad) + 1e-7 / np.sqrt(1 - 0.999))
        np.testing.assert_allclose(after.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert int(opt.fallback.iterations.numpy()) == 1
    # Its state is the KFAC's: saved and restored with it.
    assert all(any(v is w for w in opt.variables) for v in opt.fallback.variables)


def test_fallback_choices():
    x, y = _data(n=32)
    model = _dense_norm_dense()
    norm = model.layers[1]
    gamma0 = norm.gamma.numpy().copy()
    grad = _norm_gradient(model, x, y)[0]
    opt = keras_kfac.KFAC(
        model=model,
        layer_collection=_dense_only(model),
        learning_rate=0.5,
        damping=1e-2,
        fallback=keras.optimizers.SGD(0.25),
    )
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    with pytest.warns(UserWarning, match="SGD"):
        model.train_on_batch(x, y)
    np.testing.assert_allclose(norm.gamma.numpy(), gamma0 - 0.25 * grad, rtol=1e-4, atol=1e-7)
    config = opt.get_config()
    assert config["fallback"]["class_name"] == "SGD"
    assert keras_kfac.KFAC.from_config(config).get_config()["fallback"] == config["fallback"]
    assert isinstance(keras_kfac.KFAC(fallback="adamw").fallback, keras.optimizers.AdamW)
    with pytest.raises(TypeError, match="fallback"):
        keras_kfac.KFAC(fallback=3)
    with pytest.raises(ValueError, match="fallback"):
        keras_kfac.KFAC(fallback=keras_kfac.KFAC())


def test_momentum_fallback_keeps_unowned_variables_in_kfacs_update():
    """fallback="momentum": the proposal of a variable without a block is −∇h, so
    with momentum 0 its first step is −lr·∇h."""
    x, y = _data(n=32)
    model = _dense_norm_dense()
    norm = model.layers[1]
    gamma0 = norm.gamma.numpy().copy()
    grad = _norm_gradient(model, x, y)[0]
    opt = keras_kfac.KFAC(
        model=model,
        layer_collection=_dense_only(model),
        learning_rate=0.05,
        momentum=0.0,
        damping=1e-2,
        fallback="momentum",
    )
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    with pytest.warns(UserWarning, match="gamma") as record:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert len([w for w in record if "plain momentum" in str(w.message)]) == 1
    np.testing.assert_allclose(norm.gamma.numpy(), gamma0 - 0.05 * grad, rtol=1e-4, atol=1e-7)
    assert opt.get_config()["fallback"] == "momentum"


def test_a_model_without_registrable_layers_trains_as_its_fallback():
    x, y = _data(n=64)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    depthwise = keras.layers.DepthwiseConv1D(6, depth_multiplier=3)  # no block serves it
    outputs = keras.layers.Flatten()(depthwise(keras.layers.Reshape((6, 1))(inputs)))
    model = keras.Model(inputs, outputs)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss=_loss_for("sequential"))
    reference.compile(optimizer=keras.optimizers.Adam(), loss=_loss_for("sequential"))
    with pytest.warns(UserWarning, match="no layer it can precondition") as record:
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert len([w for w in record if "precondition" in str(w.message)]) == 1
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_hand_made_layer_collection():
    x, y = _data()
    model = _sequential()
    collection = keras_kfac.LayerCollection()
    collection.register_model(model)
    collection.register_dense(model.layers[1])
    opt = keras_kfac.KFAC(layer_collection=collection, learning_rate=0.1, damping=1e-2)
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    with pytest.warns(UserWarning, match="no curvature block"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert [b.layer for b in opt.blocks] == [model.layers[1]]
    with pytest.raises(ValueError, match="already registered"):
        collection.register_dense(model.layers[1])
    with pytest.raises(TypeError, match="Dense"):
        collection.register_dense(keras.layers.Conv2D(2, 3))
    with pytest.raises(TypeError, match="Embedding"):
        collection.register_embedding(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="overrides the lookup"):
        collection.register_embedding(keras.layers.ReversibleEmbedding(5, 2))


@pytest.mark.parametrize(
    "register, layer",
    [
        ("register_conv1d", keras.layers.Conv1D(4, 3, groups=2, name="grouped")),
        ("register_conv1d", keras.layers.Conv1D(4, 3, data_format="channels_first", name="transposed")),
        ("register_conv2d", keras.layers.Conv2D(4, 3, groups=2, name="grouped")),
        ("register_conv2d", keras.layers.Conv2D(4, 3, data_format="channels_first", name="transposed")),
    ],
)
def test_unsupported_convolutions_are_named_and_left_to_the_fallback_rule(register, layer):
    collection = keras_kfac.LayerCollection()
    with pytest.raises(ValueError, match=f"'{layer.name}'.*(groups|channels_first)"):
        getattr(collection, register)(layer)
    with pytest.raises(TypeError, match="Conv1D" if register == "register_conv1d" else "Conv2D"):
        getattr(collection, register)(keras.layers.Dense(2))
    rank = 1 if register == "register_conv1d" else 2
    model = keras.Sequential([keras.Input((4,) * rank + (4,)), layer, keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match=f"fallback rule.*'{layer.name}'"):
        collection.auto_register(model)
    assert [b.layer for b in collection.blocks] == [model.layers[-1]]


def test_layer_used_twice_counts_as_more_locations():
    """A shared layer's calls are rows of one block, like convolution locations."""
    shared = keras.layers.Dense(4, activation="tanh")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(shared(shared(inputs)))
    model = keras.Model(inputs, outputs)
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, damping=1e-2)
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.train_on_batch(x, np.zeros((16, 2), "float32"))
    a = opt.layer_collection.block_for(shared).input_factor.cov.numpy()
    first = np.concatenate([x, np.ones((16, 1))], 1)
    second = np.concatenate([np.tanh(x @ shared.kernel.numpy() + shared.bias.numpy()), np.ones((16, 1))], 1)
    rows = np.concatenate([first, second], 0)
    np.testing.assert_allclose(a, rows.T @ rows / 32, rtol=1e-4, atol=1e-6)


def test_positions_folded_into_the_batch_axis_count_as_locations():
    """A Dense layer on (B·T, D) rows (a model that reshapes) has the factors of the Dense on (B, T, D)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5, 4)).astype("float32")
    y = rng.normal(size=(8, 5, 2)).astype("float32")
    factors = []
    for fold in (False, True):
        keras.utils.set_random_seed(0)
        dense = keras.layers.Dense(2, activation="tanh")
        inputs = keras.Input((5, 4))
        if fold:
            rows = keras.ops.reshape(inputs, (-1, 4))
            outputs = keras.ops.reshape(dense(rows), (-1, 5, 2))
        else:
            outputs = dense(inputs)
        model = keras.Model(inputs, outputs)
        opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
        model.compile(optimizer=opt, loss="mse")
        model.train_on_batch(x, y)
        factors.append((opt.blocks[0].input_factor.cov.numpy(), opt.blocks[0].output_factor.cov.numpy()))
    rows = np.concatenate([x.reshape(40, 4), np.ones((40, 1))], 1).astype(np.float64)
    np.testing.assert_allclose(factors[1][0], rows.T @ rows / 40, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(factors[1][1], factors[0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["mse", {"first": None, "second": "mse"}])
def test_models_with_several_outputs_are_rejected_clearly(loss):
    """One loss on two outputs, or a loss on the second only: the Fisher is not the first output's."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    model = keras.Model(
        inputs, [keras.layers.Dense(2, name="first")(hidden), keras.layers.Dense(2, name="second")(hidden)]
    )
    model.compile(optimizer=keras_kfac.KFAC(model=model, learning_rate=0.1), loss=loss)
    x = np.zeros((4, 6), "float32")
    with pytest.raises((NotImplementedError, ValueError), match=r"single (output; this model has 2|loss; got 2)"):
        model.train_on_batch(x, [np.zeros((4, 2), "float32")] * 2)


class GuideStepNet(keras.Model):
    """The custom train_step of Keras' guide to customizing fit(): compute_loss, then apply."""

    def __init__(self, pass_inputs: bool):
        super().__init__()
        self.pass_inputs = pass_inputs
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            inputs = {"x": x} if self.pass_inputs else {}
            loss = self.compute_loss(y=y, y_pred=y_pred, **inputs)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


@pytest.mark.parametrize("adaptive", [False, True])
def test_custom_train_step_of_the_keras_guide_trains_as_fit_does(adaptive):
    x, y = _data(n=64)
    options = dict(adaptive=True, damping=1e-2) if adaptive else dict(learning_rate=0.1, damping=1e-2)
    weights = []
    for custom in (False, True):
        keras.utils.set_random_seed(0)
        model = GuideStepNet(pass_inputs=True) if custom else SubclassedNet()
        model.compile(optimizer=keras_kfac.KFAC(model=model, seed=1, **options), loss=_loss_for("subclassed"))
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if adaptive:  # its extra forward passes need x
        model = GuideStepNet(pass_inputs=False)
        model.compile(optimizer=keras_kfac.KFAC(model=model, **options), loss=_loss_for("subclassed"))
        with pytest.raises(ValueError, match=r"need the model inputs.*compute_loss\(x=x"):
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)


class RenamedLossNet(SubclassedNet):
    """An override of compute_loss with its own parameter names (Keras passes them by position)."""

    def compute_loss(self, inputs=None, targets=None, predictions=None, weights=None, training=True):
        return super().compute_loss(inputs, targets, predictions, weights, training=training)


def test_compute_loss_override_with_renamed_parameters_trains_as_the_plain_model():
    x, y = _data(n=64)
    weights = []
    for net in (SubclassedNet, RenamedLossNet):
        keras.utils.set_random_seed(0)
        model = net()
        model.compile(
            optimizer=keras_kfac.KFAC(model=model, adaptive=True, damping=1e-2, seed=1), loss=_loss_for("subclassed")
        )
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_without_its_model_finds_it_or_says_so():
    """KFAC() and a KFAC made from a configuration meet their model while Keras
    builds the optimizer, before the first real step: they record every step."""
    x, y = _data(n=32)
    for orphan in (
        keras_kfac.KFAC(learning_rate=0.1),
        keras_kfac.KFAC.from_config(keras_kfac.KFAC(learning_rate=0.1).get_config()),
    ):
        model = _sequential()
        model.compile(optimizer=orphan, loss=_loss_for("sequential"))
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert int(orphan._start.numpy()) == 0 and orphan.iterations.numpy() == 2
        a = orphan.blocks[0].input_factor.cov.numpy()
        np.testing.assert_allclose(a[-1, -1], 1.0, rtol=1e-6)
    model = _sequential()
    # A model that a KFAC made with `model=` hooked records its steps, so a configured clone trains it.
    first = keras_kfac.KFAC(model=model, learning_rate=0.1)
    model.compile(optimizer=first, loss=_loss_for("sequential"))
    model.fit(x, y, epochs=1, verbose=0)
    clone = keras_kfac.KFAC.from_config(first.get_config())
    model.compile(optimizer=clone, loss=_loss_for("sequential"))
    model.fit(x, y, epochs=1, verbose=0)
    assert clone.iterations.numpy() == 1 and np.any(clone.blocks[0].input_factor.cov.numpy() != 0)
    other = _sequential()
    other.compile(optimizer=keras_kfac.KFAC(model=_sequential(), learning_rate=0.1), loss=_loss_for("sequential"))
    with pytest.raises(ValueError, match="create one KFAC per model"):
        other.fit(x, y, epochs=1, verbose=0)


def test_an_optimizer_whose_first_step_fails_stays_unbuilt_and_can_be_compiled_again():
    """The loss is checked before any variable exists, so a mended compile trains."""
    x, y = _data(n=32)
    y = np.eye(3, dtype="float32")[y]
    model = _sequential()
    opt = keras_kfac.KFAC(model=model, learning_rate=0.1)
    model.compile(optimizer=opt, loss="huber")
    with pytest.raises(ValueError, match="predictive distribution"):
        model.fit(x, y, epochs=1, verbose=0)
    assert not opt.built
    assert opt.alpha == 0.0 and np.isnan(opt.rho)
    model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=2, verbose=0)
    assert opt.built and np.all(np.isfinite(history.history["loss"]))
    assert opt.iterations.numpy() == 2  # one batch of 32 per epoch


def test_learning_rate_schedule_and_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    settings = dict(
        damping=0.02,
        momentum=0.5,
        ema_decay=0.9,
        inverse_update_period=7,
        estimation_mode="exact",
        l2_reg=1e-4,
        seed=11,
        statistics_fraction=0.5,
        curvature_fraction=0.25,
        patch_fraction=0.3,
    )
    opt = keras_kfac.KFAC(learning_rate=schedule, **settings)
    config = opt.get_config()
    clone = keras_kfac.KFAC.from_config(copy.deepcopy(config))
    assert clone.get_config() == config
    for key, value in settings.items():
        assert config[key] == value
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, keras_kfac.KFAC)
    assert restored.get_config() == config
    reduce = keras_kfac.KFAC(weight_sharing="reduce").get_config()
    assert reduce["weight_sharing"] == "reduce" and keras_kfac.KFAC.from_config(reduce).get_config() == reduce


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(damping=-1.0), "damping"),
        (dict(momentum=1.0), "momentum"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(inverse_update_period=0), "inverse_update_period"),
        (dict(inverse_update_period=2.5), "inverse_update_period"),
        (dict(estimation_mode="fisher"), "estimation_mode"),
        (dict(l2_reg=-1e-3), "l2_reg"),
        (dict(patch_fraction=0.0), r"`patch_fraction` must be in \(0, 1\]"),
        (dict(weight_sharing="sum"), "`weight_sharing` must be None or one of"),
        (dict(weight_sharing="reduce", patch_fraction=0.5), "leave patch_fraction at 1"),
        (dict(statistics_fraction=1.5), r"`statistics_fraction` must be in \(0, 1\]"),
        (dict(damping=float("inf")), "`damping` must be a finite number"),
        (dict(l2_reg=float("nan")), "`l2_reg` must be a finite number"),
        (dict(seed=2**31), r"`seed` must be an int32 integer"),
        (dict(seed=-(2**31) - 1), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        keras_kfac.KFAC(**kwargs)


def test_numpy_scalars_are_valid_hyperparameters():
    opt = keras_kfac.KFAC(
        damping=np.float32(1e-3), learning_rate=np.float64(0.1), inverse_update_period=np.int64(5), seed=np.int64(3)
    )
    config = opt.get_config()
    assert config["inverse_update_period"] == 5 and type(config["inverse_update_period"]) is int
    assert config["damping"] == pytest.approx(1e-3) and type(config["damping"]) is float
    assert type(config["seed"]) is int


def test_unsupported_loss_says_how_to_register_one():
    x, y = _data()
    model = _sequential()
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss="mean_absolute_error")
    with pytest.raises(ValueError, match="register_loss"):
        model.fit(x, np.eye(3, dtype="float32")[y], epochs=1, verbose=0)


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("MSE", "mean_squared_error"),
        ("bce", "binary_crossentropy"),
        ("BCE", "binary_crossentropy"),
        ("MeanSquaredError", "mean_squared_error"),
        ("BinaryCrossentropy", "binary_crossentropy"),
        ("CategoricalCrossentropy", "categorical_crossentropy"),
        ("SparseCategoricalCrossentropy", "sparse_categorical_crossentropy"),
    ],
)
def test_every_name_compile_accepts_for_a_supported_loss_is_known(alias, canonical):
    named, reference = resolve_loss(alias), resolve_loss(canonical)
    assert type(named.distribution) is type(reference.distribution)
    assert (named.from_logits, named.reduction, named.needs_logits) == (
        reference.from_logits,
        reference.reduction,
        reference.needs_logits,
    )


def test_a_model_compiled_with_an_upper_case_loss_name_trains():
    x, y = _data()
    model = _sequential()
    model.compile(optimizer=keras_kfac.KFAC(model=model, learning_rate=0.1, damping=1e-2), loss="MSE")
    history = model.fit(x, np.eye(3, dtype="float32")[y], batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_hand_made_collection_finds_its_model_in_the_first_training_step():
    """register_dense alone: the same steps as with register_model."""
    x, y = _data()
    weights = None
    trained = []
    for register_model in (True, False):
        model = _sequential()
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        collection = keras_kfac.LayerCollection()
        if register_model:
            collection.register_model(model)
        for layer in model.layers:
            collection.register_dense(layer)
        opt = keras_kfac.KFAC(layer_collection=collection, learning_rate=0.1, damping=1e-2, seed=0)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for start in range(0, 96, 32):
            model.train_on_batch(x[start : start + 32], y[start : start + 32])
        assert collection.model is model
        trained.append(model.get_weights())
    for with_model, without in zip(*trained):
        np.testing.assert_allclose(without, with_model, rtol=1e-6, atol=1e-7)
    # The preconditioned step is not SGD's: K-FAC's statistics were recorded.
    assert float(np.max(np.abs(collection.blocks[0].input_factor.cov.numpy()))) > 0


def test_registered_loss_overrides_custom_compiled_loss():
    x, y = _data()
    model = _sequential()
    collection = keras_kfac.LayerCollection()
    collection.register_model(model)
    collection.register_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def my_loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    opt = keras_kfac.KFAC(layer_collection=collection, learning_rate=0.2, damping=1e-2)
    model.compile(optimizer=opt, loss=my_loss)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_probabilities_without_logits_are_rejected():
    x, y = _data()
    inputs = keras.Input((6,))
    probs = keras.layers.Lambda(lambda t: keras.ops.softmax(t) * 1.0)(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, probs)
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="logits"):
        model.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("bad", ["input", "label", "fallback"])
def test_non_finite_gradient_leaves_weights_and_statistics_untouched(bad):
    """A NaN input, or a NaN label (finite activations, non-finite gradient): nothing
    moves, the fallback optimizer's variables and state included."""
    model = _sequential()
    if bad == "fallback":  # a LayerNormalization left to the fallback: no moving statistics to spoil
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8), keras.layers.LayerNormalization(), keras.layers.Dense(3)]
        )
    opt = keras_kfac.KFAC(model=model, layer_collection=_dense_only(model), learning_rate=0.1, damping=1e-2)
    model.compile(optimizer=opt, loss="mse")
    x, _ = _data(n=32)
    y = np.zeros((32, 3), "float32")
    model.train_on_batch(x, y)
    state = [v.numpy().copy() for v in model.weights + opt.variables if "iteration" not in v.path]
    x, y = x.copy(), y.copy()
    (y if bad == "label" else x)[0, 0] = np.nan
    model.train_on_batch(x, y)
    if bad == "fallback":
        assert int(opt.fallback.iterations.numpy()) == 1  # its second step was undone
    for old, new in zip(state, [v for v in model.weights + opt.variables if "iteration" not in v.path]):
        np.testing.assert_array_equal(old, new.numpy(), err_msg=new.path)


def test_a_non_finite_update_from_finite_gradients_moves_no_weight_or_velocity():
    """An infinite stored inverse makes the preconditioned step non-finite: θ and δ₀ stay."""
    model = _sequential()
    opt = keras_kfac.KFAC(model=model, layer_collection=_dense_only(model), learning_rate=0.1, damping=1e-2)
    model.compile(optimizer=opt, loss="mse")
    x, _ = _data(n=32)
    y = np.ones((32, 3), "float32")
    for _ in range(3):  # the inverses are refreshed after each of the first 3 statistics updates
        model.train_on_batch(x, y)
    inverse = opt.blocks[0].input_factor.inverse
    inverse.assign(np.full(inverse.shape, np.inf, np.float32))
    kept = [v.numpy().copy() for v in model.trainable_weights + list(opt._velocities.values())]
    model.train_on_batch(x, y)  # no refresh at this step: the infinite inverse is used
    for old, new in zip(kept, model.trainable_weights + list(opt._velocities.values())):
        np.testing.assert_array_equal(old, new.numpy(), err_msg=new.path)
    assert any(np.any(v != 0) for v in kept[len(model.trainable_weights) :])  # δ₀ was kept, not reset


def test_norm_constraint_bounds_the_step_in_the_fisher_metric():
    """lr²·UᵀF̆U ≤ C after scaling, with F̆ the damped Kronecker blocks built explicitly."""
    keras.utils.set_random_seed(4)
    x, y = _data(n=48)
    model = _sequential()
    constraint = 1e-4
    opt = keras_kfac.KFAC(
        model=model, learning_rate=1.0, damping=1e-3, momentum=0.0, norm_constraint=constraint, estimation_mode="exact"
    )
    model.compile(optimizer=opt, loss=_loss_for("sequential"))
    before = [w.numpy().astype(np.float64) for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = _loss_for("sequential")(y, model(x))
    gradient = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_weights)]
    model.train_on_batch(x, y)
    after = [w.numpy().astype(np.float64) for w in model.trainable_weights]
    quadratic, linear = 0.0, 0.0
    for i, block in enumerate(opt.blocks):
        a = block.input_factor.cov.numpy().astype(np.float64)
        g = block.output_factor.cov.numpy().astype(np.float64)
        gamma = np.sqrt(1e-3)
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        damped = np.kron(a + pi * gamma * np.eye(len(a)), g + gamma / pi * np.eye(len(g)))
        step = np.concatenate([after[2 * i] - before[2 * i], (after[2 * i + 1] - before[2 * i + 1])[None]], 0)
        quadratic += step.reshape(-1) @ damped @ step.reshape(-1)
        linear += sum(
            np.sum((a - b) * g)
            for a, b, g in zip(after[2 * i : 2 * i + 2], before[2 * i : 2 * i + 2], gradient[2 * i : 2 * i + 2])
        )
    # The unconstrained step is far larger, so the constraint is active: equality.
    np.testing.assert_allclose(quadratic, constraint, rtol=2e-3)
    # α is the step length the constraint left: U = αΔ with F̆Δ = −∇h, so α = −UᵀF̆U / Uᵀ∇h < lr.
    np.testing.assert_allclose(float(opt.alpha.numpy()), -quadratic / linear, rtol=5e-3)
    assert float(opt.alpha.numpy()) < 0.1
    with pytest.raises(ValueError, match="norm_constraint"):
        keras_kfac.KFAC(norm_constraint=0.0)


def test_default_step_is_the_trust_region_natural_gradient_step():
    """KFAC(model=model): lr 1, μ 0.5, C = 1e-3, λ = 3·tr(F̃)/n, statistics every 5th step,
    inverses every 25; a learning rate or momentum given keeps the classic defaults; the
    quadratic model has the trust region C = 3e-3, periods 5 and 10 and λ₀ = 0.3·tr(F̃)/n."""
    opt = keras_kfac.KFAC()
    assert (float(opt.learning_rate), opt.momentum, opt.norm_constraint) == (1.0, 0.5, 1e-3)
    assert (opt.statistics_update_period, opt.inverse_update_period) == (5, 25)
    assert opt.initial_damping is None and opt.relative_damping == 3.0
    assert isinstance(opt.fallback, keras.optimizers.Adam)
    classic = keras_kfac.KFAC(learning_rate=0.1)
    assert (classic.momentum, classic.norm_constraint) == (0.9, None)
    assert (classic.statistics_update_period, classic.inverse_update_period) == (1, 10)
    assert classic.relative_damping == 3.0
    adaptive = keras_kfac.KFAC(adaptive=True)
    assert (adaptive.statistics_update_period, adaptive.inverse_update_period) == (5, 10)
    assert (adaptive.norm_constraint, adaptive.relative_damping, adaptive.curvature_fraction) == (3e-3, 0.3, 1.0)
    assert keras_kfac.KFAC(adaptive=True, relative_damping=3.0).relative_damping == 3.0
    assert keras_kfac.KFAC(adaptive=True, norm_constraint=math.inf).norm_constraint == math.inf
    assert float(keras_kfac.KFAC(momentum=0.5).learning_rate) == pytest.approx(0.01)
    assert keras_kfac.KFAC(norm_constraint=float("inf")).norm_constraint == float("inf")
