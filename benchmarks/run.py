"""Benchmarks of keras_kfac against Adam, SGD with Nesterov momentum and Muon.

One command per problem and budget, or all of them in turn:

    python benchmarks/run.py --problem all --budget small --seeds 3 --save-figures
    python benchmarks/run.py --problem autoencoder --budget small
    python benchmarks/run.py --problem autoencoder            # default budget
    python benchmarks/run.py --problem convnet --budget small
    python benchmarks/run.py --problem profile --budget small
    python benchmarks/run.py --problem autoencoder-50-vs-500 --budget small
    python benchmarks/run.py --problem autoencoder --budget smoke --synthetic

Problems:

autoencoder
    The deep autoencoder of Martens & Grosse (2015, after Hinton &
    Salakhutdinov 2006): 784-1000-500-250-30 with a mirrored decoder, on
    Fashion-MNIST images scaled to [0, 1], Bernoulli cross-entropy on the 784
    output logits, l2 penalty η = 1e-5. Hidden units tanh with Glorot
    initialisation (or `--activation logistic`: logistic units with the sparse
    initialisation). K-FAC uses the paper's growing batch size
    m_k = min(m₁·exp((k−1)/b), N); the baselines a fixed batch. Every
    optimizer gets the same budget of training seconds.
convnet
    A small convnet classifier (Conv 5×5×32 - pool - Conv 5×5×32 - pool -
    Dense 128 - Dense 10): time to a training loss and to a test accuracy.
profile
    Per-step cost of K-FAC variants against SGD and Adam on several models,
    and where K-FAC's time goes (statistics, inverses, preconditioning,
    quadratic model), from differences between variants timed in turns.
autoencoder-50-vs-500
    A small deep autoencoder (784-256-64-16, mirrored), batch 1000 for all:
    adaptive K-FAC's loss after 50 iterations against Adam's (several learning
    rates) after 500, and per-step times of adaptive K-FAC, fixed-lr K-FAC and
    Adam.

Results go to `benchmarks/results/<problem>/<budget>/` (table.md, results.json,
PNG plots); `--save-figures` also copies the PNGs to `benchmarks/figures/`.

The training loss is the data term (without the l2 penalty) on a fixed subset
of the training set, evaluated at log points outside the training clock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # Keras' retracing warnings: each run has its own functions.

import harness as H  # noqa: E402
from harness import OptimizerSpec as Spec  # noqa: E402

PAPER_WIDTHS = (1000, 500, 250, 30)
SMALL_DEEP_WIDTHS = (256, 64, 16)
L2 = 1e-5

# ------------------------------------------------------------------ budgets
# Each budget: data size, model size, seconds per run, grids. "smoke" is for
# the test suite (a few iterations); "small" fits in a few minutes on 2 cores.

# The fixed-lr K-FAC run of every race (not tuned).
KFAC_FIXED = dict(learning_rate=0.1, damping=1e-2, norm_constraint=1e-3)

AUTOENCODER_BUDGETS = {
    "smoke": dict(
        n_train=256,
        n_eval=256,
        width=0.02,
        budget_s=math.inf,
        max_iters=3,
        logs=2,
        baseline_batch=64,
        kfac_first=64,
        kfac_reach=None,
        seeds=1,
        grid={"adam": [1e-3], "sgd": [(0.3, 0.99)], "muon": [1e-3]},
        kfac_fixed=[KFAC_FIXED],
    ),
    "small": dict(
        n_train=10000,
        n_eval=5000,
        width=0.25,
        budget_s=12.0,
        max_iters=None,
        logs=12,
        baseline_batch=250,
        kfac_first=500,
        kfac_reach=150,
        seeds=1,
        grid={"adam": [1e-3, 3e-3], "sgd": [(1.0, 0.99), (3.0, 0.99)], "muon": [1e-2, 3e-2]},
        kfac_fixed=[KFAC_FIXED],
    ),
    "default": dict(
        n_train=60000,
        n_eval=5000,
        width=1.0,
        budget_s=60.0,
        max_iters=None,
        logs=18,
        baseline_batch=250,
        kfac_first=1000,
        kfac_reach=500,
        seeds=1,
        grid={"adam": [1e-3, 3e-3], "sgd": [(0.3, 0.99), (1.0, 0.99), (3.0, 0.99)], "muon": [3e-3, 1e-2, 3e-2]},
        kfac_fixed=[KFAC_FIXED],
    ),
}
# The paper's recipe as these races ran it: without the package's safeguards
# (check of ρ on the first steps, bounded α and μ, undoing a step that raised
# the loss), which the adaptive mode has by default since the zoo race.
PAPER_RECIPE = dict(damping_warmup=0, reject_below=None, max_momentum=None)
KFAC_ADAPTIVE_PARAMS = dict(statistics_fraction=0.125, curvature_fraction=0.25, **PAPER_RECIPE)  # the paper's τ₁, τ₂
# The paper's λ₀ = 150 for a loss summed over the output units, in Keras' units.
PAPER_DAMPING = {"autoencoder": 150.0 / 784, "convnet": 150.0}
# Initial dampings λ₀ of the further adaptive runs (the first starts at the
# paper's): the paper's λ₀ is tuned for runs of thousands of iterations.
KFAC_INITIAL_DAMPINGS = {"smoke": [1e-2], "small": [1e-2, 1e-4], "default": [1e-2, 1e-4]}

# Conv2D layers: Ā from a quarter of the patch rows, and the fixed-lr run on τ₁ = 1/8 too.
CONVNET_KFAC = dict(patch_fraction=0.25)
CONVNET_KFAC_FIXED = dict(CONVNET_KFAC, statistics_fraction=0.125, **KFAC_FIXED)
CONVNET_BUDGETS = {
    "smoke": dict(
        n_train=256,
        n_eval=256,
        n_test=256,
        budget_s=math.inf,
        max_iters=3,
        logs=2,
        baseline_batch=64,
        kfac_batch=64,
        seeds=1,
        grid={"adam": [1e-3], "sgd": [(0.05, 0.99)], "muon": [1e-3]},
        kfac_adaptive=CONVNET_KFAC,
        kfac_fixed=[CONVNET_KFAC_FIXED],
    ),
    "small": dict(
        n_train=10000,
        n_eval=5000,
        n_test=5000,
        budget_s=15.0,
        max_iters=None,
        logs=10,
        baseline_batch=128,
        kfac_batch=512,
        seeds=1,
        grid={"adam": [1e-3, 3e-3], "sgd": [(0.03, 0.99), (0.1, 0.99)], "muon": [3e-3]},
        kfac_adaptive=CONVNET_KFAC,
        kfac_fixed=[CONVNET_KFAC_FIXED],
    ),
    "default": dict(
        n_train=60000,
        n_eval=5000,
        n_test=10000,
        budget_s=60.0,
        max_iters=None,
        logs=15,
        baseline_batch=128,
        kfac_batch=512,
        seeds=1,
        grid={"adam": [3e-4, 1e-3, 3e-3], "sgd": [(0.03, 0.99), (0.1, 0.99)], "muon": [1e-3, 3e-3]},
        kfac_adaptive=CONVNET_KFAC,
        kfac_fixed=[CONVNET_KFAC_FIXED],
    ),
}

FIFTY_BUDGETS = {
    "smoke": dict(
        n_train=512,
        n_eval=256,
        batch=128,
        kfac_iters=3,
        adam_iters=6,
        adam_lrs=[1e-3],
        kfac_dampings=[None, 1e-3],
        seeds=1,
        width=0.1,
    ),
    "small": dict(
        n_train=60000,
        n_eval=10000,
        batch=1000,
        kfac_iters=50,
        adam_iters=500,
        adam_lrs=[1e-3, 3e-3, 1e-2],
        kfac_dampings=[None, 1e-3, 1e-4, 1e-5],
        seeds=1,
        width=1.0,
    ),
    "default": dict(
        n_train=60000,
        n_eval=10000,
        batch=1000,
        kfac_iters=50,
        adam_iters=500,
        adam_lrs=[3e-4, 1e-3, 3e-3, 1e-2],
        kfac_dampings=[None, 1e-3, 1e-4, 1e-5],
        seeds=3,
        width=1.0,
    ),
}

PROFILE_BUDGETS = {
    "smoke": dict(models=["autoencoder-small-deep"], width=0.1, rounds=2, chunk=2, warmup=2, batch=64, n_train=512),
    "small": dict(
        models=["autoencoder-paper-x0.5", "autoencoder-small-deep", "convnet"],
        width=1.0,
        rounds=4,
        chunk=4,
        warmup=3,
        batch=None,
        n_train=10000,
    ),
    "default": dict(
        models=["autoencoder-paper", "autoencoder-paper-x0.5", "autoencoder-small-deep", "convnet"],
        width=1.0,
        rounds=6,
        chunk=5,
        warmup=3,
        batch=None,
        n_train=20000,
    ),
}

# ------------------------------------------------------------------- models


def sparse_initializer(nonzero: int = 15):
    """Martens (2010)'s sparse initialisation: `nonzero` N(0, 1) incoming weights per unit."""

    class Sparse(keras.initializers.Initializer):
        def __call__(self, shape, dtype=None):
            fan_in, fan_out = shape
            rng = np.random.default_rng(int(keras.random.randint((), 0, 2**31 - 1)))
            w = np.zeros(shape, np.float32)
            for j in range(fan_out):
                rows = rng.choice(fan_in, size=min(nonzero, fan_in), replace=False)
                w[rows, j] = rng.standard_normal(len(rows))
            return keras.ops.convert_to_tensor(w, dtype=dtype or "float32")

    return Sparse()


