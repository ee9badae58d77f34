"""keras_kfac: the K-FAC optimizer (Martens & Grosse 2015) for Keras 3 on TensorFlow."""

try:
    import tensorflow  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keras_kfac needs TensorFlow: `pip install tensorflow` (GPU) or `pip install tensorflow-cpu`."
    ) from error

import keras

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    raise ImportError(
        "keras_kfac runs on Keras's TensorFlow backend; set KERAS_BACKEND=tensorflow "
        f"(the current backend is {keras.backend.backend()!r})."
    )

from keras_kfac import blocks, callbacks, growing_batches
from keras_kfac.blocks import register_block_type
from keras_kfac.callbacks import KFACMonitor
from keras_kfac.growing_batches import GrowingBatches
from keras_kfac.optimizer import KFAC
from keras_kfac.registration import LayerCollection

__version__ = "0.1.0"
__all__ = [
    "KFAC",
    "LayerCollection",
    "KFACMonitor",
    "GrowingBatches",
    "blocks",
    "callbacks",
    "growing_batches",
    "register_block_type",
]
