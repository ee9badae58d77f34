"""Layer registration: which layers get Kronecker blocks, and which loss is the model's.

A ``LayerCollection`` maps layers to curvature blocks (``register(layer)``, its
shorthands ``register_dense``, ``register_conv2d``, ..., or ``auto_register``
for every served layer of a model), the block of each layer class coming from
the block registry (``blocks.registry``), and names the loss whose predictive
distribution defines the Fisher (``register_loss``; by default the loss the
model is compiled with).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import keras

from keras_kfac import capture, compat, losses
from keras_kfac.blocks import (
    ChannelwiseBlock,
    Conv1DBlock,
    Conv2DBlock,
    DenseBlock,
    EinsumDenseBlock,
    EmbeddingBlock,
    KroneckerBlock,
    registry,
)


def _curvature_label(block: KroneckerBlock) -> str:
    """The summary's name of a block: its kind and factor sizes (per channel for channel-wise blocks)."""
    sizes = f"{'diagonal ' if block.diagonal else ''}Ā {block.input_dim} G {block.output_dim}"
    if isinstance(block, ChannelwiseBlock):
        return f"{type(block).kind} {block.channels}×({sizes})"
    return f"{type(block).kind} {sizes}"


# How a registered layer's Fisher block is approximated (``LayerCollection.register``).
APPROXIMATIONS = ("kronecker", "diagonal", "fallback")