def autoencoder_builder(widths, activation: str = "tanh"):
    """784-widths-…-784 with a linear code layer and a linear output (logits)."""
    if activation == "logistic":
        act, init = "sigmoid", sparse_initializer
    else:
        act, init = "tanh", lambda: "glorot_uniform"

    def build(layer_kwargs: dict) -> keras.Model:
        dense = lambda units, a=None: keras.layers.Dense(units, activation=a, kernel_initializer=init(), **layer_kwargs)
        layers = [keras.Input((784,))]
        layers += [dense(w, act) for w in widths[:-1]]
        layers += [dense(widths[-1])]
        layers += [dense(w, act) for w in reversed(widths[:-1])]
        layers += [dense(784)]
        return keras.Sequential(layers)

    return build


def scaled_widths(base, scale: float) -> list[int]:
    return [max(int(round(w * scale)), 4) for w in base]


def convnet_builder(layer_kwargs: dict) -> keras.Model:
    """Conv5×5×32-pool-Conv5×5×32-pool-Dense128-Dense10; the factors stay ≤ 801×801."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu", **layer_kwargs),
            keras.layers.MaxPooling2D(2),  # 14×14
            keras.layers.Conv2D(32, 5, padding="same", activation="relu", **layer_kwargs),
            keras.layers.MaxPooling2D(2),  # 7×7
            keras.layers.MaxPooling2D(2, padding="same"),  # 4×4×32 = 512
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu", **layer_kwargs),
            keras.layers.Dense(10, **layer_kwargs),
        ]
    )


# --------------------------------------------------------------------- data


def load_images(args, n_train: int, flatten: bool, n_test: int = 0):
    """(x_train, y_train, x_test, y_test) as float32 in [0, 1], int32 labels."""
    if args.synthetic:
        rng = np.random.default_rng(1234)
        shape = (784,) if flatten else (28, 28, 1)
        # Blurry blobs rather than pure noise, so that an autoencoder can learn something.
        base = rng.uniform(size=(16,) + shape).astype(np.float32)
        pick = rng.integers(0, 16, size=n_train + n_test)
        x = np.clip(base[pick] + 0.1 * rng.standard_normal((n_train + n_test,) + shape), 0, 1).astype(np.float32)
        y = (pick % 10).astype(np.int32)
        return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    from keras_kfac.datasets import fashion_mnist_arrays

    (x, y), (xt, yt) = fashion_mnist_arrays(flatten=flatten, num_train=n_train)
    return x, y, xt[:n_test], yt[:n_test]


def autoencoder_evaluator(x_eval: np.ndarray, l2: float = 0.0, chunk: int = 2500):
    """Bernoulli cross-entropy (mean over pixels, as Keras), the paper's
    squared error (summed over pixels, mean over images) on `x_eval`, and the
    l2 penalty ½·l2·‖θ‖² that the optimized objective adds to the first."""

    def evaluate(model: keras.Model) -> dict:
        bce, sq = 0.0, 0.0
        for i in range(0, len(x_eval), chunk):
            x = x_eval[i : i + chunk]
            z = np.asarray(model.predict_on_batch(x), dtype=np.float64)
            bce += float(np.sum(np.maximum(z, 0) - z * x + np.log1p(np.exp(-np.abs(z)))))
            p = 1.0 / (1.0 + np.exp(-z))
            sq += float(np.sum((p - x) ** 2))
        penalty = 0.5 * l2 * sum(float(np.sum(np.square(w, dtype=np.float64))) for w in model.get_weights())
        return {"loss": bce / x_eval.size, "sq_error": sq / len(x_eval), "l2_penalty": penalty}

    return evaluate


def classifier_evaluator(x_eval, y_eval, x_test, y_test, chunk: int = 2500):
    """Cross-entropy on a training subset and accuracy on the test set."""

    def logits(model, x):
        return np.concatenate(
            [np.asarray(model.predict_on_batch(x[i : i + chunk]), np.float64) for i in range(0, len(x), chunk)]
        )

    def evaluate(model: keras.Model) -> dict:
        z = logits(model, x_eval)
        zmax = z.max(axis=1, keepdims=True)
        lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
        loss = float(np.mean(lse - z[np.arange(len(z)), y_eval]))
        acc = float(np.mean(np.argmax(logits(model, x_test), axis=1) == y_test))
        return {"loss": loss, "accuracy": acc}

    return evaluate


# ------------------------------------------------------------ time races


def baseline_specs(grid: dict) -> list[Spec]:
    specs = []
    for lr in grid.get("adam", []):
        specs.append(Spec("adam", {"learning_rate": lr}))
    for lr, mu_max in grid.get("sgd", []):
        specs.append(Spec("sgd", {"learning_rate": lr, "max_momentum": mu_max}))
    for lr in grid.get("muon", []):
        specs.append(Spec("muon", {"learning_rate": lr}))
    return specs


def parse_grid_overrides(text: str | None, grid: dict) -> dict:
    """`adam=1e-3,3e-3;sgd=1:0.99,3:0.99;muon=3e-3` replaces those families' grids; `adam=` drops Adam."""
    grid = dict(grid)
    if not text:
        return grid
    for part in text.split(";"):
        family, values = part.split("=")
        if not values:
            grid[family] = []
        elif family == "sgd":
            grid["sgd"] = [tuple(float(x) for x in v.split(":")) for v in values.split(",")]
        else:
            grid[family] = [float(v) for v in values.split(",")]
    return grid


