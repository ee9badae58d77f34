"""The benchmark harness (benchmarks/run.py) on its tiny `smoke` budget."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_harness():
    return load_module("bench_harness", ROOT / "benchmarks" / "harness.py")


def run_benchmark(out_dir: Path, *flags: str) -> str:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, str(RUN), "--budget", "smoke", "--synthetic", "--out-dir", str(out_dir), *flags],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return completed.stdout


def test_all_problems_smoke_write_tables_json_and_plots(tmp_path):
    stdout = run_benchmark(tmp_path, "--problem", "all")
    expected = {
        "autoencoder-50-vs-500": ("step time adaptive / fixed K-FAC", ["loss.png"]),
        "convnet": ("Time to test accuracy", ["loss.png", "accuracy.png"]),
        "profile": ("Where the time goes", ["step_time.png"]),
    }
    for problem, (heading, plots) in expected.items():
        folder = tmp_path / problem / "smoke"
        assert heading in (folder / "table.md").read_text()
        assert json.loads((folder / "results.json").read_text())
        for plot in plots:
            assert (folder / plot).stat().st_size > 0
    folder = tmp_path / "autoencoder" / "smoke"
    # The per-interval log lines and the printed tables.
    assert "[autoencoder seed 0] kfac-adaptive" in stdout
    assert "Targets from the best baseline" in stdout
    assert "Training loss at equal training time" in stdout
    table = (folder / "table.md").read_text()
    for family in ("K-FAC adaptive", "K-FAC fixed lr", "Adam", "SGD+Nesterov", "Muon"):
        assert family in table
    record = json.loads((folder / "results.json").read_text())
    runs = record["runs"]["0"]
    assert {r["family"] for r in runs} == {"kfac-adaptive", "kfac-fixed", "adam", "sgd", "muon"}
    for run in runs:
        curve = run["curve"]
        assert run["iterations"] == 3
        assert len(curve["loss"]) == len(curve["seconds"]) == len(curve["iterations"]) >= 2
        assert all(math.isfinite(v) for v in curve["loss"])
        assert run["trace_seconds"] > 0
    assert record["grid"]["adam"] == [1e-3]
    assert (folder / "loss.png").stat().st_size > 0


def test_nesterov_momentum_schedule():
    harness = load_harness()
    assert harness.nesterov_momentum(0, 0.99) == 0.5
    assert harness.nesterov_momentum(249, 0.99) == 0.5
    assert harness.nesterov_momentum(250, 0.99) == 0.75
    assert abs(harness.nesterov_momentum(750, 0.99) - 0.875) < 1e-12
    assert harness.nesterov_momentum(10**6, 0.99) == 0.99
    assert harness.nesterov_momentum(10**6, 0.9) == 0.9


def test_batch_size_schedule_reaches_n():
    harness = load_harness()
    schedule = harness.batch_size_schedule(1000, 60000, 500)
    assert schedule(1) == 1000
    assert schedule(500) == 60000
    assert schedule(800) == 60000
    assert all(schedule(k) <= schedule(k + 1) for k in range(1, 600))
    assert harness.batch_size_schedule(250, 60000, None)(77) == 250


def test_first_crossing_interpolates():
    harness = load_harness()
    xs, losses = [0, 10, 20], [1.0, 0.5, 0.25]
    assert harness.first_crossing(xs, losses, 0.5) == 10
    assert abs(harness.first_crossing(xs, losses, math.sqrt(0.5)) - 5) < 1e-9
    assert harness.first_crossing(xs, losses, 0.1) is None
    assert harness.first_crossing(xs, [0.1, 0.5, 0.9], 0.7, higher=True) == 15


def test_budget_seconds_results_get_their_own_folder():
    run = load_module("bench_run", RUN)

    def label(problem: str, seconds: float | None, activation: str = "tanh", l2: float | None = None) -> str:
        return run.budget_label(
            argparse.Namespace(budget="small", budget_seconds=seconds, problem=problem, activation=activation, l2=l2)
        )

    assert label("autoencoder", None) == "small"
    assert label("autoencoder", 60.0) == "small-60s"
    assert label("convnet", 7.5) == "small-7.5s"
    # The problems that do not race on the clock keep the budget's folder.
    assert label("profile", 60.0) == "small"
    assert label("autoencoder-50-vs-500", 60.0) == "small"
    # The paper's logistic units get their own folders too (and figure names).
    assert label("autoencoder", 60.0, "logistic") == "small-60s-logistic"
    assert label("autoencoder-50-vs-500", None, "logistic") == "small-logistic"
    assert label("convnet", None, "logistic") == "small"
    # So does an autoencoder race with another l2 penalty than the default.
    assert label("autoencoder", 60.0, "logistic", 1e-5 / 784) == "small-60s-logistic-l2-1.27551e-08"
    assert label("convnet", None, l2=1e-8) == "small"


def test_autoencoder_evaluation_reports_the_l2_penalty_of_the_objective():
    run = load_module("bench_run", RUN)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(7, 5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(5)])
    values = run.autoencoder_evaluator(x, l2=1e-3)(model)
    weights = [np.asarray(w, np.float64) for w in model.get_weights()]
    assert values["l2_penalty"] == pytest.approx(0.5 * 1e-3 * sum(np.sum(w**2) for w in weights), rel=1e-9)
    z = model.predict_on_batch(x).astype(np.float64)
    bce = np.mean(np.maximum(z, 0) - z * x + np.log1p(np.exp(-np.abs(z))))
    assert values["loss"] == pytest.approx(bce, rel=1e-9)


def test_kfac_runs_can_be_narrowed_to_chosen_initial_dampings():
    run = load_module("bench_run", RUN)
    cfg = run.AUTOENCODER_BUDGETS["small"]
    assert run.parse_kfac_dampings(None) is None
    assert run.parse_kfac_dampings("paper, 1e-4") == [None, 1e-4]

    default = run.kfac_specs(cfg, "small", 150.0 / 784)
    assert [s.family for s in default].count("kfac-fixed") == len(cfg["kfac_fixed"])
    assert [s.params.get("damping") for s in default if s.family == "kfac-adaptive"] == [150.0 / 784, 1e-2, 1e-4]
    # The paper's recipe, as these races ran it: none of the adaptive mode's safeguards.
    assert all(s.params["reject_below"] is None for s in default if s.family == "kfac-adaptive")

    narrowed = run.kfac_specs(cfg, "small", 150.0 / 784, run.parse_kfac_dampings("1e-4"), fixed=False)
    assert [(s.family, s.params.get("damping")) for s in narrowed] == [("kfac-adaptive", 1e-4)]
    assert narrowed[0].params["statistics_fraction"] == 0.125


def test_grid_overrides_replace_or_drop_a_family():
    run = load_module("bench_run", RUN)
    grid = {"adam": [1e-3], "sgd": [(1.0, 0.99)], "muon": [3e-3]}
    assert run.parse_grid_overrides(None, grid) == grid
    changed = run.parse_grid_overrides("adam=;sgd=0.3:0.9,1:0.99;muon=1e-3", grid)
    assert changed == {"adam": [], "sgd": [(0.3, 0.9), (1.0, 0.99)], "muon": [1e-3]}
    assert [s.family for s in run.baseline_specs(changed)] == ["sgd", "sgd", "muon"]
    assert grid["adam"] == [1e-3]  # the budget's own grid is left as it was


def test_race_tables_name_the_seeds_that_ran(tmp_path):
    stdout = run_benchmark(
        tmp_path, "--problem", "autoencoder", "--seed", "3", "--seeds", "2", "--no-kfac-fixed", "--grid", "adam=;sgd="
    )
    assert "[autoencoder seed 4] muon" in stdout and "adam[" not in stdout
    table = (tmp_path / "autoencoder" / "smoke" / "table.md").read_text()
    assert "Grid (seed 3;" in table
    per_seed = [line.split("|")[1].strip() for line in table.splitlines() if "| Muon | muon[" in line]
    assert per_seed == ["3", "4"]
    results = json.loads((tmp_path / "autoencoder" / "smoke" / "results.json").read_text())
    assert set(results["runs"]) == {"3", "4"}
    assert (results["settings"]["seed"], results["settings"]["seeds"]) == (3, 2)


def test_kfac_after_baselines_stops_kfac_at_the_lowest_baseline_final_loss():
    harness = load_harness()
    trained = []  # (run name, iteration) in the order the race trains them

    class ScriptedRun(harness.Run):
        """A Run whose loss after k steps is losses[k]; one step costs one second."""

        def __init__(self, family: str, losses: list[float]):
            self.spec = harness.OptimizerSpec(family, {"tag": len(losses)})
            self.losses = losses
            self.iterations, self.clock, self.budget_s, self.max_iters = 0, 0.0, 6.0, None
            self.diverged, self.stop_loss = False, None
            self.curve = {"iterations": [], "seconds": [], "loss": []}

        def step(self) -> None:
            self.iterations += 1
            self.clock += 1.0
            trained.append((self.spec.family, self.iterations))

        def record(self) -> dict:
            for key, value in (
                ("iterations", self.iterations),
                ("seconds", self.clock),
                ("loss", self.losses[self.iterations]),
            ):
                self.curve[key].append(value)
            return {"loss": self.curve["loss"][-1]}

    adam = ScriptedRun("adam", [1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5])
    muon = ScriptedRun("muon", [1.0, 0.8, 0.6, 0.5, 0.45, 0.42, 0.4])
    kfac = ScriptedRun("kfac-adaptive", [1.0, 0.6, 0.45, 0.41, 0.39, 0.3, 0.2])
    harness.race([kfac, adam, muon], [2.0, 4.0, 6.0], "test", verbose=False, kfac_after_baselines=True)

    # The baselines ran their whole budget, in turns, before K-FAC's first step.
    first_kfac = trained.index(("kfac-adaptive", 1))
    assert {name for name, _ in trained[:first_kfac]} == {"adam", "muon"}
    assert adam.iterations == muon.iterations == 6
    assert trained[:4] == [("adam", 1), ("adam", 2), ("muon", 1), ("muon", 2)]
    # K-FAC stops at the first log point at or below Muon's final 0.4 (iteration 4: 0.39).
    assert kfac.stop_loss == 0.4
    assert kfac.iterations == 4 and kfac.curve["loss"][-1] == 0.39 and kfac.done

    # Without the option every run trains in turns to the end.
    trained.clear()
    runs = [ScriptedRun(family, [1.0] * 7) for family in ("kfac-adaptive", "adam")]
    harness.race(runs, [2.0, 4.0, 6.0], "test", verbose=False)
    assert trained[:4] == [("kfac-adaptive", 1), ("kfac-adaptive", 2), ("adam", 1), ("adam", 2)]
    assert [r.iterations for r in runs] == [6, 6] and runs[0].stop_loss is None


def test_budget_speedups_read_shorter_races_off_a_long_one(tmp_path):
    speedups = load_module("budget_speedups", ROOT / "benchmarks" / "budget_speedups.py")

    def run(name, family, seconds, iterations, loss):
        return {"name": name, "family": family, "curve": {"seconds": seconds, "iterations": iterations, "loss": loss}}

    runs = [
        run("adam", "adam", [0, 10, 20, 30], [0, 100, 200, 300], [1.0, 0.5, 0.45, 0.44]),
        run("muon", "muon", [0, 10, 20, 30], [0, 10, 20, 30], [1.0, 0.6, 0.4, 0.3]),
        run("kfac", "kfac-adaptive", [0, 2, 5, 40], [0, 4, 8, 16], [1.0, 0.5, 0.4, 0.3]),
        run("fixed", "kfac-fixed", [0, 1, 2, 3], [0, 1, 2, 3], [1.0, 0.1, 0.1, 0.1]),  # not compared
    ]
    rows = speedups.speedups_by_budget(runs)
    assert [r["best_baseline"] for r in rows] == ["adam", "muon", "muon"]
    # B = 10 s: Adam's 0.5 after 10 s and 100 iterations; K-FAC's after 2 s and 4.
    assert (rows[0]["seconds_speedup"], rows[0]["iteration_speedup"]) == (5.0, 25.0)
    # B = 20 s: Muon's 0.4 after 20 s and 20 iterations; K-FAC's after 5 s and 8.
    assert (rows[1]["seconds_speedup"], rows[1]["iteration_speedup"]) == (4.0, 2.5)
    # B = 30 s: K-FAC needs 40 s for Muon's 0.3, past the budget.
    assert rows[2]["kfac_seconds"] == 40 and rows[2]["seconds_speedup"] is None
    text = speedups.table("0", rows, ["adam", "muon"])
    assert [line.split("|")[-2].strip() for line in text.splitlines()[-3:]] == ["yes", "no", "no"]

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": {"0": runs, "1": runs[1:3]}}))
    printed = speedups.main([str(path), "--out", str(tmp_path / "speedups.png")])
    assert "Seed 1 (baseline runs: muon)" in printed
    assert (tmp_path / "speedups.png").stat().st_size > 0
    assert (tmp_path / "speedups.md").read_text().strip() == printed
