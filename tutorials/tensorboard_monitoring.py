"""Watching K-FAC in TensorBoard.

The adaptive K-FAC of Martens & Grosse (2015) changes its own hyperparameters
as it trains: the damping λ follows the Levenberg–Marquardt rule (§6.5), the
factored-Tikhonov γ is searched every few steps (§6.6), and every update
δ = αΔ + μδ₀ takes its step size α and momentum μ from the exact-Fisher
quadratic model (§7), whose predicted change M(δ) − M(0) is compared with the
loss's actual change in the reduction ratio ρ. When training goes wrong, these
are the numbers to look at: ρ far from 1 means the quadratic model is not
trusted, λ rising steeply means the steps are being shortened, α collapsing
means the preconditioned direction is poor.

`keras_kfac.KFACMonitor` writes them to TensorBoard every `update_freq` steps
(tags `kfac/damping`, `kfac/rho`, ...) and adds them to the epoch logs, where
Keras' own `TensorBoard` callback picks them up (`epoch_kfac_damping`, ...)
if the monitor comes first in the callback list.

    python tutorials/tensorboard_monitoring.py            # writes logs/kfac
    tensorboard --logdir logs/kfac                        # then open the page it prints
    python tutorials/tensorboard_monitoring.py --smoke    # a few seconds

The event files can also be read without TensorBoard's page; the script
prints the last value of each K-FAC tag it wrote.
"""

from pathlib import Path

import common
import keras
import tensorflow as tf

import keras_kfac


def last_values(log_dir: Path) -> dict[str, float]:
    """The last value of every `kfac/...` scalar in the event files under `log_dir`."""
    values = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith("kfac/"):
                    values[value.tag] = float(tf.make_ndarray(value.tensor))
    return values


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="logs/kfac")
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = common.load(args, flatten=True)

    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="tanh"),
            keras.layers.Dense(10),  # logits
        ]
    )
    # The paper's recipe; damping=1e-2 starts λ nearer where LM takes it on this problem.
    optimizer = keras_kfac.KFAC(
        model=model, adaptive=True, damping=1e-2, damping_adaptation_period=5, gamma_adaptation_period=20
    )
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    log_dir = Path(args.log_dir)
    callbacks = [
        keras_kfac.KFACMonitor(log_dir=log_dir, update_freq=1 if args.smoke else 5),  # before TensorBoard
        keras.callbacks.TensorBoard(log_dir=str(log_dir)),
    ]
    model.fit(
        x_train,
        y_train,
        batch_size=64 if args.smoke else 512,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=2,
    )
    print(f"TensorBoard logs in {log_dir}; run: tensorboard --logdir {log_dir}")
    for tag, value in sorted(last_values(log_dir).items()):
        print(f"  {tag:24s} {value:.4g}")


if __name__ == "__main__":
    main()
