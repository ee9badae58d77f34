"""Fashion-MNIST loading without a network connection.

`load_fashion_mnist` returns the same arrays as
`keras.datasets.fashion_mnist.load_data()`, but first looks for the four idx gz
files in places where they may already be on disk, so tutorials and tests run
on machines that cannot download:

1. `data_dir`, when the caller gives one;
2. the Keras cache, `$KERAS_HOME/datasets/fashion-mnist/` (default
   `~/.keras/datasets/fashion-mnist/`), where Keras' own loader stores them;
3. `/usr/share/datasets/fashion-mnist/`, where the Debian package
   `dataset-fashion-mnist` installs them;
4. the Keras download, as a last resort.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILE_NAMES = {
    "train_labels": "train-labels-idx1-ubyte.gz",
    "train_images": "train-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
}
_UINT8_TYPE_CODE = 0x08

Split = tuple[np.ndarray, np.ndarray]


def keras_cache_dir() -> Path:
    """Returns the folder where Keras' own loader caches Fashion-MNIST.

    Returns:
        ``$KERAS_HOME/datasets/fashion-mnist``, by default under ``~/.keras``
        (``/tmp/.keras`` when the home folder is not writable).
    """
    if "KERAS_HOME" in os.environ:
        home = Path(os.environ["KERAS_HOME"])
    else:
        base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
        home = base / ".keras"
    return home / "datasets" / "fashion-mnist"


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Reads a gzip-compressed idx file of unsigned bytes.

    Args:
        path: the `.gz` file.
        ndim: the number of dimensions the file must declare (1 for labels,
            3 for images).

    Returns:
        A uint8 array of the shape declared in the file's header.

    Raises:
        ValueError: if the header or the length of the data is not that of an
            idx file of `ndim` dimensions of unsigned bytes.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    zeros, type_code, declared_ndim = raw[0:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or type_code != _UINT8_TYPE_CODE or declared_ndim != ndim:
        raise ValueError(
            f"{path}: bad idx magic number {raw[0:4].hex()}, expected "
            f"0000{_UINT8_TYPE_CODE:02x}{ndim:02x} (unsigned bytes, {ndim} dimensions)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=header_size)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header declares shape {shape} ({int(np.prod(shape))} values) but the file holds {data.size}"
        )
    return data.reshape(shape)


def _read_split(folder: Path, split: str) -> Split:
    """Reads the images and labels of `split` ("train" or "test") in `folder`."""
    images = read_idx(folder / FILE_NAMES[f"{split}_images"], ndim=3)
    labels = read_idx(folder / FILE_NAMES[f"{split}_labels"], ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def _has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILE_NAMES.values())


def load_fashion_mnist(
    data_dir: str | Path | None = None,
) -> tuple[Split, Split]:
    """Loads Fashion-MNIST as `keras.datasets.fashion_mnist.load_data()` does.

    Args:
        data_dir: optional folder holding the four idx gz files under Keras'
            names; searched before the Keras cache and the Debian folder.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: uint8 images of shape
        `(N, 28, 28)` and uint8 labels of shape `(N,)`.

    Raises:
        FileNotFoundError: if no folder holds the files and the download fails;
            the message lists every place tried.
        ValueError: if a file found is not a valid idx file.
    """
    folders = [Path(data_dir)] if data_dir is not None else []
    folders += [keras_cache_dir(), DEBIAN_DIR]
    for folder in folders:
        if _has_all_files(folder):
            return _read_split(folder, "train"), _read_split(folder, "test")
    try:
        import keras

        return keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # Keras raises a bare Exception on fetch failures.
        tried = "\n".join(f"  - {folder}/" for folder in folders)
        raise FileNotFoundError(
            "Fashion-MNIST not found. Looked for "
            f"{', '.join(FILE_NAMES.values())} in:\n{tried}\n"
            f"  - keras.datasets.fashion_mnist.load_data() download: {error}\n"
            "Install it with `apt-get install dataset-fashion-mnist` (Debian), or "
            f"put the four files in {keras_cache_dir()}/."
        ) from error


def prepare_images(images: np.ndarray, flatten: bool) -> np.ndarray:
    """Scales uint8 images to float32 in [0, 1].

    Args:
        images: uint8 array of shape `(N, 28, 28)`.
        flatten: return `(N, 784)` vectors for dense networks instead of
            `(N, 28, 28, 1)` single-channel images for convolutions.

    Returns:
        A float32 array of shape `(N, 784)` or `(N, 28, 28, 1)`.
    """
    scaled = images.astype(np.float32) / 255.0
    if flatten:
        return scaled.reshape(len(images), -1)
    return scaled[..., np.newaxis]


def fashion_mnist_arrays(
    flatten: bool,
    num_train: int | None = None,
    data_dir: str | Path | None = None,
) -> tuple[Split, Split]:
    """Loads Fashion-MNIST ready for training.

    Args:
        flatten: see `prepare_images`.
        num_train: keep only the first `num_train` training examples.
        data_dir: see `load_fashion_mnist`.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: float32 images from
        `prepare_images` and int32 labels.
    """
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
    x_train, y_train = x_train[:num_train], y_train[:num_train]
    return (
        (prepare_images(x_train, flatten), y_train.astype(np.int32)),
        (prepare_images(x_test, flatten), y_test.astype(np.int32)),
    )
