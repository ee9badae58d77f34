"""Channel-wise blocks: one Kronecker-factored block per channel of a layer [KFAC §3].

Some layers give each channel c weights of its own that see only that
channel's input: a depthwise convolution's filter, a normalization layer's
scale and shift. Their Fisher is then approximated block-diagonally over the
channels, each block ``Ā_c ⊗ G_c`` the Kronecker factorisation of a Dense
layer from the channel's input rows ā_c to its outputs ĝ_c, its locations
counted as rows as for a convolution [KFC §3.1]. The C factors of each kind are
stacked (``curvature.ChannelFactor``) and inverted as one batch.
"""

from __future__ import annotations

import abc

import keras
import tensorflow as tf

from keras_kfac import curvature
from keras_kfac.blocks.base import KroneckerBlock, state_prefix


class ChannelwiseBlock(KroneckerBlock):
    """C independent blocks ``Ā_c ⊗ G_c``, one per channel, kept in stacked factors.

    Rows are 3-D: ā rows (N, C, ``input_dim``) and ĝ rows (N, C, ``output_dim``),
    and the weights of channel c are the matrix W̄_c of shape (``input_dim``,
    ``output_dim``), its bias (if any) the last row. Subclasses say how the
    layer's input and variables map to these.
    """

    @property
    @abc.abstractmethod
    def channels(self) -> int:
        """C, the number of channels."""

    @property
    def fisher_dim(self) -> int:
        """C · dim Ā_c · dim G_c: the number of weights the blocks precondition."""
        return self.channels * self.input_dim * self.output_dim

    def create_state(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Creates the stacked factor variables (called from ``optimizer.build``).

        Args:
            optimizer: the optimizer whose variables hold the Ā_c and G_c and
                their damped inverses, named after the layer's path.
        """
        prefix = state_prefix(self)
        self.input_factor = curvature.ChannelFactor(optimizer, self.channels, self.input_dim, f"{prefix}_A")
        self.output_factor = curvature.ChannelFactor(optimizer, self.channels, self.output_dim, f"{prefix}_G")

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """Rows ā_c: each channel's input patch, with the homogeneous 1 appended when there is a bias.

        Args:
            inputs: the input of one call of the layer.

        Returns:
            A float32 tensor of shape (rows, C, ``input_dim``).
        """
        rows = tf.cast(self.input_patches(inputs), tf.float32)
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
        return rows

    def input_second_moment(self, input_rows: tf.Tensor, weights: tf.Tensor | None = None) -> tf.Tensor:
        """Each channel's Ā_c: the (weighted) mean of ā_c ā_cᵀ over the rows [KFAC §3].

        Args:
            input_rows: rows from ``input_rows``, shape (N, C, ``input_dim``).
            weights: the rows' weights, shape (N,); None weighs them equally.

        Returns:
            The stacked Ā_c, shape (C, ``input_dim``, ``input_dim``); 0 without rows or weight.
        """
        if weights is None:
            count = tf.cast(tf.maximum(tf.shape(input_rows)[0], 1), tf.float32)
            return tf.einsum("nci,ncj->cij", input_rows, input_rows) / count
        weighted = tf.einsum("n,nci,ncj->cij", weights, input_rows, input_rows)
        return tf.math.divide_no_nan(weighted, tf.reduce_sum(weights))

    def output_second_moment(self, output_rows: tf.Tensor, examples: tf.Tensor) -> tf.Tensor:
        """Each channel's G_c: Σ ĝ_c ĝ_cᵀ over the rows, divided by the number of examples [KFAC §3].

        Args:
            output_rows: rows from ``output_rows``, shape (N, C, ``output_dim``).
            examples: B, the number of examples.

        Returns:
            The stacked G_c, shape (C, ``output_dim``, ``output_dim``).
        """
        return tf.einsum("nci,ncj->cij", output_rows, output_rows) / tf.cast(tf.maximum(examples, 1), tf.float32)

    def output_rows(self, output_gradient: tf.Tensor) -> tf.Tensor:
        """ĝ_c rows of one call: the back-propagated vector at each location, split by channel.

        Args:
            output_gradient: a vector back-propagated to the call's output, shaped like it.

        Returns:
            A float32 tensor of shape (rows, C, ``output_dim``).
        """
        return tf.reshape(tf.cast(output_gradient, tf.float32), [-1, self.channels, self.output_dim])

    def row_count(self, preactivation: tf.Tensor) -> tf.Tensor:
        """How many rows (examples × locations) one call with this output has.

        Args:
            preactivation: the output of one call.

        Returns:
            The number of rows, a scalar int32 tensor.
        """
        return tf.size(preactivation) // (self.channels * self.output_dim)
