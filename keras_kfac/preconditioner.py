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
        """The moving averages of statistics beyond the blocks' own Ā and G (inputs, outputs)."""

    def cross_estimates(self, rows: dict, batch_size: tf.Tensor) -> tuple[list, list, list]:
        """Batch estimates of ``cross_targets``, with the masses of the input ones."""

    def inverses(self, gamma: tf.Tensor) -> list:
        """The inverse state for factored-Tikhonov damping γ, freshly computed (not stored)."""

    def store(self, inverses: list) -> None:
        """Keeps ``inverses`` as the stored state."""

    def stored(self) -> list:
        """The stored inverse state."""

    def precondition(self, grads: dict, inverses: list, var_key: Callable) -> dict:
        """F⁻¹∇h by variable key, for the blocks whose variables all have gradients."""


class BlockDiagonal:
    """Damped inverses per block, stored in the blocks' factors."""

    def __init__(self, blocks: list[KroneckerBlock]):
        self.blocks = blocks

    def cross_targets(self) -> tuple[list, list]:
        """No statistics beyond each block's own factors."""
        return [], []

    def cross_estimates(self, rows: dict, batch_size: tf.Tensor) -> tuple[list, list, list]:
        return [], [], []

    def inverses(self, gamma: tf.Tensor) -> list:
        """Fresh ((Ā + πγI)⁻¹, (G + (γ/π)I)⁻¹) of every block for γ (not stored)."""
        return [block.damped_inverses(gamma) for block in self.blocks]

    def store(self, inverses: list) -> None:
        for block, block_inverses in zip(self.blocks, inverses):
            block.store_inverses(block_inverses)

    def stored(self) -> list:
        return [(b.input_factor.inverse, b.output_factor.inverse) for b in self.blocks]

    def precondition(self, grads: dict, inverses: list, var_key: Callable) -> dict:
        """F̆⁻¹∇h for every block whose variables all have gradients, by ``var_key``."""
        updates = {}
        for block, block_inverses in zip(self.blocks, inverses):
            keys = [var_key(v) for v in block.variables]
            if all(k in grads for k in keys):
                updates.update(zip(keys, block.precondition([grads[k] for k in keys], block_inverses)))
        return updates
