"""Conv3D block: KFC factors for volumetric convolutions (Grosse & Martens 2016).

A Conv3D layer applies W̄ to the patch ā_t of ``kernel_size`` input voxels around
each output location t, so it is the KFC block of a convolution whose locations
are the |T| output voxels [KFC §3.1-3.2]: the rows of the block are the patches
of every location of every example.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_kfac.blocks.convolution import ConvolutionBlock
from keras_kfac.blocks.registry import register_block_type


def volume_patches(
    inputs: tf.Tensor, sizes: Sequence[int], strides: Sequence[int], rates: Sequence[int], padding: str
) -> tf.Tensor:
    """The patches of a 3-D convolution, in the kernel's (kd, kh, kw, c) row-major order.

    ``tf.extract_volume_patches`` has neither dilation rates nor an XLA kernel,
    so the patches are taken as ``tf.image.extract_patches`` of each depth
    slice over (height, width), then of those along depth. TensorFlow pads each
    axis on its own, so the two stages pad as the 3-D convolution does.

    Args:
        inputs: a volume of shape (batch, depth, height, width, c).
        sizes: the kernel size (kd, kh, kw).
        strides: the strides along (depth, height, width).
        rates: the dilation rates along (depth, height, width).
        padding: ``"VALID"`` or ``"SAME"``, as TensorFlow pads.

    Returns:
        A tensor of shape (batch × output locations, kd·kh·kw·c).
    """
    (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = sizes, strides, rates
    shape = tf.shape(inputs)
    slices = tf.reshape(inputs, tf.concat([[-1], shape[2:]], axis=0))
    planes = tf.image.extract_patches(slices, [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1], padding)
    # (batch, depth, locations of a slice, kh·kw·c): patches along depth stack the slices' patches.
    planes = tf.reshape(planes, [shape[0], shape[1], -1, kh * kw * int(inputs.shape[-1])])
    patches = tf.image.extract_patches(planes, [1, kd, 1, 1], [1, sd, 1, 1], [1, dd, 1, 1], padding)
    return tf.reshape(patches, [-1, kd * kh * kw * int(inputs.shape[-1])])


@register_block_type
class Conv3DBlock(ConvolutionBlock):
    """Kernel (kd, kh, kw, c_in, c_out) and bias of a ``keras.layers.Conv3D``.

    Any strides, dilation rates and ``"valid"``/``"same"`` padding.

    Args:
        layer: the Conv3D layer (``channels_last``, ``groups=1``).
    """

    layer_types = (keras.layers.Conv3D,)
    kind = "conv3d"

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Patches in the kernel's (kd, kh, kw, c_in) row-major order, one row a location.

        Args:
            inputs: one call's input, shape (batch, depth, height, width, c_in).

        Returns:
            A tensor of shape (batch × output locations, kd·kh·kw·c_in).
        """
        layer = self.layer
        return volume_patches(inputs, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding.upper())
