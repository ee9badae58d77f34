"""Sequences with K-FAC: Embedding and Conv1D blocks, on Fashion-MNIST rows.

Each image becomes a sequence of 28 rows, and each pixel a token: its
intensity quantised to 8 levels. An Embedding layer maps the tokens to
vectors. It is a Dense layer applied to one-hot rows, so its Ā factor is
diagonal: the tokens' frequencies. K-FAC stores only that diagonal, whatever
the vocabulary size. Two Conv1D layers then read the rows in order. Like
Conv2D, they are KFC blocks (Grosse & Martens 2016), with one location per
output step. `KFAC(model=...)` registers all of them.

    python tutorials/sequences.py            # 5 epochs on Fashion-MNIST
    python tutorials/sequences.py --smoke    # a few seconds
"""

import common
import keras
import numpy as np

import keras_kfac

LEVELS = 8  # the vocabulary: pixel intensities quantised to 8 tokens


def tokens(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) int32 tokens from (n, 28, 28, 1) images in [0, 1]."""
    return np.minimum((images[..., 0] * LEVELS).astype("int32"), LEVELS - 1)


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    (x_train, y_train), (x_test, y_test) = common.load(args, flatten=False)
    x_train, x_test = tokens(x_train), tokens(x_test)

    model = keras.Sequential(
        [
            keras.Input((28, 28), dtype="int32"),
            keras.layers.Embedding(LEVELS, 4),  # (rows, pixels, 4)
            keras.layers.Reshape((28, 28 * 4)),  # a row is one step
            keras.layers.Conv1D(64, 5, padding="causal", activation="relu"),
            keras.layers.Conv1D(64, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(10, activation="softmax"),  # K-FAC takes the logits behind it
        ]
    )
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=256, epochs=args.epochs, validation_data=(x_test, y_test), verbose=2)
    for block in model.optimizer.blocks:
        kind = "diagonal, stored as a vector" if block.input_factor.cov.shape.rank == 1 else "dense"
        print(
            f"{block.name:>10}: Ā {block.input_dim}×{block.input_dim} ({kind}), G {block.output_dim}×{block.output_dim}"
        )


if __name__ == "__main__":
    main()
