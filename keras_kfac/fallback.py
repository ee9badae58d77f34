"""The first-order rule for trainable variables that have no curvature block.

K-FAC preconditions the variables of registered layers. Every other trainable
variable (normalization scales unless opted in, layers K-FAC does not know)
has no Fisher block, so a preconditioned step says nothing about its scale. By
default such variables are trained by Keras' Adam with its own learning rate,
as Keras' ``Muon`` trains the variables it does not orthogonalise with AdamW.
``fallback="momentum"`` keeps them inside K-FAC's own update instead: their
proposal is the plain gradient, Δ = −∇h, scaled by K-FAC's α and μ.
"""

from __future__ import annotations

import copy
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import compat

MOMENTUM = "momentum"


def resolve(fallback: Any) -> keras.optimizers.Optimizer | None:
    """The fallback optimizer for ``fallback``, or None for the momentum step.

    Args:
        fallback: None (Keras' ``Adam()`` with its defaults), ``"momentum"``,
            a ``keras.optimizers.Optimizer``, the name Keras knows one by
            (``"adamw"``, ...) or its serialized configuration.

    Returns:
        A fresh or the given optimizer, or None for ``"momentum"``.
    """
    if fallback is None:
        return keras.optimizers.Adam()
    if fallback == MOMENTUM:
        return None
    if isinstance(fallback, (str, dict)):
        fallback = keras.optimizers.get(copy.deepcopy(fallback))
    if not isinstance(fallback, keras.optimizers.Optimizer):
        raise TypeError(
            f"`fallback` must be a keras.optimizers.Optimizer, the name of one, or '{MOMENTUM}'; got {fallback!r}."
        )
    if isinstance(fallback, keras.optimizers.LossScaleOptimizer) or hasattr(fallback, "layer_collection"):
        raise ValueError(f"`fallback` must be a plain first-order optimizer; got {type(fallback).__name__}.")
    return fallback


def config(optimizer: keras.optimizers.Optimizer | None) -> Any:
    """What ``resolve`` rebuilds ``optimizer`` from.

    Args:
        optimizer: a fallback optimizer, or None for the momentum step.

    Returns:
        The optimizer's Keras serialization, or ``"momentum"`` for None.
    """
    return MOMENTUM if optimizer is None else keras.saving.serialize_keras_object(optimizer)


def apply(optimizer: keras.optimizers.Optimizer, grads: list, variables: list, accept: tf.Tensor) -> None:
    """One step of ``optimizer`` on ``variables``, kept only where ``accept`` is true.

    The gradients are the global batch's already (K-FAC all-reduced them), so
    the optimizer's own ``apply``, which would all-reduce them again under a
    ``tf.distribute`` strategy, is bypassed: its clipping, decoupled weight
    decay and per-variable ``update_step`` run here, and its step counter
    advances as ``apply`` advances it. A rejected step (a non-finite
    gradient) is undone by restoring the variables and the optimizer's state,
    not skipped in a ``tf.cond``: a strategy cannot synchronise its step
    counter inside a branch.

    Args:
        optimizer: the fallback optimizer, built on ``variables``.
        grads: the global batch's gradients, one per variable.
        variables: the variables without a curvature block.
        accept: a scalar bool tensor; when false the step is undone.
    """
    state = list(variables) + list(optimizer.variables)
    saved = [tf.identity(v) for v in state]
    learning_rate = optimizer.learning_rate
    grads = compat.clip_gradients(optimizer, grads)
    compat.apply_weight_decay(optimizer, variables)
    for gradient, variable in zip(grads, variables):
        optimizer.update_step(gradient, variable, learning_rate)
    optimizer.iterations.assign_add(1)
    for variable, value in zip(state, saved):
        variable.assign(tf.where(accept, variable, value))
