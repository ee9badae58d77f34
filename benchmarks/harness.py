"""The machinery the benchmark problems share.

* optimizers: K-FAC (adaptive and fixed learning rate), Adam, SGD with
  Nesterov momentum on the schedule of Sutskever et al. (2013), Keras' Muon;
* `Run`: one model trained by one optimizer, with its own training clock;
* `race`: trains several runs in turns (round robin, a slice of training
  seconds each), so that a slow period of the machine hits all of them, and
  evaluates the loss at log points outside the clock;
* reading the curves: iterations and seconds to reach a target loss, the loss
  at a given time, the tables and the plots.

Timing rules. A run's clock counts only `train_on_batch` calls (and picking
the batch's indices). The first call of a run traces the training graph; it is
not on the clock and is reported as `trace_s`, and the clock is charged the
time of the next step instead. The same applies when the batch size first
changes (Keras retraces once with a generic batch dimension). Evaluations of
the loss at log points are not on the clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
from keras import ops

import keras_kfac
from keras_kfac.growing_batches import growing_batch_size, growth_to_reach

# --------------------------------------------------------------- optimizers


def nesterov_momentum(step: int | float, max_momentum: float, period: int = 250) -> float:
    """μ_t = min(1 − 2^(−1−log2(⌊t/period⌋+1)), μ_max) of Sutskever et al. (2013)."""
    k = math.floor(step / period) + 1
    return min(1.0 - 2.0 ** (-1.0 - math.log2(k)), max_momentum)


class ScheduledNesterovSGD(keras.optimizers.Optimizer):
    """SGD with Nesterov momentum whose momentum follows `nesterov_momentum`.

    The update is Keras' Nesterov form (Bengio et al., 2013), with μ_t computed
    in the graph from the iteration count:

        m ← μ_t m − lr g,    θ ← θ + μ_t m − lr g.
    """

    def __init__(self, learning_rate=0.01, max_momentum=0.99, period=250, name="nesterov_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.max_momentum = float(max_momentum)
        self.period = int(period)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, name="momentum") for v in variables]

    def current_momentum(self):
        k = ops.floor(ops.cast(self.iterations, "float32") / self.period) + 1.0
        # 1 − 2^(−1−log2 k) = 1 − 1/(2k)
        return ops.minimum(1.0 - 0.5 / k, self.max_momentum)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        mu = ops.cast(self.current_momentum(), variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        gradient = ops.cast(gradient, variable.dtype)
        self.assign(m, mu * m - lr * gradient)
        self.assign_add(variable, mu * m - lr * gradient)

    def get_config(self):
        config = super().get_config()
        config.update(max_momentum=self.max_momentum, period=self.period)
        return config


FAMILIES = {
    "kfac": "K-FAC default",
    "kfac-adaptive": "K-FAC adaptive",
    "kfac-fixed": "K-FAC fixed lr",
    "adam": "Adam",
    "sgd": "SGD+Nesterov (sched.)",
    "muon": "Muon",
}
KFAC_FAMILIES = ("kfac", "kfac-adaptive", "kfac-fixed")


# Which layers K-FAC's automatic registration takes (``OptimizerSpec`` param ``blocks``):
# the layer kinds of the first releases (the rest left to the fallback), or every
# served layer including the opt-in normalization layers.
BLOCK_SETS = {
    "dense_conv_embedding": (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Embedding),
    "all": keras_kfac.LayerCollection().auto_register_types + keras_kfac.blocks.ScaleShiftBlock.layer_types,
}


@dataclass
class OptimizerSpec:
    """One grid point: an optimizer family and its arguments."""

    family: str
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if not self.params:
            return self.family
        parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()]
        return f"{self.family}[{','.join(parts)}]"

    @property
    def is_kfac(self) -> bool:
        return self.family in KFAC_FAMILIES


def make_optimizer(spec: OptimizerSpec, model: keras.Model, l2: float, seed: int):
    """The optimizer of `spec`.

    K-FAC takes the l2 penalty as `l2_reg` (which also adds it to its damping);
    the baselines get it from the model's kernel and bias regularizers (see
    `regularizers_for`), so their weight decay arguments are zero.
    """
    p = dict(spec.params)
    blocks = p.pop("blocks", None)
    if blocks is not None:
        collection = keras_kfac.LayerCollection()
        collection.auto_register_types = BLOCK_SETS[blocks]
        collection.auto_register(model)
        p["layer_collection"] = collection
    if spec.family == "kfac":
        return keras_kfac.KFAC(model=model, l2_reg=l2, seed=seed, **p)
    if spec.family == "kfac-adaptive":
        return keras_kfac.KFAC(model=model, adaptive=True, l2_reg=l2, seed=seed, **p)
    if spec.family == "kfac-fixed":
        p.setdefault("learning_rate", 0.1)
        p.setdefault("damping", 1e-2)
        p.setdefault("norm_constraint", 1e-3)
        return keras_kfac.KFAC(model=model, l2_reg=l2, seed=seed, **p)
    if spec.family == "adam":
        return keras.optimizers.Adam(**p)
    if spec.family == "sgd":
        return ScheduledNesterovSGD(**p)
    if spec.family == "muon":
        # Kernels of Dense layers (2-D) get the orthogonalised Muon step; every
        # other variable (biases, 4-D Conv2D kernels) gets Keras' AdamW branch.
        p.setdefault("weight_decay", 0.0)
        p.setdefault("adam_weight_decay", 0.0)
        return keras.optimizers.Muon(**p)
    raise ValueError(f"unknown optimizer family {spec.family!r}")


def regularizers_for(spec: OptimizerSpec, l2: float) -> dict:
    """Layer arguments that add ½·l2·‖θ‖² to a baseline's loss (none for K-FAC)."""
    if spec.is_kfac or not l2:
        return {}
    reg = keras.regularizers.L2(l2 / 2.0)  # Keras' L2(c) adds c·Σθ².
    return {"kernel_regularizer": reg, "bias_regularizer": reg}


