"""Per-batch Kronecker-factor statistics from the recorded training step [KFAC §3, §5].

The second, curvature backward pass of the paper: output vectors drawn from the
predictive distribution (or its exact Hessian factor, or the data's labels) are
back-propagated to every recorded pre-activation, and each block turns its
inputs and those vectors into batch estimates of Ā and G, which enter the
moving averages.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kfac import curvature, losses
from keras_kfac.blocks import KroneckerBlock
from keras_kfac.capture import LayerCall

# How a weight-shared layer's locations enter its factors (Eschenhagen et al. 2023):
# a row per location (K-FAC-expand, [KFC §3]) or one per example (K-FAC-reduce);
# None: each block's own default (``KroneckerBlock.reduces_locations_by_default``).
WEIGHT_SHARING = ("expand", "reduce")


def reduces(block: KroneckerBlock, reduce_locations: bool | None) -> bool:
    """Whether ``block``'s rows are reduced to one per example (K-FAC-reduce).

    Args:
        block: a block.
        reduce_locations: True (reduce), False (expand) or None (the block's default).

    Returns:
        True when its rows are locations and they are reduced.
    """
    if not (block.rows_are_patch_locations or block.rows_are_positions):
        return False
    return block.reduces_locations_by_default if reduce_locations is None else reduce_locations


def subset_size(batch_size: tf.Tensor, fraction: float) -> tf.Tensor:
    """⌈fraction · batch_size⌉ examples, at least one.

    Args:
        batch_size: the number of examples B, a scalar int32 tensor.
        fraction: the fraction to keep, in (0, 1].

    Returns:
        The subset's size, a scalar int32 tensor (``batch_size`` itself for a fraction of 1).
    """
    if fraction >= 1.0:
        return batch_size
    size = tf.cast(tf.math.ceil(fraction * tf.cast(batch_size, tf.float32)), tf.int32)
    return tf.maximum(size, 1)


def subsample_rows(
    rows: tf.Tensor, weights: tf.Tensor | None, fraction: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """⌈fraction · n⌉ of the n rows (and their weights), drawn uniformly without replacement.

    The (weighted) mean of ``ā āᵀ`` over the drawn rows is an estimate of its
    mean over all of them, at ``fraction`` of the cost of the product.

    Args:
        rows: n rows, shape (n, ...).
        weights: their weights, shape (n,), or None.
        fraction: the fraction to draw, in (0, 1]; 1 keeps every row in order.
        seed: a stateless random seed, shape (2,).

    Returns:
        (drawn rows, their weights or None).
    """
    if fraction >= 1.0:
        return rows, weights
    count = tf.shape(rows)[0]
    size = tf.minimum(subset_size(count, fraction), count)
    # Full-range int32 keys: float32 keys take only 2²³ values, and ties at the
    # cut would favour the rows that come first.
    keys = tf.random.stateless_uniform([count], seed=seed, minval=None, maxval=None, dtype=tf.int32)
    drawn = tf.argsort(keys)[:size]
    return tf.gather(rows, drawn), None if weights is None else tf.gather(weights, drawn)


def row_weights(call: LayerCall, value_weights: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    """The weights of one layer call's rows ā: the loss values' weights carried to its locations.

    The loss is Σ_v w_v ℓ_v over its values v (examples, and positions of a
    sequence output; ``sample_weight`` times a Keras mask), so each row's ā
    enters Ā with the weight of the values it feeds. A layer's R rows and the
    S loss values both run example by example (the leading axes flattened), so
    row r is given the mean weight of the values in the span [r·S/R, (r+1)·S/R),
    or, when R > S, the weight of the value its position falls in. That is the
    value's own weight where the layer's locations are the loss's (R = S: a
    masked sequence), each example's mean weight where the layer has one row
    per example (R = B), and each example's weight repeated over its locations
    where the weights are per example. A call on a constant input (a position
    embedding) is shared by the whole batch: its rows weigh the same.

    Args:
        call: the layer call.
        value_weights: the weights of the loss values (``losses.value_weights``).
        rows: R, the block's ``row_count`` of the call.

    Returns:
        A float32 vector of R row weights.
    """
    if tf.get_static_value(call.inputs) is not None:
        return tf.ones([rows])
    flat = tf.reshape(tf.cast(value_weights, tf.float32), [-1])
    size = tf.size(flat, out_type=tf.int64)
    count = tf.cast(rows, tf.int64)
    spans = tf.range(size) * count // tf.maximum(size, 1)
    span_means = tf.math.unsorted_segment_mean(flat, spans, tf.maximum(rows, 1))[:rows]
    # A trailing 0 keeps the gather defined when there are no loss values (an empty batch).
    covering_values = tf.gather(tf.concat([flat, [0.0]], 0), tf.range(count) * size // tf.maximum(count, 1))
    return tf.where(count <= size, span_means, covering_values)


def factor_rows(
    blocks: list[KroneckerBlock],
    calls: dict[int, list[LayerCall]],
    loss: losses.RegisteredLoss,
    z: tf.Tensor,
    mode: str,
    y_true,
    sample_weight,
    seed: tf.Tensor,
    reduce_locations: bool | None = None,
) -> dict[int, tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]]:
    """Each called block's rows (ā rows, back-propagated ĝ rows, ā rows' weights), by ``id(block)``.

    The second backward pass of [KFAC §5]: the output vectors of ``mode``
    (sampled targets, the exact Hessian factor or the labels) are
    back-propagated from z to every recorded pre-activation. The calls are
    those of the forward pass that produced z — the training step's, or one of
    the first ⌈τ₁·B⌉ examples for the paper's τ₁ [KFAC §8] — and every row of
    theirs counts, whatever the layer's leading axis (a model may fold
    positions into it). The ā rows' weights are ``None`` without
    ``sample_weight`` (all rows weigh the same), otherwise ``row_weights``.

    Args:
        blocks: the registered blocks; those without calls are skipped.
        calls: each block's recorded calls, by ``id(block)``.
        loss: the registered loss, whose distribution gives the output vectors.
        z: the network output of the forward pass that made ``calls``.
        mode: the estimation mode: ``"sampled"``, ``"empirical"`` or ``"exact"``.
        y_true: the data's targets (used by ``"empirical"``).
        sample_weight: the weights of z's values, or None.
        seed: a stateless random seed, shape (2,), of the target sampling.
        reduce_locations: K-FAC-reduce for the blocks whose rows are locations
            (convolutions, EinsumDense; Eschenhagen et al. 2023, §3.2): one row per
            example, ā the mean of its patches and ĝ the sum of its locations'
            vectors, instead of a row per location (K-FAC-expand, [KFC §3]);
            None: each block's default (``reduces``).

    Returns:
        A dict from ``id(block)`` to (ā rows (N, input_dim), ĝ rows
        (N·V, output_dim) for V output vectors, ā rows' weights (N,) or None).
    """
    blocks = [b for b in blocks if calls.get(id(b))]
    if not blocks:
        return {}
    if mode != "sampled":
        for block in blocks:
            if any(tf.get_static_value(c.inputs) is not None for c in calls[id(block)]):
                raise NotImplementedError(
                    f"Layer '{block.name}' is called on a constant (e.g. the positions of a "
                    "position embedding), so its output is shared by the whole batch and the "
                    f"back-propagated vectors are sums over the examples: estimation_mode='{mode}' "
                    "would count the cross-example terms. The default 'sampled' mode estimates "
                    "G without bias there (its samples are independent across examples)."
                )
    vectors = loss.output_vectors(tf.cast(z, tf.float32), mode, y_true, sample_weight, seed)
    preactivations = [c.preactivation for b in blocks for c in calls[id(b)]]
    # One backward pass per vector: ĝ = Jᵀ v at every recorded pre-activation.
    backpropagated = [
        [
            tf.zeros_like(s) if g is None else g
            for g, s in zip(tf.gradients(z, preactivations, grad_ys=tf.cast(v, z.dtype)), preactivations)
        ]
        for v in vectors
    ]
    value_weights = None if sample_weight is None else losses.value_weights(z, sample_weight)
    position = 0
    rows = {}
    for block in blocks:
        block_calls = calls[id(block)]
        span = slice(position, position + len(block_calls))
        position += len(block_calls)
        inputs = [block.row_source(c) for c in block_calls]
        gradients = [g for per_vector in backpropagated for g in per_vector[span]]
        weights = None
        if value_weights is not None:
            weights = [row_weights(c, value_weights, block.call_row_count(c)) for c in block_calls]
        if reduces(block, reduce_locations):
            input_rows = tf.concat([_per_example(block.input_rows(x), x, tf.reduce_mean) for x in inputs], 0)
            output_rows = tf.concat([_per_example(block.output_rows(g), g, tf.reduce_sum) for g in gradients], 0)
            if weights is not None:
                weights = [_per_example(w[:, None], x, tf.reduce_mean)[:, 0] for w, x in zip(weights, inputs)]
        else:
            input_rows = tf.concat([block.call_input_rows(c) for c in block_calls], axis=0)
            # ``gradients`` runs over the vectors, and for each over the calls.
            output_rows = tf.concat(
                [block.call_output_rows(c, g) for c, g in zip(block_calls * len(vectors), gradients)], axis=0
            )
        rows[id(block)] = (input_rows, output_rows, None if weights is None else tf.concat(weights, axis=0))
    return rows


def _per_example(rows: tf.Tensor, call_tensor: tf.Tensor, reduce) -> tf.Tensor:
    """One call's rows (example-major: each example's locations in turn) reduced over each example's locations.

    Args:
        rows: the call's rows, shape (examples × locations, d).
        call_tensor: a tensor of the call whose first axis is its examples.
        reduce: ``tf.reduce_mean`` or ``tf.reduce_sum``, applied over the locations.

    Returns:
        One row per example, shape (examples, d).
    """
    examples = tf.shape(call_tensor)[0]
    locations = tf.shape(rows)[0] // tf.maximum(examples, 1)
    return reduce(tf.reshape(rows, [examples, locations, tf.shape(rows)[-1]]), axis=1)


def factor_estimates(
    blocks: list[KroneckerBlock],
    rows: dict[int, tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]],
    examples: tf.Tensor,
    seed: tf.Tensor,
    patch_fraction: float = 1.0,
    reduce_locations: bool | None = None,
) -> tuple[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor]]:
    """Batch estimates ([Ā …], [mass of Ā …], [G …]) of the blocks with rows, in ``blocks`` order [KFAC §5].

    Ā = Σ w ā āᵀ / Σ w over the rows (w = 1 without sample weights) and
    G = (1/examples) Σ ĝ ĝᵀ, whose ĝ already carry the weights. A weighted
    loss (1/B) Σ_n w_n ℓ_n has the Fisher (1/B) Σ_n w_n (ā_n ā_nᵀ) ⊗ (g_n g_nᵀ)
    (g_n unweighted), so its Kronecker approximation takes the expectation in
    Ā under the examples' weights: an example of weight 0 leaves Ā as if it
    were absent. Each Ā comes with its mass Σ w (the number of rows without
    weights), which weighs a replica's Ā in the global batch's.

    For blocks whose rows are patch locations (convolutions), Ā is estimated
    from a random ``patch_fraction`` of the |T|·examples patch rows: the
    expectation E_{x,t}[ā_t ā_tᵀ] of [KFC §3.1] on a uniform subsample, which
    cuts the dominant (rows × dim Ā²) product by that fraction. G keeps every
    location.

    Args:
        blocks: the registered blocks; their order sets the outputs'.
        rows: ``factor_rows``'s result.
        examples: B, the number of examples G is averaged over.
        seed: the step's stateless random seed; each block folds in its own stream.
        patch_fraction: the fraction of patch rows Ā uses, in (0, 1].
        reduce_locations: whether ``rows`` were reduced over locations
            (``factor_rows``); the rows are then examples, and all are used.

    Returns:
        Three lists aligned with the blocks that have rows: the estimates of Ā,
        their masses, and the estimates of G.
    """
    input_estimates, input_masses, output_estimates = [], [], []
    for index, block in enumerate(blocks):
        if id(block) not in rows:
            continue
        input_rows, output_rows, input_weights = rows[id(block)]
        input_masses.append(curvature.row_mass(input_rows, input_weights))
        if block.rows_are_patch_locations and not reduces(block, reduce_locations):
            # A stream of its own: the target sampling uses ``seed`` itself.
            block_seed = tf.random.experimental.stateless_fold_in(seed, index + 1)
            input_rows, input_weights = subsample_rows(input_rows, input_weights, patch_fraction, block_seed)
        input_estimates.append(block.input_second_moment(input_rows, input_weights))
        output_estimates.append(block.output_second_moment(output_rows, examples))
    return input_estimates, input_masses, output_estimates
