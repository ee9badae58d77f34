"""Quickstart: a Fashion-MNIST classifier trained with K-FAC through `model.fit`.

K-FAC is an optimizer like any other in Keras, with one difference: it needs the
model, because it preconditions each layer's gradient with the damped inverse of
a Kronecker-factored approximation of that layer's Fisher block, built from the
layer's inputs and output gradients as the training step runs. So it is created
with `model=` and then compiled in as usual.

    python tutorials/quickstart.py            # 5 epochs on Fashion-MNIST
    python tutorials/quickstart.py --smoke    # a few seconds

With no other argument, each step is the natural-gradient step bounded so that
it moves the model's predictions by at most a fixed amount (measured by the
approximate Fisher), which keeps early steps, when the curvature statistics
are young, from overshooting; the damping follows the curvature's own scale.
"""

import common
import keras

import keras_kfac


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    (x_train, y_train), (x_test, y_test) = common.load(args, flatten=True)

    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),  # logits
        ]
    )
    optimizer = keras_kfac.KFAC(model=model)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=256, epochs=args.epochs, validation_data=(x_test, y_test), verbose=2)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f}")
    print(
        f"K-FAC preconditioned {len(optimizer.blocks)} layers: " + ", ".join(block.name for block in optimizer.blocks)
    )


if __name__ == "__main__":
    main()