class LayerCollection:
    """The layers K-FAC preconditions and the loss whose Fisher it uses.

    Example:

    ```python
    collection = keras_kfac.LayerCollection()
    collection.register_model(model)        # optional: found in its first training step
    collection.register_conv2d(model.get_layer("conv"))
    collection.register_dense(model.get_layer("logits"))
    opt = keras_kfac.KFAC(layer_collection=collection, learning_rate=0.1)
    ```
    """

    def __init__(self) -> None:
        self._blocks: list[KroneckerBlock] = []
        self.model: keras.Model | None = None
        self._loss: losses.RegisteredLoss | None = None
        # What ``get_config`` saves: the layers registered by hand, the loss as given.
        self._by_hand = False
        self._loss_config: dict | None = None
        # Saved registrations waiting for their model (``from_config``).
        self._pending: dict | None = None
        self._auto_register_types: tuple[type, ...] | None = None
        # Layers registered with approximation="fallback": no block, and auto_register skips them.
        self._fallback: list[keras.layers.Layer] = []

    @property
    def auto_register_types(self) -> tuple[type, ...]:
        """The layer classes ``auto_register`` takes.

        By default those of every registered block type whose ``auto_register``
        is true (all but the normalization layers' ``ScaleShiftBlock``); assign
        a tuple to change it, e.g.
        ``collection.auto_register_types += keras_kfac.blocks.ScaleShiftBlock.layer_types``.
        """
        if self._auto_register_types is None:
            return tuple(t for b in registry.block_types() if b.auto_register for t in b.layer_types)
        return self._auto_register_types

    @auto_register_types.setter
    def auto_register_types(self, layer_types: tuple[type, ...]) -> None:
        self._auto_register_types = tuple(layer_types)

    @property
    def blocks(self) -> list[KroneckerBlock]:
        """The registered blocks, in registration order (a new list)."""
        return list(self._blocks)

    def block_for(self, layer: keras.layers.Layer) -> KroneckerBlock:
        """The block registered for ``layer``.

        Args:
            layer: a registered layer.

        Returns:
            Its block; KeyError when the layer is not registered.
        """
        for block in self._blocks:
            if block.layer is layer:
                return block
        raise KeyError(f"Layer '{layer.name}' is not registered.")

    def _register(self, block: KroneckerBlock) -> KroneckerBlock:
        """Adds ``block`` and the blocks of its ``companions`` (the layer's other weights)."""
        if any(b.layer is block.layer for b in self._blocks):
            raise ValueError(f"Layer '{block.layer.name}' is already registered.")
        self._blocks += [block] + [companion(block.layer) for companion in block.companions]
        return block

    def register(
        self,
        layer: keras.layers.Layer,
        block_type: type[KroneckerBlock] | None = None,
        approximation: str = "kronecker",
    ) -> KroneckerBlock | None:
        """Registers ``layer`` with a block of ``block_type``, or leaves it to the fallback rule.

        Args:
            layer: the layer whose weights the block preconditions.
            block_type: a ``KroneckerBlock`` subclass serving the layer; by
                default the registered one for its class
                (``keras_kfac.register_block_type``).
            approximation: ``"kronecker"``, the block ``Ā ⊗ G`` [KFAC §3];
                ``"diagonal"``, only the diagonals of Ā and G (a diagonal
                Fisher block, diag Ā ⊗ diag G, at the cost of elementwise
                products); or ``"fallback"``: no block, the layer's variables
                trained by the optimizer's fallback rule, and
                ``auto_register`` passes it over.

        Returns:
            The new block (the first, for a layer with several); None for ``"fallback"``.
        """
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"`approximation` must be one of {APPROXIMATIONS}; got {approximation!r}.")
        if approximation == "fallback":
            if any(b.layer is layer for b in self._blocks):
                raise ValueError(f"Layer '{layer.name}' is already registered.")
            self._fallback.append(layer)
            self._by_hand = True
            return None
        if block_type is None:
            block_type = registry.block_type_for(layer)
            if block_type is None:
                raise TypeError(
                    f"No curvature block serves layer '{layer.name}' ({type(layer).__name__}); "
                    "write one and register it with keras_kfac.register_block_type."
                )
        block = block_type(layer)
        if approximation == "diagonal":
            if isinstance(block, ChannelwiseBlock):
                raise ValueError(f"Layer '{layer.name}' has channel-wise blocks, which have no diagonal approximation.")
            block.diagonal = True
        self._register(block)
        for companion in self._blocks[self._blocks.index(block) + 1 :]:
            companion.diagonal = block.diagonal
        self._by_hand = True
        return block

    def register_dense(self, layer: keras.layers.Dense) -> KroneckerBlock:
        """Registers a Dense layer: kernel and bias form one block [KFAC §3].

        Args:
            layer: the ``keras.layers.Dense`` layer.

        Returns:
            The new block.
        """
        return self.register(layer, DenseBlock)

    def register_einsum_dense(self, layer: keras.layers.EinsumDense) -> KroneckerBlock:
        """Registers an EinsumDense layer whose kernel maps input features to output features at each position.

        Args:
            layer: the ``keras.layers.EinsumDense`` layer.

        Returns:
            The new block.
        """
        return self.register(layer, EinsumDenseBlock)

    def register_conv1d(self, layer: keras.layers.Conv1D) -> KroneckerBlock:
        """Registers a Conv1D layer as a KFC block over its output steps (Grosse & Martens 2016).

        Args:
            layer: the ``keras.layers.Conv1D`` layer.

        Returns:
            The new block.
        """
        return self.register(layer, Conv1DBlock)

    def register_conv2d(self, layer: keras.layers.Conv2D) -> KroneckerBlock:
        """Registers a Conv2D layer as a KFC block (Grosse & Martens 2016).

        Args:
            layer: the ``keras.layers.Conv2D`` layer.

        Returns:
            The new block.
        """
        return self.register(layer, Conv2DBlock)

    def register_embedding(self, layer: keras.layers.Embedding) -> KroneckerBlock:
        """Registers an Embedding layer: a Dense block on one-hot inputs, Ā diagonal [KFAC §3].

        Args:
            layer: the ``keras.layers.Embedding`` layer.

        Returns:
            The new block.
        """
        return self.register(layer, EmbeddingBlock)

    def register_loss(self, loss: Any, loss_weight: float = 1.0) -> None:
        """Sets the loss whose predictive distribution defines the Fisher.

        Args:
            loss: a Keras loss identifier whose curvature K-FAC knows: the name,
                function or ``keras.losses`` object of (sparse) categorical or
                binary cross-entropy or mean squared error. Use it for a model
                whose compiled loss is a custom function with the same curvature.
            loss_weight: the factor the loss is weighted by in the total loss.
        """
        self._loss = losses.resolve_loss(loss, weight=loss_weight)
        self._loss_config = {
            "loss": loss if isinstance(loss, str) else keras.losses.serialize(loss),
            "loss_weight": float(loss_weight),
        }

    def register_model(self, model: keras.Model) -> None:
        """Names the model whose training step K-FAC reads its loss from.

        Layers saved by ``get_config`` and waiting for their model
        (``from_config``) are registered in it now.

        Args:
            model: the ``keras.Model`` being trained.
        """
        if not isinstance(model, keras.Model):
            raise TypeError(f"Expected a keras.Model; got {model!r}.")
        self.model = model
        if self._pending is not None:
            self._restore_layers(self._pending.get("layers", []))
            self._pending = None

    def auto_register(self, model: keras.Model) -> None:
        """Registers ``model`` and every trainable layer of ``auto_register_types`` in it.

        By default Dense, EinsumDense, convolution, recurrent and Embedding
        layers and those of block types registered by the user; add
        ``keras_kfac.blocks.ScaleShiftBlock.layer_types`` to the types to take
        normalization layers too.

        Nested models are searched too. Each layer gets the registered block
        type for its class. Layers registered already are kept; layers no block
        serves, or serves in this configuration (a warning names why), are left
        to the optimizer's fallback rule (``KFAC(fallback=...)``).

        Args:
            model: the ``keras.Model`` whose layers to register.
        """
        self.register_model(model)
        layer_types = self.auto_register_types
        by_default = self._auto_register_types is None
        for layer in compat.nested_layers(model):
            if not layer.trainable or any(b.layer is layer for b in self._blocks) or layer in self._fallback:
                continue
            block_type = registry.block_type_for(layer)
            if block_type is None or not isinstance(layer, layer_types):
                continue
            if by_default and not block_type.auto_register:
                continue
            try:
                self._register(block_type(layer))
            except ValueError as error:
                warnings.warn(f"KFAC leaves a layer to the optimizer's fallback rule: {error}", stacklevel=2)

    def summary(self, print_fn: Callable[[str], None] | None = None, line_length: int = 100) -> None:
        """Prints which layer has which block and how many parameters it covers, like ``model.summary()``.

        One row per layer with trainable variables: its path, class, the block
        (its kind and the sizes of Ā and G) or the fallback rule for variables
        without one, and its trainable parameters; then the share of the model's
        trainable parameters in K-FAC blocks. Before the model is known (layers
        registered by hand, no ``register_model``) only the blocks are listed;
        layers not built yet have no variables to count.

        Args:
            print_fn: called with each line; ``print`` by default.
            line_length: the table's width in characters.
        """
        print_fn = print_fn or print
        built = [block for block in self._blocks if block.layer.built]
        in_blocks = {id(v): block for block in built for v in block.variables}
        variables = list(self.model.trainable_variables) if self.model is not None else []
        variables += [v for b in built for v in b.variables if all(v is not w for w in variables)]
        layers_by_path = {getattr(layer, "path", layer.name): layer for layer in self._model_layers()}
        # One row per block (a recurrent layer has two), and per layer for the fallback's variables.
        rows: dict[tuple[str, int], list] = {}
        for variable in variables:
            block = in_blocks.get(id(variable))
            path = block.layer.path if block is not None else variable.path.rpartition("/")[0]
            rows.setdefault((path, id(block)), [block, 0])[1] += math.prod(variable.shape)
        widths = [int(line_length * f) for f in (0.36, 0.24, 0.26)]
        widths.append(line_length - sum(widths))

        def line(cells: list[str]) -> str:
            fitted = [c if len(c) < w else c[: w - 2] + "…" for c, w in zip(cells, widths)]
            return "".join(c.ljust(w) for c, w in zip(fitted, widths)).rstrip()

        title = f'KFAC layer collection of "{self.model.name}"' if self.model is not None else "KFAC layer collection"
        print_fn(title)
        print_fn("━" * line_length)
        print_fn(line(["Layer (path)", "Class", "Curvature", "Params"]))
        print_fn("━" * line_length)
        covered = total = 0
        for (path, _), (block, count) in rows.items():
            layer = block.layer if block is not None else layers_by_path.get(path)
            kind = "fallback" if block is None else _curvature_label(block)
            print_fn(line([path, type(layer).__name__ if layer is not None else "?", kind, f"{count:,}"]))
            total += count
            covered += count if block is not None else 0
        print_fn("━" * line_length)
        if self.model is None:
            print_fn(f" Parameters in K-FAC blocks: {covered:,} (the model is not known yet: register_model)")
        else:
            share = covered / total if total else 0.0
            print_fn(f" Parameters in K-FAC blocks: {covered:,} of {total:,} trainable ({share:.1%})")
            print_fn(f" Parameters left to the fallback rule: {total - covered:,}")
        print_fn("━" * line_length)

    def get_config(self) -> dict | None:
        """What a saved KFAC needs to rebuild this collection, or None when it is all automatic.

        The layers registered by hand (or automatically, with
        ``auto_register_types`` changed) are named by their position among the
        model's layers (``compat.nested_layers`` order, which ``load_model``
        reproduces) and their name; the registered loss by its Keras
        serialization.

        Returns:
            A dict with ``"layers"`` (each a dict of ``kind``, ``index``,
            ``name`` and a non-default ``approximation``) when layers were registered by hand, and ``"loss"`` and
            ``"loss_weight"`` when a loss was registered; or None.
        """
        if self._pending is not None:
            return dict(self._pending)
        config = {}
        # Layers taken by non-default ``auto_register_types`` are saved as if by hand.
        if self._by_hand or (self._auto_register_types is not None and self._blocks):
            companions = {
                id(c) for b in self._blocks for c in self._blocks if c.layer is b.layer and type(c) in b.companions
            }
            saved = [b for b in self._blocks if id(b) not in companions]
            for block in saved:
                if registry.block_type_of_kind(type(block).kind) is not type(block):
                    raise ValueError(
                        f"Layer '{block.name}' has a {type(block).__name__}, which is not the registered block "
                        f"of kind '{type(block).kind}': register it (keras_kfac.register_block_type) to save it."
                    )
            layers = self._model_layers()
            config["layers"] = [
                {
                    "kind": type(block).kind,
                    "index": layers.index(block.layer) if block.layer in layers else None,
                    "name": block.layer.name,
                    **({"approximation": "diagonal"} if block.diagonal else {}),
                }
                for block in saved
            ] + [
                {
                    "kind": None,
                    "index": layers.index(layer) if layer in layers else None,
                    "name": layer.name,
                    "approximation": "fallback",
                }
                for layer in self._fallback
            ]
        if self._loss_config is not None:
            config.update(self._loss_config)
        return config or None

    @classmethod
    def from_config(cls, config: dict) -> LayerCollection:
        """A collection that registers the saved layers once it meets its model.

        Args:
            config: a dict from ``get_config``.

        Returns:
            The new ``LayerCollection``, its saved loss registered.
        """
        collection = cls()
        if "loss" in config:
            collection.register_loss(keras.losses.get(config["loss"]), config.get("loss_weight", 1.0))
        collection._pending = dict(config)
        return collection

    def _model_layers(self) -> list:
        if self.model is None:
            return []
        return compat.nested_layers(self.model)

    def _restore_layers(self, saved: list[dict]) -> None:
        """Registers the saved layers of ``get_config`` in ``self.model``, in their order."""
        layers = self._model_layers()
        for entry in saved:
            index, name = entry.get("index"), entry["name"]
            if index is not None and index < len(layers) and layers[index].name == name:
                layer = layers[index]
            else:
                matches = [layer for layer in layers if layer.name == name]
                if len(matches) != 1:
                    raise ValueError(
                        f"The saved KFAC registered layer '{name}', which the model "
                        f"'{self.model.name}' does not have (once)."
                    )
                layer = matches[0]
            kind = entry["kind"]
            block_type = None if kind is None else registry.block_type_of_kind(kind)
            self.register(layer, block_type, entry.get("approximation", "kronecker"))

    def _find_model(self) -> None:
        """Registers the model being trained by a KFAC that holds this collection, once met."""
        if self.model is not None:
            return
        model = capture.calling_model(lambda optimizer: getattr(optimizer, "layer_collection", None) is self)
        if model is not None:
            self.register_model(model)
            self.prepare()

    def loss(self) -> losses.RegisteredLoss:
        """The registered loss, or the one the model was compiled with.

        Returns:
            A ``losses.RegisteredLoss``; ValueError when there is neither a
            registered loss nor a model.
        """
        if self._loss is not None:
            return self._loss
        if self.model is None:
            raise ValueError(
                "KFAC needs the model to read its compiled loss: pass `model=` to "
                "KFAC or call `layer_collection.register_model(model)`."
            )
        return losses.resolve_compiled_loss(self.model)

    def prepare(self) -> None:
        """Registers the model's layers if none are, and hooks what must record.

        Idempotent; runs when the optimizer is created and at each call of the
        model, so layers a subclassed model creates late are found too. Layers
        registered by hand without ``register_model`` look for their model at
        each call until they meet it in its training step, before its loss.
        """
        if self.model is None:
            for block in self._blocks:
                capture.hook_layer(block.layer, before_call=self._find_model)
            return
        if not self._blocks:
            self.auto_register(self.model)
        capture.hook_model(self.model, self.prepare)
        for block in self._blocks:
            capture.hook_layer(block.layer)
