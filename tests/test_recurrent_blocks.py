"""Recurrent blocks (LSTM, GRU, SimpleRNN) against explicit float64 references."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.blocks import RecurrentInputBlock, RecurrentKernelBlock
from keras_kfac.blocks.recurrent import Recurrence
from keras_kfac.capture import LayerCall

K = 3  # outputs of the linear head
LAYERS = {"LSTM": keras.layers.LSTM, "GRU": keras.layers.GRU, "SimpleRNN": keras.layers.SimpleRNN}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("variant", ["plain", "sequences", "backwards", "mask", "initial_state"])
def test_the_recurrence_reproduces_the_layer(kind, variant):
    """The statistics' copy of the recurrence gives the layer's own output."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    layer = LAYERS[kind](6, return_sequences=variant in ("sequences", "mask"), go_backwards=variant == "backwards")
    kwargs = {}
    if variant == "mask":
        kwargs["mask"] = tf.constant(rng.uniform(size=(4, 5)) > 0.3)
    if variant == "initial_state":
        states = 2 if kind == "LSTM" else 1
        kwargs["initial_state"] = [tf.constant(rng.normal(size=(4, 6)).astype("float32")) for _ in range(states)]
    output = layer(x, **kwargs)
    call = LayerCall(tf.constant(x), output, kwargs.get("initial_state"), kwargs.get("mask"))
    recomputed, previous, _ = Recurrence(layer).run(call)
    np.testing.assert_allclose(recomputed.numpy(), output.numpy(), rtol=1e-5, atol=1e-6)
    assert tuple(previous.shape) == (5, 4, 6)


def _float64_copy(model: keras.Model) -> keras.Model:
    copy = keras.Sequential(
        [keras.Input(model.input_shape[1:], dtype="float64")]
        + [type(layer).from_config({**layer.get_config(), "dtype": "float64"}) for layer in model.layers]
    )
    copy.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return copy


@pytest.mark.parametrize("kind", ["LSTM", "SimpleRNN"])
def test_factors_match_gate_vectors_recovered_from_the_input_gradient(kind):
    """Ā = E[x_t x_tᵀ] (+1), Ā_U = E[h_{t-1} h_{t-1}ᵀ] and G = (1/B) Σ_{n,t,j} ĝ ĝᵀ, the reference ĝ_t
    recovered from Keras' own float64 ∂(output)/∂x_t = ĝ_t Wᵀ (W has more rows than columns)."""
    rng = np.random.default_rng(1)
    batch, steps, units = 3, 4, 2
    width = units * (4 if kind == "LSTM" else 1)
    features = width + 2
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    layer = LAYERS[kind](units, return_sequences=True)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((steps, features)), layer, keras.layers.Flatten(), head])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, damping=1e-2, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, np.zeros((batch, K), "float32"))

    reference = _float64_copy(model)
    x64 = tf.constant(x.astype(np.float64))
    kernel = layer.cell.kernel.numpy().astype(np.float64)
    g = np.zeros((width, width))
    for j in range(K):
        with tf.GradientTape() as tape:
            tape.watch(x64)
            out = np.sqrt(2.0 / K) * reference(x64)[:, j]
        dx = tape.gradient(out, x64).numpy()  # (batch, steps, features) = ĝ_t Wᵀ
        vectors = dx.reshape(-1, features) @ np.linalg.pinv(kernel.T)
        g += vectors.T @ vectors / batch
    rows = np.concatenate([x.reshape(-1, features).astype(np.float64), np.ones((batch * steps, 1))], 1)
    hidden = reference.layers[0](x64).numpy()
    previous = np.concatenate([np.zeros((batch, 1, units)), hidden[:, :-1]], 1).reshape(-1, units)

    input_block, kernel_block = opt.blocks[:2]
    assert isinstance(input_block, RecurrentInputBlock) and isinstance(kernel_block, RecurrentKernelBlock)
    np.testing.assert_allclose(input_block.input_factor.cov.numpy(), rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        kernel_block.input_factor.cov.numpy(), previous.T @ previous / len(previous), rtol=1e-4, atol=1e-6
    )
    for block in (input_block, kernel_block):
        np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-3, atol=1e-7)


