"""Recording the tensors of the traced training step that K-FAC's statistics need.

With the TensorFlow backend, Keras traces the forward pass, the loss and
``optimizer.apply`` into one graph. The hooks here record, while that graph is
traced, each registered layer's input ā and pre-activation s [KFAC §3] and the
loss's ``y``, ``y_pred`` and ``sample_weight``. The optimizer then takes the
records of the graph it is itself being traced into, so tensors of one trace
never leak into another (a retrace, ``evaluate``, ``predict``), and calls outside
training never reach the statistics: only the training step calls the optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import compat, replicas


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a registered layer: its input and its pre-activation output.

    Attributes:
        inputs: the first argument the layer was called with (ā's source).
        preactivation: its output s, before the activation.
        initial_state: the ``initial_state`` argument of a recurrent layer's call, or None.
        mask: the ``mask`` argument of the call, or None.
    """

    inputs: tf.Tensor
    preactivation: tf.Tensor
    initial_state: Any = None
    mask: Any = None


@dataclasses.dataclass(frozen=True)
class LossCall:
    """One evaluation of the compiled loss in a training step.

    Attributes:
        x: the model inputs passed to ``compute_loss`` (None when not passed).
        y_true: the targets.
        y_pred: the model's predictions.
        sample_weight: the sample weights, or None.
        loss: the loss ``compute_loss`` returned.
    """

    x: Any
    y_true: Any
    y_pred: Any
    sample_weight: Any
    loss: tf.Tensor


def _graph_of(tensor: Any) -> tf.Graph | None:
    """The graph a symbolic TF tensor lives in; None for eager or Keras tensors."""
    if compat.is_symbolic(tensor):
        return tensor.graph
    return None


