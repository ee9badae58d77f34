"""The paper's deep autoencoder, trained with the paper's adaptive K-FAC.

Martens & Grosse (2015) test K-FAC on the deep autoencoders of Hinton &
Salakhutdinov (2006): 784-1000-500-250-30 with a mirrored decoder, Bernoulli
cross-entropy on the 784 pixels and an l2 penalty of 1e-5. Their K-FAC has no
learning rate to tune: each update δ = αΔ + μδ₀ takes α and μ from the exact
Fisher's quadratic model of the loss (§7), the damping λ follows the
Levenberg–Marquardt rule (§6.5) and the factored-Tikhonov γ is searched every
20 steps (§6.6). `KFAC(model=..., adaptive=True)` is all of it, with three
safeguards the paper has not (ρ checked on the first 20 steps, 0 ≤ μ ≤ 1 and
α ≥ 0, a step that raised its batch's loss undone).

The paper also grows the mini-batch, m_k = min(m₁·exp((k−1)/b), N) with
m₁ = 1000 reaching the whole training set at iteration 500:
`keras_kfac.GrowingBatches` feeds `model.fit` such batches.

    python tutorials/autoencoder.py                 # the paper's widths
    python tutorials/autoencoder.py --width 0.25    # a quarter of the widths
    python tutorials/autoencoder.py --smoke

The paper's loss sums the cross-entropy over the 784 pixels; Keras' averages
it over them, so the same objective in Keras' units has the l2 penalty
1e-5 / 784 (the paper's initial damping would be 150 / 784; `KFAC` starts
instead from 3 × the mean eigenvalue of its factored Fisher, and the
Levenberg–Marquardt rule moves it from there).
An l2 of 1e-5 on Keras' average would weigh the weights 784 times as much as
the paper does (BENCHMARKS.md shows what that does to the race).

The hidden units here are tanh with Glorot initialisation, the common modern
variant of the paper's logistic units with sparse initialisation. Each epoch
prints the optimizer's damping λ, γ, α and μ, and the reduction ratio ρ
(`keras_kfac.KFACMonitor` puts them into the epoch logs).
"""

import common
import keras

import keras_kfac

WIDTHS = (1000, 500, 250, 30)
PAPER_L2 = 1e-5  # on the loss summed over the 784 pixels


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
    parser.add_argument("--batch-size", type=int, default=1000, help="m₁, the first batch size")
    parser.add_argument("--full-batch-at", type=int, default=500, help="the iteration where m_k reaches N")
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    args = parser.parse_args()
    (x_train, _), _ = common.load(args, flatten=True)

    model = build(0.1 if args.smoke else args.width)
    optimizer = keras_kfac.KFAC(model=model, adaptive=True, l2_reg=PAPER_L2 / 784)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    first = min(args.batch_size, len(x_train) // 4)
    batches = keras_kfac.GrowingBatches(
        x_train,
        x_train,
        initial_batch_size=first,
        growth_iterations=keras_kfac.growing_batches.growth_to_reach(first, len(x_train), args.full_batch_at),
        steps_per_epoch=2 if args.smoke else args.steps_per_epoch,
    )
    model.fit(batches, epochs=args.epochs, verbose=2, callbacks=[keras_kfac.KFACMonitor()])


if __name__ == "__main__":
    main()