def test_gru_vectors_give_each_examples_gradient():
    """Σ_t ā_t ĝ_tᵀ over one example's steps is its gradient in [W; b] and in [U; b_r] (Keras' float64 tape)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    layer = keras.layers.GRU(2)
    model = keras.Sequential([keras.Input((4, 3)), layer])
    layer_output = layer(x)
    call = LayerCall(tf.constant(x), layer_output)
    input_block, kernel_block = RecurrentInputBlock(layer), RecurrentKernelBlock(layer)
    vector = rng.normal(size=(2, 2)).astype("float32")
    reference = _float64_copy(model).layers[0]
    for n in range(2):
        per_example = np.zeros_like(vector)
        per_example[n] = vector[n]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(reference(x.astype(np.float64)) * per_example)
        grads = tape.gradient(loss, reference.trainable_variables)  # kernel, recurrent kernel, bias (2, 6)
        for block, variables in ((input_block, [grads[0], grads[2]]), (kernel_block, [grads[1], grads[2]])):
            rows = tf.function(lambda b=block, v=per_example: (b.call_input_rows(call), b.call_output_rows(call, v)))
            a, g = (r.numpy().reshape(2, 4, -1)[n] for r in rows())  # example by example
            expected = block.gradient_matrix([tf.constant(v.numpy(), tf.float32) for v in variables]).numpy()
            np.testing.assert_allclose(a.T @ g, expected, rtol=1e-4, atol=1e-6)


def test_gru_blocks_share_the_bias_and_precondition_their_own_rows():
    """The optimizer's update of a GRU's (2, 3H) bias: row b from the input block, row b_r from the recurrent one."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.GRU(2), keras.layers.Dense(K)])
    opt = keras_kfac.KFAC(model=model, learning_rate=1.0, momentum=0.0, damping=1e-2)
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, np.zeros((8, K), "float32"))
    input_block, kernel_block = opt.blocks[:2]
    gamma = tf.constant(0.2)
    grads = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in model.layers[0].trainable_variables]
    kernel, recurrent, bias = grads
    updates = opt._estimator.preconditioner.precondition(
        {"W": kernel, "U": recurrent, "b": bias},
        [input_block.damped_inverses(gamma), kernel_block.damped_inverses(gamma), opt.blocks[2].damped_inverses(gamma)],
        lambda v: {id(input_block.kernel): "W", id(kernel_block.kernel): "U"}.get(
            id(v), "b" if v.shape == (2, 6) else "d"
        ),
    )

    def explicit(block, gradient):
        a = block.input_factor.cov.numpy().astype(np.float64)
        g = block.output_factor.cov.numpy().astype(np.float64)
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        damped = np.kron(a + pi * 0.2 * np.eye(len(a)), g + 0.2 / pi * np.eye(len(g)))
        return np.linalg.solve(damped, gradient.reshape(-1)).reshape(gradient.shape)

    w_bar = explicit(input_block, np.concatenate([kernel.numpy(), bias.numpy()[:1]]).astype(np.float64))
    u_bar = explicit(kernel_block, np.concatenate([recurrent.numpy(), bias.numpy()[1:]]).astype(np.float64))
    np.testing.assert_allclose(updates["W"].numpy(), w_bar[:-1], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(updates["U"].numpy(), u_bar[:-1], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(updates["b"].numpy(), np.stack([w_bar[-1], u_bar[-1]]), rtol=2e-4, atol=1e-6)


class _LSTMGates(keras.layers.Layer):
    """One LSTM step from zero state on pre-activations z = x W + b: h = σ(o)·tanh(σ(i)·tanh(g))."""

    def call(self, z):
        i, _, g, o = keras.ops.split(z, 4, axis=-1)
        return keras.ops.sigmoid(o) * keras.ops.tanh(keras.ops.sigmoid(i) * keras.ops.tanh(g))


@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM"])
def test_a_one_step_rnn_input_kernel_gives_the_dense_update(kind):
    rng = np.random.default_rng(4)
    units, features = 3, 4
    width = units * (4 if kind == "LSTM" else 1)
    x = rng.normal(size=(16, 1, features)).astype("float32")
    y = rng.integers(0, K, size=16)
    kernel = rng.normal(size=(features, width)).astype("float32") * 0.5
    bias = rng.normal(size=width).astype("float32") * 0.1
    recurrent = rng.normal(size=(units, width)).astype("float32") * 0.5
    head = [rng.normal(size=(units, K)).astype("float32") * 0.5, np.zeros(K, "float32")]
    rnn = keras.Sequential([keras.Input((1, features)), LAYERS[kind](units), keras.layers.Dense(K)])
    rnn.set_weights([kernel, recurrent, bias, *head])
    gates = [_LSTMGates()] if kind == "LSTM" else []
    dense = keras.Sequential(
        [
            keras.Input((1, features)),
            keras.layers.Flatten(),
            keras.layers.Dense(width, activation=None if gates else "tanh"),
            *gates,
            keras.layers.Dense(K),
        ]
    )
    dense.set_weights([kernel, bias, *head])
    steps = []
    for model in (rnn, dense):
        opt = keras_kfac.KFAC(model=model, learning_rate=0.5, damping=0.01, momentum=0.0, estimation_mode="exact")
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.numpy().copy() for w in model.trainable_weights]
        for _ in range(3):
            model.train_on_batch(x, y)
        steps.append([w.numpy() - b for w, b in zip(model.trainable_weights, before)])
    (rnn_kernel, rnn_recurrent, rnn_bias, *rnn_head), dense_steps = steps
    np.testing.assert_array_equal(rnn_recurrent, 0.0)  # h₀ = 0: no gradient, no step
    for mine, reference in zip([rnn_kernel, rnn_bias, *rnn_head], dense_steps):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"dropout": 0.1}, "dropout"),
        ({"stateful": True}, "stateful"),
        ({"return_state": True}, "return_state"),
        ({"reset_after": False}, "reset_after"),
        ({"zero_output_for_mask": True}, "zero_output_for_mask"),
    ],
)
def test_what_the_blocks_cannot_follow_is_refused_and_left_to_the_fallback(arguments, problem):
    layer = keras.layers.GRU(2, **arguments)
    with pytest.raises(ValueError, match=problem):
        RecurrentInputBlock(layer)
    inputs = keras.Input((4, 3), batch_size=8 if "stateful" in arguments else None)
    output = layer(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(output[0] if "return_state" in arguments else output))
    with pytest.warns(UserWarning, match=problem):
        opt = keras_kfac.KFAC(model=model)
    assert len(opt.blocks) == 1


