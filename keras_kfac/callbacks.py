"""Watching K-FAC's state during training.

`KFACMonitor` puts the optimizer's adaptive state — damping λ, factored
Tikhonov γ, the update coefficients α and μ, the Levenberg–Marquardt ratio ρ
and the quadratic model's predicted change — into the epoch logs (so
`History` and Keras' `TensorBoard` callback see them) and, given a `log_dir`,
writes them to TensorBoard every few steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

# Defined in growing_batches; importable from here as before.
from keras_kfac.growing_batches import GrowingBatches, growing_batch_size, growth_to_reach  # noqa: F401
from keras_kfac.optimizer import KFAC
from keras_kfac.tensorboard import MONITORED, state_values


def _kfac_of(optimizer: Any) -> KFAC:
    """The KFAC instance behind `optimizer` (unwrapping a LossScaleOptimizer)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(inner, KFAC):
        raise ValueError(f"KFACMonitor needs a model compiled with keras_kfac.KFAC; got {type(inner).__name__}.")
    return inner


class KFACMonitor(keras.callbacks.Callback):
    """Reports K-FAC's adaptive state to the logs and to TensorBoard.

    At the end of every epoch the current values of `quantities` are added to
    the epoch logs as `<prefix><name>` (e.g. `kfac_damping`), so they appear in
    `History.history`, in the progress bar and — when this callback comes
    before `keras.callbacks.TensorBoard` in the callback list — as
    `epoch_kfac_damping` in TensorBoard. With `log_dir`, the values are also
    written every `update_freq` training steps as `kfac/<name>` to
    `<log_dir>/train`, next to the TensorBoard callback's own summaries, so
    the step-by-step dynamics of λ [KFAC §6.5], γ [§6.6] and α, μ [§7] can be
    followed.

    Args:
        quantities: names among "damping", "gamma", "alpha", "mu", "rho" and
            "quadratic_change" (the optimizer properties of the same names).
            ρ is NaN until the first Levenberg–Marquardt check.
        prefix: prefix of the log keys.
        log_dir: TensorBoard log directory for the per-step summaries; None
            writes none.
        update_freq: write the per-step summaries every this many steps.
    """

    def __init__(
        self,
        quantities: Sequence[str] = MONITORED,
        prefix: str = "kfac_",
        log_dir: str | os.PathLike | None = None,
        update_freq: int = 1,
    ) -> None:
        super().__init__()
        unknown = [q for q in quantities if q not in MONITORED]
        if unknown:
            raise ValueError(f"KFACMonitor: unknown quantities {unknown}; choose among {list(MONITORED)}.")
        if not isinstance(update_freq, int) or update_freq < 1:
            raise ValueError(f"KFACMonitor: update_freq must be a positive integer, got {update_freq!r}.")
        self.quantities = tuple(quantities)
        self.prefix = prefix
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.update_freq = update_freq
        self._writer = None

    def values(self) -> dict[str, float]:
        """The monitored quantities' current values.

        Returns:
            A dict from each name of ``quantities`` to its value, a Python float.
        """
        return state_values(_kfac_of(self.model.optimizer), self.quantities)

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Checks that the model is trained by KFAC and opens the summary writer, if any.

        Args:
            logs: unused.
        """
        _kfac_of(self.model.optimizer)
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Writes the per-step summaries when the optimizer's step count is a multiple of ``update_freq``.

        Args:
            batch: unused; the step is the optimizer's ``iterations``.
            logs: unused.
        """
        if self._writer is None:
            return
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.update_freq:
            return
        with self._writer.as_default(step=step):
            for name, value in self.values().items():
                tf.summary.scalar(f"kfac/{name}", value)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Adds the current values to the epoch logs as ``<prefix><name>``.

        Args:
            epoch: unused.
            logs: the epoch logs, updated in place.
        """
        if logs is not None:
            logs.update({self.prefix + name: value for name, value in self.values().items()})

    def on_train_end(self, logs: dict | None = None) -> None:
        """Flushes the summary writer, if any.

        Args:
            logs: unused.
        """
        if self._writer is not None:
            self._writer.flush()
