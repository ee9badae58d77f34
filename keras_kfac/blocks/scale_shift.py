"""Scale-and-shift block: a normalization layer's γ and β, one 2×2 block per unit [KFAC §3].

A normalization layer computes y = γ ⊙ x̂ + β, x̂ its normalized input, with one
γ_u and β_u per unit u (a channel, or a feature of the normalized axes). The
weights (γ_u, β_u) of unit u act like a Dense layer with one input x̂_u, a
homogeneous 1 and one output, applied at every location the unit covers. Its
Fisher block is approximated per unit as ``Ā_u ⊗ G_u``, with
Ā_u = E[(x̂_u, 1)(x̂_u, 1)ᵀ] (2×2) over the rows (examples × locations) and
G_u = (1/B) Σ ĝ_u² (1×1): a full 2×2 block over (γ_u, β_u), block-diagonal
across units. The normalized input is read off the recorded output,
x̂ = (y − β)/γ, which holds whatever statistics the layer normalized with
(batch statistics in training, moving averages, masks); a unit whose γ_u is 0
gets x̂_u = 0.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from keras_kfac.blocks.channelwise import ChannelwiseBlock
from keras_kfac.blocks.registry import register_block_type


def _scale(layer: keras.layers.Layer):
    """The layer's scale variable γ (``scale`` for RMSNormalization), or None."""
    scale = layer.scale if isinstance(layer, keras.layers.RMSNormalization) else getattr(layer, "gamma", None)
    return scale if isinstance(scale, keras.Variable) else None


@register_block_type
class ScaleShiftBlock(ChannelwiseBlock):
    """γ and β of a BatchNormalization, LayerNormalization, GroupNormalization or RMSNormalization layer.

    Not taken by automatic registration yet: on the zoo's ResNet (seed 0, 400
    steps) BatchNormalization layers in blocks were no better than their Adam
    fallback (BENCHMARKS.md); opt in with
    ``collection.auto_register_types += keras_kfac.blocks.ScaleShiftBlock.layer_types``.

    Args:
        layer: the normalization layer, with a scale, a shift or both.
    """

    layer_types = (
        keras.layers.BatchNormalization,
        keras.layers.LayerNormalization,
        keras.layers.GroupNormalization,
        keras.layers.RMSNormalization,
    )
    kind = "scale_shift"
    auto_register = False

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        if layer.built and _scale(layer) is None and getattr(layer, "beta", None) is None:
            raise ValueError(f"Layer '{layer.name}' has neither a scale nor a shift for KFAC to precondition.")

    @property
    def kernel(self) -> keras.Variable | None:
        """γ, or None when the layer has no scale."""
        return _scale(self.layer)

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a shift β."""
        return getattr(self.layer, "beta", None) is not None

    @property
    def variables(self) -> list:
        """γ then β, those the layer has."""
        return [v for v in (self.kernel, getattr(self.layer, "beta", None)) if v is not None]

    @property
    def channels(self) -> int:
        """The number of units: the size of γ (or β)."""
        return math.prod(self.variables[0].shape)

    @property
    def input_dim(self) -> int:
        """dim Ā_u: 2 for (x̂_u, 1), 1 with only a scale or only a shift."""
        return len(self.variables)

    @property
    def output_dim(self) -> int:
        """dim G_u: 1."""
        return 1

    def _unit_axes(self, rank: int) -> list[int]:
        """The axes of the layer's input that index its units, as non-negative ints."""
        axes = self.layer.axis if isinstance(self.layer.axis, (list, tuple)) else [self.layer.axis]
        return sorted(a % rank for a in axes)

    def _by_unit(self, tensor: tf.Tensor) -> tf.Tensor:
        """``tensor`` (shaped like the layer's output) as rows (examples × locations, units)."""
        rank = tensor.shape.rank
        units = self._unit_axes(rank)
        others = [a for a in range(rank) if a not in units]
        return tf.reshape(tf.transpose(tf.cast(tensor, tf.float32), others + units), [-1, self.channels])

    def row_source(self, call) -> tf.Tensor:
        """The layer's output y, from which x̂ = (y − β)/γ is read.

        Args:
            call: one recorded call of the layer.

        Returns:
            Its output.
        """
        return call.preactivation

    def input_patches(self, outputs: tf.Tensor) -> tf.Tensor:
        """x̂_u at every row, from the layer's output: (y − β)/γ (0 where γ_u = 0).

        Args:
            outputs: one call's output y.

        Returns:
            A tensor of shape (rows, units, 1), or (rows, units, 0) without a scale.
        """
        y = self._by_unit(outputs)
        if self.kernel is None:
            return y[:, :, :0]
        if self.has_bias:
            y = y - tf.reshape(tf.cast(self.layer.beta, tf.float32), [1, -1])
        return tf.math.divide_no_nan(y, tf.reshape(tf.cast(self.kernel, tf.float32), [1, -1]))[:, :, None]

    def output_rows(self, output_gradient: tf.Tensor) -> tf.Tensor:
        """ĝ_u rows: the vector back-propagated to y at each row, by unit.

        Args:
            output_gradient: a vector back-propagated to one call's output, shaped like it.

        Returns:
            A float32 tensor of shape (rows, units, 1).
        """
        return self._by_unit(output_gradient)[:, :, None]

    def gradient_matrix(self, gradients: list[tf.Tensor]) -> tf.Tensor:
        """∇W̄_u = (∂γ_u, ∂β_u) of every unit, shape (units, ``input_dim``, 1).

        Args:
            gradients: the gradients of ``variables``.

        Returns:
            The stacked per-unit gradients, float32.
        """
        return tf.stack([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients], axis=1)[:, :, None]

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of ``gradient_matrix``: γ- and β-shaped tensors.

        Args:
            matrix: a tensor of shape (units, ``input_dim``, 1).

        Returns:
            One tensor per variable of ``variables``, shaped like it.
        """
        return [tf.reshape(matrix[:, i, 0], v.shape) for i, v in enumerate(self.variables)]
