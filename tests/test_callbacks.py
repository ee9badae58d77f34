"""KFACMonitor (logs and TensorBoard) and the growing batch size of GrowingBatches."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.callbacks import KFACMonitor
from keras_kfac.growing_batches import GrowingBatches, growing_batch_size, growth_to_reach


def small_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def data(n: int = 96):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=n)


def compile_kfac(model: keras.Model, **kwargs) -> keras_kfac.KFAC:
    optimizer = keras_kfac.KFAC(model=model, seed=0, **kwargs)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return optimizer


def scalar_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file under `folder`."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name not in ("scalars", ""):
                    continue
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, number))
    return found


# ------------------------------------------------------------------ schedule


def test_growing_batch_size_is_the_papers_formula():
    m1, n, b = 100, 6000, 37.5
    for k in range(1, 400, 7):
        expected = min(m1 * math.exp((k - 1) / b), n)
        assert abs(growing_batch_size(k, m1, n, b) - expected) <= 0.5
    assert growing_batch_size(1, m1, n, b) == m1
    assert growing_batch_size(10**4, m1, n, b) == n


def test_growth_to_reach_hits_n_exactly_at_the_given_iteration():
    b = growth_to_reach(1000, 60000, 500)  # the paper's autoencoder schedule
    assert growing_batch_size(500, 1000, 60000, b) == 60000
    assert growing_batch_size(499, 1000, 60000, b) < 60000
    sizes = [growing_batch_size(k, 1000, 60000, b) for k in range(1, 600)]
    assert sizes == sorted(sizes)
    with pytest.raises(ValueError, match="iteration"):
        growth_to_reach(1000, 60000, 1)


def test_multiple_of_rounds_sizes_below_n():
    sizes = {growing_batch_size(k, 30, 1000, 10.0, multiple_of=64) for k in range(1, 100)}
    assert all(s % 64 == 0 for s in sizes if s < 1000)
    assert max(sizes) == 1000
    assert min(sizes) == 64


class ExamplesSeen(keras.metrics.Metric):
    """Counts the training examples of an epoch (the sum of its batch sizes)."""

    def __init__(self, name="examples"):
        super().__init__(name=name)
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.cast(keras.ops.shape(y_pred)[0], "float32"))

    def result(self):
        return self.total


@pytest.mark.parametrize("multiple_of", [1, 8])
def test_fit_trains_on_the_scheduled_batch_sizes(multiple_of):
    x, y = data(96)
    model = small_model()
    optimizer = keras_kfac.KFAC(model=model, learning_rate=0.05, damping=1e-2, seed=0)
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[ExamplesSeen()]
    )
    b = growth_to_reach(8, 96, 9)
    batches = GrowingBatches(
        x, y, initial_batch_size=8, growth_iterations=b, steps_per_epoch=4, multiple_of=multiple_of, seed=3
    )
    history = model.fit(batches, epochs=3, verbose=0)
    expected = [
        sum(growing_batch_size(k, 8, 96, b, multiple_of) for k in range(4 * e + 1, 4 * e + 5)) for e in range(3)
    ]
    assert history.history["examples"] == expected
    assert int(optimizer.iterations.numpy()) == 12
    # A second fit with the same instance continues the schedule at k = 13 (full batches).
    history = model.fit(batches, epochs=1, verbose=0)
    assert history.history["examples"] == [4 * 96]


def test_batches_are_random_subsets_fixed_by_seed_and_iteration():
    x = np.arange(50, dtype="float32")[:, None]
    y = np.arange(50)
    w = np.linspace(0.5, 1.5, 50).astype("float32")
    batches = GrowingBatches(x, y, w, initial_batch_size=5, growth_iterations=4.0, seed=1)
    first, again = batches[0], GrowingBatches(x, y, w, initial_batch_size=5, growth_iterations=4.0, seed=1)[0]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    bx, by, bw = batches[3]
    assert len(by) == growing_batch_size(4, 5, 50, 4.0)
    assert len(set(by.tolist())) == len(by)  # without replacement
    np.testing.assert_array_equal(bx[:, 0], by)  # rows stay aligned
    np.testing.assert_array_equal(bw, w[by])
    assert not np.array_equal(GrowingBatches(x, y, initial_batch_size=5, growth_iterations=4.0, seed=2)[3][1], by)
    assert len(batches) == 10  # ⌈N/m₁⌉ steps per epoch by default


def test_growing_batches_rejects_bad_arguments():
    x, y = data(20)
    with pytest.raises(ValueError, match="same number of rows"):
        GrowingBatches(x, y[:10], initial_batch_size=4, growth_iterations=2.0)
    with pytest.raises(ValueError, match="initial_batch_size"):
        GrowingBatches(x, y, initial_batch_size=40, growth_iterations=2.0)
    with pytest.raises(ValueError, match="growth_iterations"):
        GrowingBatches(x, y, initial_batch_size=4, growth_iterations=0.0)


# ------------------------------------------------------------------ monitor


def test_monitor_adds_the_optimizer_state_to_history():
    x, y = data()
    model = small_model()
    optimizer = compile_kfac(model, adaptive=True, damping_adaptation_period=2)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[KFACMonitor()])
    for name in ("damping", "gamma", "alpha", "mu", "rho", "quadratic_change"):
        values = history.history[f"kfac_{name}"]
        assert len(values) == 2
        assert values[-1] == pytest.approx(float(getattr(optimizer, name).numpy()))
    assert all(math.isfinite(v) for v in history.history["kfac_rho"])  # LM ran every 2 steps
    assert history.history["kfac_quadratic_change"][-1] < 0.0  # the model predicts a decrease


def test_monitor_writes_per_step_and_epoch_summaries(tmp_path):
    x, y = data()
    model = small_model()
    compile_kfac(model, learning_rate=0.05, damping=1e-2)
    callbacks = [
        KFACMonitor(log_dir=tmp_path, update_freq=2, quantities=("damping", "alpha")),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path)),
    ]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)  # 12 steps
    events = scalar_events(tmp_path / "train")
    assert [step for step, _ in events["kfac/damping"]] == [2, 4, 6, 8, 10, 12]
    assert all(value == pytest.approx(1e-2) for _, value in events["kfac/damping"])
    assert all(value == pytest.approx(0.05) for _, value in events["kfac/alpha"])
    assert [step for step, _ in events["epoch_kfac_damping"]] == [0, 1]
    assert "kfac/mu" not in events


def test_stock_tensorboard_shows_the_state_on_the_batches_it_records(tmp_path):
    """Only Keras' TensorBoard callback: K-FAC's state every update_freq batches and each epoch."""
    x, y = data()
    model = small_model()
    optimizer = compile_kfac(model, adaptive=True, damping_adaptation_period=2)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "first"), update_freq=3)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[board])  # 12 steps
    events = scalar_events(tmp_path / "first" / "train")
    for name in ("damping", "gamma", "alpha", "mu", "rho", "quadratic_change"):
        assert [step for step, _ in events[f"batch_kfac_{name}"]] == [3, 6, 9, 12]
        # Keras writes an epoch's logs when its last batch is one it records (6 and 12 here).
        assert [step for step, _ in events[f"epoch_kfac_{name}"]] == [0, 1]
        assert events[f"batch_kfac_{name}"][-1][1] == pytest.approx(float(getattr(optimizer, name).numpy()))
    assert len({value for _, value in events["batch_kfac_damping"]}) > 1  # λ adapts between the records
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # the traced step keeps no writer
    model.fit(
        x, y, batch_size=16, epochs=1, verbose=0, callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "again"))]
    )
    events = scalar_events(tmp_path / "again" / "train")
    assert "batch_kfac_damping" not in events and len(events["epoch_kfac_damping"]) == 1


def test_monitor_needs_kfac_and_known_quantities():
    with pytest.raises(ValueError, match="unknown quantities"):
        KFACMonitor(quantities=("damping", "lr"))
    with pytest.raises(ValueError, match="update_freq"):
        KFACMonitor(update_freq=0)
    x, y = data(16)
    model = small_model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="keras_kfac.KFAC"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[KFACMonitor()])
