"""Embedding block: a Dense layer on one-hot inputs, with a diagonal Ā [KFAC §3].

An embedding looks up row i of its table W (vocabulary V × output D) for token
i: it is ``s = ā W`` with ā the one-hot row of i and no bias. Its Kronecker
factors are those of that Dense layer, with every token of every example a row
(like the locations of a convolution): Ā = E[ā āᵀ] is the diagonal of the
tokens' frequencies and G = (1/B) Σ ĝ ĝᵀ over the looked-up positions. The
preconditioned gradient ``(Ā + πγI)⁻¹ ∇W (G + (γ/π)I)⁻¹`` scales each token's
row by 1/(frequency + πγ) instead of inverting a V × V matrix.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac import curvature
from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.registry import register_block_type


@register_block_type
class EmbeddingBlock(KroneckerBlock):
    """The table (V, D) of a ``keras.layers.Embedding`` as one block.

    Args:
        layer: the Embedding layer; a subclass that overrides the lookup
            (``call``) raises ValueError.
    """

    layer_types = (keras.layers.Embedding,)
    kind = "embedding"
    input_factor_type = curvature.DiagonalFactor

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        if type(layer).call is not keras.layers.Embedding.call:
            raise ValueError(
                f"Embedding layer '{layer.name}' ({type(layer).__name__}) overrides the lookup "
                "(e.g. ReversibleEmbedding's output projection); KFAC's embedding block is "
                "the plain lookup only."
            )

    @property
    def kernel(self) -> keras.Variable:
        """The embedding table (V, D)."""
        return self.layer.embeddings

    @property
    def has_bias(self) -> bool:
        """False: an embedding has no bias."""
        return False

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """The token ids, one per row (negative ids count from the end, as in the lookup).

        Args:
            inputs: one call's integer token ids, of any shape.

        Returns:
            The ids flattened, an int32 tensor of shape (rows,) with values in [0, V).
        """
        ids = tf.reshape(tf.cast(inputs, tf.int32), [-1])
        return tf.where(ids < 0, ids + self.input_dim, ids)

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """The rows ā are one-hot: kept as their token ids.

        Args:
            inputs: one call's integer token ids, of any shape.

        Returns:
            The rows' token ids, as ``input_patches`` gives them.
        """
        return self.input_patches(inputs)

    def input_second_moment(self, input_rows: tf.Tensor, weights: tf.Tensor | None = None) -> tf.Tensor:
        """diag(Ā): each token's (weighted) count among the rows, divided by the rows' total weight.

        Args:
            input_rows: the rows' token ids, shape (N,).
            weights: the rows' weights, shape (N,); None weighs them equally.

        Returns:
            diag(Ā) as a vector of shape (V,); 0 when the weights sum to 0.
        """
        if weights is None:
            weights = tf.ones_like(input_rows, dtype=tf.float32)
        counts = tf.math.unsorted_segment_sum(weights, input_rows, self.input_dim)
        return tf.math.divide_no_nan(counts, tf.reduce_sum(weights))
