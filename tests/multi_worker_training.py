"""Trains a small convnet with KFAC as one of two MultiWorkerMirroredStrategy workers, or as one process.

Run as a script (by test_multi_worker.py), once per worker process, since the
strategy reads ``TF_CONFIG`` when TensorFlow's collectives start:

    multi_worker_training.py OUT --worker I --ports P0,P1   # worker I of two on localhost
    multi_worker_training.py OUT                             # one process, the whole global batch

Each worker trains on its half of every global batch by running the model's
own ``train_step`` through the strategy (Keras 3.15's ``fit`` and
``train_on_batch`` fail under this strategy whatever the optimizer;
keras-team/keras#20585). The one-process run takes the whole global batch with
``train_on_batch``. Each process writes its final weights and K-FAC's state to OUT
(``.npz``).
"""

from __future__ import annotations

import argparse
import json
import os

GLOBAL_BATCH = 16
STEPS = 6
# Deterministic estimation: sampled targets differ between one process and two
# workers by construction. Statistics, inverses and the adapted damping all run
# on these six steps.
CONFIGURATION = dict(
    adaptive=True,
    damping=1.0,
    l2_reg=1e-3,
    estimation_mode="exact",
    damping_adaptation_period=2,
    gamma_adaptation_period=3,
    inverse_update_period=2,
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the final weights and state (.npz)")
    parser.add_argument("--worker", type=int, help="this process's index among the two workers")
    parser.add_argument("--ports", help="the two workers' localhost ports, comma-separated")
    return parser.parse_args()


def _train_function(model, strategy):
    """Keras' own ``train_step`` on each worker's batch, its logs averaged over the workers.

    Stands in for ``make_train_function``, whose reduction of the logs fails
    under this strategy in Keras 3.15 (it asks for ``axis=0`` of a scalar).
    """
    import tensorflow as tf

    @tf.function
    def train(x, y):
        logs = strategy.run(model.train_step, args=((x, y),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    return train


def main() -> None:
    arguments = _arguments()
    if arguments.worker is not None:
        workers = [f"localhost:{port}" for port in arguments.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": arguments.worker}}
        )
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_kfac

    if arguments.worker is None:
        strategy, share, index = tf.distribute.get_strategy(), GLOBAL_BATCH, 0
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        share, index = GLOBAL_BATCH // 2, arguments.worker

    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, GLOBAL_BATCH, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((6, 6, 1)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        optimizer = keras_kfac.KFAC(model=model, seed=0, **CONFIGURATION)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=False)
        optimizer.build(model.trainable_variables)
    train = model.train_on_batch if arguments.worker is None else _train_function(model, strategy)
    for step in range(STEPS):
        rows = slice(index * share, (index + 1) * share)
        train(x[step, rows], y[step, rows])
    arrays = {f"weight_{i}": np.asarray(w) for i, w in enumerate(model.weights)}
    arrays |= {f"state_{i}_{v.name}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
    np.savez(arguments.out, replicas=strategy.num_replicas_in_sync, **arrays)


if __name__ == "__main__":
    main()
