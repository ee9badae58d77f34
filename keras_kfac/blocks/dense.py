"""Dense block: ``s = ā W̄`` with ā the layer input plus a constant 1 [KFAC §3]."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.registry import register_block_type


@register_block_type
class DenseBlock(KroneckerBlock):
    """Kernel and bias of a ``keras.layers.Dense`` as one Kronecker block.

    Inputs of rank above 2, e.g. (batch, time, features), contribute one row per
    leading position, like the locations of a convolution (K-FAC-expand), or
    with ``weight_sharing="reduce"`` one row per example (K-FAC-reduce).

    Args:
        layer: the Dense layer.
    """

    layer_types = (keras.layers.Dense,)
    kind = "dense"
    rows_are_positions = True
    reduces_locations_by_default = False

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """The input's leading positions as rows.

        Args:
            inputs: one call's input, shape (batch, ..., input features).

        Returns:
            A tensor of shape (batch × leading positions, input features).
        """
        return tf.reshape(inputs, [-1, self.kernel_matrix_rows])
