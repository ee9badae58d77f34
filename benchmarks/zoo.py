"""The model zoo: six models built the way Keras' own examples build them.

Each entry gives a model builder, its compiled loss, its data (Fashion-MNIST,
or generated) and the batch size its example uses. ``size="small"`` shrinks
widths and data (images to 14×14) so that the tests can train every model
in seconds.

- ``mlp``: a relu MLP classifier, 784-256-128-10 with a softmax output.
- ``convnet``: keras.io's "Simple MNIST convnet" (Conv2D 32 → MaxPool →
  Conv2D 64 → MaxPool → Flatten → Dropout → Dense softmax, one-hot labels).
- ``resnet``: a small ResNet (Conv2D + BatchNormalization residual blocks with
  identity and projection shortcuts, global average pooling).
- ``lstm``: keras.io's "Sequence to sequence learning for performing number
  addition": an LSTM encoder, RepeatVector, an LSTM decoder and a per-digit
  softmax, on generated sums of three-digit numbers.
- ``transformer``: keras.io's "Text classification with Transformer" (token and
  position Embeddings, MultiHeadAttention, LayerNormalization, a feed-forward
  block, global average pooling), on generated sentences whose label needs
  the context of each word (a negation flips the next word's polarity).
- ``autoencoder``: the deep autoencoder of Hinton & Salakhutdinov (2006) that
  K-FAC's paper benchmarks (784-1000-500-250-30 and its mirror, tanh units,
  Bernoulli cross-entropy on logits), in batches of 1000 as the paper's
  K-FAC starts with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

MODELS = ("mlp", "convnet", "resnet", "lstm", "transformer", "autoencoder")
SIZES = ("small", "default")


@dataclass
class ZooProblem:
    """One zoo model with its data: everything but the optimizer."""

    name: str
    build: Callable[[], keras.Model]
    loss: str | keras.losses.Loss
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    batch_size: int


# --------------------------------------------------------------------- data


def _images(flatten: bool, n_train: int, n_val: int, synthetic: bool, side: int = 28):
    """Fashion-MNIST in [0, 1] (or blurry random blobs of its shapes with
    ``synthetic``), 2×2-average-pooled when ``side`` is 14."""
    shape = (side * side,) if flatten else (side, side, 1)
    if synthetic:
        rng = np.random.default_rng(1234)
        base = rng.uniform(size=(10,) + shape).astype(np.float32)
        labels = rng.integers(0, 10, size=n_train + n_val).astype(np.int32)
        noise = 0.3 * rng.standard_normal((n_train + n_val,) + shape)
        x = np.clip(base[labels] + noise, 0, 1).astype(np.float32)
        return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]
    from keras_kfac.datasets import fashion_mnist_arrays

    (x, y), (xt, yt) = fashion_mnist_arrays(flatten=flatten, num_train=n_train)
    xt = xt[:n_val]
    if side != 28:
        pool = lambda images: images.reshape(-1, side, 28 // side, side, 28 // side).mean((2, 4)).reshape((-1,) + shape)
        x, xt = pool(x), pool(xt)
    return x, y.astype(np.int32), xt, yt[:n_val].astype(np.int32)


ADDITION_DIGITS = 3
ADDITION_CHARS = "0123456789+ "


def addition_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot "a+b" questions (reversed, padded to 7 characters) and their padded answers.

    The data of keras.io's addition example: a and b have 1 to 3 digits; the
    input is reversed, as the example does, which shortens the paths the LSTM
    has to learn.
    """
    rng = np.random.default_rng(seed)
    width_in, width_out = 2 * ADDITION_DIGITS + 1, ADDITION_DIGITS + 1
    index = {c: i for i, c in enumerate(ADDITION_CHARS)}
    x = np.zeros((count, width_in, len(ADDITION_CHARS)), np.float32)
    y = np.zeros((count, width_out, len(ADDITION_CHARS)), np.float32)
    digits = rng.integers(1, ADDITION_DIGITS + 1, size=(count, 2))
    for n in range(count):
        a, b = (int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d)) for d in digits[n])
        question = f"{a}+{b}".ljust(width_in)[::-1]
        answer = str(a + b).ljust(width_out)
        x[n, np.arange(width_in), [index[c] for c in question]] = 1.0
        y[n, np.arange(width_out), [index[c] for c in answer]] = 1.0
    return x, y


NEGATION = 1  # token id of "not"; 0 is padding


