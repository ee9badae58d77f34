"""The zoo race: default K-FAC against Adam and Muon on six common Keras models.

    python benchmarks/zoo_race.py --budget default --seeds 3 --save-figures
    python benchmarks/zoo_race.py --budget default --seeds 3 --kfac-only   # after a change to K-FAC alone
    python benchmarks/zoo_race.py --budget small --models mlp,convnet
    python benchmarks/zoo_race.py --budget default --dampings --models autoencoder,convnet
    python benchmarks/zoo_race.py --budget smoke --synthetic          # what the tests run
    python benchmarks/zoo_race.py --candidates                         # how the defaults were chosen
    python benchmarks/zoo_race.py --weight-sharing --seeds 3            # K-FAC-expand against K-FAC-reduce
    python benchmarks/zoo_race.py --blocks --seeds 3                    # the new blocks against the fallback
    python benchmarks/zoo_race.py --fractions                          # statistics on a fraction of the batch
    python benchmarks/zoo_race.py --adaptive-periods                   # the adaptive mode's refresh periods
    python benchmarks/zoo_race.py --adaptive-bound --models transformer,convnet,autoencoder
    python benchmarks/zoo_race.py --adaptive-fractions                 # the quadratic model on fractions τ₂

For every model of `zoo.py` and seed, one race (`harness.race`: the runs train
in turns, each on its own clock, the validation loss evaluated off the clock
at log points) of:

- Adam with Keras' defaults (learning rate 1e-3), and at 3e-4 and 3e-3;
- Muon with Keras' defaults;
- `KFAC(model=model)` with no other argument, and `KFAC(model=model, adaptive=True)`.

All runs of a race start from the same weights and see the same batches, of
the batch size the model's Keras example uses. The targets are Adam-default's
validation loss at the end of the budget ("converged") and at a quarter of it
("short"); for each run the table gives the training seconds and iterations
to its first crossing of each target, and the speedup: Adam-default's own
seconds (iterations) to the target divided by the run's.

`--kfac-only` races only Adam-default (the reference) and the two K-FAC
runs: after a change to K-FAC, the other baselines' runs would repeat the
earlier race's, at twice the wall time.

`--dampings` races adaptive K-FAC from its default initial damping, from the
relative λ₀ of `--relative-dampings` (× tr(F̃)/n; default 3) and from the
λ₀ of `--initial-dampings` (default 1e-4, …, 150) against Adam-default
instead, for the table of the adaptive mode's sensitivity to λ₀;
`--curvature-fraction` gives all its adaptive runs that τ₂.

`--fractions` races default K-FAC with its statistics on the whole batch (the
default), on 1/4 and on 1/8 of it, and adaptive K-FAC as it is and with the
paper's fractions (statistics on τ₁ = 1/8, the quadratic model on τ₂ = 1/4,
inverses every T₃ = 20 steps), against Adam-default.

`--adaptive-periods` races adaptive K-FAC as it is (statistics every step,
inverses every 10) against statistics every 5th step, and every 5th step
with inverses every 20 (the γ search's period), against Adam-default.

`--adaptive-fractions` races adaptive K-FAC with its quadratic model (the
exact-Fisher products and ρ) on the whole batch, on half and on a quarter
of it (τ₂), against Adam-default.

`--adaptive-bound` races adaptive K-FAC without its trust region
α²ΔᵀF̆Δ ≤ C and with C = 1e-3, 3e-3 and 1e-2, against Adam-default.

`--weight-sharing` races default K-FAC (its convolutions' factors
K-FAC-expand, a row per location) and K-FAC-reduce everywhere (a row per
example) against Adam-default, on the convnet and the ResNet by default.

`--blocks` races default K-FAC as it was (blocks for Dense, Conv1D, Conv2D
and Embedding only, a row per position: recurrent layers and attention
projections on the fallback), as it is now, and with the opt-in normalization
blocks too, against Adam-default, on the LSTM, transformer and ResNet.

`--candidates` trains the candidate settings of the default step for a fixed
number of iterations on four of the models (the LSTM's and the ResNet's
curvature blocks cover little or cost much, see BENCHMARKS.md) and reports
their iterations to Adam-default's validation loss: the measurement the
defaults were chosen by. Their cost per step is the zoo race's business.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

tf.get_logger().setLevel("ERROR")

import harness as H  # noqa: E402
import zoo  # noqa: E402
from harness import OptimizerSpec as Spec  # noqa: E402

from keras_kfac.optimizer import DEFAULT_STEP  # noqa: E402

# Training seconds per run ("smoke": iterations), log points, data size.
BUDGETS = {
    "smoke": dict(size="small", seconds=None, iterations=4, logs=2),
    "small": dict(size="default", seconds={m: 8.0 for m in zoo.MODELS}, logs=8),
    "default": dict(
        size="default",
        logs=16,
        seconds={"mlp": 20.0, "convnet": 60.0, "resnet": 90.0, "lstm": 60.0, "transformer": 30.0, "autoencoder": 60.0},
    ),
}
SHORT = 0.25  # the short budget, as a fraction of the converged one
ADAM_DEFAULT = Spec("adam", {"learning_rate": 1e-3})
RACE = [
    ADAM_DEFAULT,
    Spec("adam", {"learning_rate": 3e-4}),
    Spec("adam", {"learning_rate": 3e-3}),
    Spec("muon", {}),
    Spec("kfac", {}),
    Spec("kfac-adaptive", {}),
]
KFAC_ONLY_RACE = [ADAM_DEFAULT, Spec("kfac", {}), Spec("kfac-adaptive", {})]
INITIAL_DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 150.0]


# The default step and its neighbours, each changing one thing. The default
# step is spelled out: a learning rate or momentum alone would select the
# earlier defaults for the rest.
def _step(**change) -> Spec:
    return Spec("kfac", dict(DEFAULT_STEP, **change))


CANDIDATES = [
    ADAM_DEFAULT,
    Spec("kfac", {}),
    _step(momentum=0.9),
    _step(momentum=0.0),
    _step(norm_constraint=1e-4),
    _step(norm_constraint=1e-2),
    _step(relative_damping=0.3),
    _step(relative_damping=30.0),
    _step(statistics_update_period=1, inverse_update_period=10),
    _step(statistics_update_period=10, inverse_update_period=50),
    Spec("kfac", {"learning_rate": 0.1, "momentum": 0.9, "damping": 1e-2, "norm_constraint": 1e-3}),
    Spec("kfac-adaptive", {}),
]
# K-FAC-expand (the default) and K-FAC-reduce for the convolutions (Eschenhagen et al. 2023).
WEIGHT_SHARING_RACE = [ADAM_DEFAULT, Spec("kfac", {}), Spec("kfac", {"weight_sharing": "reduce"})]
# Default K-FAC as it was (blocks for Dense, Conv1D/2D and Embedding only, a row
# per position; the rest on the fallback), as it is, and with the opt-in blocks too.
BLOCKS_RACE = [
    ADAM_DEFAULT,
    Spec("kfac", {"blocks": "dense_conv_embedding", "weight_sharing": "expand"}),
    Spec("kfac", {}),
    Spec("kfac", {"blocks": "all"}),
]
# Statistics on a fraction τ₁ of the batch (default step), and the adaptive mode
# as it is against the paper's fractions (τ₁ = 1/8, τ₂ = 1/4) and T₃ = 20 [KFAC §8].
FRACTIONS_RACE = [
    ADAM_DEFAULT,
    Spec("kfac", {}),
    Spec("kfac", {"statistics_fraction": 0.25}),
    Spec("kfac", {"statistics_fraction": 0.125}),
    Spec("kfac-adaptive", {}),
    Spec("kfac-adaptive", {"statistics_fraction": 0.125, "curvature_fraction": 0.25, "inverse_update_period": 20}),
]
# The adaptive mode's statistics and inverse periods (T_cov, T₃): (1, 10) as it is, (5, 10), (5, 20).
ADAPTIVE_PERIODS_RACE = [
    ADAM_DEFAULT,
    Spec("kfac-adaptive", {}),
    Spec("kfac-adaptive", {"statistics_update_period": 5}),
    Spec("kfac-adaptive", {"statistics_update_period": 5, "inverse_update_period": 20}),
]
# The adaptive mode's trust region α²ΔᵀF̆Δ ≤ C: off (as it was) and three sizes.
ADAPTIVE_BOUND_RACE = [ADAM_DEFAULT] + [
    Spec("kfac-adaptive", {"norm_constraint": c}) for c in (math.inf, 1e-3, 3e-3, 1e-2)
]
# The adaptive mode's initial damping (3 or 0.3 · tr(F̃)/n) crossed with its
# exact-Fisher products on the whole batch or the paper's quarter of it (τ₂).
ADAPTIVE_CANDIDATES_RACE = [ADAM_DEFAULT] + [
    Spec("kfac-adaptive", {k: v for k, v in (("relative_damping", c), ("curvature_fraction", f)) if v is not None})
    for c in (None, 0.3)
    for f in (None, 0.25)
]
# The adaptive mode's exact-Fisher products on a fraction τ₂ of the batch
# (whole, half, the paper's quarter) [KFAC §8], each sub-batch at least
# `step.MIN_CURVATURE_EXAMPLES` examples.
ADAPTIVE_FRACTIONS_RACE = [ADAM_DEFAULT] + [Spec("kfac-adaptive", {"curvature_fraction": f}) for f in (1.0, 0.5, 0.25)]
CANDIDATE_ITERATIONS = {"mlp": 300, "convnet": 200, "transformer": 300, "autoencoder": 150}


def _setup(name: str, cfg: dict, seed: int, synthetic: bool) -> tuple:
    """The zoo model ``name`` as a harness problem, its seeded initial weights and batch schedule."""
    problem = zoo.problem(name, cfg["size"], synthetic=synthetic)
    bench = H.Problem(
        name=name,
        build_model=lambda _: problem.build(),
        loss=problem.loss,
        x_train=problem.x_train,
        y_train=problem.y_train,
        evaluate=evaluator(problem),
    )
    keras.utils.set_random_seed(seed)
    initial = problem.build().get_weights()
    return bench, initial, H.batch_size_schedule(problem.batch_size, len(problem.x_train), None)


# Relative λ₀ (multiples of tr(F̃)/n) raced beside the default's (0.3) by
# default: the default step's fixed λ, the adaptive mode's λ₀ before
# `--adaptive-candidates`.
RELATIVE_DAMPINGS = [3.0]


def dampings_race(grid: list[float], relative: list[float], options: dict) -> list[Spec]:
    """Adam-default and adaptive K-FAC from its default, relative and given λ₀, each with ``options``."""
    return (
        [ADAM_DEFAULT, Spec("kfac-adaptive", dict(options))]
        + [Spec("kfac-adaptive", dict(options, relative_damping=c)) for c in relative]
        + [Spec("kfac-adaptive", dict(options, damping=d)) for d in grid]
    )


def evaluator(problem: zoo.ZooProblem):
    """The compiled loss on the validation set (what `fit`'s val_loss reports)."""

    def evaluate(model: keras.Model) -> dict:
        loss = model.evaluate(problem.x_val, problem.y_val, batch_size=1024, verbose=0)
        return {"loss": float(np.asarray(loss).reshape(-1)[0])}

    return evaluate


def race_model(name: str, cfg: dict, specs: list[Spec], seed: int, synthetic: bool) -> list[dict]:
    bench, initial, batch = _setup(name, cfg, seed, synthetic)
    seconds = cfg["seconds"][name] if cfg["seconds"] else math.inf
    runs = []
    for spec in specs:
        keras.utils.set_random_seed(seed)
        runs.append(H.Run(bench, spec, batch, initial, seed, cfg.get("iterations"), seconds))
    if math.isfinite(seconds):
        H.race(runs, H.log_points(seconds, cfg["logs"]), f"{name} seed {seed}")
    else:
        points = sorted({max(1, cfg["iterations"] * (i + 1) // cfg["logs"]) for i in range(cfg["logs"])})
        H.race(runs, [], f"{name} seed {seed}", iter_points=points)
    return [r.summary() for r in runs]


def trained(curve: dict) -> dict:
    """The curve without its point before the first step: a target counts as reached by training."""
    keep = [i for i, it in enumerate(curve["iterations"]) if it > 0]
    return {key: [values[i] for i in keep] for key, values in curve.items()}


def analyse(summaries: list[dict]) -> dict:
    """Adam-default's short and converged targets; every run's seconds, iterations and speedups to them."""
    reference = next(s for s in summaries if s["name"] == ADAM_DEFAULT.name)
    curve = trained(reference["curve"])
    end = curve["seconds"][-1]
    targets = {"converged": curve["loss"][-1]}
    short = H.value_at(curve["seconds"], curve["loss"], SHORT * end)
    if short is not None and math.isfinite(end) and end > 0:
        targets["short"] = short
    own = {
        label: {key: H.first_crossing(curve[key], curve["loss"], target) for key in ("seconds", "iterations")}
        for label, target in targets.items()
    }
    rows = {}
    for s in summaries:
        c = trained(s["curve"])
        row = {
            "family": s["family"],
            "final_loss": c["loss"][-1],
            "diverged": s["diverged"],
            "iterations": s["iterations"],
            "median_step_ms": 1e3 * s["median_step_seconds"],
            "to": {},
        }
        for label, target in targets.items():
            reached = {key: H.first_crossing(c[key], c["loss"], target) for key in ("seconds", "iterations")}
            row["to"][label] = {
                **reached,
                **{
                    f"{key}_speedup": (own[label][key] / reached[key]) if reached[key] and own[label][key] else None
                    for key in ("seconds", "iterations")
                },
            }
        rows[s["name"]] = row
    return {"targets": targets, "rows": rows}


def model_table(name: str, analyses: dict[int, dict]) -> str:
    """One model: per run, the median over seeds of seconds, iterations and speedups to each target."""
    first = next(iter(analyses.values()))
    labels = list(first["targets"])
    header = ["run", "final val loss", "ms/step"]
    for label in labels:
        header += [f"s to {label}", f"iters to {label}", "× (s)", "× (iters)"]
    rows = []
    for run in first["rows"]:
        per_seed = [a["rows"][run] for a in analyses.values()]
        cells = [
            run,
            H.fmt(np.median([r["final_loss"] for r in per_seed]), ".4f"),
            H.fmt(np.median([r["median_step_ms"] for r in per_seed]), ".1f"),
        ]
        for label in labels:
            values = [r["to"][label] for r in per_seed]
            for key, spec in (
                ("seconds", ".1f"),
                ("iterations", ".0f"),
                ("seconds_speedup", ".2f"),
                ("iterations_speedup", ".2f"),
            ):
                cells.append(_median_cell([v[key] for v in values], spec))
        rows.append(cells)
    targets = ", ".join(
        f"{label} {np.median([a['targets'][label] for a in analyses.values()]):.4f}" for label in labels
    )
    return (
        f"### {name}\n\nAdam-default's validation loss (median over seeds): {targets}. Medians over "
        f"{len(analyses)} seed(s); '—' = not reached in every seed (the count reached is given).\n\n"
        + H.markdown_table(header, rows)
    )


def _median_cell(values: list, spec: str) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "—"
    cell = format(float(np.median(reached)), spec)
    return cell if len(reached) == len(values) else f"{cell} ({len(reached)}/{len(values)})"


def summary_table(results: dict[str, dict[int, dict]], label: str) -> tuple[str, dict]:
    """Per model, default K-FAC's seconds speedup to Adam-default's target: min / median / max over seeds."""
    rows, medians = [], {}
    for name, analyses in results.items():
        cells = [name]
        for run in (Spec("kfac", {}).name, Spec("kfac-adaptive", {}).name, "muon", "adam[learning_rate=0.003]"):
            raced = [a for a in analyses.values() if run in a["rows"] and label in a["targets"]]
            speedups = [a["rows"][run]["to"][label]["seconds_speedup"] for a in raced]
            cells.append(_spread(speedups) if raced else "—")
            if run == "kfac":
                medians[name] = _median_or_zero(speedups)
        iteration = [
            a["rows"]["kfac"]["to"][label]["iterations_speedup"] for a in analyses.values() if label in a["targets"]
        ]
        cells.insert(2, _spread(iteration))
        rows.append(cells)
    finite = [v for v in medians.values() if v > 0]
    geo = math.exp(np.mean(np.log(finite))) if len(finite) == len(medians) and finite else None
    table = H.markdown_table(
        [
            "model",
            "K-FAC default × (s)",
            "K-FAC default × (iters)",
            "K-FAC adaptive × (s)",
            "Muon × (s)",
            "Adam 3e-3 × (s)",
        ],
        rows,
    )
    return table, {
        "medians": medians,
        "geometric_mean": geo,
        "ahead": sum(v > 1 for v in medians.values()),
        "models": len(medians),
    }


def dampings_table(results: dict[str, dict[int, dict]], grid: list[float], relative: list[float], options: dict) -> str:
    """Per model and target: adaptive K-FAC's seconds from its default λ₀ against its best λ₀ in ``grid``.

    The runs are those of ``dampings_race(grid, relative, options)``; the
    relative λ₀ runs get a column each.
    """
    default = Spec("kfac-adaptive", dict(options)).name
    given = {Spec("kfac-adaptive", dict(options, damping=d)).name: d for d in grid}
    relative_runs = [Spec("kfac-adaptive", dict(options, relative_damping=c)).name for c in relative]
    rows = []
    for name, analyses in results.items():
        first = next(iter(analyses.values()))
        for label in first["targets"]:

            def median_seconds(run: str, label: str = label, analyses: dict = analyses) -> float:
                values = [a["rows"][run]["to"][label]["seconds"] for a in analyses.values()]
                return float(np.median(values)) if all(v is not None for v in values) else math.inf

            seconds = {run: median_seconds(run) for run in given}
            best = min(seconds, key=seconds.get)
            own = median_seconds(default)
            ratio = own / seconds[best] if math.isfinite(seconds[best]) else math.nan
            relative_seconds = [median_seconds(run) for run in relative_runs]
            rows.append(
                [
                    name,
                    label,
                    H.fmt(own, ".1f"),
                    *[H.fmt(v, ".1f") for v in relative_seconds],
                    f"{given[best]:g}",
                    H.fmt(seconds[best], ".1f"),
                    H.fmt(ratio, ".2f"),
                    "—" if math.isnan(ratio) else ("yes" if ratio <= 1.1 else "no"),
                ]
            )
    return H.markdown_table(
        ["model", "target", "default λ₀: s"]
        + [f"{c:g}·tr(F̃)/n: s" for c in relative]
        + ["best λ₀", "best λ₀: s", "default ÷ best", "within 10%"],
        rows,
    )


def _spread(values: list) -> str:
    reached = [v for v in values if v]
    if not reached:
        return "not reached"
    text = (
        f"{np.median(reached):.2f} ({min(reached):.2f}–{max(reached):.2f})" if len(reached) > 1 else f"{reached[0]:.2f}"
    )
    return text if len(reached) == len(values) else f"{text}, {len(values) - len(reached)} not reached"


def _median_or_zero(values: list) -> float:
    return float(np.median([v or 0.0 for v in values])) if values else 0.0


def plot_summary(results: dict[str, dict[int, dict]], path: Path) -> None:
    """Default and adaptive K-FAC's seconds speedups to Adam-default's converged target, per model and seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(results)
    fig, axis = plt.subplots(figsize=(7.5, 3.4))
    for offset, (run, color) in enumerate(
        (
            (Spec("kfac", {}).name, "C0"),
            (Spec("kfac-adaptive", {}).name, "C1"),
            ("muon", "C2"),
            ("adam[learning_rate=0.003]", "C3"),
        )
    ):
        labelled = False  # a run not raced (--kfac-only) gets no legend entry
        for index, name in enumerate(names):
            values = [
                a["rows"][run]["to"]["converged"]["seconds_speedup"] or 0.05
                for a in results[name].values()
                if run in a["rows"]
            ]
            xs = [index + 0.2 * (offset - 1.5)] * len(values)
            axis.scatter(xs, values, color=color, s=18, label=None if labelled or not values else run)
            labelled = labelled or bool(values)
    axis.axhline(1.0, color="gray", lw=0.8)
    axis.set_yscale("log")
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("speedup over Adam-default (s)")
    axis.set_title(
        "Seconds to Adam-default's final validation loss, relative to Adam-default (per seed; at 0.05: not reached)",
        fontsize=8,
    )
    axis.legend(fontsize=7, ncol=4, frameon=False)
    axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--budget", default="default", choices=list(BUDGETS))
    parser.add_argument("--models", default=",".join(zoo.MODELS), help="comma-separated zoo models")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="training seconds of every model instead of the budget's (folder <budget>-<seconds>s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds from --seed on")
    parser.add_argument(
        "--kfac-only",
        action="store_true",
        help="only Adam-default and the two K-FAC runs of the zoo race (tables: — for the others)",
    )
    parser.add_argument(
        "--dampings",
        action="store_true",
        help="adaptive K-FAC from its default λ₀ and from λ₀ = 1e-4 … 150, against Adam-default",
    )
    parser.add_argument(
        "--initial-dampings",
        default=",".join(f"{d:g}" for d in INITIAL_DAMPINGS),
        help="the given λ₀ of --dampings, comma-separated",
    )
    parser.add_argument(
        "--relative-dampings",
        default=",".join(f"{c:g}" for c in RELATIVE_DAMPINGS),
        help="the relative λ₀ of --dampings (multiples of tr(F̃)/n), comma-separated",
    )
    parser.add_argument(
        "--curvature-fraction",
        type=float,
        default=None,
        help="τ₂ of every adaptive run of --dampings (default: the adaptive mode's)",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="the default step's candidate settings, for a fixed number of iterations",
    )
    parser.add_argument(
        "--weight-sharing",
        action="store_true",
        help="default K-FAC with K-FAC-expand and K-FAC-reduce convolutions, against Adam-default",
    )
    parser.add_argument(
        "--blocks",
        action="store_true",
        help="default K-FAC with only Dense/Conv/Embedding blocks, as it is, and with the opt-in blocks",
    )
    parser.add_argument(
        "--fractions",
        action="store_true",
        help="default and adaptive K-FAC with statistics (and quadratic model) on fractions of the batch",
    )
    parser.add_argument(
        "--adaptive-periods",
        action="store_true",
        help="adaptive K-FAC with its statistics every step or every 5th, inverses every 10 or 20",
    )
    parser.add_argument(
        "--adaptive-bound",
        action="store_true",
        help="adaptive K-FAC without and with its trust region α²ΔᵀF̆Δ ≤ C (C = 1e-3, 3e-3, 1e-2)",
    )
    parser.add_argument(
        "--adaptive-candidates",
        action="store_true",
        help="adaptive K-FAC with λ₀ = 3 or 0.3 · tr(F̃)/n, its quadratic model on the whole batch or a quarter (τ₂)",
    )
    parser.add_argument(
        "--adaptive-fractions",
        action="store_true",
        help="adaptive K-FAC with its quadratic model on τ₂ = 1, 1/2 and 1/4 of the batch",
    )
    parser.add_argument("--synthetic", action="store_true", help="generated images instead of Fashion-MNIST")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--save-figures", action="store_true", help="copy the PNGs to benchmarks/figures/")
    args = parser.parse_args(argv)
    cfg, folder = BUDGETS[args.budget], args.budget
    if args.seconds is not None:
        cfg, folder = dict(cfg, seconds={m: args.seconds for m in zoo.MODELS}), f"{args.budget}-{args.seconds:g}s"
    kind, specs = "zoo", RACE
    grid = [float(d) for d in args.initial_dampings.split(",")]
    relative = [float(c) for c in args.relative_dampings.split(",")]
    options = {} if args.curvature_fraction is None else {"curvature_fraction": args.curvature_fraction}
    if args.dampings and options:
        folder = f"{folder}-tau2-{args.curvature_fraction:g}"
    if args.kfac_only:
        specs, folder = KFAC_ONLY_RACE, f"{folder}-kfac-only"
    if args.dampings:
        kind, specs = "zoo-dampings", dampings_race(grid, relative, options)
    if args.weight_sharing:
        kind, specs = "zoo-weight-sharing", WEIGHT_SHARING_RACE
        if args.models == parser.get_default("models"):
            args.models = "convnet,resnet"
    if args.blocks:
        kind, specs = "zoo-blocks", BLOCKS_RACE
        if args.models == parser.get_default("models"):
            args.models = "lstm,transformer,resnet"
    if args.fractions:
        kind, specs = "zoo-fractions", FRACTIONS_RACE
    if args.adaptive_periods:
        kind, specs = "zoo-adaptive-periods", ADAPTIVE_PERIODS_RACE
    if args.adaptive_bound:
        kind, specs = "zoo-adaptive-bound", ADAPTIVE_BOUND_RACE
    if args.adaptive_candidates:
        kind, specs = "zoo-adaptive-candidates", ADAPTIVE_CANDIDATES_RACE
    if args.adaptive_fractions:
        kind, specs = "zoo-adaptive-fractions", ADAPTIVE_FRACTIONS_RACE
    if args.candidates:
        kind, specs = "zoo-candidates", CANDIDATES
        if args.models == parser.get_default("models"):
            args.models = ",".join(CANDIDATE_ITERATIONS)
    out_dir = Path(args.out_dir) if args.out_dir else HERE / "results"
    out_dir = out_dir / kind / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs, results = {}, {}
    for name in args.models.split(","):
        model_cfg = cfg
        if args.candidates:
            model_cfg = dict(cfg, seconds=None, iterations=CANDIDATE_ITERATIONS[name], logs=12)
        for seed in range(args.seed, args.seed + args.seeds):
            summaries = race_model(name, model_cfg, specs, seed, args.synthetic)
            runs.setdefault(name, {})[seed] = summaries
            results.setdefault(name, {})[seed] = analyse(summaries)
    text = [
        f"## {kind} — budget `{folder}`, seeds {args.seed}–{args.seed + args.seeds - 1}, "
        f"wall time {time.time() - started:.0f} s\n"
    ]
    payload = {"budget": folder, "settings": cfg, "short_fraction": SHORT, "results": results, "runs": runs}
    if kind == "zoo":
        for label in ("converged", "short"):
            table, verdict = summary_table(results, label)
            payload[f"summary_{label}"] = verdict
            geo = H.fmt(verdict["geometric_mean"], ".2f")
            text.append(
                f"Speedup in seconds (iterations) to Adam-default's {label} validation loss, median "
                f"(min–max) over seeds: K-FAC default ahead of Adam-default on {verdict['ahead']} of "
                f"{verdict['models']} models, geometric mean of the medians {geo}×.\n\n{table}\n"
            )
    if kind == "zoo-dampings":
        table = dampings_table(results, grid, relative, options)
        tau2 = f" with τ₂ = {args.curvature_fraction:g}" if options else ""
        text.append(
            f"Adaptive K-FAC{tau2}: "
            "seconds to Adam-default's validation loss from the default relative λ₀ "
            f"and from the best of λ₀ ∈ {{{', '.join(f'{d:g}' for d in grid)}}} "
            f"(median over seeds; — = not reached in every seed).\n\n{table}\n"
        )
    text += [model_table(name, analyses) for name, analyses in results.items()]
    table = "\n\n".join(text)
    print("\n" + table, flush=True)
    (out_dir / "table.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=H.json_default))
    pngs = []
    for name, by_seed in runs.items():
        curves = {s["name"]: s["curve"] for s in by_seed[args.seed]}
        png = out_dir / f"{name}_val_loss.png"
        H.plot_curves(curves, png, f"{name}: validation loss, seed {args.seed}", ylabel="validation loss")
        pngs.append(png)
    if kind == "zoo":
        pngs.append(out_dir / "speedups.png")
        plot_summary(results, pngs[-1])
    if args.save_figures:
        (HERE / "figures").mkdir(exist_ok=True)
        for png in pngs:
            (HERE / "figures" / f"{kind}_{folder}_{png.name}").write_bytes(png.read_bytes())
    print(f"wrote {out_dir}/table.md, results.json and {len(pngs)} plots", flush=True)


if __name__ == "__main__":
    main()
