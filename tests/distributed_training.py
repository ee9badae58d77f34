"""Trains the same model with and without a two-replica MirroredStrategy.

Run as a script (by test_distribute.py): the two logical CPU devices must be
configured before TensorFlow starts, which a pytest process has long done. For
each K-FAC configuration given by name on the command line it trains a small
convnet on a fixed global batch sequence (with sample weights) on two replicas
and, where the runs are comparable, once more on one device, and prints one
JSON line per configuration with the largest differences found: between the
two runs' weights and K-FAC state, and between the two replicas' copies of
every variable.
"""

from __future__ import annotations

import json
import sys

import tensorflow as tf

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kfac  # noqa: E402

# Deterministic estimation ("exact", "empirical"): sampled targets differ
# between one device and two replicas by construction.
CONFIGURATIONS = {
    "fixed": dict(
        learning_rate=0.05, momentum=0.9, damping=1e-2, l2_reg=1e-3, estimation_mode="exact", inverse_update_period=2
    ),
    "adaptive": dict(
        adaptive=True,
        damping=1.0,
        l2_reg=1e-3,
        estimation_mode="exact",
        damping_adaptation_period=2,
        gamma_adaptation_period=3,
        statistics_update_period=2,
        inverse_update_period=2,
    ),
    # A loss summed over the batch: the replicas' curvatures add up instead.
    "sum_reduction": dict(
        adaptive=True, damping=30.0, estimation_mode="exact", damping_adaptation_period=2, gamma_adaptation_period=3
    ),
    # Under mixed precision Keras wraps KFAC in a LossScaleOptimizer. Damped
    # enough that the runs' float16 rounding differences are not amplified,
    # over the steps, by nearly singular factors.
    "mixed_float16": dict(learning_rate=0.05, momentum=0.9, damping=3e-2, estimation_mode="exact"),
    "tridiagonal": dict(
        learning_rate=0.05,
        momentum=0.5,
        damping=1e-2,
        estimation_mode="empirical",
        approximation="block_tridiagonal",
        adapt_damping=True,
        damping_adaptation_period=2,
    ),
    # K-FAC-reduce: the conv's factors from per-example location means and sums.
    "reduce": dict(
        learning_rate=0.05,
        momentum=0.9,
        damping=1e-2,
        l2_reg=1e-3,
        estimation_mode="exact",
        inverse_update_period=2,
        weight_sharing="reduce",
    ),
    # Embedding (a diagonal Ā) and Conv1D blocks.
    # The paper's recipe without the safeguards: λ and γ then move on this short run.
    "tokens": dict(
        adaptive=True,
        damping=1.0,
        l2_reg=1e-3,
        estimation_mode="exact",
        damping_adaptation_period=2,
        gamma_adaptation_period=3,
        statistics_update_period=2,
        damping_warmup=0,
        reject_below=None,
    ),
    # Not comparable with one device (sampled targets, per-replica fractions):
    # only the replicas' agreement is checked.
    "sampled_fractions": dict(
        adaptive=True,
        damping=1.0,
        l2_reg=1e-3,
        damping_adaptation_period=2,
        gamma_adaptation_period=3,
        statistics_fraction=0.5,
        curvature_fraction=0.5,
        patch_fraction=0.5,
        damping_warmup=0,
        reject_below=None,
    ),
    # A last batch of 15 examples (shares 8 and 7), and one of 1 (shares 1 and 0).
    "uneven_shares": dict(learning_rate=0.05, momentum=0.9, damping=1e-2, l2_reg=1e-3, estimation_mode="exact"),
    "empty_replica": dict(learning_rate=0.05, momentum=0.9, damping=1e-2, l2_reg=1e-3, estimation_mode="exact"),
    # LayerNormalization has no block: its scale and shift follow the Adam fallback.
    "fallback": dict(learning_rate=0.05, momentum=0.9, damping=1e-2, estimation_mode="exact"),
    # A layer that all-reduces in its forward pass: a clear error.
    "synchronized_batch_norm": dict(adaptive=True),
}
ONE_DEVICE = (
    "fixed",
    "reduce",
    "adaptive",
    "sum_reduction",
    "mixed_float16",
    "tridiagonal",
    "tokens",
    "uneven_shares",
    "empty_replica",
    "fallback",
)
GLOBAL_BATCH = 16
STEPS = 6
# Examples short of (or beyond) STEPS full batches, for the uneven last batches.
EXAMPLES_OFFSET = {"uneven_shares": -1, "empty_replica": 1}


