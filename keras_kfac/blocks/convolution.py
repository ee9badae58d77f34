"""Checks shared by the convolution blocks (KFC, Grosse & Martens 2016)."""

from __future__ import annotations

import keras

from keras_kfac.blocks.base import KroneckerBlock


class ConvolutionBlock(KroneckerBlock):
    """A block whose rows are the input patches at the output locations [KFC §3.1].

    Only ``channels_last`` convolutions with ``groups=1`` have a single
    Kronecker-factored block.

    Args:
        layer: the convolution layer; other data formats or groups raise ValueError.
    """

    rows_are_patch_locations = True

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        kind = type(layer).__name__
        if layer.data_format != "channels_last":
            raise ValueError(
                f"{kind} layer '{layer.name}' uses data_format='{layer.data_format}'; "
                "KFAC supports channels_last convolutions only."
            )
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"{kind} layer '{layer.name}' has groups={layer.groups}; KFAC supports groups=1 only.")
