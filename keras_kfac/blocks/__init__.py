"""Curvature blocks, one module per layer kind, and the registry of which serves which layer."""

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.channelwise import ChannelwiseBlock
from keras_kfac.blocks.conv1d import Conv1DBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.conv3d import Conv3DBlock
from keras_kfac.blocks.conv_transpose import ConvTransposeBlock
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.depthwise_conv2d import DepthwiseConv2DBlock
from keras_kfac.blocks.einsum_dense import EinsumDenseBlock
from keras_kfac.blocks.embedding import EmbeddingBlock
from keras_kfac.blocks.recurrent import RecurrentInputBlock, RecurrentKernelBlock
from keras_kfac.blocks.registry import block_type_for, block_types, register_block_type
from keras_kfac.blocks.scale_shift import ScaleShiftBlock
from keras_kfac.blocks.separable_conv2d import SeparableDepthwiseBlock, SeparablePointwiseBlock

__all__ = [
    "ChannelwiseBlock",
    "Conv1DBlock",
    "Conv2DBlock",
    "Conv3DBlock",
    "ConvTransposeBlock",
    "DenseBlock",
    "DepthwiseConv2DBlock",
    "EinsumDenseBlock",
    "EmbeddingBlock",
    "KroneckerBlock",
    "RecurrentInputBlock",
    "RecurrentKernelBlock",
    "ScaleShiftBlock",
    "SeparableDepthwiseBlock",
    "SeparablePointwiseBlock",
    "block_type_for",
    "block_types",
    "register_block_type",
]
