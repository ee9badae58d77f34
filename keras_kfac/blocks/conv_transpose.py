"""Transposed convolution block: KFC factors for Conv1DTranspose, Conv2DTranspose and Conv3DTranspose.

A transposed convolution with strides s is the stride-1 convolution of its
input *spread out* (s − 1 zeros between neighbouring elements along each axis)
and padded, with its kernel flipped along the spatial axes and its two channel
axes swapped (Dumoulin & Visin 2016, §4). So it is the KFC block of that
convolution [KFC §3.1-3.2]: ā_t is the patch of the spread, padded input at
output location t, ĝ_t the back-propagated vector there, and W̄ the flipped
kernel as a (kernel positions · c_in, c_out) matrix.

Keras' TensorFlow backend computes the layer as the gradient of the ordinary
convolution (strides s, dilation d, TensorFlow's ``padding``) from an
output-sized tensor to the input. An input of n elements along an axis gives
(n − 1)·s + 1 + e outputs, with e the same for every n; that convolution pads
its input (the layer's output) by p = max(k_d − 1 − e, 0) // 2 in front for
"same", 0 for "valid", with k_d = (k − 1)·d + 1 the dilated kernel size. Input
element i then reaches output i·s + j·d − p through kernel index j, which is
where the patch of the spread input, padded by k_d − 1 − p in front and e + p
behind, puts it at the flipped index k − 1 − j.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from keras_kfac.blocks.conv3d import volume_patches
from keras_kfac.blocks.convolution import ConvolutionBlock
from keras_kfac.blocks.registry import register_block_type


@register_block_type
class ConvTransposeBlock(ConvolutionBlock):
    """Kernel (k…, c_out, c_in) and bias of a Conv1DTranspose, Conv2DTranspose or Conv3DTranspose.

    Any strides, dilation rates (which TensorFlow's CPU kernels refuse, but XLA
    runs), ``"valid"``/``"same"`` padding and ``output_padding``.

    Args:
        layer: the transposed convolution layer (``channels_last``).
    """

    layer_types = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    kind = "conv_transpose"

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        # (front, back) padding of the spread input per axis; e is the size of a one-element input's output, less one.
        one_element_output = layer.compute_output_shape((1,) * (layer.rank + 2))[1:-1]
        self._pads: list[tuple[int, int]] = []
        for size, dilation, outputs in zip(layer.kernel_size, layer.dilation_rate, one_element_output):
            span, e = (size - 1) * dilation + 1, outputs - 1
            front = max(span - 1 - e, 0) // 2 if layer.padding == "same" else 0
            self._pads.append((span - 1 - front, e + front))

    @property
    def _spatial_axes(self) -> list[int]:
        """The kernel's spatial axes."""
        return list(range(self.layer.rank))

    @property
    def kernel_matrix_rows(self) -> int:
        """Kernel positions × input channels: the length of a patch."""
        return math.prod(self.layer.kernel_size) * int(self.kernel.shape[-1])

    @property
    def output_dim(self) -> int:
        """dim G: the layer's filters (the kernel's second-to-last axis)."""
        return int(self.kernel.shape[-2])

    def _spread(self, inputs: tf.Tensor) -> tf.Tensor:
        """The input with stride − 1 zeros between neighbours, padded as the equivalent convolution's.

        Args:
            inputs: one call's input, shape (batch, spatial…, c_in).

        Returns:
            The spread, padded input, (batch, spatial…, c_in).
        """
        strides, spread = self.layer.strides, inputs
        sizes = [tf.shape(inputs)[1 + axis] for axis in self._spatial_axes]
        for axis, stride in zip(self._spatial_axes, strides):
            # Each element followed by stride − 1 zeros along the axis.
            spread = tf.stack([spread] + [tf.zeros_like(spread)] * (stride - 1), axis=axis + 2)
            shape = tf.shape(spread)
            spread = tf.reshape(spread, tf.concat([shape[: axis + 1], [-1], shape[axis + 3 :]], axis=0))
        # The last element's stride − 1 zeros count towards the padding behind it (or are cut off).
        spread = tf.pad(spread, [[0, 0], *[[a, max(b - s + 1, 0)] for (a, b), s in zip(self._pads, strides)], [0, 0]])
        ends = [(n - 1) * s + 1 + a + b for n, s, (a, b) in zip(sizes, strides, self._pads)]
        return spread[(slice(None), *[slice(0, end) for end in ends])]

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Patches of the spread, padded input, in (k…, c_in) row-major order of the flipped kernel.

        Args:
            inputs: one call's input, shape (batch, spatial…, c_in).

        Returns:
            A tensor of shape (batch × output locations, ``kernel_matrix_rows``).
        """
        spread = self._spread(inputs)
        # A 1-D or 2-D input is a volume with unit leading spatial axes.
        lift = 3 - self.layer.rank
        volume = spread[(slice(None),) + (tf.newaxis,) * lift]
        sizes = (1,) * lift + tuple(self.layer.kernel_size)
        rates = (1,) * lift + tuple(self.layer.dilation_rate)
        return volume_patches(volume, sizes, (1, 1, 1), rates, "VALID")

    def gradient_matrix(self, gradients: list[tf.Tensor]) -> tf.Tensor:
        """∇W̄: the kernel gradient flipped and as (k…, c_in) × c_out, the bias gradient last.

        Args:
            gradients: the gradients of ``variables``: kernel first, then bias.

        Returns:
            A float32 matrix of shape (``input_dim``, ``output_dim``).
        """
        rank = self.layer.rank
        kernel_grad = tf.reverse(tf.cast(gradients[0], tf.float32), self._spatial_axes)
        kernel_grad = tf.transpose(kernel_grad, [*self._spatial_axes, rank + 1, rank])
        return super().gradient_matrix([kernel_grad, *gradients[1:]])

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of ``gradient_matrix``: the kernel unflipped with its channel axes restored.

        Args:
            matrix: a tensor of shape (``input_dim``, ``output_dim``).

        Returns:
            One tensor per variable of ``variables``, shaped like it.
        """
        rank = self.layer.rank
        *spatial, filters, channels = self.kernel.shape
        kernel = tf.reshape(matrix[: self.kernel_matrix_rows], [*spatial, channels, filters])
        kernel = tf.reverse(tf.transpose(kernel, [*self._spatial_axes, rank + 1, rank]), self._spatial_axes)
        return [kernel] + ([matrix[self.kernel_matrix_rows]] if self.has_bias else [])
