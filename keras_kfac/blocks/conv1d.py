"""Conv1D block: KFC factors for one-dimensional convolutions (Grosse & Martens 2016).

A Conv1D layer applies W̄ to the patch ā_t of ``kernel_size`` consecutive input
steps around each output step t, so it is the KFC block of a convolution whose
locations are the |T| output steps [KFC §3.1-3.2]: the rows of the block are
the patches of every step of every example. ``causal`` padding is 'valid'
after ``dilation·(kernel_size − 1)`` zero steps on the left.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.convolution import ConvolutionBlock
from keras_kfac.blocks.registry import register_block_type


@register_block_type
class Conv1DBlock(ConvolutionBlock):
    """Kernel (k, c_in, c_out) and bias of a ``keras.layers.Conv1D``.

    Args:
        layer: the Conv1D layer (``channels_last``, ``groups=1``).
    """

    layer_types = (keras.layers.Conv1D,)
    kind = "conv1d"

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Patches in the kernel's (k, c_in) row-major order, one row an output step.

        Args:
            inputs: one call's input, shape (batch, steps, c_in).

        Returns:
            A tensor of shape (batch × output steps, k·c_in).
        """
        (size,) = self.layer.kernel_size
        (stride,) = self.layer.strides
        (dilation,) = self.layer.dilation_rate
        padding = self.layer.padding
        if padding == "causal":
            inputs = tf.pad(inputs, [[0, 0], [dilation * (size - 1), 0], [0, 0]])
            padding = "valid"
        # A sequence is an image of height 1.
        patches = tf.image.extract_patches(
            inputs[:, tf.newaxis],
            sizes=[1, 1, size, 1],
            strides=[1, 1, stride, 1],
            rates=[1, 1, dilation, 1],
            padding=padding.upper(),
        )
        return tf.reshape(patches, [-1, self.kernel_matrix_rows])
