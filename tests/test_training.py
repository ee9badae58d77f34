"""K-FAC against SGD with the same budget on a small MLP, a convnet, a Conv1D net and an embedding model."""

import keras
import numpy as np
import pytest

import keras_kfac

SGD_LEARNING_RATES = (0.03, 0.1, 0.3)


def _mlp():
    return keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(4),
        ]
    )


def _two_convolutions(input_shape, convolution, first_padding):
    return keras.Sequential(
        [
            keras.Input(input_shape),
            convolution(8, 3, padding=first_padding, activation="relu"),
            convolution(8, 3, strides=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )


def _convnet():
    return _two_convolutions((8, 8, 1), keras.layers.Conv2D, "same")


def _sequence_net():
    return _two_convolutions((16, 2), keras.layers.Conv1D, "causal")


def _token_net():
    return keras.Sequential(
        [
            keras.Input((12,), dtype="int32"),
            keras.layers.Embedding(50, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(4),
        ]
    )


def _problem(kind):
    rng = np.random.default_rng(0)
    if kind == "mlp":
        x = rng.normal(size=(512, 10)).astype("float32")
        # A nonlinear teacher: labels from a random tanh network.
        h = np.tanh(x @ rng.normal(size=(10, 16)))
        y = np.argmax(h @ rng.normal(size=(16, 4)), axis=1)
        return _mlp, x, y.astype("int32")
    if kind == "tokens":
        # Each token votes for the classes with a fixed random score; the label is the sum's argmax.
        x = rng.integers(0, 50, size=(384, 12)).astype("int32")
        scores = rng.normal(size=(50, 4))
        return _token_net, x, np.argmax(scores[x].sum(1), axis=1).astype("int32")
    if kind == "sequence":
        # The quarter of the sequence with the largest mean.
        x = rng.normal(size=(384, 16, 2)).astype("float32")
        quarters = np.stack([x[:, 4 * i : 4 * i + 4].mean((1, 2)) for i in range(4)], 1)
        return _sequence_net, x, np.argmax(quarters, axis=1).astype("int32")
    x = rng.normal(size=(384, 8, 8, 1)).astype("float32")
    quadrants = np.stack(
        [
            x[:, :4, :4].mean((1, 2, 3)),
            x[:, :4, 4:].mean((1, 2, 3)),
            x[:, 4:, :4].mean((1, 2, 3)),
            x[:, 4:, 4:].mean((1, 2, 3)),
        ],
        1,
    )
    return _convnet, x, np.argmax(quadrants, axis=1).astype("int32")


def _final_loss(build, x, y, optimizer_factory, epochs):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=optimizer_factory(model), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=False)
    return history.history["loss"][-1]


@pytest.mark.parametrize(
    "kind, learning_rate, damping",
    [("mlp", 0.03, 1e-2), ("convnet", 0.03, 0.1), ("sequence", 0.03, 0.1), ("tokens", 0.03, 1e-2)],
)
def test_kfac_reaches_a_loss_sgd_does_not_with_the_same_budget(kind, learning_rate, damping):
    build, x, y = _problem(kind)
    epochs = 6
    kfac = _final_loss(
        build,
        x,
        y,
        lambda m: keras_kfac.KFAC(model=m, learning_rate=learning_rate, damping=damping, seed=0),
        epochs,
    )
    sgd = min(
        _final_loss(build, x, y, lambda m, lr=lr: keras.optimizers.SGD(lr, momentum=0.9), epochs)
        for lr in SGD_LEARNING_RATES
    )
    assert kfac < sgd, (kfac, sgd)
