"""State of the block-tridiagonal approximation for a chain of Dense blocks [KFAC §4.3].

The registered blocks, in registration order (the model's layer order under
automatic registration), form the chain. Besides each block's Ā and G this keeps
moving averages of the cross statistics Ā_{i,i+1} = E[ā_i ā_{i+1}ᵀ] and
G_{i,i+1} = E[g_i g_{i+1}ᵀ] of consecutive blocks, and the factors of the inverse
F̂⁻¹ = Ξᵀ Λ Ξ computed by ``tridiagonal``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import keras
import tensorflow as tf

from keras_kfac import compat, curvature, tridiagonal
from keras_kfac.blocks import DenseBlock, KroneckerBlock


class TridiagonalChain:
    """Cross statistics and the stored F̂⁻¹ of a chain of Dense blocks.

    Args:
        optimizer: the KFAC optimizer whose variables hold the cross statistics
            and F̂⁻¹ (saved with it); its ``layer_collection.model`` is checked
            for the chain.
        blocks: the chain, in order: at least two ``DenseBlock``s and no other block.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, blocks: list[KroneckerBlock]):
        if len(blocks) < 2 or not all(type(b) is DenseBlock and not b.diagonal for b in blocks):
            raise ValueError(
                "approximation='block_tridiagonal' needs a chain of at least two "
                "Dense layers with Kronecker blocks and no other registered layers; got "
                f"{[type(b).__name__ + (' (diagonal)' if b.diagonal else '') for b in blocks]}."
            )
        _warn_unless_chained(optimizer.layer_collection.model, blocks)
        self.blocks = blocks
        input_dims = [b.input_dim for b in blocks]
        output_dims = [b.output_dim for b in blocks]
        self.input_cross = [
            optimizer.add_variable((n, m), dtype="float32", name=f"chain_{i}_A_cross")
            for i, (n, m) in enumerate(zip(input_dims[:-1], input_dims[1:]))
        ]
        self.output_cross = [
            optimizer.add_variable((d, e), dtype="float32", name=f"chain_{i}_G_cross")
            for i, (d, e) in enumerate(zip(output_dims[:-1], output_dims[1:]))
        ]
        with tf.init_scope():  # build may run while the train step is traced
            identity = [
                t.numpy() for t in tridiagonal.TridiagonalInverse.identity(input_dims, output_dims).to_tensors()
            ]
        self.inverse = [
            optimizer.add_variable(
                value.shape,
                dtype="float32",
                name=f"chain_inverse_{i}",
                initializer=keras.initializers.Constant(value),
            )
            for i, value in enumerate(identity)
        ]

    def cross_targets(self) -> tuple[list, list]:
        """The moving averages of Ā_{i,i+1} and G_{i,i+1}.

        Returns:
            (Ā_{i,i+1} variables, G_{i,i+1} variables), L − 1 of each.
        """
        return list(self.input_cross), list(self.output_cross)

    def cross_estimates(
        self, rows: dict, batch_size: tf.Tensor
    ) -> tuple[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor]]:
        """Batch estimates of the cross statistics from the step's aligned rows.

        The rows are one per example, and their weights are the first block's.

        Args:
            rows: each block's (ā rows, ĝ rows, ā rows' weights) by ``id(block)``
                (``statistics.factor_rows``); every block of the chain must have rows.
            batch_size: B, the number of examples.

        Returns:
            (``input_cross``, the masses of ``input_cross``, ``output_cross``):
            L − 1 estimates of Ā_{i,i+1}, the first block's row mass for each,
            and L − 1 estimates of G_{i,i+1}.
        """
        if any(id(b) not in rows for b in self.blocks):
            raise ValueError(
                "approximation='block_tridiagonal' needs every Dense layer of the "
                "chain to be called in each training step."
            )
        input_rows = [rows[id(b)][0] for b in self.blocks]
        output_rows = [rows[id(b)][1] for b in self.blocks]
        if any(r.shape.rank != 2 for r in input_rows) or len({r.shape[0] for r in input_rows}) > 1:
            raise ValueError("approximation='block_tridiagonal' needs one row per example in every layer.")
        weights = rows[id(self.blocks[0])][2]
        input_cross, output_cross = tridiagonal.chain_cross_statistics(input_rows, output_rows, batch_size, weights)
        return input_cross, [curvature.row_mass(input_rows[0], weights)] * len(input_cross), output_cross

    def inverses(self, gamma: tf.Tensor) -> list[tf.Tensor]:
        """The tensors of F̂⁻¹ for damping γ (not stored).

        Args:
            gamma: the factored Tikhonov damping γ.

        Returns:
            The 5L − 2 tensors of ``tridiagonal.TridiagonalInverse.to_tensors``.
        """
        inverse = tridiagonal.tridiagonal_inverse(
            [b.input_factor.cov for b in self.blocks],
            [b.output_factor.cov for b in self.blocks],
            [tf.convert_to_tensor(v) for v in self.input_cross],
            [tf.convert_to_tensor(v) for v in self.output_cross],
            [curvature.trace_norm_pi(b.input_factor, b.output_factor) for b in self.blocks],
            gamma,
        )
        return inverse.to_tensors()

    def store(self, tensors: list[tf.Tensor]) -> None:
        """Keeps ``tensors`` as the inverse unless any is non-finite.

        Args:
            tensors: the tensors ``inverses`` returns.
        """
        ok = curvature.all_finite(tensors)
        for variable, tensor in zip(self.inverse, tensors):
            variable.assign(tf.where(ok, tensor, variable))

    def stored(self) -> list:
        """The stored F̂⁻¹.

        Returns:
            Its 5L − 2 variables, in the order of ``inverses``.
        """
        return list(self.inverse)

    def precondition(self, grads: dict, tensors: list, var_key: Callable) -> dict:
        """F̂⁻¹∇h for the chain's variables, by ``var_key``.

        Args:
            grads: the gradients ∇h, by variable key.
            tensors: F̂⁻¹, as ``inverses`` returns or ``stored`` holds it.
            var_key: maps a variable to its key in ``grads``.

        Returns:
            The preconditioned gradient of each of the chain's variables, by key;
            empty unless every one of them has a gradient.
        """
        keys = [[var_key(v) for v in b.variables] for b in self.blocks]
        if not all(k in grads for block_keys in keys for k in block_keys):
            return {}
        matrices = [b.gradient_matrix([grads[k] for k in block_keys]) for b, block_keys in zip(self.blocks, keys)]
        results = tridiagonal.apply_tridiagonal_inverse(tridiagonal.TridiagonalInverse.from_tensors(tensors), matrices)
        updates = {}
        for block, block_keys, result in zip(self.blocks, keys, results):
            updates.update(zip(block_keys, block.split_matrix(result)))
        return updates


