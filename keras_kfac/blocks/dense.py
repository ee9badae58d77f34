"""Dense block: ``s = ā W̄`` with ā the layer input plus a constant 1 [KFAC §3]."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.base import KroneckerBlock


class DenseBlock(KroneckerBlock):
    """Kernel and bias of a ``keras.layers.Dense`` as one Kronecker block.

    Inputs of rank above 2, e.g. (batch, time, features), contribute one row per
    leading position, like the locations of a convolution.
    """

    def __init__(self, layer: keras.layers.Layer):
        if not isinstance(layer, keras.layers.Dense):
            raise TypeError(f"register_dense takes a keras.layers.Dense; got {layer!r}.")
        super().__init__(layer)

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.reshape(inputs, [-1, self.kernel_matrix_rows])
