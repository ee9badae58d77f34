"""Tests of the offline Fashion-MNIST loader on tiny idx files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_kfac import datasets


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    """Writes `array` (uint8) as a gzip-compressed idx file."""
    if magic is None:
        magic = bytes([0, 0, 0x08, array.ndim])
    header = magic + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_dataset(folder: Path, seed: int, num_train: int = 5, num_test: int = 3):
    """Writes a tiny Fashion-MNIST look-alike into `folder` and returns it."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, num_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(folder / datasets.FILE_NAMES[key], array)
    return arrays


def fail_download():
    raise Exception("URL fetch failure: no network in this test")


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Points the Keras cache and the Debian folder at empty temporary folders
    and makes the Keras download fail."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", fail_download)
    return {
        "cache": tmp_path / "keras_home" / "datasets" / "fashion-mnist",
        "debian": tmp_path / "debian",
        "data_dir": tmp_path / "data_dir",
    }


def assert_loaded(result, arrays):
    (x_train, y_train), (x_test, y_test) = result
    for got, key in [
        (x_train, "train_images"),
        (y_train, "train_labels"),
        (x_test, "test_images"),
        (y_test, "test_labels"),
    ]:
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key])


def test_parses_idx_files(places):
    arrays = write_dataset(places["data_dir"], seed=0)
    assert_loaded(datasets.load_fashion_mnist(places["data_dir"]), arrays)


def test_data_dir_comes_first(places):
    arrays = write_dataset(places["data_dir"], seed=0)
    write_dataset(places["cache"], seed=1)
    write_dataset(places["debian"], seed=2)
    assert_loaded(datasets.load_fashion_mnist(places["data_dir"]), arrays)


def test_keras_cache_before_debian_folder(places):
    arrays = write_dataset(places["cache"], seed=1)
    write_dataset(places["debian"], seed=2)
    assert_loaded(datasets.load_fashion_mnist(), arrays)


def test_debian_folder_when_cache_is_incomplete(places):
    write_dataset(places["cache"], seed=1)
    (places["cache"] / datasets.FILE_NAMES["test_images"]).unlink()
    arrays = write_dataset(places["debian"], seed=2)
    assert_loaded(datasets.load_fashion_mnist(), arrays)


def test_download_is_the_last_resort(places, monkeypatch):
    sentinel = object()
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: sentinel)
    assert datasets.load_fashion_mnist(places["data_dir"]) is sentinel


def test_error_lists_every_place_tried(places):
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_fashion_mnist(places["data_dir"])
    message = str(info.value)
    for folder in places.values():
        assert str(folder) in message
    assert "load_data() download" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_bad_magic_number_is_rejected(tmp_path):
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros(4, np.uint8), magic=bytes([0, 0, 0x0D, 1]))
    with pytest.raises(ValueError, match="magic number"):
        datasets.read_idx(path, ndim=1)


def test_wrong_number_of_dimensions_is_rejected(tmp_path):
    path = tmp_path / "images.gz"
    write_idx(path, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="magic number"):
        datasets.read_idx(path, ndim=1)


def test_truncated_data_is_rejected(tmp_path):
    path = tmp_path / "images.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 28, 28)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(28 * 28))
    with pytest.raises(ValueError, match="declares shape"):
        datasets.read_idx(path, ndim=3)


def test_label_count_must_match_image_count(places):
    write_dataset(places["data_dir"], seed=0)
    write_idx(
        places["data_dir"] / datasets.FILE_NAMES["train_labels"],
        np.zeros(4, np.uint8),
    )
    with pytest.raises(ValueError, match="5 train images but 4 labels"):
        datasets.load_fashion_mnist(places["data_dir"])


@pytest.mark.parametrize("flatten, shape", [(True, (2, 784)), (False, (2, 28, 28, 1))])
def test_fashion_mnist_arrays(places, flatten, shape):
    arrays = write_dataset(places["data_dir"], seed=0)
    (x_train, y_train), (x_test, y_test) = datasets.fashion_mnist_arrays(
        flatten, num_train=2, data_dir=places["data_dir"]
    )
    assert x_train.shape == shape and x_train.dtype == np.float32
    assert x_test.shape[0] == 3
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    np.testing.assert_allclose(x_train.reshape(2, 28, 28) * 255.0, arrays["train_images"][:2], atol=1e-3)
    assert y_train.dtype == np.int32
    np.testing.assert_array_equal(y_train, arrays["train_labels"][:2])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
