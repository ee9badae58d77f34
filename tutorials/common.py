"""What the tutorials share: command-line flags and Fashion-MNIST (or stand-in) data."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from keras_kfac.datasets import fashion_mnist_arrays  # noqa: E402

SMOKE_EXAMPLES = 256


def parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every tutorial takes."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--epochs", type=int, default=5)
    result.add_argument(
        "--smoke", action="store_true", help=f"a few seconds' check: {SMOKE_EXAMPLES} examples, 1 epoch"
    )
    result.add_argument(
        "--synthetic", action="store_true", help="random images of Fashion-MNIST's shapes instead of the data set"
    )
    return result


def load(args: argparse.Namespace, flatten: bool):
    """((x_train, y_train), (x_test, y_test)) scaled to [0, 1]."""
    if args.smoke:
        args.epochs = 1
    if args.synthetic:
        rng = np.random.default_rng(0)
        shape = (784,) if flatten else (28, 28, 1)
        n = SMOKE_EXAMPLES
        images = rng.uniform(size=(2 * n,) + shape).astype("float32")
        labels = rng.integers(0, 10, size=2 * n).astype("int32")
        return (images[:n], labels[:n]), (images[n:], labels[n:])
    train, test = fashion_mnist_arrays(flatten=flatten, num_train=SMOKE_EXAMPLES if args.smoke else None)
    if args.smoke:
        test = (test[0][:SMOKE_EXAMPLES], test[1][:SMOKE_EXAMPLES])
    return train, test