# ---------------------------------------------------------------------- runs


def batch_size_schedule(first: int, total: int, reach: int | None) -> Callable[[int], int]:
    """k ↦ m_k = min(m₁·exp((k−1)/b), N), reaching N at k = `reach` [KFAC §13].

    `reach=None` gives a constant batch size `first`.
    """
    first = min(first, total)
    if reach is None or first >= total or reach <= 1:
        return lambda k: first
    b = growth_to_reach(first, total, reach)
    return lambda k: growing_batch_size(k, first, total, b)


@dataclass
class Problem:
    """Everything a run needs besides its optimizer."""

    name: str
    build_model: Callable[[dict], keras.Model]  # layer kwargs -> fresh model
    loss: keras.losses.Loss
    x_train: np.ndarray
    y_train: np.ndarray
    evaluate: Callable[[keras.Model], dict]  # model -> {"loss": ..., maybe "accuracy": ...}
    l2: float = 0.0
    metric_names: tuple = ("loss",)


class Run:
    """One model, one optimizer, its clock and its curve."""

    def __init__(
        self,
        problem: Problem,
        spec: OptimizerSpec,
        batch_size: Callable[[int], int],
        initial_weights: list,
        seed: int,
        max_iters: int | None,
        budget_s: float,
    ):
        self.problem, self.spec, self.seed = problem, spec, seed
        self.batch_size = batch_size
        self.max_iters, self.budget_s = max_iters, budget_s
        self.model = problem.build_model(regularizers_for(spec, problem.l2))
        self.model.set_weights(initial_weights)
        self.optimizer = make_optimizer(spec, self.model, problem.l2, seed)
        self.model.compile(optimizer=self.optimizer, loss=problem.loss)
        self.rng = np.random.default_rng(seed)  # same batches for the same seed and batch sizes
        self.order = self.rng.permutation(len(problem.x_train))
        self.cursor = 0
        self.iterations = 0
        self.clock = 0.0
        self.examples = 0
        self.trace_s = 0.0
        self.pending = 0  # traced steps whose cost is charged at the next step
        self.last_batch = None
        self.step_seconds: list[float] = []
        self.curve: dict[str, list] = {"iterations": [], "seconds": [], "examples": [], "batch_size": []}
        for metric in problem.metric_names:
            self.curve[metric] = []
        self.state: list[dict] = []
        self.diverged = False
        self.stop_loss: float | None = None  # done once a logged loss is at or below it

    @property
    def reached_stop_loss(self) -> bool:
        return self.stop_loss is not None and bool(self.curve["loss"]) and self.curve["loss"][-1] <= self.stop_loss

    @property
    def done(self) -> bool:
        return (
            self.diverged
            or self.clock >= self.budget_s
            or self.reached_stop_loss
            or (self.max_iters is not None and self.iterations >= self.max_iters)
        )

    def _indices(self, m: int) -> np.ndarray:
        n = len(self.order)
        if self.cursor + m > n:
            self.order = self.rng.permutation(n)
            self.cursor = 0
        idx = self.order[self.cursor : self.cursor + m]
        self.cursor += m
        return idx

    def step(self) -> None:
        start = time.perf_counter()
        m = self.batch_size(self.iterations + 1)
        idx = self._indices(m)
        x, y = self.problem.x_train[idx], self.problem.y_train[idx]
        loss = self.model.train_on_batch(x, y)
        elapsed = time.perf_counter() - start
        loss = float(np.asarray(loss).reshape(-1)[0])
        first = self.iterations == 0
        new_shape = not first and not self._seen_second_shape and m != self._first_batch
        if first:
            self._first_batch = m
        if new_shape:
            self._seen_second_shape = True
        self.iterations += 1
        self.examples += m
        self.last_batch = m
        if first or new_shape:
            self.trace_s += elapsed
            self.pending += 1
        else:
            self.clock += elapsed * (1 + self.pending)
            self.step_seconds.append(elapsed)
            self.pending = 0
        if not math.isfinite(loss):
            self.diverged = True

    _seen_second_shape = False
    _first_batch = None

    def record(self) -> dict:
        values = self.problem.evaluate(self.model)
        c = self.curve
        c["iterations"].append(self.iterations)
        c["seconds"].append(self.clock)
        c["examples"].append(self.examples)
        c["batch_size"].append(self.batch_size(max(self.iterations, 1)))
        for metric in self.problem.metric_names:
            c[metric].append(float(values[metric]))
        if not math.isfinite(values["loss"]):
            self.diverged = True
        if self.spec.is_kfac and self.optimizer.built:
            opt = self.optimizer
            self.state.append({k: float(getattr(opt, k)) for k in ("damping", "gamma", "alpha", "mu", "rho")})
        return values

    def summary(self) -> dict:
        steady = self.step_seconds[1:] or self.step_seconds
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "params": self.spec.params,
            "seed": self.seed,
            "iterations": self.iterations,
            "train_seconds": self.clock,
            "trace_seconds": self.trace_s,
            "median_step_seconds": float(np.median(steady)) if steady else float("nan"),
            "diverged": self.diverged,
            "stop_loss": self.stop_loss,
            "curve": self.curve,
            "kfac_state": self.state,
        }


