"""K-FAC under tf.distribute: two replicas train exactly as one device does.

Under a MirroredStrategy each replica runs the step on half of the global
batch; K-FAC must all-reduce gradients, factor statistics, exact-Fisher products
and losses so that the replicas' updates equal the one-device update on the
whole batch, and so that every mirrored copy of the state stays identical.
The training runs in a subprocess (``distributed_training.py``), which sets up
two logical CPU devices before TensorFlow starts.
"""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("distributed_training.py")
# uneven_shares, empty_replica: last batches that split 8 + 7 and 1 + 0 examples;
# fallback: a LayerNormalization trained by the Adam fallback.
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
REPLICATED = ONE_DEVICE + ("sampled_fractions",)


@pytest.fixture(scope="module")
def results():
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *REPLICATED, "synchronized_batch_norm"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SCRIPT.parent.parent,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return {line["configuration"]: line for line in lines}


@pytest.mark.parametrize("name", ONE_DEVICE)
def test_two_replicas_train_as_one_device(results, name):
    result = results[name]
    assert result["replicas"] == 2
    # Float32 all-reduce rounding only (mixed precision: float16 activations).
    tolerance = 1e-2 if name == "mixed_float16" else 1e-5
    assert result["weights_difference"] < tolerance
    for variable, difference in result["state_difference"].items():
        if variable.startswith("chain_inverse"):
            continue  # eigenvectors, each defined up to its sign; the weights compare the applied inverse
        assert difference < tolerance * 10, (variable, difference)


@pytest.mark.parametrize("name", REPLICATED)
def test_every_replica_holds_the_same_state(results, name):
    result = results[name]
    assert result["finite"]
    # Trained: the adaptive runs' trust region keeps their few steps short (0.02-0.09 here).
    assert result["weights_moved"] > 1e-2
    assert result["replica_copies_difference"] == 0.0


@pytest.mark.parametrize(
    "name, initial_damping",
    [("adaptive", 1.0), ("sum_reduction", 30.0), ("sampled_fractions", 1.0), ("tokens", 1.0)],
)
def test_adaptation_ran_on_the_replicas(results, name, initial_damping):
    adapted = results[name]["adapted"]
    assert adapted["damping"] != pytest.approx(initial_damping)
    assert adapted["gamma"] != pytest.approx((initial_damping + 1e-3 * (name != "sum_reduction")) ** 0.5)
    assert adapted["rho"] == adapted["rho"]  # a ρ was computed (initially NaN)


def test_synchronized_layers_with_conditional_passes_fail_clearly(results):
    message = results["synchronized_batch_norm"]["error"]
    assert "synchronized" in message and "adapt_damping" in message
