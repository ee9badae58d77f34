"""One K-FAC update and the quadratic model that judges it [KFAC §6-7].

``Step`` computes δ = αΔ + μδ₀ from the preconditioned gradient Δ = −F̆⁻¹∇h and
the previous update δ₀, with α and μ either fixed (the learning rate, shortened
by the KL bound, and the momentum) or minimising the quadratic model
M(δ) = ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ under the exact mini-batch Fisher [KFAC §7]; it
adapts λ by the Levenberg–Marquardt rule [KFAC §6.5] and γ by trying three
values [KFAC §6.6]. It reads the optimizer's settings (``StepRule``) and the
adapted quantities (``StepState``) and is given the preconditioner and the
forward pass explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import capture, losses, quadratic_model, replicas, statistics
from keras_kfac.preconditioner import Preconditioner

# The fewest examples the quadratic model's exact-Fisher products and ρ use when
# τ₂ < 1: on 8 of a batch of 32 the zoo's LSTM trained worse (BENCHMARKS.md,
# "The adaptive mode's λ₀ and the quadratic model on a quarter of the batch").
MIN_CURVATURE_EXAMPLES = 32


@dataclasses.dataclass(frozen=True)
class StepRule:
    """The optimizer settings a step follows (``KFAC``'s arguments of the same names).

    Attributes:
        use_quadratic_model: whether α and μ minimise the exact-Fisher quadratic model.
        momentum: the fixed μ (None with the quadratic model).
        norm_constraint: C of the KL bound α²ΔᵀF̆Δ ≤ C, or None.
        max_momentum: the quadratic model's bound on μ, or None.
        l2_reg: η.
        curvature_fraction: τ₂.
        adapt_damping: whether λ follows the Levenberg–Marquardt rule.
        adapt_gamma: whether γ is searched.
        damping_adaptation_period: T₁.
        gamma_adaptation_period: T₂.
        reject_below: the ρ below which a checked step is undone, or None.
    """

    use_quadratic_model: bool
    momentum: float | None
    norm_constraint: float | None
    max_momentum: float | None
    l2_reg: float
    curvature_fraction: float
    adapt_damping: bool
    adapt_gamma: bool
    damping_adaptation_period: int
    gamma_adaptation_period: int
    reject_below: float | None


@dataclasses.dataclass(frozen=True)
class StepState:
    """The adapted quantities a step reads and updates: λ, γ, ρ (variables) and λ's floor.

    Attributes:
        damping: the variable of λ.
        gamma: the variable of γ.
        rho: the variable of ρ.
        min_damping: returns the adapted λ's floor.
    """

    damping: tf.Variable
    gamma: tf.Variable
    rho: tf.Variable
    min_damping: Callable[[], tf.Tensor]


def require_inputs(x: Any) -> Any:
    """``x``, the step's model inputs that K-FAC's extra forward passes run on.

    Args:
        x: the inputs recorded with the training loss, or None.

    Returns:
        ``x``; ValueError when it is None (a custom ``train_step`` that did not pass it).
    """
    if x is None:
        raise ValueError(
            "KFAC's extra forward passes (statistics_fraction < 1, statistics_update_period > 1, "
            "curvature_fraction < 1, adapt_damping, adapt_gamma) need the model inputs, but the "
            "training loss was computed without them: a custom train_step must pass them, as in "
            "`self.compute_loss(x=x, y=y, y_pred=y_pred)`."
        )
    return x


def sub_batch(data: tuple, batch_size: tf.Tensor, fraction: float, reduction: str, min_examples: int = 1) -> tuple:
    """(x, y, sample_weight) of the first max(⌈fraction·B⌉, min(B, min_examples)) examples [KFAC §8].

    The paper's τ subset. A ``sum`` loss grows with the number of examples, so
    the sub-batch's examples are weighted by B/(its size): its loss and its
    curvature then estimate the whole batch's, as a mean loss's sub-batch
    does unweighted.

    Args:
        data: (x, y, sample_weight), each a nested structure or None.
        batch_size: B.
        fraction: the fraction of examples to keep, in (0, 1].
        reduction: the loss's reduction.
        min_examples: the fewest examples kept (all B when B is smaller).

    Returns:
        (x, y, sample_weight) of the sub-batch.
    """
    size = tf.maximum(statistics.subset_size(batch_size, fraction), tf.minimum(batch_size, min_examples))
    x, y, sample_weight = keras.tree.map_structure(lambda a: None if a is None else a[:size], data)
    if reduction == "sum":
        scale = tf.cast(batch_size, tf.float32) / tf.cast(size, tf.float32)
        if sample_weight is None:
            sample_weight = tf.fill([size], scale)
        else:
            sample_weight = keras.tree.map_structure(lambda w: tf.cast(w, tf.float32) * scale, sample_weight)
    return x, y, sample_weight


class Batch:
    """What one training step recorded: the loss's inputs and the layer calls.

    Args:
        loss_call: the step's evaluation of the training loss.
        layer_calls: each block's recorded calls, by ``id(block)``.
        loss: the registered loss; the model must have a single output.
    """

    def __init__(self, loss_call: capture.LossCall, layer_calls: dict, loss: losses.RegisteredLoss):
        self.loss_call = loss_call
        self.layer_calls = layer_calls
        self.loss = loss
        outputs = keras.tree.flatten(loss_call.y_pred)
        if len(outputs) != 1:
            raise NotImplementedError(
                f"KFAC supports models with a single output; this model has {len(outputs)}. "
                "Its Fisher would need the predictive distribution of every output with a loss."
            )
        self.y_pred = outputs[0]
        self.z = loss.network_output(self.y_pred)
        y_true = loss_call.y_true
        self.y_true = None if y_true is None else keras.tree.flatten(y_true)[0]
        self.sample_weight = loss_call.sample_weight
        # The weights of the loss's values, a Keras mask on the output included.
        self.curvature_weight = losses.masked_sample_weight(self.y_pred, self.y_true, self.sample_weight, loss)


class Step:
    """One update δ = αΔ + μδ₀ and the quadratic model that judges it [KFAC §6-7].

    Under a ``tf.distribute`` strategy each replica computes its share of the
    losses and exact-Fisher products in ``tf.cond`` branches; the all-reduces
    that combine them run outside the branches (``replicas``).

    Args:
        rule: the settings to follow.
        state: λ, γ and ρ, updated by ``adapt_damping`` and ``adapt_gamma``.
        preconditioner: the F̆⁻¹ whose inverses give Δ.
        batch: the step's recorded loss inputs.
        variables: the variables K-FAC's own update moves (those in blocks, or
            all with ``fallback="momentum"``).
        grads: their gradients, of the global batch.
        velocities: their velocities δ₀.
        variable_key: the key of a variable in ``preconditioner.precondition``.
        forward: x ↦ (the model's output, its layers' extra losses) at the
            current weights, recording nothing.
        loss_of: (x, y, y_pred, sample_weight) ↦ the model's training loss.
        assign: assigns a value to an optimizer or model variable.
    """

    def __init__(
        self,
        rule: StepRule,
        state: StepState,
        preconditioner: Preconditioner,
        batch: Batch,
        variables: list,
        grads: list,
        velocities: list,
        variable_key: Callable[[Any], str],
        forward: Callable[[Any], tuple[Any, list]],
        loss_of: Callable[[Any, Any, Any, Any], tf.Tensor],
        assign: Callable[[Any, tf.Tensor], None],
    ):
        self.rule = rule
        self.state = state
        self.preconditioner = preconditioner
        self.batch = batch
        self.variables = variables
        self.grads = grads
        self.velocities = velocities
        self.variable_key = variable_key
        self._forward = forward
        self._loss_of = loss_of
        self._assign = assign
        self.keys = [variable_key(v) for v in variables]
        self.owned = {variable_key(v) for b in preconditioner.blocks for v in b.variables}
        self.previous = [tf.cast(tf.convert_to_tensor(v), tf.float32) for v in velocities]
        self.has_previous = quadratic_model.inner(self.previous, self.previous) > 0.0
        self.needs_model = rule.use_quadratic_model or rule.adapt_damping
        if self.needs_model or rule.adapt_gamma:
            # At θ, in the step's own graph, before any tf.cond branch.
            self.curvature_data = self.curvature_batch()

    # The curvature batch: the step's own records, or a sub-batch forward pass (τ₂).

    def curvature_batch(self) -> tuple:
        """(x, y, sample_weight, network output z, weights of z's values, loss h(θ)) for the quadratic model.

        h(θ) is the global batch's: the replicas' shares added up. The
        exact-Fisher products need z in the graph they are built in: when the
        update runs in a branch of the step's graph (a ``LossScaleOptimizer``,
        gradient accumulation), z comes from a forward pass of its own there.

        Returns:
            The tuple (x, y, sample_weight, z, weights of z's values, h(θ)),
            of the first max(⌈τ₂·B⌉, min(B, 32)) examples when
            ``curvature_fraction`` τ₂ < 1.
        """
        batch = self.batch
        call = batch.loss_call
        in_step_graph = getattr(batch.z, "graph", None) is tf.compat.v1.get_default_graph()
        if self.rule.curvature_fraction >= 1.0 and in_step_graph:
            x, y, sample_weight, z, loss = call.x, call.y_true, call.sample_weight, batch.z, call.loss
            weight = batch.curvature_weight
        else:
            x, y, sample_weight = sub_batch(
                (call.x, call.y_true, call.sample_weight),
                tf.shape(batch.z)[0],
                self.rule.curvature_fraction,
                batch.loss.reduction,
                MIN_CURVATURE_EXAMPLES,
            )
            y_pred, loss = self.forward(x, y, sample_weight)
            z = batch.loss.network_output(y_pred)
            weight = losses.masked_sample_weight(y_pred, y, sample_weight, batch.loss)
        return x, y, sample_weight, z, weight, replicas.total(tf.cast(loss, tf.float32))

    def forward(self, x, y, sample_weight) -> tuple:
        """The model's output and this replica's share of the training loss at the current weights.

        Nothing is recorded. Without a strategy the share is the whole loss.

        Args:
            x: the model inputs.
            y: the targets.
            sample_weight: the sample weights, or None.

        Returns:
            (the model's output, the loss with the layers' extra losses).
        """
        y_pred, layer_losses = self._forward(x)
        # The layers' extra losses are added as Keras' train step adds them
        # (divided among the replicas).
        loss = self._loss_of(x, y, y_pred, sample_weight)
        for extra in layer_losses:
            loss = loss + tf.cast(tf.reduce_sum(extra) / replicas.count(), loss.dtype)
        return keras.tree.flatten(y_pred)[0], loss

    # Proposals and their quadratic model.

    def proposal(self, inverses: list) -> list[tf.Tensor]:
        """Δ = −F̆⁻¹∇h per variable [KFAC §6.3].

        Args:
            inverses: the preconditioner's inverse state.

        Returns:
            Δ, one float32 tensor per variable; −∇h for variables without a block.
        """
        grads = dict(zip(self.keys, self.grads))
        updates = dict(grads)
        updates.update(self.preconditioner.precondition(grads, inverses, self.variable_key))
        return [-tf.cast(updates[k], tf.float32) for k in self.keys]

    def step_length(self, delta: list[tf.Tensor], learning_rate: Any) -> tf.Tensor:
        """The fixed α: the learning rate, shortened so that α²ΔᵀF̆Δ ≤ C when ``norm_constraint`` C is finite.

        This is "KL clipping" (Ba et al. 2017).

        Args:
            delta: Δ, one tensor per variable.
            learning_rate: the current learning rate.

        Returns:
            α, a float32 scalar.
        """
        lr = tf.cast(learning_rate, tf.float32)
        if not self.constrained:
            return lr
        quadratic = self.preconditioned_quadratic(delta)
        return lr * tf.minimum(1.0, tf.sqrt(self.rule.norm_constraint / tf.maximum(lr * lr * quadratic, 1e-30)))

    def longest_step(self, delta: list[tf.Tensor]) -> tf.Tensor | None:
        """The quadratic model's bound on α: α²ΔᵀF̆Δ ≤ C, or None without a finite ``norm_constraint`` C.

        The exact Fisher of one small batch can be near zero along Δ where the
        factored Fisher F̆, averaged over many batches, is not: the model's α
        is then large and its step leaves the region where either is valid.

        Args:
            delta: Δ, one tensor per variable.

        Returns:
            The largest α allowed, a float32 scalar, or None.
        """
        if not self.constrained:
            return None
        return tf.sqrt(self.rule.norm_constraint / tf.maximum(self.preconditioned_quadratic(delta), 1e-30))

    @property
    def constrained(self) -> bool:
        """Whether ``norm_constraint`` bounds the step."""
        bound = self.rule.norm_constraint
        return bound is not None and math.isfinite(bound)

    def preconditioned_quadratic(self, delta: list[tf.Tensor]) -> tf.Tensor:
        """ΔᵀF̆Δ = −Δᵀ∇h over the variables in blocks (F̆ the damped factored Fisher).

        Args:
            delta: Δ, one tensor per variable.

        Returns:
            A float32 scalar.
        """
        return -quadratic_model.inner(
            [d for d, k in zip(delta, self.keys) if k in self.owned],
            [g for g, k in zip(self.grads, self.keys) if k in self.owned],
        )

    def local_fisher(self, directions: list[list[tf.Tensor]], z: tf.Tensor, sample_weight) -> tf.Tensor:
        """[dᵢᵀ F dⱼ] for the ``directions`` d on this replica's examples (exact Fisher, [KFAC §7]).

        One backward pass is shared by every direction's product J d.

        Args:
            directions: the directions d, each one tensor per variable.
            z: the network output, in the current graph.
            sample_weight: the weights of z's values, or None.

        Returns:
            A float32 (k, k) matrix for k directions.
        """
        products = quadratic_model.jacobian_vector_products(
            z, [v.value if isinstance(v, keras.Variable) else v for v in self.variables], directions
        )
        return quadratic_model.fisher_gram(self.batch.loss, z, products, sample_weight)

    def linear_terms(self, delta: list[tf.Tensor]) -> tf.Tensor:
        """b = [∇hᵀdᵢ] for d = (Δ, δ₀) [KFAC §7].

        Args:
            delta: Δ, one tensor per variable.

        Returns:
            b, a float32 vector of length 2.
        """
        return tf.stack([quadratic_model.inner(self.grads, d) for d in (delta, self.previous)])

    def damped_curvature(self, fisher: tf.Tensor, dots: tf.Tensor) -> tf.Tensor:
        """C = [dᵢᵀ(F + (λ+η)I)dⱼ] from the global batch's [dᵢᵀ F dⱼ] and [dᵢᵀ dⱼ] [KFAC §7].

        Args:
            fisher: [dᵢᵀ F dⱼ], a (2, 2) matrix.
            dots: [dᵢᵀ dⱼ], a (2, 2) matrix.

        Returns:
            C, a (2, 2) matrix.
        """
        return fisher + (self.state.damping + self.rule.l2_reg) * dots

    def coefficients(self, curvature_matrix, linear, length) -> tuple[tf.Tensor, tf.Tensor]:
        """(α, μ) and M(δ): from the quadratic model, or the fixed step ``length`` and momentum.

        Args:
            curvature_matrix: C, or None when the quadratic model is not evaluated.
            linear: b, or None with ``curvature_matrix``.
            length: the fixed α, or with the quadratic model the bound on its
                α (``longest_step``; None for none).

        Returns:
            ((α, μ) as a float32 vector, M(δ) − M(0); 0 without ``curvature_matrix``).
        """
        if self.rule.use_quadratic_model:
            return quadratic_model.solve_coefficients(
                curvature_matrix, linear, self.has_previous, self.rule.max_momentum, length
            )
        fixed = tf.stack([length, tf.constant(self.rule.momentum, tf.float32)])
        if curvature_matrix is None:
            return fixed, tf.constant(0.0)
        return fixed, quadratic_model.model_value(curvature_matrix, linear, fixed)

    def update(self, learning_rate: Any) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """δ per variable, (α, μ) and M(δ) with the stored inverses.

        Args:
            learning_rate: the current learning rate (unused with the quadratic model).

        Returns:
            (δ as one float32 tensor per variable, (α, μ), M(δ) − M(0)).
        """
        delta = self.proposal(self.preconditioner.stored())
        curvature_matrix = linear = None
        if self.needs_model:
            _, _, _, z, weight, _ = self.curvature_data
            fisher = replicas.curvature(self.local_fisher([delta, self.previous], z, weight), self.batch.loss.reduction)
            curvature_matrix = self.damped_curvature(fisher, quadratic_model.dot_gram([delta, self.previous]))
            linear = self.linear_terms(delta)
        length = self.longest_step(delta) if self.rule.use_quadratic_model else self.step_length(delta, learning_rate)
        coefficients, change = self.coefficients(curvature_matrix, linear, length)
        update = [coefficients[0] * d + coefficients[1] * p for d, p in zip(delta, self.previous)]
        return update, coefficients, change

    # Adaptation: local passes in tf.cond branches, decisions outside them.

    def adapt_damping(
        self, update: list[tf.Tensor], change: tf.Tensor, before: list[tf.Tensor], due: tf.Tensor
    ) -> tf.Tensor:
        """Levenberg–Marquardt: ρ from h(θ+δ) on the same batch, then λ [KFAC §6.5].

        Runs after θ ← θ + δ; the forward pass at θ + δ runs only when ``due``.
        The l2 term ½η‖θ‖² is part of h. A checked step whose ρ is below
        ``reject_below`` (or whose loss is not finite) is undone: θ takes its
        values ``before`` the update back and δ₀ is reset.

        Args:
            update: δ, one tensor per variable.
            change: M(δ) − M(0), the quadratic model's predicted change.
            before: the variables' values before the update (used to undo it).
            due: a scalar bool tensor: whether to check ρ at this step.

        Returns:
            A scalar bool tensor, False when the step was undone.
        """
        rule, state = self.rule, self.state
        x, y, sample_weight, _, _, loss_before = self.curvature_data

        def local_loss_after() -> tf.Tensor:
            return tf.cast(self.forward(x, y, sample_weight)[1], tf.float32)

        loss_after = replicas.total(tf.cond(due, local_loss_after, lambda: tf.constant(0.0)))
        loss_change = loss_after - loss_before
        if rule.l2_reg:
            new_weights = [tf.cast(tf.convert_to_tensor(v), tf.float32) for v in self.variables]
            loss_change += rule.l2_reg * (
                quadratic_model.inner(new_weights, update) - 0.5 * quadratic_model.inner(update, update)
            )
        rho = quadratic_model.reduction_ratio(loss_change, change)
        omega = (19.0 / 20.0) ** rule.damping_adaptation_period
        damping = quadratic_model.levenberg_marquardt(state.damping, rho, omega, state.min_damping())
        state.rho.assign(tf.where(due, rho, state.rho))
        state.damping.assign(tf.where(due, damping, state.damping))
        if rule.reject_below is None:
            return tf.constant(True)
        reject = tf.logical_and(due, tf.logical_not(rho >= rule.reject_below))
        for variable, velocity, value in zip(self.variables, self.velocities, before):
            self._assign(variable, tf.where(reject, value, variable))
            self._assign(velocity, tf.where(reject, tf.zeros_like(velocity), velocity))
        return tf.logical_not(reject)

    def adapt_gamma(self, learning_rate: Any, due: tf.Tensor, current_stored: bool) -> None:
        """Tries γ, ω₂γ, γ/ω₂ and keeps the one with the lowest M(δ) [KFAC §6.6].

        When ``due``, one branch computes each candidate's proposal and exact-Fisher
        products, and a second one, if γ changes, recomputes and stores the chosen
        γ's inverses: carrying the candidates' inverses out of the first branch
        would cost a copy of them on every step. When ``current_stored``, the
        stored inverses are γ's own at this step (refreshed for it): γ's candidate
        uses them, and keeping γ stores nothing.

        Args:
            learning_rate: the current learning rate, for the fixed step's α.
            due: a scalar bool tensor: whether to search γ at this step.
            current_stored: whether, when ``due``, the stored inverses are fresh for γ.
        """
        gamma = self.state.gamma
        omega = math.sqrt(19.0 / 20.0) ** self.rule.gamma_adaptation_period
        x, y, sample_weight, _, weight, _ = self.curvature_data
        candidates = tf.stack([gamma * 1.0, gamma * omega, gamma / omega])

        def local_terms() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            # The branch runs its own forward pass: products need z in this graph.
            y_pred, _ = self.forward(x, y, sample_weight)
            z = self.batch.loss.network_output(y_pred)
            deltas, dots, linears, lengths = [], [], [], []
            for index in range(3):
                fresh = index > 0 or not current_stored
                delta = self.proposal(
                    self.preconditioner.inverses(candidates[index]) if fresh else self.preconditioner.stored()
                )
                deltas.append(delta)
                dots.append(quadratic_model.dot_gram([delta, self.previous]))
                linears.append(self.linear_terms(delta))
                if not self.rule.use_quadratic_model:
                    lengths.append(self.step_length(delta, learning_rate))
                elif self.constrained:
                    lengths.append(self.longest_step(delta))
                else:
                    lengths.append(tf.constant(math.inf))
            # [Δᵢ, δ₀]ᵀ F [Δᵢ, δ₀] for each candidate i, read off the gram of (Δ₀, Δ₁, Δ₂, δ₀).
            gram = self.local_fisher([*deltas, self.previous], z, weight)
            pairs = [[index, len(deltas)] for index in range(len(deltas))]
            fishers = [tf.gather(tf.gather(gram, pair), pair, axis=1) for pair in pairs]
            return tf.stack(fishers), tf.stack(dots), tf.stack(linears), tf.stack(lengths)

        def skip() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
            return tf.zeros([3, 2, 2]), tf.zeros([3, 2, 2]), tf.zeros([3, 2]), tf.zeros([3])

        fishers, dots, linears, lengths = tf.cond(due, local_terms, skip)
        fishers = replicas.curvature(fishers, self.batch.loss.reduction)
        values = []
        for index in range(3):
            length = lengths[index] if self.constrained or not self.rule.use_quadratic_model else None
            _, value = self.coefficients(self.damped_curvature(fishers[index], dots[index]), linears[index], length)
            values.append(tf.where(tf.math.is_finite(value), value, float("inf")))
        best = tf.argmin(tf.stack(values))
        chosen = tf.gather(candidates, best)

        def store() -> tf.Tensor:
            self.preconditioner.store(self.preconditioner.inverses(chosen))
            gamma.assign(chosen)
            return tf.constant(True)

        changed = tf.logical_and(due, best > 0) if current_stored else due
        tf.cond(changed, store, lambda: tf.constant(False))
