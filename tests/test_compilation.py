"""Under XLA the training step compiles once, whatever the step counter.

A tensor shape that depends on a variable (the step counter, say) must be a
compile-time constant for XLA, so the step would be recompiled at every
iteration. TensorFlow logs each compilation (``device_compilation_profiler``,
verbosity 1); a fresh process counts them.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import keras
    import keras_kfac

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    opt = keras_kfac.KFAC(model=model, seed=0, inverse_update_period=4, **{kwargs})
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    for _ in range(9):
        model.train_on_batch(x, y)
    print("steps done", int(opt.iterations.numpy()))
    """
)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(learning_rate=0.01),
        dict(learning_rate=0.01, statistics_update_period=3, patch_fraction=0.5),
        dict(
            adaptive=True,
            statistics_fraction=0.5,
            curvature_fraction=0.5,
            damping_adaptation_period=2,
            gamma_adaptation_period=3,
        ),
    ],
    ids=["fixed", "statistics-period-and-patches", "adaptive-fractions"],
)
def test_training_step_compiles_once_under_xla(kwargs):
    env = dict(os.environ, TF_CPP_VMODULE="device_compilation_profiler=1", TF_CPP_MIN_LOG_LEVEL="0")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("{kwargs}", repr(kwargs))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps done 9" in result.stdout
    counts = [int(n) for n in re.findall(r"Compiled __inference_one_step_on_data\S* (\d+) times", result.stderr)]
    assert counts, "TensorFlow logged no XLA compilation of the training step:\n" + result.stderr[-3000:]
    assert max(counts) == 1, f"the training step was compiled {max(counts)} times in 9 steps"
