"""Agreement between the replicas of a ``tf.distribute`` strategy.

Under a strategy, Keras runs the training step, and with it ``optimizer.apply``,
once per replica on that replica's share of the global batch. K-FAC keeps its
state (factors, inverses, damping, velocities) in mirrored variables that every
replica updates locally, so every replica must compute the same values: each
per-batch quantity that depends on the replica's examples — gradients, factor
statistics, exact-Fisher products, losses — is all-reduced before it is used,
and everything computed from reduced values is then identical on each replica.

An all-reduce is a synchronisation point that a strategy cannot place inside a
``tf.cond`` branch: callers compute local values in branches and reduce them
outside.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def count() -> int:
    """Replicas taking part in the current step (1 without a strategy).

    Returns:
        The number of replicas in sync, an int.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


def index() -> int:
    """This replica's position in its sync group while its step is traced.

    Returns:
        The replica id, an int; 0 outside a replica context, and where the
        strategy traces one program for all replicas (TPUs).
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    value = tf.get_static_value(context.replica_id_in_sync_group)
    return 0 if value is None else int(value)


def index_tensor() -> tf.Tensor:
    """This replica's position in its sync group as an int32 tensor (also on TPUs).

    Returns:
        The replica id, a scalar int32 tensor; 0 outside a replica context.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def _reduce(operation: tf.distribute.ReduceOp, values: Any) -> Any:
    if count() == 1:
        return values
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "KFAC's update must run once per replica (inside model.fit or "
            "strategy.run), not in the strategy's cross-replica context."
        )
    return context.all_reduce(operation, values)


def mean(values: Any) -> Any:
    """The mean over replicas of each tensor of ``values`` (a nested structure).

    Per-replica averages over equal shares of the batch give the global
    average, the way Keras combines per-replica gradients.

    Args:
        values: a nested structure of tensors.

    Returns:
        The same structure, all-reduced; ``values`` itself with one replica.
    """
    return _reduce(tf.distribute.ReduceOp.MEAN, values)


def weighted_mean(values: list[tf.Tensor], masses: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """(Σ_r m_r v_r / Σ_r m_r, Σ_r m_r) over replicas for each value v and its mass m.

    A replica's Ā is a mean over its rows under its examples' weights; the
    global batch's is the replicas' means, each weighted by the total weight
    its examples have in the global loss (the caller's masses). Replicas with
    equal shares of an unweighted batch have equal masses; an empty share has
    none.

    Args:
        values: this replica's values v (e.g. Ā estimates).
        masses: the mass m of each value, scalars.

    Returns:
        (weighted means, total masses), lists aligned with ``values``; a value
        whose total mass is 0 gives 0. ``(values, masses)`` with one replica.
    """
    if count() == 1:
        return values, masses
    reduced = total([m * v for v, m in zip(values, masses)] + list(masses))
    sums, masses = reduced[: len(values)], reduced[len(values) :]
    return [tf.math.divide_no_nan(s, m) for s, m in zip(sums, masses)], masses


def total(values: Any) -> Any:
    """The sum over replicas of each tensor of ``values``.

    Args:
        values: a nested structure of tensors.

    Returns:
        The same structure, all-reduced; ``values`` itself with one replica.
    """
    return _reduce(tf.distribute.ReduceOp.SUM, values)


def curvature(values: Any, reduction: str) -> Any:
    """The global batch's curvature (G, exact-Fisher products) from each replica's.

    Each replica's value is the curvature of its share of the loss as Keras
    reduces it with ``reduction``: a mean over examples, which the global
    batch's is the mean of, or for ``"sum"`` a sum, which adds up.

    Args:
        values: this replica's curvature, a nested structure of tensors.
        reduction: the loss's reduction.

    Returns:
        The global batch's curvature, in the structure of ``values``.
    """
    return total(values) if reduction == "sum" else mean(values)
