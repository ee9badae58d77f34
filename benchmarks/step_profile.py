"""Where a K-FAC step's time goes, part by part, against each part's arithmetic.

    python benchmarks/step_profile.py                          # every zoo model, with and without XLA
    python benchmarks/step_profile.py --models mlp --jit off   # one model, no XLA
    python benchmarks/step_profile.py --size small --synthetic --rounds 2 --steps 2   # what the tests run

For every zoo model (`zoo.py`, at the batch size of its Keras example) the
variants below train their own copy of the model from the same weights, on
one fixed batch, with `model.compile(jit_compile=...)` off or on. After the
warm-up steps (tracing, compilation) they take turns: each round runs every
variant for a turn of steps (a multiple of its refresh periods, so that
every turn holds the same share of statistics passes and inverse refreshes),
the order reversed every other round; a variant's time is the median over
rounds of its mean step time in a turn.

The variants, each what it runs on every step:

- SGD: forward, backward, a plain update; Adam: the same with Adam's update.
- K-FAC, nothing refreshed: the default step with statistics and inverses
  never refreshed (forward, backward, preconditioning, the KL bound, momentum).
- K-FAC, statistics every step: the same plus a statistics pass (sampled
  backward pass, factor products, moving averages).
- K-FAC, inverses every step: nothing refreshed plus a refresh of every damped
  inverse.
- K-FAC, quadratic model: adaptive=True without damping or γ adaptation,
  nothing refreshed: adds the quadratic model's exact-Fisher products.
- K-FAC default, `KFAC(model=m)`; K-FAC adaptive, `KFAC(model=m, adaptive=True)`.

The parts are differences of those times: forward/backward = SGD;
preconditioning and bookkeeping = nothing refreshed − SGD; one statistics pass
= statistics every step − nothing refreshed; one refresh of the inverses =
inverses every step − nothing refreshed; quadratic model = quadratic model −
nothing refreshed. Each part's arithmetic is counted from the model and its
blocks (F = the forward pass's FLOPs as TensorFlow's graph profiler counts
them; loop bodies such as an LSTM's recurrence are not counted):

- forward/backward: 3F (the backward pass costs about twice the forward);
- preconditioning: Σ over blocks 2(g²a + ga²) for Ā (a×a) and G (g×g),
  Ā⁻¹ diagonal for embeddings: 2g²a + ga;
- statistics: the pass's own forward pass, F, the sampled backward pass,
  about F (gradients of the layers' outputs only, no weight gradients), and
  Σ 2N(a² + g²) for the factor products over N rows (examples × locations,
  or examples for K-FAC-reduce convolutions);
- inverses: Σ over factors 7n³/3 (a Cholesky factorisation and two triangular
  solves against the identity), n³/3 for a factor kept as its Cholesky factor;
- quadratic model: about 4F, for J·Δ and J·δ₀, each found by differentiating
  the backward pass u ↦ Jᵀu in u, about 2F (the Jᵀu pass itself is not run:
  at u = 0 its value is not used).

A part whose measured rate (GFLOP/s) is far below the machine's matrix product
rate (printed first) is dominated by per-op overhead, not arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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

import keras_kfac  # noqa: E402
from keras_kfac import compat, curvature  # noqa: E402
from keras_kfac.curvature import DiagonalFactor  # noqa: E402
from keras_kfac.optimizer import DEFAULT_STEP  # noqa: E402

NEVER = 10**9


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration of the profile and the turn length that suits its periods."""

    label: str
    make: Callable[[keras.Model], keras.optimizers.Optimizer]
    turn: int


# Extra arguments of every K-FAC variant (--weight-sharing).
KFAC_ARGUMENTS: dict = {}


def _kfac(**kwargs) -> Callable[[keras.Model], keras.optimizers.Optimizer]:
    return lambda model: keras_kfac.KFAC(model=model, seed=0, **KFAC_ARGUMENTS, **kwargs)