def _feeds(upstream: keras.layers.Layer, downstream: keras.layers.Layer) -> bool:
    """Whether the functional graph has a path from ``upstream``'s output to ``downstream``'s input."""
    stack, seen = compat.inbound_nodes(downstream), set()
    while stack:
        node = stack.pop()
        for parent in node.parent_nodes:
            if parent.operation is upstream:
                return True
            if id(parent) not in seen:
                seen.add(id(parent))
                stack.append(parent)
    return False


def _warn_unless_chained(model: keras.Model | None, blocks: list[KroneckerBlock]) -> None:
    """Warns when a functional model's graph shows that consecutive blocks are not
    consecutive layers of a chain: Ψ_{i,i+1} [KFAC §4.3] then couples layers
    that do not feed each other. Layers the graph does not show (a subclassed
    model's, a nested model's) are not checked."""
    top_level = {id(layer) for layer in getattr(model, "layers", [])}
    for upstream, downstream in zip(blocks, blocks[1:]):
        shown = id(upstream.layer) in top_level and id(downstream.layer) in top_level
        if shown and compat.inbound_nodes(downstream.layer) and not _feeds(upstream.layer, downstream.layer):
            warnings.warn(
                "approximation='block_tridiagonal' treats the registered Dense layers as a "
                f"chain in registration order, but '{downstream.name}' does not take its "
                f"input from '{upstream.name}'; their cross statistics model no link of the "
                "network. Register the layers of one chain, in order, with a LayerCollection.",
                stacklevel=3,
            )
