"""SeparableConv2D blocks: the depthwise filter per channel, the pointwise kernel as a Dense layer.

A separable convolution is a depthwise convolution (each input channel c
filtered by its own kh×kw filters into M intermediate channels u) followed,
with no nonlinearity between, by a 1×1 convolution P (C·M → F, with the bias)
at every location. The two kernels get a block each, the time-honoured
split of K-FAC into layers [KFAC §3]:

- the depthwise kernel: one KFC block per input channel, as DepthwiseConv2D's
  (``Ā_c`` over its kh·kw patches, ``G_c`` over the vectors at u_c, which are
  the output's vectors carried back through P: ĝ_u = ĝ Pᵀ);
- the pointwise kernel and the bias: a Dense block at every location, ā the
  intermediate u (recomputed from the input) with a homogeneous 1, ĝ the
  output's vector.

Cross terms between the two kernels and between channels are dropped.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.depthwise_conv2d import DepthwiseConv2DBlock
from keras_kfac.blocks.registry import register_block_type


def _intermediate(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """u: the depthwise stage of ``layer`` on ``inputs``, shape (batch, h', w', C·M)."""
    return tf.nn.depthwise_conv2d(
        tf.cast(inputs, tf.float32),
        tf.cast(layer.depthwise_kernel, tf.float32),
        strides=[1, *layer.strides, 1],
        padding=layer.padding.upper(),
        dilations=layer.dilation_rate,
    )


@register_block_type
class SeparableDepthwiseBlock(DepthwiseConv2DBlock):
    """The depthwise kernel (kh, kw, C, M) of a ``keras.layers.SeparableConv2D``, one block per channel.

    Registering the layer also registers its ``SeparablePointwiseBlock``.

    Args:
        layer: the SeparableConv2D layer (``channels_last``).
    """

    layer_types = (keras.layers.SeparableConv2D,)
    kind = "separable_depthwise"
    several_per_layer = True

    def call_row_count(self, call) -> tf.Tensor:
        """The call's output locations (its rows), whatever the number of filters.

        Args:
            call: one recorded call of the layer.

        Returns:
            batch × output locations, a scalar int32 tensor.
        """
        return tf.reduce_prod(tf.shape(call.preactivation)[:-1])

    @property
    def kernel(self) -> keras.Variable:
        """The depthwise kernel."""
        return self.layer.depthwise_kernel

    @property
    def has_bias(self) -> bool:
        """False: the bias is the pointwise stage's."""
        return False

    @property
    def companions(self) -> tuple[type[KroneckerBlock], ...]:
        """The pointwise kernel's block, registered with this one."""
        return (SeparablePointwiseBlock,)

    def call_output_rows(self, call, output_gradient: tf.Tensor) -> tf.Tensor:
        """ĝ_u = ĝ Pᵀ at every location, split by input channel.

        Args:
            call: one recorded call of the layer.
            output_gradient: the vector back-propagated to the layer's output.

        Returns:
            A float32 tensor (rows, C, M).
        """
        pointwise = tf.reshape(tf.cast(self.layer.pointwise_kernel, tf.float32), [self.channels * self.output_dim, -1])
        rows = tf.reshape(tf.cast(output_gradient, tf.float32), [-1, pointwise.shape[-1]])
        return tf.reshape(tf.matmul(rows, pointwise, transpose_b=True), [-1, self.channels, self.output_dim])


class SeparablePointwiseBlock(KroneckerBlock):
    """The pointwise kernel (1, 1, C·M, F) and the bias of a SeparableConv2D: a Dense layer on u.

    Not in the block registry: registering the layer registers it with its
    ``SeparableDepthwiseBlock``.

    Args:
        layer: the SeparableConv2D layer.
    """

    layer_types = (keras.layers.SeparableConv2D,)
    kind = "separable_pointwise"
    several_per_layer = True
    rows_are_patch_locations = True

    @property
    def kernel(self) -> keras.Variable:
        """The pointwise kernel."""
        return self.layer.pointwise_kernel

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """u, the depthwise stage's output, one row per location.

        Args:
            inputs: one call's input, shape (batch, height, width, C).

        Returns:
            A tensor (batch × output locations, C·M).
        """
        return tf.reshape(_intermediate(self.layer, inputs), [-1, self.kernel_matrix_rows])
