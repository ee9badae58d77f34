"""Trains the same model with and without a two-replica MirroredStrategy.

Run as a script (by test_distribute.py): the two logical CPU devices must be
configured before TensorFlow starts, which a pytest process has long done. For
each K-FAC configuration given by name on the command line it trains a small
convnet on a fixed global batch sequence once on one device and once on two
replicas, and prints one JSON line per configuration with the largest
differences found: between the two runs' weights and K-FAC state, and between
the two replicas' copies of every variable.
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
    "fixed": dict(learning_rate=0.05, momentum=0.9, damping=1e-2, l2_reg=1e-3, estimation_mode="exact",
                  inverse_update_period=2),
    "adaptive": dict(adaptive=True, damping=1.0, estimation_mode="exact", damping_adaptation_period=2,
                     gamma_adaptation_period=3, statistics_update_period=2, inverse_update_period=2),
    # A loss summed over the batch: the replicas' curvatures add up instead.
    "sum_reduction": dict(adaptive=True, damping=30.0, estimation_mode="exact", damping_adaptation_period=2,
                          gamma_adaptation_period=3),
    # Under mixed precision Keras wraps KFAC in a LossScaleOptimizer.
    "mixed_float16": dict(learning_rate=0.05, momentum=0.9, damping=1e-2, estimation_mode="exact"),
    "tridiagonal": dict(learning_rate=0.05, momentum=0.5, damping=1e-2, estimation_mode="empirical",
                        approximation="block_tridiagonal", adapt_damping=True, damping_adaptation_period=2),
}
GLOBAL_BATCH = 16
STEPS = 6


def _model(dense_only: bool) -> keras.Model:
    keras.utils.set_random_seed(1)
    if dense_only:
        layers = [keras.layers.Flatten(), keras.layers.Dense(12, activation="tanh"),
                  keras.layers.Dense(3, activation="softmax")]
    else:
        layers = [keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                  keras.layers.Dense(3, activation="softmax")]
    return keras.Sequential([keras.Input((6, 6, 1)), *layers])


def _train(name: str, strategy: tf.distribute.Strategy) -> tuple[list[np.ndarray], list, list[float]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=GLOBAL_BATCH * STEPS).astype("int32")
    keras.mixed_precision.set_global_policy("mixed_float16" if name == "mixed_float16" else "float32")
    try:
        with strategy.scope():
            model = _model(dense_only=name == "tridiagonal")
            optimizer = keras_kfac.KFAC(model=model, seed=0, **CONFIGURATIONS[name])
            # XLA cannot compile a MirroredStrategy step over logical CPU devices.
            loss = keras.losses.SparseCategoricalCrossentropy(
                reduction="sum" if name == "sum_reduction" else "sum_over_batch_size"
            )
            model.compile(optimizer=optimizer, loss=loss, jit_compile=False)
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # By position: the two models' layer names differ.
    state = [(v.name, np.asarray(v)) for v in optimizer.variables]
    copies = []
    for variable in list(model.weights) + list(optimizer.variables):
        values = [np.asarray(c) for c in getattr(variable.value, "values", [variable.value])]
        copies.append(max(float(np.max(np.abs(v - values[0]), initial=0.0)) for v in values))
    return [np.asarray(w) for w in model.weights], state, copies


def _difference(one: np.ndarray, two: np.ndarray) -> np.ndarray:
    """|one − two|, 0 where both are NaN (a ρ not computed yet)."""
    return np.where(np.isnan(one) & np.isnan(two), 0.0, np.abs(one - two))


def main(names: list[str]) -> None:
    # One strategy for all runs: collective ops of a second MirroredStrategy in
    # the same process can collide with the first one's (TensorFlow keys them
    # per strategy).
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name in names:
        weights_one, state_one, _ = _train(name, tf.distribute.get_strategy())
        weights_two, state_two, copies = _train(name, mirrored)
        moved = max(float(np.max(np.abs(w - w0))) for w, w0 in zip(weights_one, [np.asarray(v) for v in _model(
            name == "tridiagonal").weights]))
        print(json.dumps({
            "configuration": name,
            "replicas": mirrored.num_replicas_in_sync,
            "weights_moved": moved,
            "weights_difference": max(float(np.max(np.abs(a - b))) for a, b in zip(weights_one, weights_two)),
            "state_difference": {
                name_one: float(np.max(_difference(one, two), initial=0.0) / (1.0 + np.max(np.abs(np.nan_to_num(one)), initial=0.0)))
                for (name_one, one), (_, two) in zip(state_one, state_two)
                if one.dtype.kind == "f"
            },
            "replica_copies_difference": max(copies),
            "adapted": {k: float(np.asarray(v)) for k, v in state_two if k in ("damping", "gamma", "rho")},
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CONFIGURATIONS))
