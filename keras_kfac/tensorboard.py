"""K-FAC's state in Keras' own ``TensorBoard`` callback.

A model that ``KFAC`` trains gets its ``fit`` wrapped on the instance: when the
callbacks given to ``fit`` include a ``keras.callbacks.TensorBoard``, a callback
placed just before it adds the damping λ, γ, α, μ, ρ and the quadratic model's
predicted change [KFAC §6-7] to the logs that callback writes — on the batches
it records (``update_freq``) as ``batch_kfac_<name>``, and each epoch as
``epoch_kfac_<name>``. The values are read only on those batches. In-graph
summaries would not do: the graph keeps the writer it was traced with (a later
``fit`` without the callback then fails on the closed writer), XLA refuses
summary ops, and Keras' ``update_freq`` condition is evaluated once, at trace
time.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import keras

from keras_kfac import compat

MONITORED = ("damping", "gamma", "alpha", "mu", "rho", "quadratic_change")
PREFIX = "kfac_"


def state_values(optimizer: Any, quantities: tuple[str, ...] = MONITORED) -> dict[str, float] | None:
    """``quantities`` of the K-FAC behind ``optimizer`` (a LossScaleOptimizer unwrapped), or None.

    Args:
        optimizer: a model's optimizer.
        quantities: names among ``MONITORED`` (KFAC properties).

    Returns:
        A dict from each name to its current value as a Python float, or None
        when the optimizer lacks one of them (it is not a KFAC).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not all(hasattr(inner, name) for name in quantities):
        return None
    return {name: float(keras.ops.convert_to_numpy(getattr(inner, name))) for name in quantities}


class TensorBoardFeed(keras.callbacks.Callback):
    """Adds K-FAC's state to the logs of the batches and epochs ``board`` records.

    Args:
        board: the ``keras.callbacks.TensorBoard`` callback this one comes before.
    """

    def __init__(self, board: keras.callbacks.TensorBoard):
        super().__init__()
        self.board = board
        self._batches = 0

    def _add(self, logs: dict | None) -> None:
        values = state_values(self.model.optimizer)
        if logs is not None and values is not None:
            logs.update({PREFIX + name: value for name, value in values.items()})

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Restarts the batch count, as the TensorBoard callback does.

        Args:
            logs: unused.
        """
        self._batches = 0  # the TensorBoard callback counts batches from here too

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Adds the state to ``logs`` on the batches ``board`` records (its ``update_freq``).

        Args:
            batch: unused; the batches are counted from the start of training.
            logs: the batch logs, updated in place as ``kfac_<name>``.
        """
        self._batches += 1
        frequency = self.board.update_freq
        if frequency != "epoch" and self._batches % frequency == 0:
            self._add(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Adds the state to the epoch logs.

        Args:
            epoch: unused.
            logs: the epoch logs, updated in place as ``kfac_<name>``.
        """
        self._add(logs)


def with_state_feeds(callbacks: Any) -> Any:
    """``callbacks`` with a ``TensorBoardFeed`` before each ``TensorBoard`` callback in it.

    Args:
        callbacks: the ``callbacks`` argument of ``fit``.

    Returns:
        A new list for a list or tuple; anything else (None, a
        ``CallbackList``) unchanged.
    """
    if not isinstance(callbacks, (list, tuple)):
        return callbacks
    fed = []
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.TensorBoard):
            fed.append(TensorBoardFeed(callback))
        fed.append(callback)
    return fed


def feed_stock_tensorboard(model: keras.Model) -> None:
    """Wraps ``model.fit`` (on the instance, once) to add ``TensorBoardFeed``s to its callbacks.

    Args:
        model: the model K-FAC trains.
    """
    if getattr(model, "_kfac_fit_wrapped", False):
        return
    original_fit = model.fit
    signature = inspect.signature(original_fit)

    @functools.wraps(original_fit)
    def fit(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if "callbacks" in bound.arguments:
            bound.arguments["callbacks"] = with_state_feeds(bound.arguments["callbacks"])
        return original_fit(*bound.args, **bound.kwargs)

    compat.set_untracked(model, "fit", fit)
    compat.set_untracked(model, "_kfac_fit_wrapped", True)