def log_points(budget_s: float, count: int) -> list[float]:
    """Training-clock times of the log points: denser at the start."""
    fractions = np.unique(np.round(np.linspace(0, 1, count + 1)[1:] ** 1.5, 4))
    return [float(f * budget_s) for f in fractions]


def race(
    runs: list[Run],
    points: list[float],
    tag: str,
    iter_points: list[int] | None = None,
    verbose: bool = True,
    kfac_after_baselines: bool = False,
) -> None:
    """Trains `runs` in turns up to each log point (seconds or iterations), then logs.

    Each run first takes its (untimed) traced step so that every run starts
    from the same state of the machine; then, for each log point in turn,
    every run trains until its clock (or iteration count) reaches that point
    and its loss is evaluated off the clock.

    With `kfac_after_baselines` the baselines race to the end first; then the
    K-FAC runs race, each stopping at the first log point where its loss is at
    or below the baselines' lowest final loss (a long race's K-FAC runs then
    cost only the time they need to reach it).
    """
    if kfac_after_baselines:
        baselines = [r for r in runs if not r.spec.is_kfac]
        race(baselines, points, tag, iter_points, verbose)
        finals = [r.curve["loss"][-1] for r in baselines if not r.diverged]
        kfac = [r for r in runs if r.spec.is_kfac]
        for run in kfac:
            run.stop_loss = min(finals) if finals else None
        race(kfac, points, tag, iter_points, verbose)
        return
    for run in runs:
        run.record()
        _log(run, tag, verbose)
    targets = iter_points if iter_points is not None else points
    for target in targets:
        for run in runs:
            if run.done:
                continue
            while not run.done and (run.iterations < target if iter_points is not None else run.clock < target):
                run.step()
            run.record()
            _log(run, tag, verbose)