def _model(name: str) -> keras.Model:
    keras.utils.set_random_seed(1)
    if name == "tokens":
        return keras.Sequential(
            [
                keras.Input((8,), dtype="int32"),
                keras.layers.Embedding(10, 4),
                keras.layers.Conv1D(4, 3, padding="causal", activation="tanh"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
    # Dense layers only for empty_replica: TensorFlow's ReluGrad of a Conv2D
    # fails on an empty batch whatever the optimizer.
    if name in ("tridiagonal", "empty_replica"):
        layers = [
            keras.layers.Flatten(),
            keras.layers.Dense(12, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    else:
        layers = [
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    if name == "synchronized_batch_norm":
        layers.insert(1, keras.layers.BatchNormalization(synchronized=True))
    if name == "fallback":
        layers.insert(2, keras.layers.LayerNormalization())
    return keras.Sequential([keras.Input((6, 6, 1)), *layers])


def _replica_share_weights(examples: int) -> np.ndarray:
    """One device's weights for the loss that two replicas minimise on an uneven last batch.

    Keras averages each replica's loss over its own B_r examples (the first
    takes ⌈b/2⌉ of a last batch of b) and divides by the 2 replicas, so an
    example there weighs b/(2·B_r) in the one-device mean over b.
    """
    weights = np.ones(examples, "float32")
    last = examples % GLOBAL_BATCH
    shares = [(last + 1) // 2, last // 2]
    start = examples - last
    for share in (s for s in shares if s):
        weights[start : start + share] = last / (2.0 * share)
        start += share
    return weights


def _train(name: str, strategy: tf.distribute.Strategy) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    rng = np.random.default_rng(0)
    examples = GLOBAL_BATCH * STEPS + EXAMPLES_OFFSET.get(name, 0)
    x = rng.normal(size=(examples, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=examples).astype("int32")
    if name == "tokens":
        x = rng.integers(0, 10, size=(examples, 8)).astype("int32")
    sample_weight = rng.uniform(0.5, 1.5, size=examples).astype("float32")
    if name in EXAMPLES_OFFSET and strategy.num_replicas_in_sync == 1:
        sample_weight *= _replica_share_weights(examples)
    keras.mixed_precision.set_global_policy("mixed_float16" if name == "mixed_float16" else "float32")
    try:
        with strategy.scope():
            model = _model(name)
            optimizer = keras_kfac.KFAC(model=model, seed=0, **CONFIGURATIONS[name])
            loss = keras.losses.SparseCategoricalCrossentropy(
                reduction="sum" if name == "sum_reduction" else "sum_over_batch_size"
            )
            # XLA cannot compile a MirroredStrategy step over logical CPU devices.
            model.compile(optimizer=optimizer, loss=loss, jit_compile=False)
        model.fit(x, y, sample_weight=sample_weight, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model, optimizer


def _state(optimizer: keras.optimizers.Optimizer) -> list[tuple[str, np.ndarray]]:
    # By position: the two runs' layer names differ.
    return [(v.name, np.asarray(v)) for v in optimizer.variables]


def _replica_disagreement(variables: list) -> float:
    """The largest difference between the replicas' copies of any variable."""
    largest = 0.0
    for variable in variables:
        values = [np.asarray(c) for c in getattr(variable.value, "values", [variable.value])]
        largest = max([largest] + [float(np.max(_difference(v, values[0]), initial=0.0)) for v in values])
    return largest


def _difference(one: np.ndarray, two: np.ndarray) -> np.ndarray:
    """|one − two|, 0 where both are NaN (a ρ not computed yet)."""
    return np.where(np.isnan(one) & np.isnan(two), 0.0, np.abs(one - two))


def _largest(arrays: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.nan_to_num(a)), initial=0.0)) for a in arrays)


def _report(name: str, strategy: tf.distribute.Strategy) -> dict:
    try:
        model, optimizer = _train(name, strategy)
    except NotImplementedError as error:
        return {"configuration": name, "error": str(error)}
    weights = [np.asarray(w) for w in model.weights]
    state = _state(optimizer)
    initial = [np.asarray(w) for w in _model(name).weights]
    report = {
        "configuration": name,
        "replicas": strategy.num_replicas_in_sync,
        "finite": all(np.all(np.isfinite(w)) for w in weights),
        "weights_moved": _largest([w - w0 for w, w0 in zip(weights, initial)]),
        "replica_copies_difference": _replica_disagreement(list(model.weights) + list(optimizer.variables)),
        "adapted": {k: float(v) for k, v in state if k in ("damping", "gamma", "rho")},
    }
    if name in ONE_DEVICE:
        one_model, one_optimizer = _train(name, tf.distribute.get_strategy())
        report["weights_difference"] = _largest([a - np.asarray(b) for a, b in zip(weights, one_model.weights)])
        report["state_difference"] = {
            variable: float(np.max(_difference(one, two), initial=0.0) / (1.0 + _largest([one])))
            for (variable, one), (_, two) in zip(_state(one_optimizer), state)
            if one.dtype.kind == "f"
        }
    return report


def main(names: list[str]) -> None:
    # One strategy for all runs: collective ops of a second MirroredStrategy in
    # the same process can collide with the first one's (TensorFlow keys them
    # per strategy).
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name in names:
        print(json.dumps(_report(name, mirrored)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CONFIGURATIONS))