class Recorder:
    """Per-graph store of recorded calls, keyed by the object that made them.

    Under a ``tf.distribute`` strategy the replicas trace their steps into one
    graph, so records are also keyed by the replica that made them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_graph: weakref.WeakKeyDictionary[tf.Graph, dict[tuple[int, int], list]] = weakref.WeakKeyDictionary()

    def record(self, owner: object, graph: tf.Graph, call: object) -> None:
        """Adds ``call`` to ``graph``'s records, dropping those of unrelated graphs.

        Records of a graph that is neither ``graph`` nor one it is nested in can
        never be taken any more (that trace is over): keeping them would keep the
        graph alive.

        Args:
            owner: the layer or model that made the call.
            graph: the graph the call's tensors live in.
            call: the record, e.g. a ``LayerCall`` or ``LossCall``.
        """
        live = set()
        enclosing = graph
        while enclosing is not None:
            live.add(enclosing)
            enclosing = getattr(enclosing, "outer_graph", None)
        with self._lock:
            for stale in [g for g in self._by_graph if g not in live]:
                del self._by_graph[stale]
            calls = self._by_graph.setdefault(graph, {})
            calls.setdefault((replicas.index(), id(owner)), []).append(call)

    def pop(self, owner: object) -> list:
        """Removes and returns ``owner``'s calls recorded in the current graph.

        When the current graph is a branch nested in the step's graph (a
        ``LossScaleOptimizer`` applies the update inside a ``cond``), the
        records of the nearest enclosing graph that has some are taken.

        Args:
            owner: the layer or model whose calls to take.

        Returns:
            The calls recorded by ``owner`` in this replica, in call order; an
            empty list when there are none.
        """
        graph = tf.compat.v1.get_default_graph()
        key = (replicas.index(), id(owner))
        with self._lock:
            while graph is not None:
                calls = self._by_graph.get(graph, {})
                if key in calls:
                    return calls.pop(key)
                graph = getattr(graph, "outer_graph", None)
        return []


RECORDER = Recorder()


def hook_layer(layer: keras.layers.Layer, before_call: Callable[[], None] | None = None) -> None:
    """Makes ``layer`` record (input, pre-activation) each time it is traced.

    The layer's activation is split off its ``call``: the wrapped call runs the
    original one with the activation switched off, records the pre-activation s,
    then applies the activation. The layer's configuration is untouched. A
    layer without an activation (``Embedding``) records its output.
    Hooking a layer a second time does nothing.

    Args:
        layer: the layer to hook.
        before_call: a function run first at each call, or None.
    """
    if getattr(layer, "_kfac_hooked", False):
        return
    original_call = layer.call
    signature = inspect.signature(original_call)
    # A recurrent layer's ``activation`` is a read-only view of its cell's, applied inside the cell.
    has_activation = hasattr(layer, "activation") and not isinstance(getattr(type(layer), "activation", None), property)

    @functools.wraps(original_call)
    def call(inputs, *args, **kwargs):
        if before_call is not None:
            before_call()
        activation = layer.activation if has_activation else None
        if has_activation:
            compat.set_untracked(layer, "activation", None)
        try:
            preactivation = original_call(inputs, *args, **kwargs)
        finally:
            if has_activation:
                compat.set_untracked(layer, "activation", activation)
        graph = _graph_of(preactivation)
        if graph is not None:
            arguments = signature.bind_partial(inputs, *args, **kwargs).arguments
            call_record = LayerCall(inputs, preactivation, arguments.get("initial_state"), arguments.get("mask"))
            RECORDER.record(layer, graph, call_record)
        return preactivation if activation is None else activation(preactivation)

    compat.set_untracked(layer, "call", call)
    compat.set_untracked(layer, "_kfac_hooked", True)


def calling_model(trains: Callable[[keras.optimizers.Optimizer], bool]) -> keras.Model | None:
    """The model whose code is running now and whose optimizer ``trains`` accepts.

    Keras calls an optimizer, and a model's layers, from the model's own
    methods (``fit``'s training step, ``compile_from_config``): the model is
    the ``self`` of a calling frame. Its optimizer may be wrapped in a
    ``LossScaleOptimizer``; nested models, which have no optimizer, are passed
    over.

    Args:
        trains: tells whether an optimizer (or the inner optimizer of a
            ``LossScaleOptimizer``) is the one looked for.

    Returns:
        The innermost calling model whose optimizer ``trains`` accepts, or None.
    """
    for owner in compat.calling_objects():
        if isinstance(owner, keras.Model):
            optimizer = getattr(owner, "optimizer", None)
            for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
                if candidate is not None and trains(candidate):
                    return owner
    return None


def hook_model(model: keras.Model, before_forward: Callable[[], None]) -> None:
    """Makes ``model`` record its training loss's inputs, and prepare its layers.

    ``before_forward`` runs at the start of every call of the model, before its
    layers run: an optimizer that meets its model inside the first traced step
    (a KFAC restored by ``load_model``, a model whose layers are built only by
    that step) does so after the forward pass, too late to hook the layers of
    that step.

    The loss is recorded where it is computed, ``model.compute_loss``: Keras's
    ``train_step`` reaches it through ``_compute_loss``, and a custom
    ``train_step`` calls it directly (the pattern of Keras's guide to
    customizing ``fit``). Wrapping it on the instance reaches subclassed
    models that override it too; calls with ``training=False`` (``evaluate``)
    are not recorded. The optimizer is built before the training function is
    made (``build_optimizer_before_tracing``). Hooking a model a second time
    does nothing.

    Args:
        model: the model to hook.
        before_forward: a function run at the start of every call of the model.
    """
    if getattr(model, "_kfac_hooked", False):
        return
    original_call = model.call
    original_compute_loss = model.compute_loss
    original_make_train_function = model.make_train_function
    signature = inspect.signature(original_compute_loss)
    # Keras passes (x, y, y_pred, sample_weight) by position, whatever an
    # override names them.
    names = list(signature.parameters)[:4]

    @functools.wraps(original_call)
    def call(*args, **kwargs):
        before_forward()
        return original_call(*args, **kwargs)

    @functools.wraps(original_compute_loss)
    def compute_loss(*args, **kwargs):
        loss = original_compute_loss(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        graph = _graph_of(loss)
        if arguments.get("training", True) and graph is not None:
            x, y, y_pred, sample_weight = (arguments.get(name) for name in names)
            RECORDER.record(model, graph, LossCall(x, y, y_pred, sample_weight, loss))
        return loss

    @functools.wraps(original_make_train_function)
    def make_train_function(*args, **kwargs):
        build_optimizer_before_tracing(model)
        return original_make_train_function(*args, **kwargs)

    compat.set_untracked(model, "call", call)
    compat.set_untracked(model, "compute_loss", compute_loss)
    compat.set_untracked(model, "make_train_function", make_train_function)
    compat.set_untracked(model, "_kfac_compute_loss", original_compute_loss)
    compat.set_untracked(model, "_kfac_hooked", True)


def build_optimizer_before_tracing(model: keras.Model) -> None:
    """Builds the model's compiled optimizer on its trainable variables, once every layer is built.

    Without a distribution strategy Keras builds the optimizer inside the
    first traced training step; variables created there make ``tf.function``
    trace the step a second time, and K-FAC's step is a large graph. Built
    here, before ``fit`` or ``train_on_batch`` makes its training function,
    the step is traced once. This is what Keras does itself under a strategy
    (``_maybe_symbolic_build``), with the same test of the model's layers;
    an optimizer built already, or a layer that only the step builds, leaves
    it to Keras.

    Args:
        model: the model about to make its training function.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not compat.every_layer_built(model):
        return
    with model.distribute_strategy.scope():
        optimizer.build(model.trainable_variables)


def training_loss(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> tf.Tensor:
    """The model's training loss, as ``compute_loss`` computes it, without recording it.

    Args:
        model: the model, hooked or not.
        x: the model inputs.
        y: the targets.
        y_pred: the model's predictions.
        sample_weight: the sample weights, or None.

    Returns:
        The loss ``compute_loss`` returns (with ``training=True`` where it takes that argument).
    """
    compute = getattr(model, "_kfac_compute_loss", model.compute_loss)
    if "training" in inspect.signature(compute).parameters:
        return compute(x, y, y_pred, sample_weight, training=True)
    return compute(x, y, y_pred, sample_weight)
