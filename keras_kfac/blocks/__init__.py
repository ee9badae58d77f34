"""Curvature blocks, one module per layer kind, and the registry of which serves which layer."""

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.conv1d import Conv1DBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.einsum_dense import EinsumDenseBlock
from keras_kfac.blocks.embedding import EmbeddingBlock
from keras_kfac.blocks.registry import block_type_for, block_types, register_block_type

__all__ = [
    "Conv1DBlock",
    "Conv2DBlock",
    "DenseBlock",
    "EinsumDenseBlock",
    "EmbeddingBlock",
    "KroneckerBlock",
    "block_type_for",
    "block_types",
    "register_block_type",
]
