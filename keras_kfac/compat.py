"""The Keras seam: every private Keras or TensorFlow surface keras_kfac uses.

K-FAC needs a few things Keras has no public API for: the whole update over
all variables at once, the layers nested in a model, the logits behind a
softmax output, the model whose training step is running. Each is reached
here, and only here, with why it is needed. All were checked against Keras
3.15.1 with TensorFlow 2.21.0 (``CHECKED``); ``setup.py`` admits Keras 3.15.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

CHECKED = {"keras": "3.15.1", "tensorflow": "2.21.0"}


class WholeUpdateOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer that sees every gradient of a step at once.

    Keras' public ``update_step`` is called once per variable, but a Kronecker
    block preconditions a layer's kernel and bias together and the quadratic
    model [KFAC §7] needs all of them. The TensorFlow backend's
    ``_backend_update_step`` receives the whole list inside the traced step
    (after ``apply`` has cast, scaled and, under a strategy, placed them);
    subclasses implement ``update_all`` instead. The constructor takes the
    arguments of ``keras.optimizers.Optimizer``.
    """

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        self.update_all(grads, trainable_variables, learning_rate)

    def update_all(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        """Updates every trainable variable at once; subclasses implement it.

        Args:
            grads: the step's gradients, one per variable.
            trainable_variables: the variables to update.
            learning_rate: the current learning rate.
        """
        raise NotImplementedError

    def variable_key(self, variable: Any) -> str:
        """The key Keras' optimizers index per-variable state by (``_var_key``).

        K-FAC keeps its velocities and finds a block's gradients by the same
        key, so that a strategy's or a ``LossScaleOptimizer``'s wrapper of a
        variable maps to the variable's state.

        Args:
            variable: a model variable, or a wrapper of one.

        Returns:
            The variable's key, a string.
        """
        return self._var_key(variable)


def clip_gradients(optimizer: keras.optimizers.Optimizer, grads: list) -> list:
    """The optimizer's own gradient clipping (``clipnorm``, ``clipvalue``, ...).

    The fallback optimizer's ``apply`` would all-reduce the gradients again
    under a strategy, so its steps are taken piece by piece (``fallback``).

    Args:
        optimizer: the optimizer whose clipping settings apply.
        grads: the gradients, one per variable.

    Returns:
        The clipped gradients, in the same order.
    """
    return optimizer._clip_gradients(grads)


def apply_weight_decay(optimizer: keras.optimizers.Optimizer, variables: list) -> None:
    """The optimizer's decoupled weight decay, as ``apply`` applies it (see ``clip_gradients``).

    Args:
        optimizer: the optimizer whose ``weight_decay`` applies.
        variables: the variables to decay, in place.
    """
    optimizer._apply_weight_decay(variables)


def nested_layers(model: keras.Model) -> list:
    """Every layer inside ``model``, nested models' layers included, in Keras' order.

    ``model.layers`` is not recursive; this order is the one ``load_model``
    rebuilds, which saved registrations rely on.

    Args:
        model: the model to search.

    Returns:
        A list of its layers, ``model`` itself excluded.
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


def inbound_nodes(layer: keras.layers.Layer) -> list:
    """The functional-graph nodes where ``layer`` was called (``_inbound_nodes``).

    The block-tridiagonal chain [KFAC §4.3] checks that consecutive blocks
    feed each other; each node's ``parent_nodes`` and ``operation`` lead back.

    Args:
        layer: a layer.

    Returns:
        The list of the layer's inbound nodes.
    """
    return list(layer._inbound_nodes)


def output_logits(y_pred: Any) -> Any:
    """The logits Keras keeps on a softmax or sigmoid output (``_keras_logits``), or None.

    The Fisher of a probability output is that of its logits; Keras attaches
    them so its cross-entropies can use them too.

    Args:
        y_pred: the model's output.

    Returns:
        The logits tensor, or None when Keras attached none.
    """
    return getattr(y_pred, "_keras_logits", None)


def output_mask(y_pred: Any) -> Any:
    """The mask a masking layer attached to the output (``_keras_mask``), or None.

    The loss ignores masked values, so the Fisher must too.

    Args:
        y_pred: the model's output.

    Returns:
        The mask tensor, or None when there is none.
    """
    return getattr(y_pred, "_keras_mask", None)


def loss_arguments(loss: keras.losses.Loss) -> dict:
    """The keyword arguments a ``LossFunctionWrapper`` passes to its function (``_fn_kwargs``).

    ``from_logits``, ``label_smoothing`` and the like change the predictive
    distribution K-FAC must use; Keras keeps them only on the wrapper.

    Args:
        loss: a ``keras.losses.Loss``.

    Returns:
        A copy of the keyword arguments, or an empty dict for a loss that keeps none.
    """
    return dict(getattr(loss, "_fn_kwargs", {}))


def compiled_loss_weights(model: keras.Model) -> Any:
    """The ``loss_weights`` given to ``compile`` (``_compile_loss._user_loss_weights``), or None.

    The Fisher of a weighted loss is weighted the same way; ``compile`` keeps
    the weights only on its loss wrapper.

    Args:
        model: a compiled model.

    Returns:
        The weights as ``compile`` received them, or None.
    """
    return getattr(getattr(model, "_compile_loss", None), "_user_loss_weights", None)


def every_layer_built(model: keras.Model) -> bool:
    """Whether ``model`` and every layer in it are built (the test of Keras's ``_symbolic_build``).

    ``model.built`` alone is not enough: ``build`` on a subclassed model
    without its own sets it and leaves the layers inside unbuilt.

    Args:
        model: a Keras model.

    Returns:
        True when all of its layers, itself included, have their variables.
    """
    return all(layer.built for layer in model._flatten_layers())


def is_symbolic(tensor: Any) -> bool:
    """Whether ``tensor`` is a graph tensor of a trace (not eager, not a Keras tensor).

    Records of the training step are kept per traced graph; TensorFlow's
    eager tensor class is public only as ``tf.__internal__.EagerTensor``.

    Args:
        tensor: any value.

    Returns:
        True for a ``tf.Tensor`` that is not eager.
    """
    return isinstance(tensor, tf.Tensor) and not isinstance(tensor, tf.__internal__.EagerTensor)


def calling_objects() -> Iterator[Any]:
    """The ``self`` of each calling Python frame, innermost first.

    A ``LayerCollection`` registered without its model finds the model whose
    ``fit`` is calling it: Keras calls layers and optimizers from the model's
    own methods, and gives them no handle on it.

    Yields:
        The ``self`` local of each frame that has one, from the caller outwards.
    """
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None:
                yield owner
            frame = frame.f_back
    finally:
        del frame


def set_untracked(obj: Any, name: str, value: Any) -> None:
    """Sets an attribute past Keras' attribute tracking (``object.__setattr__``).

    A layer's ``__setattr__`` tracks what it is given (sublayers, variables)
    and refuses changes once built; the wrapped ``call`` and the switched-off
    activation of a recording layer must be neither tracked nor saved.

    Args:
        obj: the object, e.g. a layer or model.
        name: the attribute's name.
        value: its new value.
    """
    object.__setattr__(obj, name, value)
