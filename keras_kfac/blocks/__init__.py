"""Curvature blocks, one module per layer kind."""

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.conv1d import Conv1DBlock
from keras_kfac.blocks.conv2d import Conv2DBlock
from keras_kfac.blocks.dense import DenseBlock
from keras_kfac.blocks.einsum_dense import EinsumDenseBlock
from keras_kfac.blocks.embedding import EmbeddingBlock

__all__ = ["Conv1DBlock", "Conv2DBlock", "DenseBlock", "EinsumDenseBlock", "EmbeddingBlock", "KroneckerBlock"]
