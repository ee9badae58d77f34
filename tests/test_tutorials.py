"""Runs the tutorials as a user would, on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keras_kfac.datasets import DEBIAN_DIR, FILE_NAMES

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "tutorials" / "compare_optimizers.py"


def run_compare(out_dir: Path, *flags: str) -> dict:
    """Runs compare_optimizers.py in `out_dir` and returns its JSON record."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, str(COMPARE), "--smoke", "--out-dir", str(out_dir), *flags],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "train loss" in completed.stdout  # The table was printed.
    assert (out_dir / "compare_optimizers.png").stat().st_size > 0
    return json.loads((out_dir / "compare_optimizers.json").read_text())


def check_results(record: dict, optimizers: list[str]) -> None:
    """The smoke run: one pass over the data, evaluated twice."""
    assert list(record["results"]) == optimizers
    for result in record["results"].values():
        for key in ("train_loss", "test_loss", "test_accuracy", "epoch_seconds"):
            assert len(result[key]) == 2
            assert all(math.isfinite(v) for v in result[key])
        assert result["epochs"] == [0.5, 1.0]
        assert 0.0 <= result["test_accuracy"][-1] <= 1.0
        assert min(result["epoch_seconds"]) > 0.0


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_optimizers", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seconds_to_a_test_loss_interpolates_between_evaluations():
    seconds_to = _compare_module().seconds_to
    record = {"cumulative_seconds": [1.0, 2.0, 4.0], "test_loss": [0.9, 0.6, 0.3]}
    assert seconds_to(record, 0.95) == 1.0
    assert seconds_to(record, 0.45) == pytest.approx(3.0)
    assert seconds_to(record, 0.2) is None


def test_parse_args():
    module = _compare_module()
    args = module.parse_args(["--smoke", "--optimizers", "adam, sgd"])
    assert args.optimizers == ["adam", "sgd"]
    assert (args.train_size, args.epochs, args.batch_size) == (512, 1, 128)
    with pytest.raises(SystemExit):
        module.parse_args(["--optimizers", "adam,rmsprop"])


def test_adam_and_sgd_on_synthetic_data(tmp_path):
    record = run_compare(tmp_path, "--synthetic", "--optimizers", "adam,sgd")
    check_results(record, ["adam", "sgd"])


def test_kfac_on_synthetic_data(tmp_path):
    record = run_compare(tmp_path, "--synthetic", "--optimizers", "kfac,adam")
    check_results(record, ["kfac", "adam"])
    assert record["settings"]["kfac_lr"] is None  # KFAC(model=model) with its defaults


@pytest.mark.skipif(
    not all((DEBIAN_DIR / name).is_file() for name in FILE_NAMES.values()),
    reason=f"Fashion-MNIST not installed in {DEBIAN_DIR}",
)
def test_adam_on_fashion_mnist(tmp_path):
    record = run_compare(tmp_path, "--optimizers", "adam")
    check_results(record, ["adam"])
    assert record["results"]["adam"]["test_accuracy"][-1] > 0.3  # Chance is 0.1.


@pytest.mark.parametrize(
    "script", ["quickstart.py", "convnet.py", "sequences.py", "autoencoder.py", "tensorboard_monitoring.py"]
)
def test_tutorial_smoke_mode(tmp_path, script):
    """Each tutorial runs end to end in its smoke mode, so none can rot."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / script), "--smoke", "--synthetic"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "loss" in completed.stdout
    if script == "tensorboard_monitoring.py":  # it read K-FAC's scalars back from its event files
        assert "kfac/damping" in completed.stdout and "kfac/rho" in completed.stdout