def sentiment_data(count: int, seed: int, vocabulary: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated sentences and their polarity, which needs each word's context.

    Tokens 2 … vocabulary−1 are words, a third of them positive (+1), a third
    negative (−1), the rest neutral; token 1 ("not") flips the polarity of the
    word after it. The label is whether the sentence's polarity sum is
    positive; sentences whose sum is 0 are redrawn.
    """
    rng = np.random.default_rng(seed)
    words = np.arange(2, vocabulary)
    polarity = np.zeros(vocabulary)
    third = len(words) // 3
    polarity[words[:third]], polarity[words[third : 2 * third]] = 1.0, -1.0
    x = np.zeros((0, length), np.int32)
    y = np.zeros((0,), np.int32)
    while len(x) < count:
        tokens = rng.choice(words, size=(count, length))
        tokens[rng.uniform(size=(count, length)) < 0.15] = NEGATION
        sign = np.where(np.roll(tokens, 1, axis=1) == NEGATION, -1.0, 1.0)
        sign[:, 0] = 1.0
        total = (polarity[tokens] * sign).sum(axis=1)
        keep = total != 0
        x = np.concatenate([x, tokens[keep].astype(np.int32)])
        y = np.concatenate([y, (total[keep] > 0).astype(np.int32)])
    return x[:count], y[:count]


# ------------------------------------------------------------------- models


def mlp(hidden=(256, 128), side: int = 28) -> keras.Model:
    return keras.Sequential(
        [keras.Input((side * side,))]
        + [layers.Dense(units, activation="relu") for units in hidden]
        + [layers.Dense(10, activation="softmax")]
    )


def convnet(filters=(32, 64), side: int = 28) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((side, side, 1)),
            layers.Conv2D(filters[0], kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(filters[1], kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )


def _residual_block(x, filters: int, strides: int):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


def resnet(filters=(16, 32, 64), side: int = 28) -> keras.Model:
    inputs = keras.Input((side, side, 1))
    x = layers.Conv2D(filters[0], 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for index, width in enumerate(filters):
        x = _residual_block(x, width, strides=1 if index == 0 else 2)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="resnet")


def lstm(units: int = 128) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((2 * ADDITION_DIGITS + 1, len(ADDITION_CHARS))),
            layers.LSTM(units),
            layers.RepeatVector(ADDITION_DIGITS + 1),
            layers.LSTM(units, return_sequences=True),
            layers.Dense(len(ADDITION_CHARS), activation="softmax"),
        ]
    )


@keras.saving.register_keras_serializable(package="keras_kfac_zoo")
class TokenAndPositionEmbedding(layers.Layer):
    """Token embedding plus a learned embedding of each position (keras.io's layer)."""

    def __init__(self, maxlen: int, vocab_size: int, embed_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = self.pos_emb(ops.arange(0, ops.shape(x)[-1], 1))
        return self.token_emb(x) + positions


@keras.saving.register_keras_serializable(package="keras_kfac_zoo")
class TransformerBlock(layers.Layer):
    """Self-attention and a feed-forward block, each with a residual and LayerNorm (keras.io's layer)."""

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, rate: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=None):
        attention = self.dropout1(self.att(inputs, inputs), training=training)
        out1 = self.layernorm1(inputs + attention)
        ffn_output = self.dropout2(self.ffn(out1), training=training)
        return self.layernorm2(out1 + ffn_output)


def transformer(vocabulary: int, length: int, embed_dim: int = 32, num_heads: int = 2, ff_dim: int = 32) -> keras.Model:
    inputs = keras.Input((length,), dtype="int32")
    x = TokenAndPositionEmbedding(length, vocabulary, embed_dim)(inputs)
    x = TransformerBlock(embed_dim, num_heads, ff_dim)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="transformer")


def autoencoder(widths=(1000, 500, 250, 30), side: int = 28) -> keras.Model:
    """784-widths-mirror-784, tanh units, a linear code and logits out (Glorot initialisation)."""
    hidden = [layers.Dense(w, activation="tanh") for w in widths[:-1]]
    mirror = [layers.Dense(w, activation="tanh") for w in reversed(widths[:-1])]
    return keras.Sequential(
        [keras.Input((side * side,)), *hidden, layers.Dense(widths[-1]), *mirror, layers.Dense(side * side)]
    )


# ------------------------------------------------------------------ problems


def problem(name: str, size: str = "default", synthetic: bool = False) -> ZooProblem:
    """The zoo model ``name`` at ``size`` ("small": tiny widths and data, for tests)."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; one of {MODELS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {SIZES}")
    small = size == "small"
    n_train, n_val = (2048, 128) if small else (20000, 5000)
    side = 14 if small else 28
    if name == "mlp":
        x, y, xv, yv = _images(True, n_train, n_val, synthetic, side)
        return ZooProblem(
            name,
            lambda: mlp((32, 16) if small else (256, 128), side),
            "sparse_categorical_crossentropy",
            x,
            y,
            xv,
            yv,
            128,
        )
    if name == "convnet":
        x, y, xv, yv = _images(False, n_train, n_val, synthetic, side)
        one_hot = lambda labels: keras.utils.to_categorical(labels, 10).astype(np.float32)
        return ZooProblem(
            name,
            lambda: convnet((4, 8) if small else (32, 64), side),
            "categorical_crossentropy",
            x,
            one_hot(y),
            xv,
            one_hot(yv),
            128,
        )
    if name == "resnet":
        x, y, xv, yv = _images(False, n_train, n_val, synthetic, side)
        return ZooProblem(
            name,
            lambda: resnet((4, 8, 8) if small else (16, 32, 64), side),
            "sparse_categorical_crossentropy",
            x,
            y,
            xv,
            yv,
            128,
        )
    if name == "lstm":
        x, y = addition_data(n_train + n_val, seed=7)
        return ZooProblem(
            name,
            lambda: lstm(16 if small else 128),
            "categorical_crossentropy",
            x[:n_train],
            y[:n_train],
            x[n_train:],
            y[n_train:],
            32,
        )
    if name == "transformer":
        vocabulary, length = (50, 12) if small else (200, 40)
        x, y = sentiment_data(n_train + n_val, seed=11, vocabulary=vocabulary, length=length)
        build = lambda: transformer(vocabulary, length, *((8, 2, 8) if small else (32, 2, 32)))
        return ZooProblem(
            name, build, "sparse_categorical_crossentropy", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 32
        )
    x, _, xv, _ = _images(True, n_train, n_val, synthetic, side)
    return ZooProblem(
        name,
        lambda: autoencoder((32, 16, 8, 4) if small else (1000, 500, 250, 30), side),
        keras.losses.BinaryCrossentropy(from_logits=True),
        x,
        x,
        xv,
        xv,
        1000,
    )
