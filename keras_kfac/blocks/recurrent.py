"""Recurrent blocks: the input and recurrent kernels of LSTM, GRU and SimpleRNN layers.

At time step t a recurrent layer computes the gate pre-activations of all its
gates at once (one kernel, the gates side by side):

    s_t = x_t W + b,    r_t = h_{t-1} U (+ b_r),    gates from s_t + r_t (GRU: r_t enters its candidate gated)

so W (with b) is a Dense layer on the inputs x_t and U one on the previous
outputs h_{t-1}, both shared over the T time steps. Each gets a Kronecker
block with the time steps as locations, as a convolution's [KFC §3.1]:
Ā = E_{n,t}[ā_t ā_tᵀ] and G = (1/B) Σ_{n,t} ĝ_t ĝ_tᵀ, ĝ_t the vector
back-propagated to s_t (to r_t for U). This is the independent-time-steps
approximation (Martens, Ba & Johnson 2018, §3.1): the derivatives at different
time steps are taken as uncorrelated, so the Fisher's cross-time-step terms are
dropped, exactly as KFC drops those between a convolution's locations.

The vectors at each time step are inside the layer's time loop, which the
training graph's gradients cannot reach. So the statistics re-run the
recurrence (``Recurrence``) from the recorded input, in float32, with zero
tensors added to s_t and r_t, and back-propagate the vector received at the
layer's output through that copy to them. Dropout, stateful layers,
``return_state`` and ``zero_output_for_mask`` are refused; ``go_backwards``,
an ``initial_state`` and masks are followed as Keras follows them (a masked
step carries the state on and receives no vector; its input still counts in
Ā).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_kfac.blocks.base import KroneckerBlock
from keras_kfac.blocks.registry import register_block_type

RECURRENT_LAYERS = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)


def _check(layer: keras.layers.Layer) -> None:
    """Raises ValueError naming what the recurrent blocks cannot follow in ``layer``."""
    cell = layer.cell
    problems = []
    if getattr(cell, "dropout", 0.0) or getattr(cell, "recurrent_dropout", 0.0):
        problems.append("dropout or recurrent_dropout")
    if layer.stateful:
        problems.append("stateful=True")
    if layer.return_state:
        problems.append("return_state=True")
    if layer.zero_output_for_mask:
        problems.append("zero_output_for_mask=True (e.g. inside a Bidirectional returning sequences)")
    if isinstance(layer, keras.layers.GRU) and not cell.reset_after:
        problems.append("reset_after=False (its recurrent kernel sees r ⊙ h, not h)")
    if problems:
        raise ValueError(
            f"{type(layer).__name__} layer '{layer.name}' has {', '.join(problems)}, which KFAC's recurrent "
            "blocks do not follow; leave it to the fallback rule (don't register it)."
        )


class Recurrence:
    """The layer's recurrence re-run in float32, with zero probes on s_t and r_t.

    The two blocks of a layer read one re-run per recorded call and one
    backward pass per vector: both are kept for the graph being traced.

    Args:
        layer: an LSTM, GRU or SimpleRNN layer.
    """

    # (ids of the key objects) ↦ (the key objects, kept alive, value), for ``_graph`` only.
    _memo: dict = {}
    _graph = None

    @classmethod
    def _once(cls, keys: tuple, make):
        """``make()``, computed once per ``keys`` in the graph being traced."""
        graph = tf.compat.v1.get_default_graph()
        if cls._graph is not graph:
            cls._memo, cls._graph = {}, graph
        key = tuple(id(k) for k in keys)
        if key not in cls._memo:
            cls._memo[key] = (keys, make())
        return cls._memo[key][1]

    def __init__(self, layer: keras.layers.Layer):
        self.layer = layer
        self.cell = layer.cell
        self.units = int(self.cell.units)
        self.gates = {keras.layers.LSTM: 4, keras.layers.GRU: 3}.get(
            next(t for t in RECURRENT_LAYERS if isinstance(layer, t)), 1
        )

    def _biases(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(b, b_r) as float32 vectors (zeros where the layer has none)."""
        width = self.gates * self.units
        if not self.cell.use_bias:
            return tf.zeros([width]), tf.zeros([width])
        bias = tf.cast(self.cell.bias, tf.float32)
        if isinstance(self.layer, keras.layers.GRU):
            return bias[0], bias[1]
        return bias, tf.zeros([width])

    def _step(self, s: tf.Tensor, r: tf.Tensor, state: list[tf.Tensor]) -> list[tf.Tensor]:
        """The cell's new state [h, (c)] from the pre-activations s_t and r_t."""
        cell = self.cell
        if isinstance(self.layer, keras.layers.LSTM):
            i, f, g, o = tf.split(s + r, 4, axis=-1)
            c = cell.recurrent_activation(f) * state[1] + cell.recurrent_activation(i) * cell.activation(g)
            return [cell.recurrent_activation(o) * cell.activation(c), c]
        if isinstance(self.layer, keras.layers.GRU):
            s_z, s_r, s_h = tf.split(s, 3, axis=-1)
            r_z, r_r, r_h = tf.split(r, 3, axis=-1)
            z = cell.recurrent_activation(s_z + r_z)
            reset = cell.recurrent_activation(s_r + r_r)
            candidate = cell.activation(s_h + reset * r_h)
            return [z * state[0] + (1.0 - z) * candidate]
        out = s + r
        return [out if cell.activation is None else cell.activation(out)]

    def run(self, call, probes: tuple[tf.Tensor, tf.Tensor] | None = None) -> tuple[tf.Tensor, tf.Tensor, tuple]:
        """(the layer's output, h_{t-1} at every step (T, B, H), the probes) from the recorded call.

        Args:
            call: one recorded call of the layer (its input, initial state and mask).
            probes: zero tensors (T, B, gates·H) added to s_t and r_t; made here when None.

        Returns:
            The recomputed output (shaped like the layer's), the previous outputs
            h_{t-1} in processing order, and the probes.
        """
        x = tf.cast(call.inputs, tf.float32)
        if self.layer.go_backwards:
            x = tf.reverse(x, axis=[1])
        x = tf.transpose(x, [1, 0, 2])  # time-major
        steps, batch = tf.shape(x)[0], tf.shape(x)[1]
        width = self.gates * self.units
        if probes is None:
            probes = (tf.zeros([steps, batch, width]), tf.zeros([steps, batch, width]))
        mask = call.mask
        if mask is None:
            mask = tf.ones([steps, batch], tf.bool)
        else:
            mask = tf.transpose(tf.cast(mask, tf.bool), [1, 0])
            if self.layer.go_backwards:
                mask = tf.reverse(mask, axis=[0])
        initial = call.initial_state
        if initial is None:
            state = [tf.zeros([batch, self.units]) for _ in range(2 if self.gates == 4 else 1)]
        else:
            state = [tf.cast(s, tf.float32) for s in (initial if isinstance(initial, (list, tuple)) else [initial])]
        kernel = tf.cast(self.cell.kernel, tf.float32)
        recurrent_kernel = tf.cast(self.cell.recurrent_kernel, tf.float32)
        bias, recurrent_bias = self._biases()
        s_all = tf.einsum("tbd,dk->tbk", x, kernel) + bias + probes[0]

        def step(carry, elems):
            old = list(carry[1:])
            s, probe, keep = elems
            r = tf.matmul(old[0], recurrent_kernel) + recurrent_bias + probe
            new = self._step(s, r, old)
            kept = [tf.where(keep[:, None], n, o) for n, o in zip(new, old)]
            return [old[0], *kept]

        # Each step's carry: (h_{t-1}, state after t); the scan stacks them over t.
        carries = tf.scan(step, (s_all, probes[1], mask), initializer=[state[0], *state])
        previous_outputs, outputs = carries[0], carries[1]
        if self.layer.return_sequences:
            output = tf.transpose(outputs, [1, 0, 2])
        else:
            output = outputs[-1]
        return output, previous_outputs, probes

    def gate_vectors(self, call, output_gradient: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The vectors back-propagated to s_t and to r_t, each (B·T, gates·H), example by example.

        Args:
            call: one recorded call of the layer.
            output_gradient: the vector back-propagated to the layer's output.

        Returns:
            (ĝ rows of s, ĝ rows of r).
        """
        output, _, probes = self.recorded_run(call)

        def backward() -> tuple[tf.Tensor, tf.Tensor]:
            grads = tf.gradients(output, list(probes), grad_ys=tf.cast(output_gradient, tf.float32))
            width = self.gates * self.units
            return tuple(
                tf.reshape(tf.transpose(tf.zeros_like(p) if g is None else g, [1, 0, 2]), [-1, width])
                for g, p in zip(grads, probes)
            )

        return self._once((call, output_gradient), backward)

    def recorded_run(self, call) -> tuple[tf.Tensor, tf.Tensor, tuple]:
        """``run(call)``, once per recorded call in the graph being traced."""
        return self._once((call,), lambda: self.run(call))


class _RecurrentBlock(KroneckerBlock):
    """Shared by the two blocks of a recurrent layer: the recurrence, the rows' count, a GRU's bias."""

    layer_types = RECURRENT_LAYERS
    several_per_layer = True
    # Which weights: 0 the input kernel (pre-activation s_t, a GRU's bias row b),
    # 1 the recurrent kernel (r_t, the row b_r).
    part = 0

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(layer)
        _check(layer)
        self.recurrence = Recurrence(layer)

    @property
    def output_dim(self) -> int:
        """dim G: all gates' pre-activations, gates·units."""
        return self.recurrence.gates * self.recurrence.units

    def _is_gru_with_bias(self, parts: list) -> bool:
        return len(parts) == 2 and isinstance(self.layer, keras.layers.GRU)

    def gradient_matrix(self, gradients: list[tf.Tensor]) -> tf.Tensor:
        """∇W̄ = [∇kernel; ∇bias], of a GRU's (2, 3H) bias its row ``part``.

        Args:
            gradients: the gradients of ``variables``.

        Returns:
            A float32 matrix (``input_dim``, gates·H).
        """
        if self._is_gru_with_bias(gradients):
            gradients = [gradients[0], tf.convert_to_tensor(gradients[1])[self.part]]
        return super().gradient_matrix(gradients)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of ``gradient_matrix``; a GRU's bias gets 0 in the other block's row.

        The two blocks of a GRU share its bias variable: the preconditioner adds their parts.

        Args:
            matrix: a tensor (``input_dim``, gates·H).

        Returns:
            One tensor per variable of ``variables``, shaped like it.
        """
        parts = super().split_matrix(matrix)
        if self._is_gru_with_bias(parts):
            rows = [tf.zeros_like(parts[1]), tf.zeros_like(parts[1])]
            rows[self.part] = parts[1]
            parts = [parts[0], tf.stack(rows)]
        return parts

    def call_output_rows(self, call, output_gradient: tf.Tensor) -> tf.Tensor:
        """ĝ_t: the vector back-propagated to this block's pre-activation (s_t or r_t) at each time step.

        Args:
            call: one recorded call of the layer.
            output_gradient: the vector back-propagated to the layer's output.

        Returns:
            A float32 tensor (batch·T, gates·H), example by example.
        """
        return self.recurrence.gate_vectors(call, output_gradient)[self.part]

    def call_row_count(self, call) -> tf.Tensor:
        """B·T rows (examples × time steps) per call.

        Args:
            call: one recorded call of the layer.

        Returns:
            The number of rows, a scalar int32 tensor.
        """
        return tf.reduce_prod(tf.shape(call.inputs)[:2])


@register_block_type
class RecurrentInputBlock(_RecurrentBlock):
    """The input kernel W (D, gates·H) and bias b of an LSTM, GRU or SimpleRNN: a Dense layer on x_t.

    Registering the layer also registers its ``RecurrentKernelBlock``.

    Args:
        layer: the recurrent layer (no dropout, not stateful, no ``return_state``;
            a GRU with ``reset_after=True``).
    """

    kind = "recurrent_input"

    @property
    def kernel(self) -> keras.Variable:
        """The input kernel W."""
        return self.layer.cell.kernel

    @property
    def has_bias(self) -> bool:
        """Whether the cell has a bias (a GRU's input bias b is its first row)."""
        return bool(self.layer.cell.use_bias)

    @property
    def variables(self) -> list:
        """W, then the bias variable (the whole of a GRU's (2, 3H) bias: b and b_r)."""
        return [self.kernel] + ([self.layer.cell.bias] if self.has_bias else [])

    @property
    def companions(self) -> tuple[type[KroneckerBlock], ...]:
        """The recurrent kernel's block, registered with this one."""
        return (RecurrentKernelBlock,)

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """x_t of every example and time step, example by example (as the loss's weights run).

        Args:
            inputs: one call's input sequence (batch, T, D).

        Returns:
            A tensor (batch·T, D).
        """
        return tf.reshape(inputs, [-1, self.kernel_matrix_rows])


class RecurrentKernelBlock(_RecurrentBlock):
    """The recurrent kernel U (H, gates·H) of an LSTM, GRU or SimpleRNN: a Dense layer on h_{t-1}.

    A GRU's recurrent bias b_r is its homogeneous row. Not in the block
    registry: registering the layer registers it with its ``RecurrentInputBlock``.

    Args:
        layer: the recurrent layer.
    """

    kind = "recurrent_kernel"
    part = 1

    @property
    def kernel(self) -> keras.Variable:
        """The recurrent kernel U."""
        return self.layer.cell.recurrent_kernel

    @property
    def has_bias(self) -> bool:
        """Whether the kernel has a bias of its own: a GRU's b_r."""
        return bool(self.layer.cell.use_bias) and isinstance(self.layer, keras.layers.GRU)

    @property
    def variables(self) -> list:
        """U, and a GRU's bias variable (its b_r row; the input block preconditions the b row)."""
        return [self.kernel] + ([self.layer.cell.bias] if self.has_bias else [])

    def call_input_rows(self, call) -> tf.Tensor:
        """h_{t-1} of every example and time step (and the homogeneous 1 for b_r), example by example.

        Args:
            call: one recorded call of the layer.

        Returns:
            A float32 tensor (batch·T, ``input_dim``).
        """
        _, previous, _ = self.recurrence.recorded_run(call)
        rows = tf.reshape(tf.transpose(previous, [1, 0, 2]), [-1, self.recurrence.units])
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
        return rows

    def input_patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Not used: the rows h_{t-1} come from the recurrence (``call_input_rows``)."""
        raise NotImplementedError
