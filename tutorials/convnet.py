"""A convnet on Fashion-MNIST with K-FAC's convolution blocks (KFC).

Grosse & Martens (2016) extend K-FAC to convolutions: a Conv2D layer applies one
weight matrix to the patch around each output location, so its Kronecker
factors are averaged over locations as well as examples — Ā from the patches
(`extract_patches`, with a 1 appended for the bias) and G from the output
gradients at each location, times the number of locations. `KFAC(model=...)`
registers Conv2D and Dense layers alike; pooling and flattening have no weights.

    python tutorials/convnet.py            # 5 epochs on Fashion-MNIST
    python tutorials/convnet.py --smoke    # a few seconds

Keep the input of the last Dense layer small (here 5·5·32 = 800 after two
poolings): its Ā factor is (inputs + 1)² and is inverted every
`inverse_update_period` steps.
"""

import common
import keras

import keras_kfac


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    (x_train, y_train), (x_test, y_test) = common.load(args, flatten=False)

    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    optimizer = keras_kfac.KFAC(model=model)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=256, epochs=args.epochs, validation_data=(x_test, y_test), verbose=2)
    for block in optimizer.blocks:
        print(f"{block.name:>10}: Ā {block.input_dim}×{block.input_dim}, G {block.output_dim}×{block.output_dim}")


if __name__ == "__main__":
    main()