_DEFAULT_TURN = DEFAULT_STEP["inverse_update_period"]  # a multiple of the statistics period too
VARIANTS = [
    Variant("SGD", lambda model: keras.optimizers.SGD(1e-3), _DEFAULT_TURN),
    Variant("Adam", lambda model: keras.optimizers.Adam(), _DEFAULT_TURN),
    Variant("nothing refreshed", _kfac(statistics_update_period=NEVER, inverse_update_period=NEVER), _DEFAULT_TURN),
    # A fraction just below 1 takes the default step's statistics path on every
    # step: its own forward pass of the whole batch (at period 1 and fraction 1
    # the statistics would reuse the training step's forward pass instead).
    Variant(
        "statistics every step",
        _kfac(statistics_update_period=1, statistics_fraction=1 - 1e-6, inverse_update_period=NEVER),
        _DEFAULT_TURN,
    ),
    Variant("inverses every step", _kfac(statistics_update_period=NEVER, inverse_update_period=1), _DEFAULT_TURN),
    Variant(
        "quadratic model",
        _kfac(
            adaptive=True,
            adapt_damping=False,
            adapt_gamma=False,
            damping=1e-2,
            statistics_update_period=NEVER,
            inverse_update_period=NEVER,
        ),
        _DEFAULT_TURN,
    ),
    Variant("K-FAC default", _kfac(), _DEFAULT_TURN),
    # Periods 5 (statistics), 10 (inverses), 5 (damping), 20 (γ).
    Variant("K-FAC adaptive", _kfac(adaptive=True), 20),
]


