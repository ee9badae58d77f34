"""Speedups by budget: what races shorter than a recorded one would have measured.

A baseline's training does not depend on the race's budget (constant learning
rates; SGD's momentum schedule counts iterations), and neither does K-FAC's
(its batch schedule counts iterations), so the first B seconds of a race's
curves are a race of budget B, up to the machine's timing noise and the
spacing of the log points (interpolation between them). For each log point
B of the baselines this reads off, from a race's `results.json`:

* the best baseline at B (the lowest loss at B), and its seconds and
  iterations to that loss;
* adaptive K-FAC's seconds and iterations to the same loss (its run with the
  lowest loss at B; "not reached" when it needs more than B seconds);
* the ratios, the speedups a race of budget B would report.

The best baseline at B is the best of the runs the race had: a seed that
raced only the longest budget's winner says nothing about the budgets where
another run would have been ahead (its line is dashed in the plot). It
prints a table per seed and plots both speedups against B, one line per
seed, with the issue's goals (3× in seconds, 10× in iterations) drawn in:

    python benchmarks/budget_speedups.py \\
        benchmarks/results/autoencoder/default-1800s/results.json [more results.json ...] \\
        --out speedups.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import KFAC_FAMILIES, first_crossing, markdown_table  # noqa: E402

GOALS = {"seconds": 3.0, "iterations": 10.0}


def _loss_at(curve: dict, index: int) -> float:
    """The loss at log point `index`, or at the curve's end if it stopped before."""
    losses = curve["loss"]
    value = losses[min(index, len(losses) - 1)]
    return value if math.isfinite(value) else math.inf


def _index_at(curve: dict, seconds: float) -> int:
    """The last log point at or before `seconds` (0 if none)."""
    return max([i for i, s in enumerate(curve["seconds"]) if s <= seconds] or [0])


def speedups_by_budget(runs: list[dict]) -> list[dict]:
    """One row per baseline log point B: the best baseline at B and adaptive K-FAC against it.

    `runs` are one seed's run summaries (as `results.json` stores them).
    """
    baselines = [r for r in runs if r["family"] not in KFAC_FAMILIES]
    adaptive = [r for r in runs if r["family"] == "kfac-adaptive"]
    if not baselines or not adaptive:
        raise ValueError("a race with at least one baseline and one adaptive K-FAC run is needed.")
    rows = []
    for i in range(1, max(len(r["curve"]["seconds"]) for r in baselines)):
        best = min((r for r in baselines if i < len(r["curve"]["seconds"])), key=lambda r: _loss_at(r["curve"], i))
        curve = best["curve"]
        budget, target = curve["seconds"][i], _loss_at(curve, i)
        if not math.isfinite(target):
            continue
        kfac = min(adaptive, key=lambda r: _loss_at(r["curve"], _index_at(r["curve"], budget)))
        kc = kfac["curve"]
        row = {
            "budget_s": budget,
            "best_baseline": best["name"],
            "target": target,
            "baseline_seconds": first_crossing(curve["seconds"][: i + 1], curve["loss"][: i + 1], target),
            "baseline_iterations": first_crossing(curve["iterations"][: i + 1], curve["loss"][: i + 1], target),
            "kfac": kfac["name"],
            "kfac_seconds": first_crossing(kc["seconds"], kc["loss"], target),
            "kfac_iterations": first_crossing(kc["iterations"], kc["loss"], target),
        }
        reached = row["kfac_seconds"] is not None and row["kfac_seconds"] <= budget
        row["seconds_speedup"] = row["baseline_seconds"] / row["kfac_seconds"] if reached else None
        row["iteration_speedup"] = row["baseline_iterations"] / row["kfac_iterations"] if reached else None
        rows.append(row)
    return rows


def table(seed: str, rows: list[dict], baselines: list[str]) -> str:
    def ratio(value):
        return "not reached" if value is None else f"{value:.2f}×"

    def meets(row):
        s, i = row["seconds_speedup"], row["iteration_speedup"]
        return "yes" if s and i and s >= GOALS["seconds"] and i >= GOALS["iterations"] else "no"

    body = [
        [
            f"{r['budget_s']:.0f}",
            r["best_baseline"],
            f"{r['target']:.5f}",
            f"{r['baseline_seconds']:.1f} / {r['baseline_iterations']:.0f}",
            "—" if r["kfac_seconds"] is None else f"{r['kfac_seconds']:.1f} / {r['kfac_iterations']:.0f}",
            ratio(r["seconds_speedup"]),
            ratio(r["iteration_speedup"]),
            meets(r),
        ]
        for r in rows
    ]
    header = [
        "budget s",
        "best baseline at B",
        "its loss at B",
        "its s / iters to it",
        "K-FAC s / iters",
        "seconds speedup",
        "iterations speedup",
        f"both goals (≥ {GOALS['seconds']:g}× s, ≥ {GOALS['iterations']:g}× iters)",
    ]
    return f"Seed {seed} (baseline runs: {', '.join(baselines)}):\n\n" + markdown_table(header, body)


def plot(curves: dict[str, tuple[list[dict], bool]], path: Path) -> None:
    """Both speedups against the budget; `curves` maps a label to (rows, whether
    the seed raced a single baseline run; drawn dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.4))
    for axis, key, goal in (
        (axes[0], "seconds_speedup", GOALS["seconds"]),
        (axes[1], "iteration_speedup", GOALS["iterations"]),
    ):
        for label, (rows, single) in curves.items():
            points = [(r["budget_s"], r[key]) for r in rows if r[key] is not None]
            if points:
                axis.plot(*zip(*points), marker=".", label=label, linestyle="--" if single else "-")
        axis.axhline(goal, color="black", linestyle="--", linewidth=1, label=f"goal {goal:g}×")
        axis.set_xscale("log")
        axis.set_xlabel("race budget B (training seconds per run)")
        axis.set_ylabel(f"K-FAC's {'seconds' if key.startswith('seconds') else 'iterations'} speedup")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle("Adaptive K-FAC against the best baseline at each budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of time races")
    parser.add_argument(
        "--out", type=Path, default=None, help="the plot (default: budget_speedups.png next to the first results.json)"
    )
    args = parser.parse_args(argv)
    curves, tables = {}, []
    for path in args.results:
        record = json.loads(path.read_text())
        for seed, runs in record["runs"].items():
            rows = speedups_by_budget(runs)
            baselines = [r["name"] for r in runs if r["family"] not in KFAC_FAMILIES]
            label = f"seed {seed}" + (f" ({baselines[0]} alone)" if len(baselines) == 1 else "")
            curves[label if label not in curves else f"{label} ({path.parent.name})"] = (rows, len(baselines) == 1)
            tables.append(table(seed, rows, baselines))
    text = "\n\n".join(tables)
    print(text)
    out = args.out or args.results[0].parent / "budget_speedups.png"
    plot(curves, out)
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return text


if __name__ == "__main__":
    main()