def _log(run: Run, tag: str, verbose: bool) -> None:
    if not verbose:
        return
    c = run.curve
    extra = ""
    if "accuracy" in c:
        extra += f"  test acc {c['accuracy'][-1]:.4f}"
    if run.state:
        s = run.state[-1]
        extra += f"  λ {s['damping']:.3g} α {s['alpha']:.3g} μ {s['mu']:.3g} ρ {s['rho']:.3g}"
    if run.diverged:
        extra += "  DIVERGED"
    if run.reached_stop_loss:
        extra += f"  reached {run.stop_loss:.5f}: stopped"
    print(
        f"[{tag}] {run.spec.name:<44} it {run.iterations:>6}  t {run.clock:7.2f}s  "
        f"batch {c['batch_size'][-1]:>5}  loss {c['loss'][-1]:.5f}{extra}",
        flush=True,
    )


# ------------------------------------------------------------ reading curves


def first_crossing(xs: list[float], losses: list[float], target: float, higher: bool = False) -> float | None:
    """The x at which the curve first reaches `target` (linear interpolation
    between log points in x and log-loss); None if it never does. With
    `higher`, the first x where the curve rises to `target` (linear in the value)."""
    if higher:
        for i, value in enumerate(losses):
            if value >= target:
                if i == 0 or losses[i - 1] == value:
                    return float(xs[i])
                f = (target - losses[i - 1]) / (value - losses[i - 1])
                return float(xs[i - 1] + f * (xs[i] - xs[i - 1]))
        return None
    for i, value in enumerate(losses):
        if value <= target:
            if i == 0:
                return float(xs[0])
            a, b = losses[i - 1], value
            if not (a > 0 and b > 0) or a == b:
                return float(xs[i])
            f = (math.log(a) - math.log(target)) / (math.log(a) - math.log(b))
            return float(xs[i - 1] + f * (xs[i] - xs[i - 1]))
    return None


def value_at(xs: list[float], values: list[float], x: float) -> float | None:
    """The curve's value at x (interpolated between log points); None past its end."""
    if not xs or x > xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, values))


def best_of(summaries: list[dict], metric: str = "loss", higher_is_better: bool = False) -> dict:
    """The grid point with the best final value (diverged runs lose)."""

    def key(s):
        v = s["curve"][metric][-1]
        if s["diverged"] or not math.isfinite(v):
            return math.inf
        return -v if higher_is_better else v

    return min(summaries, key=key)


def fmt(value, spec=".3g", none="—") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def json_default(value):
    """JSON for numpy scalars; None for non-finite floats."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def plot_curves(
    curves: dict[str, dict],
    path,
    title: str,
    metric: str = "loss",
    ylabel: str = "training loss",
    log_y: bool = True,
    x_keys=("iterations", "seconds"),
) -> None:
    """One panel per x axis (iterations, training seconds), log scales."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(x_keys), figsize=(5.2 * len(x_keys), 3.6))
    axes = np.atleast_1d(axes)
    for label, curve in curves.items():
        for axis, key in zip(axes, x_keys):
            xs = np.asarray(curve[key], dtype=float)
            ys = np.asarray(curve[metric], dtype=float)
            keep = xs > 0
            axis.plot(
                xs[keep],
                ys[keep],
                marker=".",
                markersize=3,
                label=label,
                linestyle=curve.get("_style", "-"),
                color=curve.get("_color"),
            )
    for axis, key in zip(axes, x_keys):
        axis.set_xscale("log")
        if log_y:
            axis.set_yscale("log")
        axis.set_xlabel({"iterations": "iterations", "seconds": "training seconds (CPU, evals excluded)"}[key])
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 2), 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
