"""Conv2D block: Kronecker factors for convolution (KFC, Grosse & Martens 2016).

A convolution applies W̄ to the patch ā_t around each output location t, so it is
a Dense layer shared over the |T| locations. Assuming spatial homogeneity and
spatially uncorrelated derivatives [KFC §3.1-3.2],
``F ≈ |T| · E_{x,t}[ā_t ā_tᵀ] ⊗ E_{x,t}[ds_t ds_tᵀ]``: the rows of the block are
the patches of every location of every example.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.convolution import ConvolutionBlock
from keras_kfac.blocks.registry import register_block_type


def image_patches(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The kh×kw patches of a 2-D convolution's input at its output locations [KFC §3.1].

    Args:
        layer: the convolution (its ``kernel_size``, ``strides``, ``dilation_rate`` and ``padding``).
        inputs: one call's input, shape (batch, height, width, channels).

    Returns:
        A tensor (batch, output height, output width, kh·kw·channels), each patch in (kh, kw, channels) order.
    """
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.image.extract_patches(
        inputs,
        sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1],
        padding=layer.padding.upper(),
    )


@register_block_type
class Conv2DBlock(ConvolutionBlock):
    """Kernel (kh, kw, c_in, c_out) and bias of a ``keras.layers.Conv2D``.

    Args:
        layer: the Conv2D layer (``channels_last``, ``groups=1``).
    """

    layer_types = (keras.layers.Conv2D,)
    kind = "conv2d"

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Patches in the kernel's (kh, kw, c_in) row-major order, one row a location.

        Args:
            inputs: one call's input, shape (batch, height, width, c_in).

        Returns:
            A tensor of shape (batch × output locations, kh·kw·c_in).
        """
        return tf.reshape(image_patches(self.layer, inputs), [-1, self.kernel_matrix_rows])