def time_race(
    problem: H.Problem, cfg: dict, kfac_batch, baseline_batch, args, seed: int, specs: list[Spec]
) -> list[dict]:
    """All `specs` on `problem` from the same initial weights, trained in turns."""
    keras.utils.set_random_seed(seed)
    initial = problem.build_model({}).get_weights()
    runs = []
    for spec in specs:
        keras.utils.set_random_seed(seed)
        batch = kfac_batch if spec.is_kfac else baseline_batch
        runs.append(H.Run(problem, spec, batch, initial, seed, cfg["max_iters"], cfg["budget_s"]))
    if math.isfinite(cfg["budget_s"]):
        points = H.log_points(cfg["budget_s"], cfg["logs"])
        H.race(runs, points, f"{problem.name} seed {seed}", kfac_after_baselines=args.kfac_after_baselines)
    else:
        iters = sorted({max(1, cfg["max_iters"] * (i + 1) // cfg["logs"]) for i in range(cfg["logs"])})
        H.race(
            runs, [], f"{problem.name} seed {seed}", iter_points=iters, kfac_after_baselines=args.kfac_after_baselines
        )
    return [r.summary() for r in runs]


def analyse_race(summaries: list[dict], budget_s: float, accuracy: bool = False) -> dict:
    """Winners per family, targets, iterations/seconds to targets, loss at times."""
    by_family: dict[str, list[dict]] = {}
    for s in summaries:
        by_family.setdefault(s["family"], []).append(s)
    winners = {fam: H.best_of(group) for fam, group in by_family.items()}
    baselines = [w for fam, w in winners.items() if fam not in H.KFAC_FAMILIES]
    best = H.best_of(baselines)
    bc = best["curve"]
    end = bc["seconds"][-1]
    targets = []
    for frac, label in (
        (0.25, "best baseline @25% time"),
        (0.5, "best baseline @50% time"),
        (1.0, "best baseline final"),
    ):
        v = H.value_at(bc["seconds"], bc["loss"], frac * end)
        if v is not None:
            targets.append({"label": label, "loss": v})
    analysis = {
        "winners": {fam: w["name"] for fam, w in winners.items()},
        "best_baseline": best["name"],
        "targets": targets,
        "rows": {},
    }
    best_time = {t["label"]: H.first_crossing(bc["seconds"], bc["loss"], t["loss"]) for t in targets}
    best_iter = {t["label"]: H.first_crossing(bc["iterations"], bc["loss"], t["loss"]) for t in targets}
    horizon = min(w["curve"]["seconds"][-1] for w in winners.values())
    for fam, w in winners.items():
        c = w["curve"]
        row = {
            "name": w["name"],
            "final_loss": c["loss"][-1],
            "iterations": w["iterations"],
            "train_seconds": w["train_seconds"],
            "trace_seconds": w["trace_seconds"],
            "median_step_seconds": w["median_step_seconds"],
            "to_target": {},
            "loss_at": {},
        }
        for t in targets:
            secs = H.first_crossing(c["seconds"], c["loss"], t["loss"])
            its = H.first_crossing(c["iterations"], c["loss"], t["loss"])
            row["to_target"][t["label"]] = {
                "seconds": secs,
                "iterations": its,
                "time_speedup": (best_time[t["label"]] / secs) if secs and best_time[t["label"]] else None,
                "iteration_speedup": (best_iter[t["label"]] / its) if its and best_iter[t["label"]] else None,
            }
        for frac in (0.25, 0.5, 1.0):
            at = frac * horizon
            row["loss_at"][f"{at:.1f}s"] = H.value_at(c["seconds"], c["loss"], at)
        if accuracy:
            row["final_accuracy"] = c["accuracy"][-1]
        analysis["rows"][fam] = row
    if accuracy:
        accs = [w["curve"]["accuracy"][-1] for w in baselines]
        best_acc = max(accs)
        acc_targets = sorted({round(best_acc - 0.02, 3), round(best_acc - 0.01, 3), round(best_acc, 4)})
        best_acc_run = max(baselines, key=lambda s: s["curve"]["accuracy"][-1])
        analysis["accuracy_targets"] = acc_targets
        for fam, w in winners.items():
            c = w["curve"]
            analysis["rows"][fam]["to_accuracy"] = {
                str(a): {
                    "seconds": H.first_crossing(c["seconds"], c["accuracy"], a, higher=True),
                    "iterations": H.first_crossing(c["iterations"], c["accuracy"], a, higher=True),
                }
                for a in acc_targets
            }
        analysis["best_accuracy_baseline"] = best_acc_run["name"]
    return analysis


def race_tables(analysis: dict, summaries: list[dict], seed: int, accuracy: bool = False) -> str:
    out = []
    grid_rows = []
    winners = set(analysis["winners"].values())
    for s in summaries:
        c = s["curve"]
        grid_rows.append(
            [
                ("**" + s["name"] + "**") if s["name"] in winners else s["name"],
                str(s["iterations"]),
                H.fmt(s["train_seconds"], ".1f"),
                H.fmt(s["trace_seconds"], ".1f"),
                H.fmt(1e3 * s["median_step_seconds"], ".1f"),
                "diverged" if s["diverged"] else H.fmt(c["loss"][-1], ".5f"),
            ]
            + ([H.fmt(c["accuracy"][-1], ".4f")] if accuracy else [])
        )
    out.append(f"Grid (seed {seed}; **bold** = the family's winner, by final training loss):\n")
    out.append(
        H.markdown_table(
            ["run", "iters", "train s", "trace s", "ms/step (median)", "final loss"]
            + (["test acc"] if accuracy else []),
            grid_rows,
        )
    )
    targets = analysis["targets"]
    header = ["optimizer (winner)", "final loss"]
    for t in targets:
        header += [f"s to {t['loss']:.4f} ({t['label']})", "iters", "time speedup", "iter speedup"]
    rows = []
    for fam, r in analysis["rows"].items():
        row = [f"{H.FAMILIES[fam]}: {r['name']}", H.fmt(r["final_loss"], ".5f")]
        for t in targets:
            d = r["to_target"][t["label"]]
            row += [
                H.fmt(d["seconds"], ".1f"),
                H.fmt(d["iterations"], ".0f"),
                H.fmt(d["time_speedup"], ".2f") + ("×" if d["time_speedup"] else ""),
                H.fmt(d["iteration_speedup"], ".2f") + ("×" if d["iteration_speedup"] else ""),
            ]
        rows.append(row)
    out.append(
        f"\nTargets from the best baseline ({analysis['best_baseline']}); speedup = best baseline's "
        "seconds (iterations) to the target / this optimizer's (> 1: faster than the best baseline; "
        "interpolated between log points):\n"
    )
    out.append(H.markdown_table(header, rows))
    times = list(next(iter(analysis["rows"].values()))["loss_at"].keys())
    best_row = analysis["rows"][next(f for f, r in analysis["rows"].items() if r["name"] == analysis["best_baseline"])]
    rows = []
    for fam, r in analysis["rows"].items():
        row = [f"{H.FAMILIES[fam]}"]
        for t in times:
            v, b = r["loss_at"][t], best_row["loss_at"][t]
            row += [H.fmt(v, ".5f") + (f" ({v / b:.2f})" if v and b else "")]
        row += [H.fmt(1e3 * r["median_step_seconds"], ".1f"), H.fmt(r["trace_seconds"], ".1f")]
        rows.append(row)
    out.append("\nTraining loss at equal training time (in brackets: ratio to the best baseline's loss):\n")
    out.append(H.markdown_table(["optimizer"] + [f"loss @ {t}" for t in times] + ["ms/step", "trace s"], rows))
    if accuracy:
        rows = []
        for fam, r in analysis["rows"].items():
            row = [H.FAMILIES[fam], H.fmt(r["final_accuracy"], ".4f")]
            for d in r["to_accuracy"].values():
                row += [H.fmt(d["seconds"], ".1f"), H.fmt(d["iterations"], ".0f")]
            rows.append(row)
        header = ["optimizer", "final test acc"]
        for a in analysis["accuracy_targets"]:
            header += [f"s to acc {a}", "iters"]
        out.append("\nTime to test accuracy (targets: best baseline's final accuracy and 1, 2 points below):\n")
        out.append(H.markdown_table(header, rows))
    return "\n".join(out)


def seed_spread(per_seed: dict[int, dict]) -> str:
    """Speedups to the final target per seed, with min / median / max."""
    rows, collected = [], {}
    for seed, analysis in per_seed.items():
        final = analysis["targets"][-1]["label"]
        for fam, r in analysis["rows"].items():
            d = r["to_target"][final]
            collected.setdefault(fam, []).append((seed, analysis["targets"][-1]["loss"], d))
    for fam, items in collected.items():
        ts = [d["time_speedup"] for _, _, d in items]
        its = [d["iteration_speedup"] for _, _, d in items]

        def spread(v):
            vals = [x for x in v if x]
            miss = len(v) - len(vals)
            if not vals:
                return f"not reached ({miss}/{len(v)})"
            s = f"{min(vals):.2f} / {np.median(vals):.2f} / {max(vals):.2f}"
            return s + (f" (+{miss} not reached)" if miss else "")

        rows.append([H.FAMILIES[fam], ", ".join(str(s) for s, _, _ in items), spread(ts), spread(its)])
    return (
        "Spread over seeds of the speedups to the best baseline's final loss "
        "(min / median / max; each seed's target is that seed's best baseline):\n\n"
        + H.markdown_table(["optimizer", "seeds", "time speedup", "iteration speedup"], rows)
    )


def against_each_baseline(runs_by_seed: dict) -> str:
    """Adaptive K-FAC's speedup to each baseline family's own final loss, per seed.

    Per seed and family the winner is `harness.best_of` the family's runs; the
    baseline's seconds (iterations) to its final loss — its first crossing —
    are divided by adaptive K-FAC's to the same loss.
    """
    rows = []
    for seed, runs in runs_by_seed.items():
        families = {run["family"] for run in runs}
        best = {f: H.best_of([run for run in runs if run["family"] == f]) for f in families}
        kfac = best.get("kfac-adaptive")
        for family in ("adam", "sgd", "muon"):
            if kfac is None or family not in best:
                continue
            curve, target = best[family]["curve"], best[family]["curve"]["loss"][-1]
            cells = [str(seed), H.FAMILIES[family], best[family]["name"], f"{target:.5f}"]
            for key in ("seconds", "iterations"):
                own = H.first_crossing(curve[key], curve["loss"], target)
                reached = H.first_crossing(kfac["curve"][key], kfac["curve"]["loss"], target)
                cells += [
                    H.fmt(reached, ".1f" if key == "seconds" else ".0f"),
                    f"{own / reached:.2f}×" if reached and own else "—",
                ]
            rows.append(cells)
    return (
        "Adaptive K-FAC (its best initial damping) against each baseline: seconds and iterations "
        "to that baseline's final loss, and the baseline's own seconds (iterations) to it ÷ K-FAC's:\n\n"
        + H.markdown_table(
            [
                "seed",
                "baseline",
                "winner",
                "its final loss",
                "K-FAC s",
                "time speedup",
                "K-FAC iters",
                "iteration speedup",
            ],
            rows,
        )
    )


def run_time_race_problem(args, name: str, problem_factory, cfg: dict, kfac_specs, accuracy=False):
    out_dir = output_dir(args, name)
    grid = parse_grid_overrides(args.grid, cfg["grid"])
    specs = kfac_specs + baseline_specs(grid)
    problem, kfac_batch, baseline_batch = problem_factory()
    print(
        f"# {name}, budget {args.budget}: {len(specs)} runs of {cfg['budget_s']} training s "
        f"(max iters {cfg['max_iters']}), {len(problem.x_train)} training examples",
        flush=True,
    )
    started = time.time()
    all_summaries = {args.seed: time_race(problem, cfg, kfac_batch, baseline_batch, args, args.seed, specs)}
    analyses = {args.seed: analyse_race(all_summaries[args.seed], cfg["budget_s"], accuracy)}
    seeds = args.seeds or cfg["seeds"]
    if seeds > 1:
        winners = set(analyses[args.seed]["winners"].values())
        again = [s for s in specs if s.name in winners]
        for seed in range(args.seed + 1, args.seed + seeds):
            summaries = time_race(problem, cfg, kfac_batch, baseline_batch, args, seed, again)
            all_summaries[seed] = summaries
            analyses[seed] = analyse_race(summaries, cfg["budget_s"], accuracy)
    wall = time.time() - started
    table = race_tables(analyses[args.seed], all_summaries[args.seed], args.seed, accuracy)
    if seeds > 1:
        table += "\n\n" + seed_spread(analyses)
    table += "\n\n" + against_each_baseline(all_summaries)
    settings = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in cfg.items() if k != "grid"}
    settings.update(seed=args.seed, seeds=seeds)
    header = (
        f"## {name} — budget `{budget_label(args)}`\n\n"
        f"Settings: {json.dumps(settings)}; grid {json.dumps(grid)}; K-FAC runs "
        f"{[s.name for s in kfac_specs]}. Wall time of the benchmark {wall:.0f} s.\n"
    )
    if args.kfac_after_baselines:
        header += (
            "\nThe baselines raced first; each K-FAC run then stopped at the first log point at or below "
            "their lowest final loss, so its 'final loss' is its loss there and 'loss at equal training "
            "time' ends at its stop.\n"
        )
    finish(
        args,
        out_dir,
        name,
        header + "\n" + table,
        {
            "problem": name,
            "budget": args.budget,
            "settings": settings,
            "grid": grid,
            "environment": environment(),
            "analysis": {str(k): v for k, v in analyses.items()},
            "runs": {str(k): v for k, v in all_summaries.items()},
        },
    )
    curves = {}
    for s in all_summaries[args.seed]:
        if s["name"] in analyses[args.seed]["winners"].values():
            setting = s["name"].split("[")[-1].rstrip("]") if "[" in s["name"] else "defaults"
            curves[f"{H.FAMILIES[s['family']]} ({setting})"] = s["curve"]
    pngs = [out_dir / "loss.png"]
    H.plot_curves(curves, pngs[0], f"{name} ({budget_label(args)}): training loss, seed {args.seed}")
    if accuracy:
        pngs.append(out_dir / "accuracy.png")
        H.plot_curves(
            curves,
            pngs[1],
            f"{name} ({budget_label(args)}): test accuracy",
            metric="accuracy",
            ylabel="test accuracy",
            log_y=False,
        )
    save_figures(args, name, pngs)


def autoencoder_problem(args, cfg):
    def factory():
        x, _, _, _ = load_images(args, cfg["n_train"], flatten=True)
        widths = scaled_widths(PAPER_WIDTHS, args.width_scale or cfg["width"])
        problem = H.Problem(
            name="autoencoder",
            build_model=autoencoder_builder(widths, args.activation),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            x_train=x,
            y_train=x,
            evaluate=autoencoder_evaluator(x[: cfg["n_eval"]], cfg["l2"]),
            l2=cfg["l2"],
            metric_names=("loss", "sq_error", "l2_penalty"),
        )
        print(f"widths {widths}, activation {args.activation}, l2 {cfg['l2']:g}", flush=True)
        kfac_batch = H.batch_size_schedule(cfg["kfac_first"], len(x), cfg["kfac_reach"])
        return problem, kfac_batch, H.batch_size_schedule(cfg["baseline_batch"], len(x), None)

    return factory


def convnet_problem(args, cfg):
    def factory():
        x, y, xt, yt = load_images(args, cfg["n_train"], flatten=False, n_test=cfg["n_test"])
        problem = H.Problem(
            name="convnet",
            build_model=convnet_builder,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            x_train=x,
            y_train=y,
            evaluate=classifier_evaluator(x[: cfg["n_eval"]], y[: cfg["n_eval"]], xt, yt),
            l2=L2,
            metric_names=("loss", "accuracy"),
        )
        return (
            problem,
            H.batch_size_schedule(cfg["kfac_batch"], len(x), None),
            H.batch_size_schedule(cfg["baseline_batch"], len(x), None),
        )

    return factory


def kfac_specs(
    cfg: dict, budget: str, paper_damping: float, dampings: list[float | None] | None = None, fixed: bool = True
) -> list[Spec]:
    """Adaptive K-FAC from the paper's initial damping and from smaller ones, and fixed-lr K-FAC.

    `dampings` replaces the budget's initial dampings λ₀ of the adaptive runs
    (None: the paper's, `paper_damping`); `fixed=False` leaves out the fixed-lr runs.
    """
    params = dict(KFAC_ADAPTIVE_PARAMS, **cfg.get("kfac_adaptive", {}))
    if dampings is None:
        dampings = [None] + KFAC_INITIAL_DAMPINGS[budget]
    adaptive = [Spec("kfac-adaptive", dict(params, damping=paper_damping if d is None else d)) for d in dampings]
    return adaptive + ([Spec("kfac-fixed", p) for p in cfg["kfac_fixed"]] if fixed else [])


def parse_kfac_dampings(text: str | None) -> list[float | None] | None:
    """`paper,1e-4` → [None, 1e-4]: the adaptive runs' initial dampings (None, "paper": the paper's
    λ₀ = 150 in Keras' units, `PAPER_DAMPING`)."""
    if not text:
        return None
    return [None if v.strip() == "paper" else float(v) for v in text.split(",")]


# ------------------------------------------------------- 50 vs 500 iterations


def mean_step(summary: dict) -> float:
    return summary["train_seconds"] / max(summary["iterations"], 1)


def run_fifty(args):
    cfg = FIFTY_BUDGETS[args.budget]
    name = "autoencoder-50-vs-500"
    out_dir = output_dir(args, name)
    x, _, _, _ = load_images(args, cfg["n_train"], flatten=True)
    widths = scaled_widths(SMALL_DEEP_WIDTHS, args.width_scale or cfg["width"])
    problem = H.Problem(
        name=name,
        build_model=autoencoder_builder(widths, args.activation),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        x_train=x,
        y_train=x,
        evaluate=autoencoder_evaluator(x[: cfg["n_eval"]]),
        l2=L2,
        metric_names=("loss", "sq_error"),
    )
    batch = H.batch_size_schedule(cfg["batch"], len(x), None)
    # Adaptive K-FAC: the paper's initial damping (None) and a few smaller ones.
    specs = [
        Spec("kfac-adaptive", dict(PAPER_RECIPE, damping=PAPER_DAMPING["autoencoder"] if d is None else d))
        for d in cfg["kfac_dampings"]
    ]
    specs += [Spec("kfac-fixed", {})]
    specs += [Spec("adam", {"learning_rate": lr}) for lr in cfg["adam_lrs"]]
    print(
        f"# {name}, budget {args.budget}: widths {widths}, batch {cfg['batch']}, {len(x)} examples; "
        f"K-FAC {cfg['kfac_iters']} iterations, Adam {cfg['adam_iters']}",
        flush=True,
    )
    seeds = args.seeds or cfg["seeds"]
    per_seed = {}
    for seed in range(args.seed, args.seed + seeds):
        keras.utils.set_random_seed(seed)
        initial = problem.build_model({}).get_weights()
        runs = []
        for spec in specs:
            keras.utils.set_random_seed(seed)
            iters = cfg["kfac_iters"] if spec.is_kfac else cfg["adam_iters"]
            runs.append(H.Run(problem, spec, batch, initial, seed, iters, math.inf))
        # Log every 5 iterations up to the K-FAC horizon, then every 25.
        k, a = cfg["kfac_iters"], cfg["adam_iters"]
        points = sorted(
            set(list(range(max(1, k // 10), k + 1, max(1, k // 10))) + list(range(k, a + 1, max(1, a // 20))) + [a])
        )
        H.race(runs, [], f"{name} seed {seed}", iter_points=points)
        per_seed[seed] = [r.summary() for r in runs]
    rows, records = [], {}
    for seed, summaries in per_seed.items():
        adaptive = [s for s in summaries if s["family"] == "kfac-adaptive"]
        paper = adaptive[0]  # from the paper's λ₀ (cfg["kfac_dampings"] starts with None)
        ka = H.best_of(adaptive)
        kf = next(s for s in summaries if s["family"] == "kfac-fixed")
        adams = [s for s in summaries if s["family"] == "adam"]
        best = H.best_of(adams)
        k_iters = cfg["kfac_iters"]
        k_loss = H.value_at(ka["curve"]["iterations"], ka["curve"]["loss"], k_iters)
        adam_at_k = H.value_at(best["curve"]["iterations"], best["curve"]["loss"], k_iters)
        adam_final = best["curve"]["loss"][-1]
        adam_iters_to = H.first_crossing(best["curve"]["iterations"], best["curve"]["loss"], k_loss)
        kfac_iters_to_adam = H.first_crossing(ka["curve"]["iterations"], ka["curve"]["loss"], adam_final)
        record = {
            "kfac_adaptive_loss": k_loss,
            "best_kfac_adaptive": ka["name"],
            "kfac_adaptive_losses": {s["name"]: s["curve"]["loss"][-1] for s in adaptive},
            "kfac_fixed_loss": kf["curve"]["loss"][-1],
            "best_adam": best["name"],
            "adam_loss_at_kfac_iters": adam_at_k,
            "adam_final_loss": adam_final,
            "adam_losses": {s["name"]: s["curve"]["loss"][-1] for s in adams},
            "adam_iterations_to_kfac_loss": adam_iters_to,
            "kfac_iterations_to_adam_final": kfac_iters_to_adam,
            "claim_holds": bool(k_loss is not None and k_loss < adam_final),
            "ms_per_step": {s["name"]: 1e3 * s["median_step_seconds"] for s in summaries},
            "adaptive_over_fixed": mean_step(ka) / mean_step(kf),
            "adaptive_over_adam": mean_step(ka) / mean_step(best),
            "fixed_over_adam": mean_step(kf) / mean_step(best),
            "kfac_adaptive_train_seconds": ka["train_seconds"],
            "adam_train_seconds": best["train_seconds"],
        }
        records[seed] = record
        rows.append(
            [
                str(seed),
                H.fmt(paper["curve"]["loss"][-1], ".5f"),
                ka["name"],
                H.fmt(k_loss, ".5f"),
                H.fmt(kf["curve"]["loss"][-1], ".5f"),
                f"{best['name']}",
                H.fmt(adam_at_k, ".5f"),
                H.fmt(adam_final, ".5f"),
                H.fmt(adam_iters_to, ".0f") if adam_iters_to else f"not in {cfg['adam_iters']}",
                H.fmt(kfac_iters_to_adam, ".0f") if kfac_iters_to_adam else f"not in {k_iters}",
                "yes" if record["claim_holds"] else "no",
                f"{record['adaptive_over_fixed']:.2f}",
                f"{record['adaptive_over_adam']:.2f}",
                f"{record['fixed_over_adam']:.2f}",
            ]
        )
    k, a = cfg["kfac_iters"], cfg["adam_iters"]
    table = H.markdown_table(
        [
            "seed",
            f"adaptive K-FAC, paper λ₀, loss @{k}",
            "best adaptive K-FAC",
            f"its loss @{k}",
            f"K-FAC fixed-lr loss @{k}",
            "best Adam",
            f"Adam loss @{k}",
            f"Adam loss @{a}",
            "Adam iters to K-FAC's loss",
            "K-FAC iters to Adam's final",
            f"K-FAC@{k} < Adam@{a}",
            "step time adaptive / fixed K-FAC",
            "adaptive K-FAC / Adam",
            "fixed K-FAC / Adam",
        ],
        rows,
    )
    table += (
        "\n\nThe comparison uses the best adaptive K-FAC (by its loss at iteration "
        f"{k}) against the best Adam (by its loss at {a})."
    )
    adam_rows = []
    for seed, summaries in per_seed.items():
        for s in summaries:
            adam_rows.append(
                [
                    str(seed),
                    s["name"],
                    str(s["iterations"]),
                    H.fmt(s["curve"]["loss"][-1], ".5f"),
                    H.fmt(1e3 * mean_step(s), ".1f"),
                    H.fmt(1e3 * s["median_step_seconds"], ".1f"),
                    H.fmt(s["train_seconds"], ".1f"),
                    H.fmt(s["trace_seconds"], ".1f"),
                ]
            )
    table += (
        "\n\nAll runs (mean step time = training seconds / iterations, the traced first step charged "
        "at the next step's time; median step time; trace = first step, off the clock). Step-time ratios "
        "above use the means, which include K-FAC's inverse refreshes:\n\n"
    ) + H.markdown_table(
        ["seed", "run", "iters", "final loss", "ms/step (mean)", "ms/step (median)", "train s", "trace s"], adam_rows
    )
    header = (
        f"## {name} — budget `{args.budget}`\n\nWidths {widths} (mirrored), batch {cfg['batch']} for all, "
        f"{len(x)} training examples, loss on {cfg['n_eval']} of them; Adam lrs {cfg['adam_lrs']}; "
        "K-FAC adaptive = `KFAC(adaptive=True, l2_reg=1e-5)` (τ₁ = τ₂ = 1) with the paper's initial "
        f"damping and with damping (initial λ₀) in {[d for d in cfg['kfac_dampings'] if d]}, fixed = "
        "`KFAC(learning_rate=0.1, damping=1e-2, norm_constraint=1e-3, l2_reg=1e-5)`.\n"
    )
    for seed, r in records.items():
        print(
            f"seed {seed}: adaptive K-FAC step = {r['adaptive_over_fixed']:.2f}× fixed-lr K-FAC step, "
            f"{r['adaptive_over_adam']:.2f}× Adam step; fixed-lr K-FAC = {r['fixed_over_adam']:.2f}× Adam"
        )
    finish(
        args,
        out_dir,
        name,
        header + "\n" + table,
        {
            "problem": name,
            "budget": args.budget,
            "settings": cfg,
            "environment": environment(),
            "records": {str(k): v for k, v in records.items()},
            "runs": {str(k): v for k, v in per_seed.items()},
        },
    )
    curves = {}
    for s in per_seed[args.seed]:
        curves[s["name"]] = s["curve"]
    png = out_dir / "loss.png"
    H.plot_curves(curves, png, f"{name} ({args.budget}): training loss, seed {args.seed}")
    save_figures(args, name, [png])


# ------------------------------------------------------------------ profile


def profile_models(cfg):
    """name -> (builder, loss, data kind, batch size)."""
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    w = cfg["width"]
    return {
        "autoencoder-paper": (autoencoder_builder(scaled_widths(PAPER_WIDTHS, w)), bce, "ae", 1000),
        "autoencoder-paper-x0.5": (autoencoder_builder(scaled_widths(PAPER_WIDTHS, 0.5 * w)), bce, "ae", 1000),
        "autoencoder-small-deep": (autoencoder_builder(scaled_widths(SMALL_DEEP_WIDTHS, w)), bce, "ae", 1000),
        "convnet": (convnet_builder, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "conv", 256),
    }


PROFILE_VARIANTS = [
    ("sgd", Spec("sgd", {"learning_rate": 0.01, "max_momentum": 0.99})),
    ("adam", Spec("adam", {"learning_rate": 1e-3})),
    ("kfac fixed (T3=10, τ1=1)", Spec("kfac-fixed", {})),
    ("kfac fixed, inverses every step (T3=1)", Spec("kfac-fixed", {"inverse_update_period": 1})),
    ("kfac fixed, inverses never (T3=10^6)", Spec("kfac-fixed", {"inverse_update_period": 10**6})),
    ("kfac fixed, τ1=1/8", Spec("kfac-fixed", {"statistics_fraction": 0.125})),
    ("kfac fixed, statistics every 10 steps", Spec("kfac-fixed", {"statistics_update_period": 10})),
    ("kfac adaptive (τ1=τ2=1)", Spec("kfac-adaptive", {})),
    ("kfac adaptive, τ2=1/4", Spec("kfac-adaptive", {"curvature_fraction": 0.25})),
    (
        "kfac adaptive, τ1=1/8, τ2=1/4 (paper)",
        Spec("kfac-adaptive", {"statistics_fraction": 0.125, "curvature_fraction": 0.25}),
    ),
    (
        "kfac adaptive, paper, Conv2D patches 1/4",
        Spec("kfac-adaptive", {"statistics_fraction": 0.125, "curvature_fraction": 0.25, "patch_fraction": 0.25}),
    ),
]


def run_profile(args):
    cfg = PROFILE_BUDGETS[args.budget]
    name = "profile"
    out_dir = output_dir(args, name)
    models = profile_models(cfg)
    xa, _, _, _ = load_images(args, cfg["n_train"], flatten=True)
    xc, yc, _, _ = load_images(args, cfg["n_train"], flatten=False)
    results, text = {}, []
    for model_name in cfg["models"]:
        builder, loss, kind, batch = models[model_name]
        batch = cfg["batch"] or batch
        x, y = (xa, xa) if kind == "ae" else (xc, yc)
        problem = H.Problem(
            name=model_name,
            build_model=builder,
            loss=loss,
            x_train=x,
            y_train=y,
            evaluate=lambda m: {"loss": 0.0},
            l2=L2,
        )
        keras.utils.set_random_seed(args.seed)
        probe = builder({})
        initial = probe.get_weights()
        params = probe.count_params()
        runs = []
        for label, spec in PROFILE_VARIANTS:
            keras.utils.set_random_seed(args.seed)
            run = H.Run(problem, spec, H.batch_size_schedule(batch, len(x), None), initial, args.seed, None, math.inf)
            runs.append((label, run))
        print(f"# profile {model_name}: {params} parameters, batch {batch}", flush=True)
        for _, run in runs:  # trace, then warm up
            for _ in range(cfg["warmup"]):
                run.step()
        times = {label: [] for label, _ in runs}
        for r in range(cfg["rounds"]):
            order = runs if r % 2 == 0 else runs[::-1]
            for label, run in order:
                # chunks of T3=10-period variants must cover refreshes fairly: whole periods
                chunk = 10 if run.spec.is_kfac else cfg["chunk"]
                start = time.perf_counter()
                for _ in range(chunk):
                    run.step()
                times[label].append((time.perf_counter() - start) / chunk)
        med = {label: float(np.median(v)) for label, v in times.items()}
        sgd = med["sgd"]
        rows = [[label, H.fmt(1e3 * t, ".1f"), f"{t / sgd:.2f}", f"{t / med['adam']:.2f}"] for label, t in med.items()]
        fixed, p1, pinf = (
            med["kfac fixed (T3=10, τ1=1)"],
            med["kfac fixed, inverses every step (T3=1)"],
            med["kfac fixed, inverses never (T3=10^6)"],
        )
        stats_part = (fixed - med["kfac fixed, τ1=1/8"]) / (7 / 8)
        inverse_refresh = p1 - pinf
        breakdown = {
            "gradient step (SGD)": sgd,
            "statistics (τ1=1), from fixed − fixed τ1=1/8, ÷ 7/8": stats_part,
            "one refresh of all inverses, T3=1 − T3=10^6": inverse_refresh,
            "inverses amortised at T3=10": inverse_refresh / 10,
            "preconditioning + rest: (T3=10^6) − SGD − statistics": pinf - sgd - stats_part,
            "quadratic model + damping/γ adaptation: adaptive − fixed (τ2=1)": med["kfac adaptive (τ1=τ2=1)"] - fixed,
        }
        bd_rows = [[k, H.fmt(1e3 * v, ".1f"), f"{v / fixed:.2f}"] for k, v in breakdown.items()]
        text.append(
            f"### {model_name} ({params:,} parameters, batch {batch})\n\n"
            + H.markdown_table(["variant", "ms/step (median)", "÷ SGD", "÷ Adam"], rows)
            + "\n\nWhere the time goes (differences of the medians above; noisy, can be negative):\n\n"
            + H.markdown_table(["part", "ms/step", "share of a fixed-lr K-FAC step"], bd_rows)
        )
        results[model_name] = {
            "params": params,
            "batch": batch,
            "median_seconds": med,
            "samples": times,
            "breakdown": breakdown,
            "trace_seconds": {label: run.trace_s for label, run in runs},
        }
        print(text[-1], flush=True)
    header = (
        f"## profile — budget `{args.budget}`\n\nEach variant trains its own copy of the model from the "
        f"same weights; after {cfg['warmup']} warm-up steps the variants take turns "
        f"({cfg['rounds']} rounds, order reversed every other round; 10 steps per K-FAC turn so that "
        f"T3=10 refreshes are included in proportion, {cfg['chunk']} per SGD/Adam turn); "
        "the table gives the median over rounds of the mean step time of a turn. "
        "All K-FAC variants have l2_reg=1e-5; fixed = learning_rate 0.1, damping 1e-2, norm_constraint 1e-3.\n"
    )
    finish(
        args,
        out_dir,
        name,
        header + "\n" + "\n\n".join(text),
        {"problem": name, "budget": args.budget, "settings": cfg, "environment": environment(), "results": results},
    )
    png = out_dir / "step_time.png"
    plot_profile(results, png)
    save_figures(args, name, [png])


def plot_profile(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 0.5 + 0.9 * len(results) + 1.2))
    labels = [label for label, _ in PROFILE_VARIANTS]
    height = 0.8 / max(len(results), 1)
    for i, (model_name, r) in enumerate(results.items()):
        sgd = r["median_seconds"]["sgd"]
        ys = np.arange(len(labels)) + i * height
        axis.barh(ys, [r["median_seconds"][label] / sgd for label in labels], height=height, label=model_name)
    axis.set_yticks(np.arange(len(labels)) + 0.4 - height / 2)
    axis.set_yticklabels(labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("step time ÷ SGD step time (same model)")
    axis.axvline(1, color="k", linewidth=0.5)
    axis.legend(fontsize=7)
    axis.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------- output


def environment() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "command": " ".join(sys.argv),
    }


TIME_RACES = ("autoencoder", "convnet")
AUTOENCODERS = ("autoencoder", "autoencoder-50-vs-500")  # the problems `--activation` applies to


def budget_label(args) -> str:
    """The budget's name, with the training seconds where ``--budget-seconds`` overrides them (the time races)
    and ``-logistic`` for the autoencoders with the paper's logistic units."""
    label = args.budget
    if args.budget_seconds and args.problem in TIME_RACES:
        label += f"-{args.budget_seconds:g}s"
    if args.activation == "logistic" and args.problem in AUTOENCODERS:
        label += "-logistic"
    if args.l2 is not None and args.problem == "autoencoder":
        label += f"-l2-{args.l2:g}"
    return label


def output_dir(args, name: str) -> Path:
    base = Path(args.out_dir) if args.out_dir else HERE / "results"
    path = base / name / budget_label(args)
    path.mkdir(parents=True, exist_ok=True)
    return path


def finish(args, out_dir: Path, name: str, table: str, payload: dict) -> None:
    print("\n" + table + "\n", flush=True)
    (out_dir / "table.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=H.json_default))
    print(f"wrote {out_dir}/table.md, results.json and the PNG plots", flush=True)


def save_figures(args, name: str, pngs: list[Path]) -> None:
    if not args.save_figures:
        return
    target = HERE / "figures"
    target.mkdir(exist_ok=True)
    for png in pngs:
        shutil.copy(png, target / f"{name}_{budget_label(args)}_{png.name}")


PROBLEMS = ["autoencoder", "autoencoder-50-vs-500", "convnet", "profile"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--problem", required=True, choices=PROBLEMS + ["all"], help="one problem, or all of them in turn"
    )
    parser.add_argument("--budget", default="default", choices=["smoke", "small", "default"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds from --seed on (the winners of the first seed's grid and K-FAC are rerun)",
    )
    parser.add_argument(
        "--width-scale", type=float, default=None, help="scale the autoencoder's layer widths (default: the budget's)"
    )
    parser.add_argument(
        "--activation",
        choices=["tanh", "logistic"],
        default="tanh",
        help="tanh + Glorot init, or the paper's logistic units + sparse init",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="override training seconds per run of the autoencoder and convnet races "
        "(results in <budget>-<seconds>s folders)",
    )
    parser.add_argument(
        "--kfac-first-batch",
        type=int,
        default=None,
        help="autoencoder: K-FAC's first batch size m₁ (default: the budget's)",
    )
    parser.add_argument(
        "--kfac-reach",
        type=int,
        default=None,
        help="autoencoder: the iteration at which K-FAC's batch reaches N (default: the budget's)",
    )
    parser.add_argument(
        "--kfac-dampings",
        default=None,
        help="autoencoder and convnet: the adaptive K-FAC runs' initial dampings, e.g. "
        "'paper,1e-4' (default: the budget's)",
    )
    parser.add_argument(
        "--no-kfac-fixed", action="store_true", help="autoencoder and convnet: leave out the fixed-lr K-FAC run"
    )
    parser.add_argument(
        "--logs",
        type=int,
        default=None,
        help="autoencoder and convnet: number of log points per run (default: the budget's)",
    )
    parser.add_argument(
        "--kfac-after-baselines",
        action="store_true",
        help="autoencoder and convnet: race the baselines first, then the K-FAC runs, each "
        "stopping at the first log point at or below the baselines' lowest final loss",
    )
    parser.add_argument(
        "--grid", default=None, help="override baseline grids, e.g. 'adam=1e-3,3e-3;sgd=1:0.99,3:0.99;muon=3e-3'"
    )
    parser.add_argument(
        "--l2",
        type=float,
        default=None,
        help=f"the autoencoder race's l2 penalty η (default {L2:g}; the paper's η = 1e-5 on its "
        "loss summed over the 784 pixels is 1e-5/784 on Keras' pixel mean)",
    )
    parser.add_argument("--synthetic", action="store_true", help="synthetic images instead of Fashion-MNIST")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--save-figures", action="store_true", help="copy the PNGs to benchmarks/figures/")
    args = parser.parse_args(argv)
    for problem in PROBLEMS if args.problem == "all" else [args.problem]:
        run_problem(argparse.Namespace(**{**vars(args), "problem": problem}))


def run_problem(args: argparse.Namespace) -> None:
    keras.utils.set_random_seed(args.seed)
    if args.problem == "autoencoder":
        cfg = dict(AUTOENCODER_BUDGETS[args.budget])
        if args.budget_seconds:
            cfg["budget_s"] = args.budget_seconds
        if args.logs:
            cfg["logs"] = args.logs
        if args.kfac_first_batch:
            cfg["kfac_first"] = args.kfac_first_batch
        if args.kfac_reach:
            cfg["kfac_reach"] = args.kfac_reach
        cfg["l2"] = L2 if args.l2 is None else args.l2
        kfac = kfac_specs(
            cfg,
            args.budget,
            PAPER_DAMPING["autoencoder"],
            parse_kfac_dampings(args.kfac_dampings),
            not args.no_kfac_fixed,
        )
        run_time_race_problem(args, "autoencoder", autoencoder_problem(args, cfg), cfg, kfac)
    elif args.problem == "convnet":
        cfg = dict(CONVNET_BUDGETS[args.budget])
        if args.budget_seconds:
            cfg["budget_s"] = args.budget_seconds
        if args.logs:
            cfg["logs"] = args.logs
        kfac = kfac_specs(
            cfg, args.budget, PAPER_DAMPING["convnet"], parse_kfac_dampings(args.kfac_dampings), not args.no_kfac_fixed
        )
        run_time_race_problem(args, "convnet", convnet_problem(args, cfg), cfg, kfac, accuracy=True)
    elif args.problem == "profile":
        run_profile(args)
    else:
        run_fifty(args)


if __name__ == "__main__":
    main()
