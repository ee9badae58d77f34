"""The K-FAC optimizer (Martens & Grosse 2015) for Keras 3 on TensorFlow."""

from __future__ import annotations

import random
import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import capture, curvature, losses
from keras_kfac.registration import LayerCollection

_EAGER_MESSAGE = (
    "KFAC reads the activations and output gradients of the training step from "
    "its TensorFlow graph, and an eagerly executed step has none. Compile the "
    "model with run_eagerly=False (the default) and train with model.fit or "
    "model.train_on_batch."
)


def _check_range(name: str, value: Any, low: float, high: float | None = None, *, high_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number; got {value!r}.")
    too_high = high is not None and (value >= high if high_open else value > high)
    if value < low or too_high:
        bound = "" if high is None else (f", {high})" if high_open else f", {high}]")
        interval = f"[{low}{bound or ', inf)'}"
        raise ValueError(f"`{name}` must be in {interval}; got {value!r}.")


@keras.saving.register_keras_serializable(package="keras_kfac")
class KFAC(keras.optimizers.Optimizer):
    """Kronecker-factored Approximate Curvature (Martens & Grosse, 2015).

    Preconditions the gradient of each registered layer with the damped inverse
    of a Kronecker-factored approximation ``Ā ⊗ G`` of its Fisher block
    [KFAC §3]; convolutions use the KFC factors of Grosse & Martens (2016). The
    factors are moving averages of statistics gathered in the training step
    [KFAC §5]; their damped inverses [KFAC §6.3] are refreshed every
    ``inverse_update_period`` steps. For a block with gradient ``∇W̄`` the step is

        U = (G + (γ/π) I)⁻¹ ∇W̄ (Ā + πγ I)⁻¹,   γ = sqrt(damping + l2_reg),
        δ = momentum · δ₀ − learning_rate · U,   θ ← θ + δ.

    Variables of layers with no block (normalization, embeddings, ...) take the
    same momentum step on their plain gradient.

    The optimizer reads what it needs from the graph Keras traces for
    ``model.fit``/``train_on_batch``, so the model must not run eagerly.

    Args:
        model: the ``keras.Model`` being trained. Its Dense and Conv2D layers are
            registered automatically when the optimizer is built, and its
            compiled loss defines the Fisher.
        layer_collection: a hand-made ``LayerCollection`` instead of (or in
            addition to) automatic registration.
        learning_rate: a float or a ``keras.optimizers.schedules`` schedule.
        damping: the Tikhonov damping λ ≥ 0 [KFAC §6].
        momentum: heavy-ball coefficient μ in [0, 1) on the preconditioned step.
        ema_decay: ε_max in [0, 1) of the factors' moving averages [KFAC §5].
        inverse_update_period: steps between damped inverses of the factors
            (also done on each of the first 3 steps).
        estimation_mode: ``"sampled"`` (targets drawn from the model: the true
            Fisher), ``"empirical"`` (the data's labels) or ``"exact"`` (the
            expectation over the predictive distribution, one backward pass per
            output unit).
        l2_reg: coefficient η ≥ 0 of an l2 penalty added to the gradient (η·θ)
            and to the damping (γ² = λ + η).
        norm_constraint: C > 0 bounds the step's squared length in the
            approximate Fisher metric, ``lr² UᵀF̆U ≤ C``, by scaling U down
            ("KL clipping", Ba et al. 2017): a safeguard for fixed learning
            rates. None turns it off.
        seed: seed of the target sampling; random when None.
        name: the optimizer's name.
        **kwargs: other ``keras.optimizers.Optimizer`` arguments (``clipnorm``, ...).
    """

    def __init__(
        self,
        model: keras.Model | None = None,
        layer_collection: LayerCollection | None = None,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.9,
        ema_decay: float = 0.95,
        inverse_update_period: int = 10,
        estimation_mode: str = "sampled",
        l2_reg: float = 0.0,
        norm_constraint: float | None = None,
        seed: int | None = None,
        name: str = "kfac",
        **kwargs: Any,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
            _check_range("learning_rate", learning_rate, 0.0)
        _check_range("damping", damping, 0.0)
        _check_range("momentum", momentum, 0.0, 1.0)
        _check_range("ema_decay", ema_decay, 0.0, 1.0)
        _check_range("l2_reg", l2_reg, 0.0)
        if norm_constraint is not None:
            _check_range("norm_constraint", norm_constraint, 0.0)
            if norm_constraint == 0:
                raise ValueError("`norm_constraint` must be positive or None; got 0.")
        if isinstance(inverse_update_period, bool) or not isinstance(inverse_update_period, int) or inverse_update_period < 1:
            raise ValueError(
                "`inverse_update_period` must be an integer >= 1; "
                f"got {inverse_update_period!r}."
            )
        if estimation_mode not in losses.ESTIMATION_MODES:
            raise ValueError(
                f"`estimation_mode` must be one of {losses.ESTIMATION_MODES}; "
                f"got {estimation_mode!r}."
            )
        if model is not None and not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model; got {model!r}.")
        if layer_collection is not None and not isinstance(layer_collection, LayerCollection):
            raise TypeError(
                f"`layer_collection` must be a keras_kfac.LayerCollection; got {layer_collection!r}."
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.damping = float(damping)
        self.momentum = float(momentum)
        self.ema_decay = float(ema_decay)
        self.inverse_update_period = inverse_update_period
        self.estimation_mode = estimation_mode
        self.l2_reg = float(l2_reg)
        self.norm_constraint = None if norm_constraint is None else float(norm_constraint)
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        # A plain (untracked) object: the optimizer does not own the model.
        self.layer_collection = layer_collection or LayerCollection()
        if model is not None:
            self.layer_collection.register_model(model)
        self.layer_collection.prepare()

    @property
    def blocks(self) -> list:
        """The curvature blocks this optimizer preconditions with."""
        return self.layer_collection.blocks

    def build(self, variables: list) -> None:
        if self.built:
            return
        super().build(variables)
        collection = self.layer_collection
        collection.prepare()
        trainable = {self._var_key(v) for v in variables}
        owned = set()
        for block in collection.blocks:
            keys = [self._var_key(v) for v in block.variables]
            if not all(k in trainable for k in keys):
                raise ValueError(
                    f"Layer '{block.name}' is registered with KFAC but its weights "
                    "are not among the variables being trained (is it frozen?)."
                )
            owned.update(keys)
            block.create_state(self)
        self._velocities = [
            self.add_variable_from_reference(v, name="velocity") for v in variables
        ]
        unowned = [v.path if hasattr(v, "path") else v.name for v in variables if self._var_key(v) not in owned]
        if unowned:
            warnings.warn(
                "KFAC has no curvature block for these variables and gives them a "
                f"plain momentum step: {', '.join(unowned)}",
                stacklevel=2,
            )

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        if tf.executing_eagerly():
            raise RuntimeError(_EAGER_MESSAGE)
        if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise NotImplementedError("KFAC does not support multi-replica tf.distribute strategies yet.")
        if self.layer_collection.model is None:
            raise RuntimeError(
                "KFAC has no model: create it with KFAC(model=model) or a "
                "LayerCollection that registered the model."
            )
        grads = [tf.convert_to_tensor(g) for g in grads]
        if self.l2_reg:
            grads = [g + tf.cast(self.l2_reg, g.dtype) * v for g, v in zip(grads, trainable_variables)]
        self._update_curvature()
        grads = dict(zip([self._var_key(v) for v in trainable_variables], grads))
        updates = self._precondition(grads)
        if self.norm_constraint is not None:
            updates = self._constrain_norm(grads, updates, learning_rate)
        self._apply_momentum_step(trainable_variables, updates, learning_rate)

    def _update_curvature(self) -> None:
        """Moving averages of Ā and G [KFAC §5], then the scheduled damped inverses."""
        collection = self.layer_collection
        loss_calls = capture.RECORDER.pop(collection.model)
        if not loss_calls:
            raise RuntimeError(
                "KFAC found no training loss in this step's graph. It must run inside "
                "model.fit / model.train_on_batch of the model it was created with."
            )
        loss_call = loss_calls[-1]
        layer_calls = {id(b): capture.RECORDER.pop(b.layer) for b in collection.blocks}
        blocks = [b for b in collection.blocks if layer_calls[id(b)]]

        registered_loss = collection.loss()
        y_pred = keras.tree.flatten(loss_call.y_pred)[0]
        z = registered_loss.network_output(y_pred)
        seed = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(self.iterations, tf.int32)])
        y_true = loss_call.y_true
        if y_true is not None:
            y_true = keras.tree.flatten(y_true)[0]
        vectors = registered_loss.output_vectors(
            tf.cast(z, tf.float32), self.estimation_mode, y_true, loss_call.sample_weight, seed
        )
        preactivations = [c.preactivation for b in blocks for c in layer_calls[id(b)]]
        # One backward pass per vector: ĝ = Jᵀ v at every recorded pre-activation.
        backpropagated = [
            [
                tf.zeros_like(s) if g is None else g
                for g, s in zip(
                    tf.gradients(z, preactivations, grad_ys=tf.cast(v, z.dtype)), preactivations
                )
            ]
            for v in vectors
        ]
        decay = curvature.moving_average_decay(self.iterations + 1, self.ema_decay)
        batch_size = tf.shape(z)[0]
        position = 0
        for block in blocks:
            calls = layer_calls[id(block)]
            span = slice(position, position + len(calls))
            position += len(calls)
            input_stats = block.input_statistics([c.inputs for c in calls])
            output_stats = block.output_statistics(
                [g for per_vector in backpropagated for g in per_vector[span]], batch_size
            )
            block.input_factor.update_moving_average(input_stats, decay)
            block.output_factor.update_moving_average(output_stats, decay)

        gamma = self._gamma()

        def refresh_inverses() -> tf.Tensor:
            for block in collection.blocks:
                block.update_inverses(gamma)
            return tf.constant(True)

        due = tf.logical_or(
            self.iterations < 3, tf.equal(self.iterations % self.inverse_update_period, 0)
        )
        tf.cond(due, refresh_inverses, lambda: tf.constant(False))

    def _gamma(self) -> tf.Tensor:
        """γ = sqrt(λ + η) [KFAC §6.3]."""
        return tf.sqrt(tf.constant(self.damping + self.l2_reg, tf.float32))

    def _precondition(self, grads: dict) -> dict:
        """Per-variable update directions: F̆⁻¹∇h for block variables, ∇h otherwise."""
        updates = dict(grads)
        for block in self.layer_collection.blocks:
            keys = [self._var_key(v) for v in block.variables]
            if not all(k in grads for k in keys):
                continue
            for key, update in zip(keys, block.precondition([grads[k] for k in keys])):
                updates[key] = update
        return updates

    def _constrain_norm(self, grads: dict, updates: dict, learning_rate: Any) -> dict:
        """Scales U by min(1, sqrt(C / (lr² UᵀF̆U))) (Ba et al. 2017, §5).

        ``UᵀF̆U = Σ ⟨U, ∇h⟩`` over the blocks, since ``F̆U = ∇h`` there.
        """
        lr = tf.cast(learning_rate, tf.float32)
        quadratic = tf.add_n([
            tf.reduce_sum(tf.cast(updates[self._var_key(v)], tf.float32) * tf.cast(grads[self._var_key(v)], tf.float32))
            for block in self.layer_collection.blocks for v in block.variables
            if self._var_key(v) in grads
        ] or [tf.constant(0.0)])
        scale = tf.minimum(1.0, tf.sqrt(self.norm_constraint / tf.maximum(lr * lr * quadratic, 1e-30)))
        return {key: tf.cast(scale, u.dtype) * u for key, u in updates.items()}

    def _apply_momentum_step(self, variables: list, updates: dict, learning_rate: Any) -> None:
        """δ = μ δ₀ − lr · U and θ ← θ + δ; a non-finite step changes nothing."""
        lr = tf.cast(learning_rate, tf.float32)
        steps, velocities = [], []
        for variable in variables:
            velocity = self._velocities[self._get_variable_index(variable)]
            update = tf.cast(updates[self._var_key(variable)], tf.float32)
            steps.append(self.momentum * tf.cast(velocity, tf.float32) - lr * update)
            velocities.append(velocity)
        finite = curvature.all_finite(steps)
        for variable, velocity, step in zip(variables, velocities, steps):
            self.assign(velocity, tf.where(finite, step, tf.cast(velocity, tf.float32)))
            self.assign_add(variable, tf.where(finite, step, tf.zeros_like(step)))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "damping": self.damping,
                "momentum": self.momentum,
                "ema_decay": self.ema_decay,
                "inverse_update_period": self.inverse_update_period,
                "estimation_mode": self.estimation_mode,
                "l2_reg": self.l2_reg,
                "norm_constraint": self.norm_constraint,
                "seed": self.seed,
            }
        )
        return config
