"""The preconditioner interface, and the block-diagonal F̆⁻¹ [KFAC §4.2, §6.3].

F̆ is block-diagonal over the registered layers, each block the factored-Tikhonov
damped ``(Ā + πγI) ⊗ (G + (γ/π)I)``. Its inverse state is a pair of small
inverses per block. ``chain.TridiagonalChain`` implements the same
``Preconditioner`` interface for the block-tridiagonal F̂⁻¹ [KFAC §4.3].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import tensorflow as tf

from keras_kfac.blocks import KroneckerBlock


class Preconditioner(Protocol):
    """What the step needs of a curvature approximation: its blocks and damped inverses."""

    blocks: list[KroneckerBlock]

    def cross_targets(self) -> tuple[list, list]:
        """The moving averages of statistics beyond the blocks' own Ā and G (inputs, outputs).

        Returns:
            (input-side variables, output-side variables).
        """

    def cross_estimates(self, rows: dict, batch_size: tf.Tensor) -> tuple[list, list, list]:
        """Batch estimates of ``cross_targets``, with the masses of the input ones.

        Args:
            rows: each called block's (ā rows, ĝ rows, ā rows' weights) by ``id(block)``
                (``statistics.factor_rows``).
            batch_size: B, the number of examples.

        Returns:
            (input-side estimates, their masses, output-side estimates), in the
            order of ``cross_targets``.
        """

    def inverses(self, gamma: tf.Tensor) -> list:
        """The inverse state for factored-Tikhonov damping γ, freshly computed (not stored).

        Args:
            gamma: the factored Tikhonov damping γ.

        Returns:
            The inverse state, a list in the form ``stored`` holds it.
        """

    def store(self, inverses: list) -> None:
        """Keeps ``inverses`` as the stored state.

        Args:
            inverses: the inverse state, as ``inverses`` returns it.
        """

    def stored(self) -> list:
        """The stored inverse state.

        Returns:
            The inverse state, a list of variables or pairs of them.
        """

    def precondition(self, grads: dict, inverses: list, var_key: Callable) -> dict:
        """F⁻¹∇h by variable key, for the blocks whose variables all have gradients.

        Args:
            grads: the gradients ∇h, by variable key.
            inverses: the inverse state, from ``inverses`` or ``stored``.
            var_key: maps a variable to its key in ``grads``.

        Returns:
            The preconditioned gradients, by variable key.
        """


class BlockDiagonal:
    """Damped inverses per block, stored in the blocks' factors.

    Args:
        blocks: the registered blocks, their factors' state created.
    """

    def __init__(self, blocks: list[KroneckerBlock]):
        self.blocks = blocks

    def cross_targets(self) -> tuple[list, list]:
        """No statistics beyond each block's own factors.

        Returns:
            ([], []).
        """
        return [], []

    def cross_estimates(self, rows: dict, batch_size: tf.Tensor) -> tuple[list, list, list]:
        """No estimates beyond each block's own factors (``Preconditioner.cross_estimates``): ([], [], [])."""
        return [], [], []

    def inverses(self, gamma: tf.Tensor) -> list:
        """Fresh ((Ā + πγI)⁻¹, (G + (γ/π)I)⁻¹) of every block for γ (not stored).

        Args:
            gamma: the factored Tikhonov damping γ.

        Returns:
            One pair of damped inverses per block, in ``blocks`` order.
        """
        return [block.damped_inverses(gamma) for block in self.blocks]

    def store(self, inverses: list) -> None:
        """Keeps each block's damped inverses in its factors (each unless not finite).

        Args:
            inverses: one pair per block, as ``inverses`` returns them.
        """
        for block, block_inverses in zip(self.blocks, inverses):
            block.store_inverses(block_inverses)

    def stored(self) -> list:
        """The blocks' stored damped inverses.

        Returns:
            One pair of inverse variables (Ā's, G's) per block, in ``blocks`` order.
        """
        return [(b.input_factor.inverse, b.output_factor.inverse) for b in self.blocks]

    def precondition(self, grads: dict, inverses: list, var_key: Callable) -> dict:
        """F̆⁻¹∇h for every block whose variables all have gradients, by ``var_key``.

        Args:
            grads: the gradients ∇h, by variable key.
            inverses: the inverse state, from ``inverses`` or ``stored``.
            var_key: maps a variable to its key in ``grads``.

        Returns:
            The preconditioned gradient of each such block's variables, by key.
        """
        updates = {}
        for block, block_inverses in zip(self.blocks, inverses):
            keys = [var_key(v) for v in block.variables]
            if all(k in grads for k in keys):
                for key, update in zip(keys, block.precondition([grads[k] for k in keys], block_inverses)):
                    # Blocks sharing a variable (a GRU's bias) each give their rows; the rest are 0.
                    updates[key] = updates[key] + update if key in updates else update
        return updates
