"""A Kronecker-factored curvature block for one layer's weights [KFAC §3].

A block owns a layer's kernel and bias as one matrix W̄ in *homogeneous* form: the
bias is the last row, multiplying the constant 1 appended to each input row ā.
Its Fisher block is approximated as ``Ā ⊗ G``:

    Ā = (1/N) Σ_rows ā āᵀ,        G = (1/B) Σ_rows ĝ ĝᵀ

over the rows of one batch — examples, and for convolutions and inputs of rank
above 2 also the |T| locations of each example [KFC §3] (and the several calls of
a layer used more than once, treated like more locations). N is the number of
rows and B the number of examples, so ``G`` carries the |T| factor of KFC. With
sample weights (or a mask) Ā is the weighted mean Σ w ā āᵀ / Σ w and the ĝ carry
the weights (``statistics``). Subclasses say how a layer's input becomes rows ā
and its weights become W̄.
"""

from __future__ import annotations

import abc
import re

import keras
import tensorflow as tf

from keras_kfac import curvature


def state_prefix(block: KroneckerBlock) -> str:
    """The prefix of a block's variable names: its layer's path, and its kind for a layer with several blocks."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(block.layer, "path", block.name)).lstrip("_.-") or "layer"
    return f"{prefix}_{block.kind}" if block.several_per_layer else prefix


class KroneckerBlock(abc.ABC):
    """Curvature block ``Ā ⊗ G`` of one layer, with its factors' state.

    Subclasses declare the layer classes they serve and their name in saved
    configurations, and are made known by ``registry.register_block_type``.

    Args:
        layer: the layer whose kernel (and bias) the block preconditions; an
            instance of ``layer_types``, without LoRA and not quantized.
    """

    # The layer classes this block serves (their subclasses too).
    layer_types: tuple[type, ...] = ()
    # The block's name in saved configurations.
    kind: str = ""
    # Whether ``LayerCollection.auto_register`` takes these layers by default.
    auto_register: bool = True
    # Whether the layer has other blocks too (``companions``): their variables' names say the kind.
    several_per_layer: bool = False

    # Whether the rows ā are the patches at the |T| locations of each example
    # (convolutions), which ``patch_fraction`` may subsample for Ā and
    # ``weight_sharing="reduce"`` reduces to one row per example.
    rows_are_patch_locations: bool = False
    # Whether the rows are an example's positions (a sequence), which
    # ``weight_sharing="reduce"`` reduces to one row per example too.
    rows_are_positions: bool = False
    # Whether such rows (locations or positions) are reduced when
    # ``weight_sharing`` is left to each block (the default).
    reduces_locations_by_default: bool = False
    # How Ā is stored: dense, or diagonal where ā is one-hot (embeddings).
    input_factor_type: type[curvature.KroneckerFactor] = curvature.KroneckerFactor

    def __init__(self, layer: keras.layers.Layer):
        if not isinstance(layer, self.layer_types):
            served = ", ".join(t.__name__ for t in self.layer_types)
            raise TypeError(f"{type(self).__name__} serves {served} layers; got {layer!r}.")
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise ValueError(
                f"Layer '{layer.name}' has LoRA enabled or is quantized; KFAC's blocks need its plain kernel."
            )
        self.layer = layer
        # Whether only the diagonals of Ā and G are kept (``approximation="diagonal"``).
        self.diagonal = False
        self.input_factor: curvature.KroneckerFactor | None = None
        self.output_factor: curvature.KroneckerFactor | None = None

    @property
    def name(self) -> str:
        """The layer's name."""
        return self.layer.name

    @property
    def kernel(self) -> keras.Variable:
        """The weight matrix (or tensor) of the layer, without its bias."""
        return self.layer.kernel

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias, the last row of W̄."""
        return getattr(self.layer, "bias", None) is not None

    @property
    def variables(self) -> list:
        """The layer variables this block preconditions, kernel first."""
        return [self.kernel] + ([self.layer.bias] if self.has_bias else [])

    @property
    def input_dim(self) -> int:
        """dim Ā: the kernel's input size, plus one for the bias."""
        return self.kernel_matrix_rows + int(self.has_bias)

    @property
    def output_dim(self) -> int:
        """dim G: the layer's number of outputs (the kernel's last axis)."""
        return int(self.kernel.shape[-1])

    @property
    def fisher_dim(self) -> int:
        """The size of the block's Fisher matrix: the number of weights it preconditions."""
        return self.input_dim * self.output_dim

    def trace(self) -> tf.Tensor:
        """tr(Ā ⊗ G) = tr Ā · tr G, from the factors' floored mean eigenvalues.

        Returns:
            A float32 scalar, positive even while a factor is all zeros.
        """
        means = self.input_factor.mean_eigenvalue() * self.output_factor.mean_eigenvalue()
        return tf.reduce_sum(means) * float(self.input_dim * self.output_dim)

    @property
    def kernel_matrix_rows(self) -> int:
        """Rows of the kernel seen as a (inputs, outputs) matrix."""
        shape = self.kernel.shape
        rows = 1
        for size in shape[:-1]:
            rows *= int(size)
        return rows

    def create_state(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Creates the factor variables (called from ``optimizer.build``).

        Args:
            optimizer: the optimizer whose variables hold Ā and G and their
                damped inverses (saved with it), named after the layer's path.
        """
        prefix = state_prefix(self)
        period = optimizer.inverse_update_period
        if self.diagonal:
            input_type = output_type = curvature.DiagonalFactor
        else:
            input_type = self.input_factor_type
            if input_type is curvature.KroneckerFactor:
                input_type = curvature.inverse_form(self.input_dim, self.output_dim, period)
            output_type = curvature.inverse_form(self.output_dim, self.input_dim, period)
        self.input_factor = input_type(optimizer, self.input_dim, f"{prefix}_A")
        self.output_factor = output_type(optimizer, self.output_dim, f"{prefix}_G")

    @property
    def companions(self) -> tuple[type[KroneckerBlock], ...]:
        """Block types registered for the same layer with this one (its other weights); none by default."""
        return ()

    def call_input_rows(self, call) -> tf.Tensor:
        """Rows ā of one recorded call: ``input_rows`` of its ``row_source``.

        Args:
            call: one recorded call of the layer (a ``capture.LayerCall``).

        Returns:
            A float32 tensor of rows.
        """
        return self.input_rows(self.row_source(call))

    def call_output_rows(self, call, output_gradient: tf.Tensor) -> tf.Tensor:
        """Rows ĝ of one recorded call: ``output_rows`` of the vector back-propagated to its output.

        Args:
            call: one recorded call of the layer.
            output_gradient: a vector back-propagated to the call's output s.

        Returns:
            A float32 tensor of rows.
        """
        return self.output_rows(output_gradient)

    def call_row_count(self, call) -> tf.Tensor:
        """How many rows one recorded call has: ``row_count`` of its output.

        Args:
            call: one recorded call of the layer.

        Returns:
            A scalar int32 tensor.
        """
        return self.row_count(call.preactivation)

    def row_source(self, call) -> tf.Tensor:
        """The tensor of a recorded call that the rows ā are built from: the layer's input.

        Args:
            call: one recorded call of the layer (a ``capture.LayerCall``).

        Returns:
            ``call.inputs``.
        """
        return call.inputs

    @abc.abstractmethod
    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """The layer input as rows of length ``kernel_matrix_rows``.

        Args:
            inputs: the input of one call of the layer.

        Returns:
            A tensor of shape (rows, ``kernel_matrix_rows``).
        """

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """Rows ā: input patches with the homogeneous 1 appended when there is a bias.

        Args:
            inputs: the input of one call of the layer.

        Returns:
            A float32 tensor of shape (rows, ``input_dim``).
        """
        rows = tf.cast(self.input_patches(inputs), tf.float32)
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
        return rows

    def input_second_moment(self, input_rows: tf.Tensor, weights: tf.Tensor | None = None) -> tf.Tensor:
        """The batch estimate of Ā: the mean of ā āᵀ over the rows, weighted by ``weights`` [KFAC §3].

        Args:
            input_rows: rows ā from ``input_rows``, shape (N, ``input_dim``).
            weights: the rows' weights, shape (N,); None weighs them equally.

        Returns:
            Ā of shape (``input_dim``, ``input_dim``); 0 without rows or weight.
        """
        if self.diagonal:  # the mean of ā², (weighted) like the full moment
            squares = tf.square(input_rows)
            if weights is None:
                return tf.reduce_mean(squares, axis=0)
            return tf.math.divide_no_nan(tf.reduce_sum(squares * weights[:, tf.newaxis], 0), tf.reduce_sum(weights))
        if weights is None:
            return curvature.cross_moment(input_rows, input_rows, tf.shape(input_rows)[0])
        return curvature.weighted_cross_moment(input_rows, input_rows, weights)

    def output_second_moment(self, output_rows: tf.Tensor, examples: tf.Tensor) -> tf.Tensor:
        """The batch estimate of G: Σ ĝ ĝᵀ over the rows, divided by the number of examples [KFAC §3].

        Args:
            output_rows: rows ĝ from ``output_rows`` (already weighted).
            examples: B, the number of examples.

        Returns:
            G of shape (``output_dim``, ``output_dim``).
        """
        if self.diagonal:
            return tf.reduce_sum(tf.square(output_rows), axis=0) / tf.cast(tf.maximum(examples, 1), tf.float32)
        return curvature.cross_moment(output_rows, output_rows, examples)

    def output_rows(self, output_gradient: tf.Tensor) -> tf.Tensor:
        """Per-location back-propagated vectors ĝ as rows of length ``output_dim``.

        Args:
            output_gradient: a vector back-propagated to one call's
                pre-activation s, shaped like s.

        Returns:
            A float32 tensor of shape (rows, ``output_dim``).
        """
        return tf.reshape(tf.cast(output_gradient, tf.float32), [-1, self.output_dim])

    def row_count(self, preactivation: tf.Tensor) -> tf.Tensor:
        """How many rows (examples × locations) one call with this pre-activation has.

        Args:
            preactivation: the pre-activation s of one call.

        Returns:
            The number of rows, a scalar int32 tensor.
        """
        return tf.reduce_prod(tf.shape(preactivation)[:-1])

    def gradient_matrix(self, gradients: list[tf.Tensor]) -> tf.Tensor:
        """∇W̄ of shape (input_dim, output_dim) from the variables' gradients.

        Args:
            gradients: the gradients of ``variables``: kernel first, then bias.

        Returns:
            ∇W̄ as a float32 matrix, the bias gradient (if any) its last row.
        """
        kernel_grad = tf.reshape(tf.cast(gradients[0], tf.float32), [-1, self.output_dim])
        if not self.has_bias:
            return kernel_grad
        bias_grad = tf.reshape(tf.cast(gradients[1], tf.float32), [1, self.output_dim])
        return tf.concat([kernel_grad, bias_grad], axis=0)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of ``gradient_matrix``: per-variable tensors of W̄-shaped ``matrix``.

        Args:
            matrix: a tensor of shape (``input_dim``, ``output_dim``).

        Returns:
            One tensor per variable of ``variables``, shaped like it.
        """
        parts = [tf.reshape(matrix[: self.kernel_matrix_rows], self.kernel.shape)]
        if self.has_bias:
            parts.append(matrix[self.kernel_matrix_rows])
        return parts

    def damped_inverses(self, gamma: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Freshly computed ((Ā + πγI)⁻¹, (G + (γ/π)I)⁻¹) [KFAC §6.3].

        Args:
            gamma: the factored Tikhonov damping γ.

        Returns:
            The pair of damped inverses (not stored); a diagonal factor's as a vector.
        """
        return curvature.damped_inverses(self.input_factor, self.output_factor, gamma)

    def store_inverses(self, inverses: tuple[tf.Tensor, tf.Tensor]) -> None:
        """Keeps the damped inverses (each unless its factorisation failed).

        Args:
            inverses: the pair ``damped_inverses`` returns.
        """
        inverse_a, inverse_g = inverses
        self.input_factor.assign_inverse(inverse_a)
        self.output_factor.assign_inverse(inverse_g)

    def precondition(
        self,
        gradients: list[tf.Tensor],
        inverses: tuple[tf.Tensor, tf.Tensor] | None = None,
    ) -> list[tf.Tensor]:
        """(Ā + πγI)⁻¹ ∇W̄ (G + (γ/π)I)⁻¹, split back per variable [KFAC §6.3].

        Args:
            gradients: the gradients of ``variables``: kernel first, then bias.
            inverses: a pair from ``damped_inverses``; defaults to the stored ones.

        Returns:
            The preconditioned gradient, one tensor per variable, shaped like it.
        """
        if inverses is None:
            inverses = (self.input_factor.inverse, self.output_factor.inverse)
        inverse_a, inverse_g = inverses
        update = self.output_factor.right_multiply(
            self.input_factor.left_multiply(inverse_a, self.gradient_matrix(gradients)), inverse_g
        )
        return self.split_matrix(update)
