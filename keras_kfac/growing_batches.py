"""The paper's growing mini-batch [KFAC §13].

`GrowingBatches` is a `keras.utils.PyDataset` of random mini-batches whose size
follows the schedule of the paper's autoencoder experiments,
m_k = min(m₁·exp((k−1)/b), N); `growing_batch_size` and `growth_to_reach`
compute it.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np


def growing_batch_size(
    iteration: int, initial_batch_size: int, final_batch_size: int, growth_iterations: float, multiple_of: int = 1
) -> int:
    """m_k = min(m₁·exp((k−1)/b), N) of the paper's autoencoder runs [KFAC §13].

    Sizes are rounded to a multiple of `multiple_of` (below N), which bounds
    the number of distinct batch shapes.

    Args:
        iteration: k, counted from 1.
        initial_batch_size: m₁.
        final_batch_size: N, the cap.
        growth_iterations: b.
        multiple_of: the sizes below N are multiples of this (at least one multiple).

    Returns:
        m_k, an int.
    """
    if iteration < 1:
        raise ValueError(f"iteration counts from 1, got {iteration}.")
    size = min(initial_batch_size * math.exp((iteration - 1) / growth_iterations), final_batch_size)
    if size >= final_batch_size:
        return int(final_batch_size)
    size = max(multiple_of, multiple_of * round(size / multiple_of))
    return int(min(size, final_batch_size))


def growth_to_reach(initial_batch_size: int, final_batch_size: int, iteration: int) -> float:
    """The b for which m_k reaches N at k = `iteration` (the paper: k = 500).

    Args:
        initial_batch_size: m₁.
        final_batch_size: N, larger than m₁.
        iteration: k at which m_k reaches N, larger than 1.

    Returns:
        b = (k − 1) / ln(N/m₁), a float.
    """
    if iteration <= 1 or final_batch_size <= initial_batch_size:
        raise ValueError(
            "growth_to_reach needs iteration > 1 and final_batch_size > initial_batch_size, got "
            f"iteration={iteration}, initial={initial_batch_size}, final={final_batch_size}."
        )
    return (iteration - 1) / math.log(final_batch_size / initial_batch_size)


class GrowingBatches(keras.utils.PyDataset):
    """Random mini-batches whose size grows as m_k = min(m₁·exp((k−1)/b), N).

    Martens & Grosse [KFAC §13] train the deep autoencoders with this
    exponentially growing batch: K-FAC's curvature estimates, and the
    quadratic model that picks its step, improve with the batch size, and
    the growth lets K-FAC take large steps late in training. Batch k is a
    uniformly random subset of the N training examples, drawn without
    replacement; once m_k = N it is the whole set.

    Use it as the `x` of `model.fit` (no `batch_size`):

    ```python
    data = keras_kfac.GrowingBatches(x, y, initial_batch_size=1000,
                                    growth_iterations=growth_to_reach(1000, len(x), 500))
    model.fit(data, epochs=10)
    ```

    An "epoch" is `steps_per_epoch` iterations (by default ⌈N/m₁⌉); the
    iteration count k carries over from epoch to epoch (and from one `fit` call
    to the next with the same instance). Batches depend only on
    (seed, k), so Keras' peeking at the first batches and worker processes
    do not change them. Set `initial_iteration` when resuming a run.

    Args:
        x: the inputs: an array (or a structure of arrays) with N rows.
        y: the targets, likewise, or None.
        sample_weight: the sample weights, likewise, or None.
        initial_batch_size: m₁.
        growth_iterations: b; the size reaches N at k = 1 + b·ln(N/m₁).
        final_batch_size: the cap N (default: all N examples).
        steps_per_epoch: iterations per Keras epoch.
        multiple_of: round batch sizes to multiples of this.
        seed: the random seed of the batches.
        initial_iteration: k − 1 of the first batch.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
            `keras.utils.PyDataset`.
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        initial_batch_size: int,
        growth_iterations: float,
        final_batch_size: int | None = None,
        steps_per_epoch: int | None = None,
        multiple_of: int = 1,
        seed: int = 0,
        initial_iteration: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._arrays = (x, y, sample_weight)
        sizes = {len(a) for a in keras.tree.flatten(self._arrays) if a is not None}
        if len(sizes) != 1:
            raise ValueError(f"GrowingBatches: x, y and sample_weight must have the same number of rows, got {sizes}.")
        self.num_examples = sizes.pop()
        final = self.num_examples if final_batch_size is None else int(final_batch_size)
        if not 1 <= int(initial_batch_size) <= final <= self.num_examples:
            raise ValueError(
                "GrowingBatches needs 1 <= initial_batch_size <= final_batch_size <= number of examples, got "
                f"{initial_batch_size}, {final}, {self.num_examples}."
            )
        if not growth_iterations > 0:
            raise ValueError(f"GrowingBatches: growth_iterations must be positive, got {growth_iterations!r}.")
        if multiple_of < 1:
            raise ValueError(f"GrowingBatches: multiple_of must be >= 1, got {multiple_of!r}.")
        self.initial_batch_size = int(initial_batch_size)
        self.final_batch_size = final
        self.growth_iterations = float(growth_iterations)
        self.multiple_of = int(multiple_of)
        self.steps_per_epoch = int(steps_per_epoch or math.ceil(self.num_examples / self.initial_batch_size))
        self.seed = int(seed)
        self.initial_iteration = int(initial_iteration)
        self._epochs_begun = 0

    @property
    def epoch(self) -> int:
        """The current epoch (0 before training starts: Keras peeks at it then)."""
        return max(self._epochs_begun - 1, 0)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def iteration(self, index: int) -> int:
        """k of the batch at position `index` of the current epoch.

        Args:
            index: the batch's position in the epoch, from 0.

        Returns:
            k, counted from 1 (after `initial_iteration` earlier iterations).
        """
        return self.initial_iteration + self.epoch * self.steps_per_epoch + index + 1

    def batch_size(self, iteration: int) -> int:
        """m_k, from `growing_batch_size` with this dataset's settings.

        Args:
            iteration: k, counted from 1.

        Returns:
            The batch size m_k.
        """
        return growing_batch_size(
            iteration, self.initial_batch_size, self.final_batch_size, self.growth_iterations, self.multiple_of
        )

    def __getitem__(self, index: int) -> tuple:
        k = self.iteration(index)
        size = self.batch_size(k)
        if size >= self.num_examples:
            rows = np.arange(self.num_examples)
        else:
            rows = np.random.default_rng([self.seed, k]).choice(self.num_examples, size, replace=False)
            rows.sort()
        x, y, sample_weight = keras.tree.map_structure(
            lambda a: None if a is None else np.asarray(a)[rows], self._arrays, none_is_leaf=False
        )
        if sample_weight is not None:
            return x, y, sample_weight
        return (x,) if y is None else (x, y)

    def on_epoch_begin(self) -> None:
        """Counts the epoch that begins, which `epoch` and `iteration` follow."""
        self._epochs_begun += 1
