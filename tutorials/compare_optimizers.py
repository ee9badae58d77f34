"""K-FAC against Adam and SGD on Fashion-MNIST, with `model.fit`.

This script trains the same classifier, from the same initial weights and
with the same shuffling seed, once per optimizer:

* K-FAC (`keras_kfac.KFAC(model=model)`, with no other argument), which
  preconditions each layer's gradient with damped inverses of Kronecker
  factors of that layer's Fisher block;
* Adam with learning rate 1e-3;
* SGD with Nesterov momentum 0.9 and learning rate 0.05.

The model is an MLP 784-256-128-10 with ReLU (default) or, with
`--model conv`, a small convnet Conv2D(16, 3)-MaxPool-Conv2D(32, 3)-MaxPool-Dense(10).
Its last layer is linear and the loss is sparse categorical cross-entropy on
logits, the pairing K-FAC reads as a categorical predictive distribution.

For every optimizer it records, `--evals-per-epoch` times per pass over the
data, the training loss (the mean of the mini-batch losses since the last
evaluation, as Keras reports it), the test loss and accuracy and the
wall-clock seconds spent training. Training seconds leave out the time Keras
spends on the test pass; the first stretch includes tracing the training
graph, for every optimizer alike. The table gives each optimizer's seconds to
Adam's final test loss (its first evaluation at or below it, interpolated
between evaluations) and Adam's seconds to it divided by that.

It prints a table side by side, writes `compare_optimizers.json` and plots
training loss against epochs and against seconds in `compare_optimizers.png`,
both under `--out-dir` (default `results/`).

An optimizer that takes more time per step can still win if it needs fewer
steps; the plot against seconds is the one that answers that for this model,
this machine and these hyperparameters, and nothing more general.

Examples:

    python tutorials/compare_optimizers.py                  # all data, 3 epochs
    python tutorials/compare_optimizers.py --model conv --epochs 5
    python tutorials/compare_optimizers.py --optimizers adam,sgd --smoke --synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from keras_kfac.datasets import fashion_mnist_arrays, prepare_images  # noqa: E402

OPTIMIZERS = {"kfac": "K-FAC", "adam": "Adam", "sgd": "SGD+Nesterov"}
NUM_CLASSES = 10
TIMING_NOTE = "training seconds = wall-clock time minus the test evaluations; the first stretch includes graph tracing"

Data = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; `--smoke` overrides the size settings."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--optimizers", default="kfac,adam,sgd", help="comma-separated subset of " + ",".join(OPTIMIZERS)
    )
    parser.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=None, help="number of training examples (default: all 60000)")
    parser.add_argument("--test-size", type=int, default=None, help="number of test examples (default: all 10000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--evals-per-epoch", type=int, default=4, help="test-set evaluations per pass over the training data"
    )
    parser.add_argument("--kfac-lr", type=float, default=None, help="K-FAC's learning rate (default: KFAC's)")
    parser.add_argument("--kfac-damping", type=float, default=None, help="K-FAC's damping (default: KFAC's)")
    parser.add_argument("--kfac-momentum", type=float, default=None, help="K-FAC's momentum (default: KFAC's)")
    parser.add_argument(
        "--data-dir", default=None, help="folder with the Fashion-MNIST idx gz files, searched before the usual places"
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="random images and labels of Fashion-MNIST's shapes instead of the real data",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny run: 512 training and test examples, 1 epoch, batch size 128"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    args.optimizers = [name.strip() for name in args.optimizers.split(",")]
    unknown = [name for name in args.optimizers if name not in OPTIMIZERS]
    if unknown or not args.optimizers:
        parser.error(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    if args.smoke:
        args.train_size, args.test_size, args.epochs, args.batch_size = 512, 512, 1, 128
        args.evals_per_epoch = 2
    return args


def synthetic_arrays(flatten: bool, num_train: int, num_test: int, seed: int) -> Data:
    """Uniform random images and labels with Fashion-MNIST's shapes and dtypes."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        return prepare_images(images, flatten), labels

    return split(num_train), split(num_test)


def load_data(args: argparse.Namespace) -> Data:
    """Returns float32 images and int32 labels for `args.model`."""
    flatten = args.model == "mlp"
    if args.synthetic:
        return synthetic_arrays(flatten, args.train_size or 60000, args.test_size or 10000, args.seed)
    (x_train, y_train), (x_test, y_test) = fashion_mnist_arrays(
        flatten, num_train=args.train_size, data_dir=args.data_dir
    )
    return (x_train, y_train), (x_test[: args.test_size], y_test[: args.test_size])


