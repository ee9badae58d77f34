"""The block registry: which curvature block serves which layer class.

Every block class declares the layer classes it serves (``layer_types``) and its
name in saved configurations (``kind``); ``register_block_type`` puts it in the
registry, which ``LayerCollection`` reads for automatic registration, for
``register(layer)`` and to restore saved registrations. A layer is served by
the block whose layer class comes first in the layer's method resolution
order, so a block for a subclass of ``Dense`` takes precedence over the Dense
block for it.

A block for a layer class of your own is a ``KroneckerBlock`` subclass that
says how the layer's input becomes rows ā [KFAC §3]. The layer takes its
input as the first argument of ``call`` and returns its pre-activation s, or
applies its nonlinearity through an ``activation`` attribute (K-FAC sets it to
None while recording s); its weights are ``kernel`` and, if any, ``bias``
(override the block's ``kernel`` and ``has_bias`` otherwise):

```python
@keras_kfac.register_block_type
class MyBlock(keras_kfac.blocks.KroneckerBlock):
    layer_types = (MyLayer,)
    kind = "my_layer"

    def input_patches(self, inputs):
        return tf.reshape(inputs, [-1, self.kernel_matrix_rows])
```
"""

from __future__ import annotations

import keras

from keras_kfac.blocks.base import KroneckerBlock

_REGISTRY: list[type[KroneckerBlock]] = []


def register_block_type(block_type: type[KroneckerBlock]) -> type[KroneckerBlock]:
    """Makes ``block_type`` serve its ``layer_types`` in every ``LayerCollection``.

    Usable as a class decorator. Registering a class of the same module and
    name again (a reloaded module) replaces the earlier one; another class
    with a ``kind`` already taken is refused.

    Args:
        block_type: a ``KroneckerBlock`` subclass declaring its own non-empty
            ``layer_types`` (Keras layer classes) and ``kind`` (a name unique
            among blocks; not inherited, so that a subclass of a built-in
            block never takes its place).

    Returns:
        ``block_type``.
    """
    if not (isinstance(block_type, type) and issubclass(block_type, KroneckerBlock)):
        raise TypeError(f"register_block_type takes a KroneckerBlock subclass; got {block_type!r}.")
    layer_types = block_type.layer_types
    if not layer_types or not all(isinstance(t, type) and issubclass(t, keras.layers.Layer) for t in layer_types):
        raise ValueError(
            f"{block_type.__name__}.layer_types must name the Keras layer classes it serves; got {layer_types!r}."
        )
    kind = block_type.__dict__.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{block_type.__name__} must declare its own kind: a non-empty name for saved configurations.")
    for registered in _REGISTRY:
        same_class = (registered.__module__, registered.__qualname__) == (
            block_type.__module__,
            block_type.__qualname__,
        )
        if registered.kind == kind and not same_class:
            raise ValueError(f"The block kind '{kind}' is taken by {registered.__qualname__}; choose another kind.")
    _REGISTRY[:] = [b for b in _REGISTRY if b.kind != kind]
    _REGISTRY.append(block_type)
    return block_type


def block_types() -> tuple[type[KroneckerBlock], ...]:
    """The registered block types.

    Returns:
        A tuple of ``KroneckerBlock`` subclasses, in registration order.
    """
    return tuple(_REGISTRY)


def block_type_for(layer: keras.layers.Layer) -> type[KroneckerBlock] | None:
    """The block type serving ``layer``: the nearest of its classes that one serves.

    Args:
        layer: a Keras layer.

    Returns:
        The registered block type for the first class in ``layer``'s method
        resolution order that one serves (the latest registered among ties),
        or None when no block serves it.
    """
    for layer_class in type(layer).__mro__:
        for block_type in reversed(_REGISTRY):
            if layer_class in block_type.layer_types:
                return block_type
    return None


def block_type_of_kind(kind: str) -> type[KroneckerBlock]:
    """The registered block type named ``kind`` in saved configurations.

    Args:
        kind: a block's ``kind``.

    Returns:
        The registered ``KroneckerBlock`` subclass of that kind; ValueError when none is.
    """
    for block_type in _REGISTRY:
        if block_type.kind == kind:
            return block_type
    raise ValueError(
        f"No block type '{kind}' is registered; register it (keras_kfac.register_block_type) "
        "before loading the optimizer that used it."
    )