def test_the_zoo_lstm_is_in_blocks_and_trains_and_resumes(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 6, 4)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 5, size=(64, 3)), 5)
    model = keras.Sequential(
        [
            keras.Input((6, 4)),
            keras.layers.LSTM(8),
            keras.layers.RepeatVector(3),
            keras.layers.LSTM(8, return_sequences=True),
            keras.layers.Dense(5, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss="categorical_crossentropy")
    lines = []
    model.optimizer.layer_collection.summary(print_fn=lines.append)
    assert (
        f" Parameters in K-FAC blocks: {model.count_params():,} of {model.count_params():,} trainable (100.0%)" in lines
    )
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < history.history["loss"][0]
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [type(b) for b in loaded.optimizer.blocks] == [type(b) for b in model.optimizer.blocks]
    for model_ in (model, loaded):
        model_.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for mine, reference in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)


def test_rows_are_weighted_by_their_own_examples_sample_weights():
    """With per-example sample weights, Ā of x_t rows and of h_{t-1} rows is the weighted mean over
    examples and steps, each row weighted by its own example's weight (rows run example by example)."""
    rng = np.random.default_rng(8)
    batch, steps, features, units = 4, 3, 2, 2
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    weights = np.array([0.0, 1.0, 3.0, 0.5], "float32")
    layer = keras.layers.SimpleRNN(units, return_sequences=True)
    model = keras.Sequential([keras.Input((steps, features)), layer, keras.layers.Flatten(), keras.layers.Dense(K)])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, np.zeros((batch, K), "float32"), sample_weight=weights)
    row_weights = np.repeat(weights, steps).astype(np.float64)
    rows = np.concatenate([x.reshape(-1, features), np.ones((batch * steps, 1))], 1).astype(np.float64)
    expected = (rows * row_weights[:, None]).T @ rows / row_weights.sum()
    np.testing.assert_allclose(opt.blocks[0].input_factor.cov.numpy(), expected, rtol=1e-4, atol=1e-6)
    hidden = _float64_copy(model).layers[0](x.astype(np.float64)).numpy()
    previous = np.concatenate([np.zeros((batch, 1, units)), hidden[:, :-1]], 1).reshape(-1, units)
    expected = (previous * row_weights[:, None]).T @ previous / row_weights.sum()
    np.testing.assert_allclose(opt.blocks[1].input_factor.cov.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_both_blocks_read_one_re_run_and_one_backward_pass_per_vector(monkeypatch):
    """A traced statistics pass re-runs each recurrent layer's recurrence once and back-propagates each vector once."""
    runs, backward = collections.Counter(), collections.Counter()
    run, gradients = Recurrence.run, tf.gradients

    def counted_run(self, call, probes=None):
        runs[id(tf.compat.v1.get_default_graph())] += 1
        return run(self, call, probes)

    def counted_gradients(ys, xs, **kwargs):
        if isinstance(xs, list) and len(xs) == 2 and all(x.shape.rank == 3 for x in xs):
            backward[id(tf.compat.v1.get_default_graph())] += 1
        return gradients(ys, xs, **kwargs)

    monkeypatch.setattr(Recurrence, "run", counted_run)
    monkeypatch.setattr(tf, "gradients", counted_gradients)
    x = np.random.default_rng(9).normal(size=(4, 3, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3, 2)), keras.layers.GRU(3), keras.layers.Dense(K)])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, np.zeros((4, K), "float32"))
    assert [type(b) for b in opt.blocks[:2]] == [RecurrentInputBlock, RecurrentKernelBlock]
    assert runs and set(runs.values()) == {1}
    # The exact mode's K vectors, each shared by the two blocks.
    assert backward.keys() == runs.keys() and set(backward.values()) == {K}