def build_model(kind: str) -> keras.Model:
    """The classifier; its last layer is linear (logits)."""
    if kind == "mlp":
        layers = [
            keras.Input(shape=(784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    else:
        layers = [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    return keras.Sequential(layers, name=kind)


def make_optimizer(name: str, model: keras.Model, args: argparse.Namespace) -> keras.optimizers.Optimizer:
    """The optimizer `name`; K-FAC is bound to the model it trains."""
    if name == "kfac":
        import keras_kfac

        chosen = {"learning_rate": args.kfac_lr, "damping": args.kfac_damping, "momentum": args.kfac_momentum}
        return keras_kfac.KFAC(model=model, seed=args.seed, **{k: v for k, v in chosen.items() if v is not None})
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=1e-3)
    return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, nesterov=True)


class TrainingTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch, less the validation pass inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()
        self._validation_seconds = 0.0

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._test_start = time.perf_counter()

    def on_test_end(self, logs: dict | None = None) -> None:
        self._validation_seconds += time.perf_counter() - self._test_start

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        self.epoch_seconds.append(elapsed - self._validation_seconds)


def train(name: str, args: argparse.Namespace, data: Data, initial_weights: list) -> dict:
    """Trains a fresh model with optimizer `name` and returns its record."""
    (x_train, y_train), validation = data
    keras.utils.set_random_seed(args.seed)  # Same shuffling for every optimizer.
    model = build_model(args.model)
    model.set_weights(initial_weights)
    model.compile(
        optimizer=make_optimizer(name, model, args),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = TrainingTimer()
    print(f"\n== {OPTIMIZERS[name]} ==", flush=True)
    # Keras "epochs" of a fraction of the data each: a test evaluation after each.
    steps = max(1, -(-len(x_train) // args.batch_size) // args.evals_per_epoch)
    history = model.fit(
        _repeated(x_train, y_train, args.batch_size, args.seed),
        steps_per_epoch=steps,
        epochs=args.epochs * args.evals_per_epoch,
        validation_data=validation,
        callbacks=[timer],
        verbose=2,
    )
    return {
        "optimizer": OPTIMIZERS[name],
        "jit_compile": bool(model.jit_compile),
        "train_loss": [float(v) for v in history.history["loss"]],
        "test_loss": [float(v) for v in history.history["val_loss"]],
        "test_accuracy": [float(v) for v in history.history["val_accuracy"]],
        "epoch_seconds": timer.epoch_seconds,
        "cumulative_seconds": np.cumsum(timer.epoch_seconds).tolist(),
        "epochs": [(i + 1) / args.evals_per_epoch for i in range(len(timer.epoch_seconds))],
    }


def _repeated(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Shuffled batches, a new order at each pass, for as long as `fit` asks."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(x))
        for start in range(0, len(x) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]


def seconds_to(record: dict, target: float) -> float | None:
    """Training seconds at the first evaluation whose test loss is at or below
    `target`, interpolated linearly from the evaluation before; None if never."""
    times, losses = [0.0] + record["cumulative_seconds"], [np.inf] + record["test_loss"]
    for i in range(1, len(losses)):
        if losses[i] <= target:
            if not np.isfinite(losses[i - 1]):
                return times[i]
            fraction = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return times[i - 1] + fraction * (times[i] - times[i - 1])
    return None


def print_table(results: dict[str, dict]) -> None:
    """Prints final losses, accuracy, time and time to Adam's final test loss, side by side."""
    target = results["adam"]["test_loss"][-1] if "adam" in results else None
    reference = seconds_to(results["adam"], target) if target is not None else None
    header = f"{'optimizer':<14}{'train loss':>12}{'test loss':>11}{'test acc':>10}{'train s':>10}"
    if target is not None:
        header += f"{'s to Adam final':>17}{'speedup':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for record in results.values():
        row = (
            f"{record['optimizer']:<14}{record['train_loss'][-1]:>12.4f}{record['test_loss'][-1]:>11.4f}"
            f"{record['test_accuracy'][-1]:>10.4f}{record['cumulative_seconds'][-1]:>10.1f}"
        )
        if target is not None:
            reached = seconds_to(record, target)
            row += f"{'—' if reached is None else f'{reached:.1f}':>17}"
            row += f"{'—' if not reached or not reference else f'{reference / reached:.2f}x':>9}"
        print(row)
    if target is not None:
        print(f"(Adam's final test loss {target:.4f}; speedup = Adam's seconds to it / this optimizer's)")
    print(f"({TIMING_NOTE}; train loss = mean mini-batch loss since the previous evaluation)")


def plot(results: dict[str, dict], path: Path) -> None:
    """Training loss against epochs and against training seconds, log scale."""
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for record in results.values():
        label = record["optimizer"]
        by_epoch.plot(record["epochs"], record["test_loss"], marker="o", label=label)
        by_time.plot(record["cumulative_seconds"], record["test_loss"], marker="o", label=label)
    by_epoch.set_xlabel("passes over the training data")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set_xlabel("training seconds (test evaluations excluded)")
    for axis in (by_epoch, by_time):
        axis.set_yscale("log")
        axis.set_ylabel("test loss")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.suptitle("Fashion-MNIST: K-FAC vs first-order optimizers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = load_data(args)
    print(
        f"{args.model} on {'synthetic' if args.synthetic else 'Fashion-MNIST'}: "
        f"{len(data[0][0])} train / {len(data[1][0])} test examples, "
        f"batch {args.batch_size}, {args.epochs} epoch(s), seed {args.seed}"
    )
    keras.utils.set_random_seed(args.seed)
    initial_weights = build_model(args.model).get_weights()
    results = {name: train(name, args, data, initial_weights) for name in args.optimizers}

    print_table(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "compare_optimizers.json"
    png_path = args.out_dir / "compare_optimizers.png"
    settings = {key: value for key, value in vars(args).items() if key != "out_dir"}
    json_path.write_text(json.dumps({"settings": settings, "timing": TIMING_NOTE, "results": results}, indent=2))
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
