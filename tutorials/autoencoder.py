"""The paper's deep autoencoder, trained with the paper's adaptive K-FAC.

Martens & Grosse (2015) test K-FAC on the deep autoencoders of Hinton &
Salakhutdinov (2006): 784-1000-500-250-30 with a mirrored decoder, Bernoulli
cross-entropy on the 784 pixels and an l2 penalty of 1e-5. Their K-FAC has no
learning rate to tune: each update δ = αΔ + μδ₀ takes α and μ from the exact
Fisher's quadratic model of the loss (§7), the damping λ follows the
Levenberg–Marquardt rule (§6.5) and the factored-Tikhonov γ is searched every
20 steps (§6.6). `KFAC(model=..., adaptive=True)` is all of it.

    python tutorials/autoencoder.py                 # the paper's widths
    python tutorials/autoencoder.py --width 0.25    # a quarter of the widths
    python tutorials/autoencoder.py --smoke

The hidden units here are tanh with Glorot initialisation, the common modern
variant of the paper's logistic units with sparse initialisation. Each epoch
prints the optimizer's damping λ, γ, α and μ, and the reduction ratio ρ.
"""

import keras

import common
import keras_kfac

WIDTHS = (1000, 500, 250, 30)


class ShowState(keras.callbacks.Callback):
    """Prints the adaptive K-FAC state at the end of each epoch."""

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        print(f"  λ {float(opt.damping):.3g}  γ {float(opt.gamma):.3g}  α {float(opt.alpha):.3g}"
              f"  μ {float(opt.mu):.3g}  ρ {float(opt.rho):.3g}")


def build(scale: float) -> keras.Model:
    widths = [max(int(w * scale), 2) for w in WIDTHS]
    layers = [keras.Input((784,))]
    layers += [keras.layers.Dense(w, activation="tanh") for w in widths[:-1]]
    layers += [keras.layers.Dense(widths[-1])]  # the linear code layer
    layers += [keras.layers.Dense(w, activation="tanh") for w in reversed(widths[:-1])]
    layers += [keras.layers.Dense(784)]  # logits of the 784 Bernoulli pixels
    return keras.Sequential(layers)


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="scale of the layer widths")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    (x_train, _), _ = common.load(args, flatten=True)

    model = build(0.1 if args.smoke else args.width)
    optimizer = keras_kfac.KFAC(model=model, adaptive=True, l2_reg=1e-5)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x_train, x_train, batch_size=min(args.batch_size, len(x_train)), epochs=args.epochs,
              verbose=2, callbacks=[ShowState()])


if __name__ == "__main__":
    main()
