"""The curvature estimator: factor statistics, their moving averages and the inverse schedule.

It owns what K-FAC knows of the curvature: each block's Ā and G as moving
averages of per-batch estimates [KFAC §5] (and, for the block-tridiagonal
approximation, the cross statistics of consecutive blocks [KFAC §4.3]), and the
damped inverses refreshed on a schedule [KFAC §6.3], behind the
``Preconditioner`` of the chosen approximation. The optimizer calls
``update`` once per step and gives the step its ``preconditioner``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import curvature, losses, replicas, statistics
from keras_kfac.blocks import KroneckerBlock
from keras_kfac.chain import TridiagonalChain
from keras_kfac.preconditioner import BlockDiagonal, Preconditioner
from keras_kfac.step import Batch, sub_batch

# The approximations of the Fisher, by name [KFAC §4.2, §4.3].
APPROXIMATIONS: dict[str, Callable[[keras.optimizers.Optimizer, list[KroneckerBlock]], Preconditioner]] = {
    "block_diagonal": lambda optimizer, blocks: BlockDiagonal(blocks),
    "block_tridiagonal": TridiagonalChain,
}
# The layer types automatic registration takes where an approximation needs fewer
# than all: the block-tridiagonal chain is made of Dense layers.
AUTO_REGISTER_TYPES: dict[str, tuple[type, ...]] = {"block_tridiagonal": (keras.layers.Dense,)}


class CurvatureEstimator:
    """Kronecker-factor statistics of the registered blocks and their damped inverses.

    Args:
        optimizer: the optimizer whose variables hold the approximation's own
            state (saved with it).
        blocks: the registered blocks, their factors' state created.
        approximation: a name in ``APPROXIMATIONS``.
        estimation_mode: how output vectors are drawn (``statistics.factor_rows``).
        ema_decay: the moving averages' largest decay ε [KFAC §5].
        statistics_update_period: T_cov, steps between statistics updates.
        statistics_fraction: τ₁, the fraction of the batch the statistics use.
        patch_fraction: the fraction of a convolution's patches Ā uses.
        inverse_update_period: T₃, steps between inverse refreshes.
        weight_sharing: how a weight-shared layer's locations enter its factors,
            one of ``statistics.WEIGHT_SHARING``, or None for each block's default.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        blocks: list[KroneckerBlock],
        approximation: str,
        estimation_mode: str,
        ema_decay: float,
        statistics_update_period: int,
        statistics_fraction: float,
        patch_fraction: float,
        inverse_update_period: int,
        weight_sharing: str | None = None,
    ):
        self.blocks = blocks
        self.preconditioner = APPROXIMATIONS[approximation](optimizer, blocks)
        self.estimation_mode = estimation_mode
        self.ema_decay = ema_decay
        self.statistics_update_period = statistics_update_period
        self.statistics_fraction = statistics_fraction
        self.patch_fraction = patch_fraction
        self.inverse_update_period = inverse_update_period
        self.reduce_locations = None if weight_sharing is None else weight_sharing == "reduce"

    def update(
        self,
        batch: Batch,
        count: tf.Tensor,
        gradients_finite: tf.Tensor,
        seed: tf.Tensor,
        forward: Callable[[Any], tuple[Any, dict]],
    ) -> None:
        """Moving averages of the factors from this step's batch [KFAC §5].

        With τ₁ = 1 and T_cov = 1 the statistics use the training step's own
        forward pass and one more backward pass, from the sampled outputs. With
        τ₁ < 1 or T_cov > 1 they come from a forward and backward pass of the
        first ⌈τ₁B⌉ examples alone (``forward``: x ↦ the model's output and its
        blocks' layer calls), run on every T_cov-th step only (a ``tf.cond``):
        these passes then cost about τ₁/T_cov of the training step's. No tensor
        shape depends on the step counter, so XLA compiles the step once.
        Under a ``tf.distribute`` strategy the replicas' batch estimates are
        all-reduced before they enter the moving averages; the all-reduce runs
        on every step (a strategy cannot place it in the ``tf.cond``), also on
        those that skip the passes. A batch enters the statistics whole or not
        at all: not when one of its estimates or ``gradients_finite`` is false,
        nor when its examples all weigh 0.

        Args:
            batch: the step's recorded loss inputs and layer calls.
            count: the number of K-FAC steps before this one.
            gradients_finite: a scalar bool tensor, false when a gradient of the
                step is not finite.
            seed: the step's stateless seed of the target sampling (and of the
                patch subsampling).
            forward: x ↦ (the model's output, its blocks' layer calls by
                ``id(block)``) at the current weights.
        """
        period = self.statistics_update_period
        decay = curvature.moving_average_decay(count // period + 1, self.ema_decay)
        called = [b for b in self.blocks if batch.layer_calls.get(id(b))]
        cross_inputs, cross_outputs = self.preconditioner.cross_targets()
        input_targets = [b.input_factor.cov for b in called] + cross_inputs
        output_targets = [b.output_factor.cov for b in called] + cross_outputs

        def estimate(layer_calls: dict, z: tf.Tensor, y_true, sample_weight) -> tuple[list, list, list]:
            examples = tf.shape(z)[0]
            rows = statistics.factor_rows(
                self.blocks,
                layer_calls,
                batch.loss,
                z,
                self.estimation_mode,
                y_true,
                sample_weight,
                seed,
                self.reduce_locations,
            )
            if [b for b in self.blocks if id(b) in rows] != called:
                raise RuntimeError("KFAC's statistics pass called other layers than the training step.")
            input_estimates, input_masses, output_estimates = statistics.factor_estimates(
                self.blocks, rows, examples, seed, self.patch_fraction, self.reduce_locations
            )
            input_cross, cross_masses, output_cross = self.preconditioner.cross_estimates(rows, examples)
            input_estimates += input_cross
            input_masses += cross_masses
            output_estimates += output_cross
            if batch.loss.reduction != "sum":
                # Keras averages each replica's loss over its own examples, so
                # the weight of its examples in the global loss is w/B_replica.
                input_masses = [tf.math.divide_no_nan(m, tf.cast(examples, tf.float32)) for m in input_masses]
            return input_estimates, input_masses, output_estimates

        def estimate_sub_batch() -> tuple[list, list, list]:
            x, y_true, sample_weight = sub_batch(
                (batch.loss_call.x, batch.y_true, batch.sample_weight),
                tf.shape(batch.z)[0],
                self.statistics_fraction,
                batch.loss.reduction,
            )
            y_pred, layer_calls = forward(x)
            y_pred = keras.tree.flatten(y_pred)[0]
            weight = losses.masked_sample_weight(y_pred, y_true, sample_weight, batch.loss)
            return estimate(layer_calls, batch.loss.network_output(y_pred), y_true, weight)

        def skip() -> tuple[list, list, list]:
            return (
                [tf.zeros(t.shape) for t in input_targets],
                [tf.zeros([]) for _ in input_targets],
                [tf.zeros(t.shape) for t in output_targets],
            )

        def combine(estimates: tuple[list, list, list]) -> tuple[list, list, list]:
            """The global batch's estimates and masses of Ā (identity without a strategy)."""
            inputs, masses = replicas.weighted_mean(list(estimates[0]), list(estimates[1]))
            return inputs, masses, replicas.curvature(list(estimates[2]), batch.loss.reduction)

        def accumulate(estimates: tuple[list, list, list]) -> tf.Tensor:
            inputs, masses, outputs = estimates
            accept = tf.logical_and(gradients_finite, curvature.all_finite(inputs + outputs))
            accept = tf.logical_and(accept, tf.reduce_all([m > 0.0 for m in masses]))
            for variable, value in zip(input_targets + output_targets, inputs + outputs):
                curvature.update_moving_average(variable, value, decay, accept)
            return tf.constant(True)

        if not input_targets:  # no registered layer ran in this step
            return
        if self.statistics_fraction >= 1.0 and period == 1:
            accumulate(combine(estimate(batch.layer_calls, batch.z, batch.y_true, batch.curvature_weight)))
        elif period == 1:
            accumulate(combine(estimate_sub_batch()))
        else:
            active = tf.equal(count % period, 0)
            if replicas.count() == 1:  # nothing to all-reduce: the whole update in one branch
                tf.cond(active, lambda: accumulate(estimate_sub_batch()), lambda: tf.constant(False))
            else:
                # ``combine`` all-reduces, which cannot run inside a branch: the
                # skipped steps carry zeros of every factor's shape to it.
                estimates = combine(tf.cond(active, estimate_sub_batch, skip))
                tf.cond(active, lambda: accumulate(estimates), lambda: tf.constant(False))

    def refresh_inverses(self, count: tf.Tensor, gamma: tf.Tensor) -> None:
        """Stores the damped inverses for γ after each of the first 3 statistics updates, then every T₃ steps.

        Args:
            count: the number of K-FAC steps before this one.
            gamma: the factored Tikhonov damping γ.
        """
        period = self.statistics_update_period
        early = tf.logical_and(count < 3 * period, tf.equal(count % period, 0))
        due = tf.logical_or(early, tf.equal(count % self.inverse_update_period, 0))

        def refresh() -> tf.Tensor:
            self.preconditioner.store(self.preconditioner.inverses(gamma))
            return tf.constant(True)

        tf.cond(due, refresh, lambda: tf.constant(False))

    def accepted(self) -> tf.Tensor:
        """Whether any batch's statistics have entered the factors yet (they are 0 until then).

        Returns:
            A scalar bool tensor: true once some block's G has a positive trace.
        """
        return tf.reduce_any(tf.stack([b.output_factor.trace() > 0.0 for b in self.blocks]))

    def mean_eigenvalue(self) -> tf.Tensor:
        """tr(F̃)/n = Σ tr Ā·tr G / Σ dim Ā·dim G, the mean eigenvalue of F̃ = ⊕ Ā ⊗ G.

        Returns:
            A float32 scalar, from each factor's floored ``mean_eigenvalue``.
        """
        return tf.add_n([b.trace() for b in self.blocks]) / float(sum(b.fisher_dim for b in self.blocks))
