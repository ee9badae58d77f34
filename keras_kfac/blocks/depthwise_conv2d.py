"""DepthwiseConv2D block: one KFC block per input channel [KFC §3.1, applied channel by channel].

A depthwise convolution filters each input channel c on its own: its
``depth_multiplier`` outputs (c·M … c·M + M − 1) are a Dense layer W̄_c from the
kh·kw patch of channel c (and a homogeneous 1 for the bias) applied at every
output location. Channels share no weights and no inputs, so the Fisher is
approximated block-diagonally over them, each block the KFC factorisation
``Ā_c ⊗ G_c`` of that shared Dense layer, the locations counted as rows.
Cross-channel terms of the Fisher are dropped, as the block-diagonal K-FAC
drops them between layers [KFAC §4.2]. The rows are every location (no
``patch_fraction`` subsampling, no ``weight_sharing="reduce"``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.channelwise import ChannelwiseBlock
from keras_kfac.blocks.conv2d import image_patches
from keras_kfac.blocks.registry import register_block_type


@register_block_type
class DepthwiseConv2DBlock(ChannelwiseBlock):
    """Kernel (kh, kw, C, M) and bias (C·M,) of a ``keras.layers.DepthwiseConv2D``.

    Args:
        layer: the DepthwiseConv2D layer; ``channels_first`` raises ValueError.
    """

    layer_types = (keras.layers.DepthwiseConv2D,)
    kind = "depthwise_conv2d"

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        if layer.data_format != "channels_last":
            raise ValueError(
                f"DepthwiseConv2D layer '{layer.name}' uses data_format='{layer.data_format}'; "
                "KFAC supports channels_last convolutions only."
            )

    @property
    def channels(self) -> int:
        """C, the input channels."""
        return int(self.kernel.shape[2])

    @property
    def input_dim(self) -> int:
        """dim Ā_c: kh·kw, plus one for the bias."""
        kh, kw = self.layer.kernel_size
        return kh * kw + int(self.has_bias)

    @property
    def output_dim(self) -> int:
        """dim G_c: the depth multiplier M."""
        return int(self.kernel.shape[3])

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Each channel's kh×kw patch at every output location, in the kernel's (kh, kw) order.

        Args:
            inputs: one call's input, shape (batch, height, width, C).

        Returns:
            A tensor of shape (batch × output locations, C, kh·kw).
        """
        kh, kw = self.layer.kernel_size
        patches = image_patches(self.layer, inputs)
        return tf.transpose(tf.reshape(patches, [-1, kh * kw, self.channels]), [0, 2, 1])

    def gradient_matrix(self, gradients: list[tf.Tensor]) -> tf.Tensor:
        """∇W̄_c of every channel, shape (C, ``input_dim``, M), the bias gradient the last row.

        Args:
            gradients: the gradients of the kernel and (if any) the bias.

        Returns:
            The stacked per-channel gradient matrices, float32.
        """
        kernel = tf.cast(gradients[0], tf.float32)
        matrix = tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]), [self.channels, -1, self.output_dim])
        if not self.has_bias:
            return matrix
        bias = tf.reshape(tf.cast(gradients[1], tf.float32), [self.channels, 1, self.output_dim])
        return tf.concat([matrix, bias], axis=1)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of ``gradient_matrix``: the kernel- and bias-shaped tensors.

        Args:
            matrix: a tensor of shape (C, ``input_dim``, M).

        Returns:
            One tensor per variable of ``variables``, shaped like it.
        """
        kh, kw = self.layer.kernel_size
        kernel = tf.reshape(matrix[:, : kh * kw], [self.channels, kh, kw, self.output_dim])
        parts = [tf.transpose(kernel, [1, 2, 0, 3])]
        if self.has_bias:
            parts.append(tf.reshape(matrix[:, kh * kw], [-1]))
        return parts
