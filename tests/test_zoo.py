"""The model zoo with K-FAC's defaults: every weight stays finite, and the zoo race runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_profile  # noqa: E402
import zoo  # noqa: E402

SEEDS = (0, 1, 2)
BATCH_SIZES = {32: 10, 128: 6, 1000: 2}  # batch size: steps
CONFIGS = {
    "default": {},
    "fixed": dict(learning_rate=0.1, damping=1e-2, momentum=0.9),
}


def _fresh_state(problem: zoo.ZooProblem, seed: int) -> list:
    keras.utils.set_random_seed(seed)
    return problem.build().get_weights()


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", zoo.MODELS)
def test_every_weight_stays_finite(name, config):
    """Small versions of every zoo model × 3 seeds × batch sizes 32, 128 and 1000.

    One compiled model per case: each (seed, batch size) starts from that
    seed's initial weights and from the optimizer's initial state. The
    batches come from datasets of unknown batch size, so that the training
    function is traced once for all of them.
    """
    problem = zoo.problem(name, "small", synthetic=True)
    keras.utils.set_random_seed(0)
    model = problem.build()
    opt = keras_kfac.KFAC(model=model, seed=0, **CONFIGS[config])
    model.compile(optimizer=opt, loss=problem.loss)
    opt.build(model.trainable_variables)
    initial_state = [np.array(v.numpy()) for v in opt.variables]
    for seed in SEEDS:
        weights = _fresh_state(problem, seed)
        for batch_size, steps in BATCH_SIZES.items():
            model.set_weights(weights)
            for variable, value in zip(opt.variables, initial_state):
                variable.assign(value)
            keras.utils.set_random_seed(seed)
            batches = tf.data.Dataset.from_tensor_slices((problem.x_train, problem.y_train)).batch(batch_size)
            history = model.fit(batches.repeat(), epochs=1, steps_per_epoch=steps, verbose=0)
            assert int(opt.iterations.numpy()) == steps
            finite = [bool(np.all(np.isfinite(w))) for w in model.get_weights()]
            assert all(finite), (name, config, seed, batch_size)
            assert np.isfinite(history.history["loss"][-1]), (name, config, seed, batch_size)


def test_zoo_data_and_models_are_what_the_examples_build():
    x, y = zoo.addition_data(64, seed=0)
    chars = zoo.ADDITION_CHARS
    for question, answer in zip(x, y):
        text = "".join(chars[i] for i in question.argmax(-1))[::-1].strip()
        a, b = (int(v) for v in text.split("+"))
        assert "".join(chars[i] for i in answer.argmax(-1)).strip() == str(a + b)
    tokens, labels = zoo.sentiment_data(200, seed=0, vocabulary=30, length=10)
    polarity = np.zeros(30)
    third = 28 // 3
    polarity[2 : 2 + third], polarity[2 + third : 2 + 2 * third] = 1.0, -1.0
    sign = np.where(np.roll(tokens, 1, axis=1) == zoo.NEGATION, -1.0, 1.0)
    sign[:, 0] = 1.0
    np.testing.assert_array_equal(labels, ((polarity[tokens] * sign).sum(1) > 0).astype(np.int32))
    counts = {
        name: zoo.problem(name, "default", synthetic=True).build().count_params()
        for name in ("mlp", "convnet", "autoencoder")
    }
    # keras.io's "Simple MNIST convnet" has 34,826 parameters; the paper's autoencoder 2.84 M.
    assert counts == {"mlp": 235146, "convnet": 34826, "autoencoder": 2837314}


def _zoo_race(tmp_path, *flags):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "zoo_race.py"),
            "--budget",
            "smoke",
            "--synthetic",
            "--models",
            "mlp",
            "--out-dir",
            str(tmp_path),
            *flags,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]


def test_zoo_race_smoke(tmp_path):
    _zoo_race(tmp_path)
    results = json.loads((tmp_path / "zoo" / "smoke" / "results.json").read_text())
    rows = results["results"]["mlp"]["0"]["rows"]
    assert set(rows) == {
        "adam[learning_rate=0.001]",
        "adam[learning_rate=0.0003]",
        "adam[learning_rate=0.003]",
        "muon",
        "kfac",
        "kfac-adaptive",
    }
    reference = rows["adam[learning_rate=0.001]"]["to"]["converged"]
    assert reference["iterations_speedup"] == pytest.approx(1.0)
    assert (tmp_path / "zoo" / "smoke" / "speedups.png").exists()
    assert "geometric mean" in (tmp_path / "zoo" / "smoke" / "table.md").read_text()


def test_zoo_blocks_race_smoke(tmp_path):
    """The LSTM with its recurrent layers in blocks, on their fallback, and with the opt-in blocks too."""
    _zoo_race(tmp_path, "--blocks", "--models", "lstm")
    results = json.loads((tmp_path / "zoo-blocks" / "smoke" / "results.json").read_text())
    assert set(results["results"]["lstm"]["0"]["rows"]) == {
        "adam[learning_rate=0.001]",
        "kfac[blocks=dense_conv_embedding,weight_sharing=expand]",
        "kfac",
        "kfac[blocks=all]",
    }
    states = {run["name"]: run["kfac_state"] for run in results["runs"]["lstm"]["0"] if run["family"] == "kfac"}
    assert all(states.values())


def test_step_profile_smoke(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--size", "small", "--synthetic"]
    command += ["--models", "mlp", "--jit", "off", "--rounds", "1", "--steps", "1", "--out-dir", str(tmp_path)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(result["ms_per_step"]) == len(step_profile.VARIANTS)
    assert all(value > 0 for value in result["ms_per_step"].values())
    assert set(result["part_ms"]) == set(result["part_flops"])
    assert "inverse refresh" in (tmp_path / "table.md").read_text()


def test_step_profile_counts_each_parts_arithmetic():
    """F from TensorFlow's profiler and the K-FAC parts' FLOPs, against counts by hand."""
    batch, widths = 8, (5, 4, 3)
    model = keras.Sequential([keras.Input((widths[0],)), keras.layers.Dense(widths[1]), keras.layers.Dense(widths[2])])
    model.compile(optimizer=keras_kfac.KFAC(model=model), loss="mse")
    x = np.ones((batch, widths[0]), "float32")
    model.train_on_batch(x, np.ones((batch, widths[2]), "float32"))
    forward = step_profile.forward_flops(model, x)
    # The profiler counts a matmul as 2·B·n·m; the bias adds are B·m each.
    assert forward == 2 * batch * (5 * 4 + 4 * 3) + batch * (4 + 3)
    sizes = step_profile.layer_output_sizes(model, x)
    flops = step_profile.part_flops(model, model.optimizer.blocks, sizes, forward, batch)
    dims = [(6, 4), (5, 3)]  # (dim Ā with the bias row, dim G)
    assert flops["forward/backward"] == 3 * forward
    assert flops["preconditioning + bookkeeping"] == sum(2 * g * g * a + 2 * g * a * a for a, g in dims)
    assert flops["statistics pass"] == 2 * forward + sum(2 * batch * (a * a + g * g) for a, g in dims)
    assert flops["inverse refresh"] == pytest.approx(sum(7 / 3 * (a**3 + g**3) for a, g in dims))
    assert flops["quadratic model"] == 4 * forward
    # With T₃ = 1 the first Ā (6 ≥ 1·4) and the second (5 ≥ 1·3) keep Cholesky factors: n³/3 each.
    model.compile(optimizer=keras_kfac.KFAC(model=model, inverse_update_period=1), loss="mse")
    model.train_on_batch(x, np.ones((batch, widths[2]), "float32"))
    flops = step_profile.part_flops(model, model.optimizer.blocks, sizes, forward, batch)
    assert flops["inverse refresh"] == pytest.approx(sum(a**3 / 3 + 7 / 3 * g**3 for a, g in dims))


def test_dampings_table_compares_the_default_initial_damping_with_the_best_given_one():
    import zoo_race

    def row(seconds):
        return {"to": {"converged": {"seconds": seconds}}}

    given = {zoo_race.Spec("kfac-adaptive", {"damping": d}).name: 40.0 for d in zoo_race.INITIAL_DAMPINGS}
    given[zoo_race.Spec("kfac-adaptive", {"damping": 1e-3}).name] = 20.0
    given[zoo_race.Spec("kfac-adaptive", {"damping": 150.0}).name] = None
    relative = {zoo_race.Spec("kfac-adaptive", {"relative_damping": c}).name: 30.0 + c for c in (3.0,)}
    analyses = {
        seed: {
            "targets": {"converged": 0.3},
            "rows": {"kfac-adaptive": row(21.0 + seed), **{k: row(v) for k, v in {**given, **relative}.items()}},
        }
        for seed in (0, 1, 2)
    }
    table = zoo_race.dampings_table({"convnet": analyses}, zoo_race.INITIAL_DAMPINGS, [3.0], {}).splitlines()
    assert zoo_race.RELATIVE_DAMPINGS == [3.0]
    assert table[0].startswith("| model | target | default λ₀: s | 3·tr(F̃)/n: s | best λ₀ |")
    assert table[2] == "| convnet | converged | 22.0 | 33.0 | 0.001 | 20.0 | 1.10 | yes |"
    narrow = zoo_race.dampings_table({"convnet": analyses}, [1e-4, 150.0], [3.0], {}).splitlines()
    assert narrow[2] == "| convnet | converged | 22.0 | 33.0 | 0.0001 | 40.0 | 0.55 | yes |"


def test_dampings_race_gives_every_adaptive_run_the_same_options():
    import zoo_race

    specs = zoo_race.dampings_race([1e-4], [0.1], {"curvature_fraction": 0.25})
    assert [s.name for s in specs] == [
        "adam[learning_rate=0.001]",
        "kfac-adaptive[curvature_fraction=0.25]",
        "kfac-adaptive[curvature_fraction=0.25,relative_damping=0.1]",
        "kfac-adaptive[curvature_fraction=0.25,damping=0.0001]",
    ]
    row = {"to": {"short": {"seconds": 5.0}}}
    analyses = {0: {"targets": {"short": 1.0}, "rows": {s.name: row for s in specs}}}
    table = zoo_race.dampings_table({"mlp": analyses}, [1e-4], [0.1], {"curvature_fraction": 0.25}).splitlines()
    assert table[2] == "| mlp | short | 5.0 | 5.0 | 0.0001 | 5.0 | 1.00 | yes |"
