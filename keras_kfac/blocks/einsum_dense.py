"""EinsumDense block: a Dense layer applied at every position of its input [KFAC §3].

``keras.layers.EinsumDense`` computes s = einsum(equation, x, W) (+ b). When
each kernel axis is either contracted with the input (an input feature) or
copied to the output (an output feature), and the other axes of the input are
all kept in the output (batch, sequence or head positions), s is a Dense layer
W̄ applied at each position: ā is the input's feature axes flattened at one
position, ĝ the output's. By default each example gives one row, ā the mean
of its positions' rows and ĝ the sum of theirs (K-FAC-reduce, Eschenhagen et
al. 2023); with ``weight_sharing="expand"`` the positions count as locations,
as for a convolution.
MultiHeadAttention's query, key, value and output projections are such layers.
"""

from __future__ import annotations

import math
import re

import keras
import tensorflow as tf

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.registry import register_block_type

_EQUATION = re.compile(r"([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)")


def _expand(spec: str, rank: int) -> str:
    """``spec`` with its ellipsis replaced by one placeholder axis per elided dimension."""
    if "..." not in spec:
        return spec
    return spec.replace("...", "".join(str(i) for i in range(rank - (len(spec) - 3))))


@register_block_type
class EinsumDenseBlock(KroneckerBlock):
    """Kernel and bias of a ``keras.layers.EinsumDense`` whose kernel maps input features to output features.

    Its positions are reduced to one row per example by default (K-FAC-reduce):
    with a row per position (K-FAC-expand) and all four attention projections
    in blocks the zoo's transformer stalls at chance level (BENCHMARKS.md).

    Args:
        layer: the EinsumDense layer. Each kernel axis must be an input or an
            output feature, no input axis may be summed without the kernel, and
            a bias must span exactly the output features; ValueError otherwise.
    """

    layer_types = (keras.layers.EinsumDense,)
    kind = "einsum_dense"
    reduces_locations_by_default = True

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        match = _EQUATION.fullmatch(layer.equation.replace(" ", ""))
        if match is None:
            raise ValueError(f"Layer '{layer.name}': cannot read the EinsumDense equation {layer.equation!r}.")
        self._inputs, self._kernel_axes, self._outputs = match.groups()
        self.input_features = [a for a in self._kernel_axes if a in self._inputs]
        self.output_features = [a for a in self._kernel_axes if a in self._outputs]
        shared = set(self.input_features) & set(self.output_features)
        summed = [a for a in self._inputs.replace(".", "") if a not in self._kernel_axes and a not in self._outputs]
        if shared or summed:
            raise ValueError(
                f"Layer '{layer.name}' ({layer.equation!r}) is not a Dense layer at each position: "
                + (
                    f"kernel axes {sorted(shared)} are also positions (a separate matrix per position)"
                    if shared
                    else f"input axes {summed} are summed without the kernel"
                )
                + "."
            )
        # K-FAC-reduce averages each example's rows: it needs the example axis
        # to lead both the input's and the output's positions.
        leading = [spec[0] if not spec.startswith("...") else "..." for spec in (self._inputs, self._outputs)]
        self.rows_are_positions = leading[0] == leading[1] and leading[0] not in self._kernel_axes
        bias_axes = layer.bias_axes or ""
        if bias_axes and set(bias_axes) != set(self.output_features):
            raise ValueError(
                f"Layer '{layer.name}' has a bias over axes {bias_axes!r}, not over its output features "
                f"{''.join(self.output_features)!r}: the bias cannot be a row of W̄."
            )

    # Sizes and orders, from the kernel's shape and the equation.

    def _size(self, axis: str) -> int:
        return int(self.kernel.shape[self._kernel_axes.index(axis)])

    @property
    def kernel_matrix_rows(self) -> int:
        """The number of input features: the product of the input feature axes' sizes."""
        return math.prod(self._size(a) for a in self.input_features)

    @property
    def output_dim(self) -> int:
        """The number of output features: the product of the output feature axes' sizes."""
        return math.prod(self._size(a) for a in self.output_features)

    def _kernel_order(self) -> list[int]:
        """The kernel's axes as (input features, output features)."""
        return [self._kernel_axes.index(a) for a in self.input_features + self.output_features]

    def _bias_axes(self) -> list[str]:
        """The bias axes in the order of the bias variable (the output's)."""
        return [a for a in self._outputs if a in self.output_features]

    @staticmethod
    def _rows(tensor: tf.Tensor, spec: str, features: list[str], width: int) -> tf.Tensor:
        """``tensor`` (axes ``spec``) as rows: positions first, ``features`` flattened last."""
        spec = _expand(spec, tensor.shape.rank)
        positions = [a for a in spec if a not in features]
        order = [spec.index(a) for a in positions + features]
        if order != list(range(len(order))):
            tensor = tf.transpose(tensor, order)
        return tf.reshape(tensor, [-1, width])

    # The KroneckerBlock interface.

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """The input's feature axes flattened, one row per position.

        Args:
            inputs: one call's input, with the axes of the equation's input.

        Returns:
            A tensor of shape (positions, ``kernel_matrix_rows``).
        """
        return self._rows(inputs, self._inputs, self.input_features, self.kernel_matrix_rows)

    def output_rows(self, output_gradient: tf.Tensor) -> tf.Tensor:
        """The back-propagated vectors' output feature axes flattened, one row per position.

        Args:
            output_gradient: a vector back-propagated to one call's output s, shaped like s.

        Returns:
            A float32 tensor of shape (positions, ``output_dim``).
        """
        return self._rows(tf.cast(output_gradient, tf.float32), self._outputs, self.output_features, self.output_dim)

    def row_count(self, preactivation: tf.Tensor) -> tf.Tensor:
        """The number of positions of one call.

        Args:
            preactivation: the output s of one call.

        Returns:
            The number of rows, a scalar int32 tensor.
        """
        return tf.size(preactivation) // self.output_dim

    def gradient_matrix(self, gradients: list[tf.Tensor]) -> tf.Tensor:
        """∇W̄: the kernel gradient as (input features, output features), the bias gradient last.

        Args:
            gradients: the gradients of ``variables``: kernel first, then bias.

        Returns:
            A float32 matrix of shape (``input_dim``, ``output_dim``).
        """
        kernel_grad = tf.transpose(tf.cast(gradients[0], tf.float32), self._kernel_order())
        matrix = tf.reshape(kernel_grad, [self.kernel_matrix_rows, self.output_dim])
        if not self.has_bias:
            return matrix
        bias_grad = tf.reshape(tf.cast(gradients[1], tf.float32), [self._size(a) for a in self._bias_axes()])
        bias_order = [self._bias_axes().index(a) for a in self.output_features]
        return tf.concat([matrix, tf.reshape(tf.transpose(bias_grad, bias_order), [1, self.output_dim])], axis=0)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of ``gradient_matrix``: the kernel's and bias's axes restored.

        Args:
            matrix: a tensor of shape (``input_dim``, ``output_dim``).

        Returns:
            One tensor per variable of ``variables``, shaped like it.
        """
        order = self._kernel_order()
        ordered_shape = [int(self.kernel.shape[i]) for i in order]
        kernel = tf.reshape(matrix[: self.kernel_matrix_rows], ordered_shape)
        parts = [tf.transpose(kernel, [order.index(i) for i in range(len(order))])]
        if self.has_bias:
            bias = tf.reshape(matrix[self.kernel_matrix_rows], [self._size(a) for a in self.output_features])
            bias = tf.transpose(bias, [self.output_features.index(a) for a in self._bias_axes()])
            parts.append(tf.reshape(bias, self.layer.bias.shape))
        return parts