def matmul_rate(size: int = 1024, repeats: int = 10) -> float:
    """The machine's float32 matrix product rate (GFLOP/s), the floor's yardstick."""
    a = tf.random.normal([size, size])
    product = tf.function(lambda a: tf.matmul(a, a))
    product(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        product(a).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_flops(model: keras.Model, x: np.ndarray) -> float:
    """F: the FLOPs of one training-mode forward pass on ``x``, by TensorFlow's graph profiler."""
    graph = (
        tf.function(lambda inputs: model(inputs, training=True))
        .get_concrete_function(tf.TensorSpec(x.shape, tf.as_dtype(x.dtype)))
        .graph
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


def layer_output_sizes(model: keras.Model, x: np.ndarray) -> list[int]:
    """Each nested layer's output size on ``x`` (summed over its calls), in `compat.nested_layers` order."""
    sizes, originals = {}, {}
    for layer in compat.nested_layers(model):
        originals[id(layer)] = layer.call

        def recording(*args, _layer=layer, **kwargs):
            output = originals[id(_layer)](*args, **kwargs)
            if hasattr(output, "shape"):
                sizes[id(_layer)] = sizes.get(id(_layer), 0) + int(np.prod(output.shape))
            return output

        compat.set_untracked(layer, "call", recording)
    try:
        model(x, training=False)
    finally:
        for layer in compat.nested_layers(model):
            compat.set_untracked(layer, "call", originals[id(layer)])
    return [sizes.get(id(layer), 0) for layer in compat.nested_layers(model)]


def part_flops(
    model: keras.Model, blocks: list, sizes: list[int], forward: float, batch: int, reduce_locations: bool = False
) -> dict[str, float]:
    """Each part's FLOPs per step (module docstring).

    Args:
        model: the model the blocks belong to.
        blocks: its K-FAC blocks.
        sizes: `layer_output_sizes` of a copy of ``model`` on the batch.
        forward: F, the forward pass's FLOPs.
        batch: the number of examples.
        reduce_locations: whether convolutions use K-FAC-reduce (a row per example).

    Returns:
        FLOPs by part.
    """
    preconditioning = statistics = inverses = 0.0
    layers = compat.nested_layers(model)
    for block in blocks:
        a, g = block.input_dim, block.output_dim
        n = batch if reduce_locations and block.rows_are_patch_locations else sizes[layers.index(block.layer)] // g
        diagonal = block.input_factor_type is DiagonalFactor or issubclass(block.input_factor_type, DiagonalFactor)
        preconditioning += 2 * g * g * a + (g * a if diagonal else 2 * g * a * a)
        statistics += 2 * n * ((a if diagonal else a * a) + g * g)
        for factor, n in ((block.input_factor, a), (block.output_factor, g)):
            if not isinstance(factor, DiagonalFactor):
                inverses += n**3 / 3 if isinstance(factor, curvature.CholeskyFactor) else 7 * n**3 / 3
    return {
        "forward/backward": 3 * forward,
        "preconditioning + bookkeeping": preconditioning,
        "statistics pass": 2 * forward + statistics,
        "inverse refresh": inverses,
        "quadratic model": 4 * forward,
    }


def _compiled(problem: zoo.ZooProblem, initial: list, variant: Variant, jit: bool) -> keras.Model:
    model = problem.build()
    model.set_weights(initial)
    model.compile(optimizer=variant.make(model), loss=problem.loss, jit_compile=jit)
    return model


def profile_model(name: str, size: str, synthetic: bool, jit: bool, rounds: int, steps: int | None) -> dict:
    """Median ms per step of every variant, the parts, and their FLOPs, for one zoo model."""
    problem = zoo.problem(name, size, synthetic=synthetic)
    keras.utils.set_random_seed(0)
    reference = problem.build()
    initial = reference.get_weights()
    x, y = problem.x_train[: problem.batch_size], problem.y_train[: problem.batch_size]
    sizes = layer_output_sizes(reference, x)
    forward = forward_flops(reference, x)
    models = {v.label: _compiled(problem, initial, v, jit) for v in VARIANTS}
    # One turn of warm-up: tracing, and the early inverse refreshes of the first statistics updates.
    for variant in VARIANTS:
        for _ in range(steps or variant.turn):
            models[variant.label].train_on_batch(x, y)
    times: dict[str, list[float]] = {label: [] for label in models}
    for round_index in range(rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            model, turn = models[variant.label], steps or variant.turn
            start = time.perf_counter()
            for _ in range(turn):
                model.train_on_batch(x, y)
            times[variant.label].append((time.perf_counter() - start) / turn)
    ms = {label: 1e3 * float(np.median(values)) for label, values in times.items()}
    frozen = ms["nothing refreshed"]
    parts = {
        "forward/backward": ms["SGD"],
        "preconditioning + bookkeeping": frozen - ms["SGD"],
        "statistics pass": ms["statistics every step"] - frozen,
        "inverse refresh": ms["inverses every step"] - frozen,
        "quadratic model": ms["quadratic model"] - frozen,
    }
    blocks = models["K-FAC default"].optimizer.blocks
    reduce_locations = KFAC_ARGUMENTS.get("weight_sharing") == "reduce"
    flops = part_flops(models["K-FAC default"], blocks, sizes, forward, problem.batch_size, reduce_locations)
    covered = sum(int(np.prod(v.shape)) for b in blocks for v in b.variables)
    return {
        "model": name,
        "jit_compile": jit,
        "batch": problem.batch_size,
        "parameters": reference.count_params(),
        "parameters_in_blocks": covered,
        "forward_flops": forward,
        "ms_per_step": ms,
        "part_ms": parts,
        "part_flops": flops,
        "default_predicted_ms": frozen
        + parts["statistics pass"] / DEFAULT_STEP["statistics_update_period"]
        + parts["inverse refresh"] / DEFAULT_STEP["inverse_update_period"],
    }


def _rate(flops: float, ms: float) -> str:
    return H.fmt(flops / ms / 1e6, ".3g") if ms > 0.05 else "—"


def model_table(result: dict) -> str:
    """The parts of one model's step: measured ms, FLOPs and rate."""
    ms, adam = result["ms_per_step"], result["ms_per_step"]["Adam"]
    period = {
        "statistics pass": DEFAULT_STEP["statistics_update_period"],
        "inverse refresh": DEFAULT_STEP["inverse_update_period"],
    }
    rows = []
    for part, part_ms in result["part_ms"].items():
        flops = result["part_flops"][part]
        every = period.get(part, 1)
        in_default = "—" if part == "quadratic model" else f"{part_ms / every:.1f}"
        rows.append([part, f"{part_ms:.1f}", f"{flops / 1e6:.1f}", _rate(flops, part_ms), str(every), in_default])
    parts = H.markdown_table(
        ["part", "ms each", "MFLOP each", "GFLOP/s", "every … steps (default)", "ms/step in the default step"], rows
    )
    steps = H.markdown_table(
        ["variant", "ms/step", "÷ Adam"],
        [[label, f"{value:.1f}", f"{value / adam:.2f}"] for label, value in ms.items()],
    )
    jit = "XLA" if result["jit_compile"] else "no XLA"
    return (
        f"#### {result['model']}, {jit} (batch {result['batch']}, {result['parameters']:,} parameters, "
        f"{result['parameters_in_blocks']:,} in K-FAC blocks; F = {result['forward_flops'] / 1e6:.1f} MFLOP)\n\n"
        f"{steps}\n\n{parts}\n\nDefault step predicted from the parts: {result['default_predicted_ms']:.1f} ms "
        f"(measured {ms['K-FAC default']:.1f}).\n"
    )


def summary_table(results: list[dict]) -> str:
    """One line per model and compilation: Adam, default and adaptive K-FAC per step."""
    rows = []
    for r in results:
        ms = r["ms_per_step"]
        rows.append(
            [
                r["model"],
                "XLA" if r["jit_compile"] else "no",
                str(r["batch"]),
                f"{ms['Adam']:.1f}",
                f"{ms['K-FAC default']:.1f}",
                f"{ms['K-FAC default'] / ms['Adam']:.2f}",
                f"{ms['K-FAC adaptive']:.1f}",
                f"{ms['K-FAC adaptive'] / ms['Adam']:.2f}",
            ]
        )
    return H.markdown_table(
        ["model", "XLA", "batch", "Adam ms", "K-FAC ms", "÷ Adam", "adaptive ms", "÷ Adam"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", default=",".join(zoo.MODELS), help="comma-separated zoo models")
    parser.add_argument("--jit", default="both", choices=["off", "on", "both"], help="jit_compile of every variant")
    parser.add_argument("--size", default="default", choices=list(zoo.SIZES))
    parser.add_argument("--rounds", type=int, default=5, help="turns of every variant")
    parser.add_argument("--steps", type=int, default=None, help="steps per turn (default: the variant's periods)")
    parser.add_argument(
        "--weight-sharing", default=None, choices=["expand", "reduce"], help="every K-FAC variant's weight_sharing"
    )
    parser.add_argument("--synthetic", action="store_true", help="generated images instead of Fashion-MNIST")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/step-profile)")
    args = parser.parse_args(argv)
    # The form of each factor's inverse (explicit, or a Cholesky factor) follows
    # T₃ (`curvature.inverse_form`); every variant keeps the default step's
    # forms, so that the parts, differences of variants, compare the same products.
    inverse_form = curvature.inverse_form
    curvature.inverse_form = lambda dim, applied_to, _period: inverse_form(
        dim, applied_to, DEFAULT_STEP["inverse_update_period"]
    )
    out_dir = Path(args.out_dir) if args.out_dir else HERE / "results" / "step-profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    if args.weight_sharing is not None:
        KFAC_ARGUMENTS["weight_sharing"] = args.weight_sharing
    rate = matmul_rate()
    print(f"float32 matrix product (1024²): {rate:.1f} GFLOP/s", flush=True)
    started, results, sections = time.time(), [], []
    for name in args.models.split(","):
        for jit in jits:
            result = profile_model(name, args.size, args.synthetic, jit, args.rounds, args.steps)
            results.append(result)
            sections.append(model_table(result))
            print("\n" + sections[-1], flush=True)
    sharing = f", weight_sharing={args.weight_sharing}" if args.weight_sharing else ""
    text = (
        f"## step profile — {args.size} size{sharing}, {args.rounds} rounds, "
        f"wall time {time.time() - started:.0f} s\n\n"
        f"float32 matrix product (1024²) on this machine: {rate:.1f} GFLOP/s.\n\n"
        f"{summary_table(results)}\n\n" + "\n".join(sections)
    )
    print("\n" + summary_table(results), flush=True)
    (out_dir / "table.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps({"matmul_gflops": rate, "results": results}, indent=1))


if __name__ == "__main__":
    main()
