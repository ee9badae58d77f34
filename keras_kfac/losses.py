"""Predictive distributions behind the losses Keras users compile with.

K-FAC's curvature is the Fisher of the model's predictive distribution
[KFAC §2, §5]. Each supported compiled loss is, per example and up to a constant,
``c · NLL(y | z)`` for a distribution on the network output ``z``:

========================================  ==========================  =======
compiled loss                             distribution on z           c
========================================  ==========================  =======
(sparse_)categorical_crossentropy         Categorical(softmax(z))     1
binary_crossentropy                       Bernoulli(sigmoid(z)) / unit 1/K
mean_squared_error                        Normal(z, ½ I)              1/K
========================================  ==========================  =======

(K output units: Keras averages binary cross-entropy and squared error over the
last axis.) With the batch reduction ``L = Σ_n w_n · c · NLL_n`` the Fisher of L is
``Σ_n w_n c J_nᵀ H_n J_n`` with ``H_n`` the NLL's Hessian in z. K-FAC needs it as
an average over the batch of outer products of *output vectors* back-propagated
to each layer: ``v_n = sqrt(B w_n c) · u_n`` where ``u_n`` is

- ``sampled``: ``∇_z NLL(ŷ_n | z_n)`` with ŷ_n drawn from the model, whose
  outer product has expectation H_n (the true Fisher; the paper's choice);
- ``empirical``: ``∇_z NLL(y_n | z_n)`` at the data's labels (smoothed as the
  compiled loss smooths them, for ``label_smoothing``);
- ``exact``: each column of a symmetric factor C_n with ``C_n C_nᵀ = H_n``
  (K vectors, so K backward passes).

Label smoothing leaves H_n as it is (H_n does not depend on the labels, which
still sum to one per categorical example), so it changes only the empirical
vectors. ``ignore_class`` drops the values whose label is that class from the
loss, as a mask does (``masked_sample_weight``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import compat

ESTIMATION_MODES = ("sampled", "empirical", "exact")


class PredictiveDistribution(abc.ABC):
    """A distribution on the network output z whose NLL is the compiled loss."""

    #: Whether Keras averages the loss over the last axis (c = 1/K) or not (c = 1).
    averages_over_units: bool = False

    @abc.abstractmethod
    def nll_gradient(self, z: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """∇_z NLL(y | z), per example.

        Args:
            z: the network output, shape (..., K).
            y: targets shaped like z, in the form ``labels`` gives.

        Returns:
            The gradient, shaped like z.
        """

    @abc.abstractmethod
    def sample(self, z: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Targets drawn from the model's predictive distribution at z.

        Args:
            z: the network output, shape (..., K).
            seed: a stateless random seed, shape (2,).

        Returns:
            The targets, shaped like z.
        """

    @abc.abstractmethod
    def hessian_factor(self, z: tf.Tensor) -> list[tf.Tensor]:
        """Columns of C with C Cᵀ = ∇²_z NLL, each shaped like z.

        Args:
            z: the network output, shape (..., K).

        Returns:
            A list of K tensors, each shaped like z.
        """

    @abc.abstractmethod
    def hessian_product(self, z: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """∇²_z NLL · v, per example.

        Args:
            z: the network output, shape (..., K).
            v: a vector per example, shaped like z.

        Returns:
            The product, shaped like z.
        """

    def labels(self, y_true: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """The data's targets in the form ``nll_gradient`` takes, shaped like z.

        As Keras' losses do, targets one rank below z (labels (B,) for an
        output (B, 1)) gain a last axis, and one rank above with a last axis
        of 1 lose it.

        Args:
            y_true: the data's targets.
            z: the network output, shape (..., K).

        Returns:
            The targets in z's dtype, broadcast to z's shape.
        """
        y = tf.cast(y_true, z.dtype)
        if y.shape.rank == z.shape.rank - 1:
            y = y[..., tf.newaxis]
        elif y.shape.rank == z.shape.rank + 1 and y.shape[-1] == 1:
            y = tf.squeeze(y, -1)
        return tf.broadcast_to(y, tf.shape(z))


class CategoricalLogits(PredictiveDistribution):
    """Categorical(softmax(z)); ``sparse`` labels are class indices.

    Args:
        sparse: whether the labels are class indices (sparse categorical
            cross-entropy) rather than one-hot or probability vectors.
        label_smoothing: the compiled loss's smoothing of dense labels towards
            the uniform distribution over the K classes.
    """

    def __init__(self, sparse: bool, label_smoothing: float = 0.0):
        self.sparse = sparse
        self.label_smoothing = label_smoothing

    def nll_gradient(self, z, y):
        """softmax(z) − y.

        Args:
            z: the logits, shape (..., K).
            y: class probabilities (one-hot or smoothed), shaped like z.

        Returns:
            The gradient, shaped like z.
        """
        return tf.nn.softmax(z) - y

    def sample(self, z, seed):
        """One class per example (and position) drawn from softmax(z), one-hot.

        Args:
            z: the logits, shape (..., K).
            seed: a stateless random seed, shape (2,).

        Returns:
            One-hot targets, shaped like z.
        """
        flat = tf.reshape(z, [-1, tf.shape(z)[-1]])
        classes = tf.random.stateless_categorical(flat, 1, seed=seed)[:, 0]
        return tf.reshape(tf.one_hot(classes, tf.shape(z)[-1], dtype=z.dtype), tf.shape(z))

    def hessian_factor(self, z):
        """Columns sqrt(p_j) (e_j − p), j = 1 … K, with p = softmax(z).

        Args:
            z: the logits, shape (..., K).

        Returns:
            A list of K tensors, each shaped like z.
        """
        # H = diag(p) − p pᵀ = Σ_j p_j (e_j − p)(e_j − p)ᵀ, as Σ p = 1.
        p = tf.nn.softmax(z)
        num_classes = z.shape[-1]
        return [
            tf.sqrt(p[..., j : j + 1]) * (tf.one_hot(j, num_classes, dtype=z.dtype) - p) for j in range(num_classes)
        ]

    def hessian_product(self, z, v):
        """(diag(p) − p pᵀ) v with p = softmax(z).

        Args:
            z: the logits, shape (..., K).
            v: a vector per example, shaped like z.

        Returns:
            The product, shaped like z.
        """
        p = tf.nn.softmax(z)
        return p * v - p * tf.reduce_sum(p * v, axis=-1, keepdims=True)

    def labels(self, y_true, z):
        """The labels as class probabilities: one-hot for sparse labels, else smoothed.

        Args:
            y_true: class indices (``sparse``) or class probabilities.
            z: the logits, shape (..., K).

        Returns:
            Class probabilities in z's dtype, shaped like z.
        """
        if self.sparse:
            classes = tf.cast(tf.reshape(y_true, tf.shape(z)[:-1]), tf.int32)
            return tf.one_hot(classes, tf.shape(z)[-1], dtype=z.dtype)
        y = super().labels(y_true, z)
        # Keras smooths towards the uniform distribution over the K classes.
        return y * (1.0 - self.label_smoothing) + self.label_smoothing / z.shape[-1]


class BernoulliLogits(PredictiveDistribution):
    """Independent Bernoulli(sigmoid(z)) per output unit.

    Args:
        label_smoothing: the compiled loss's smoothing of each unit's label towards 1/2.
    """

    averages_over_units = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def nll_gradient(self, z, y):
        """sigmoid(z) − y.

        Args:
            z: the logits, shape (..., K).
            y: each unit's target probability, shaped like z.

        Returns:
            The gradient, shaped like z.
        """
        return tf.sigmoid(z) - y

    def sample(self, z, seed):
        """Each unit's 0 or 1, drawn with probability sigmoid(z) of 1.

        Args:
            z: the logits, shape (..., K).
            seed: a stateless random seed, shape (2,).

        Returns:
            The targets in z's dtype, shaped like z.
        """
        uniform = tf.random.stateless_uniform(tf.shape(z), seed=seed, dtype=z.dtype)
        return tf.cast(uniform < tf.sigmoid(z), z.dtype)

    def hessian_factor(self, z):
        """Columns sqrt(p_j (1 − p_j)) e_j, j = 1 … K, with p = sigmoid(z).

        Args:
            z: the logits, shape (..., K).

        Returns:
            A list of K tensors, each shaped like z.
        """
        p = tf.sigmoid(z)
        scale = tf.sqrt(p * (1.0 - p))
        num_units = z.shape[-1]
        return [scale * tf.one_hot(j, num_units, dtype=z.dtype) for j in range(num_units)]

    def hessian_product(self, z, v):
        """p (1 − p) v elementwise, with p = sigmoid(z).

        Args:
            z: the logits, shape (..., K).
            v: a vector per example, shaped like z.

        Returns:
            The product, shaped like z.
        """
        p = tf.sigmoid(z)
        return p * (1.0 - p) * v

    def labels(self, y_true, z):
        """The targets shaped like z, each smoothed towards 1/2 by ``label_smoothing``.

        Args:
            y_true: the data's targets.
            z: the logits, shape (..., K).

        Returns:
            Target probabilities in z's dtype, shaped like z.
        """
        # Keras smooths each unit's label towards 1/2.
        return super().labels(y_true, z) * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing


class NormalMean(PredictiveDistribution):
    """Normal(z, ½ I): its NLL is Σ_k (y_k − z_k)² up to a constant."""

    averages_over_units = True

    def nll_gradient(self, z, y):
        """2 (z − y).

        Args:
            z: the predicted means, shape (..., K).
            y: the targets, shaped like z.

        Returns:
            The gradient, shaped like z.
        """
        return 2.0 * (z - y)

    def sample(self, z, seed):
        """Targets drawn from Normal(z, ½ I).

        Args:
            z: the predicted means, shape (..., K).
            seed: a stateless random seed, shape (2,).

        Returns:
            The targets, shaped like z.
        """
        noise = tf.random.stateless_normal(tf.shape(z), seed=seed, dtype=z.dtype)
        return z + noise * (0.5**0.5)

    def hessian_factor(self, z):
        """Columns sqrt(2) e_j, j = 1 … K (the Hessian is 2I).

        Args:
            z: the predicted means, shape (..., K).

        Returns:
            A list of K tensors, each shaped like z.
        """
        num_units = z.shape[-1]
        return [(2.0**0.5) * tf.ones_like(z) * tf.one_hot(j, num_units, dtype=z.dtype) for j in range(num_units)]

    def hessian_product(self, z, v):
        """2 v.

        Args:
            z: the predicted means, shape (..., K).
            v: a vector per example, shaped like z.

        Returns:
            The product, shaped like z.
        """
        return 2.0 * v


# name: (distribution from the loss's smoothing, whether z must be logits)
_LOSS_NAMES = {
    "sparse_categorical_crossentropy": (lambda smoothing: CategoricalLogits(sparse=True), True),
    "categorical_crossentropy": (lambda smoothing: CategoricalLogits(False, smoothing), True),
    "binary_crossentropy": (BernoulliLogits, True),
    "mean_squared_error": (lambda smoothing: NormalMean(), False),
}
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum")


@dataclasses.dataclass
class RegisteredLoss:
    """A compiled loss seen as a predictive distribution, with its reduction.

    Attributes:
        distribution: the predictive distribution on the network output z.
        from_logits: False means the model outputs probabilities (softmax or
            sigmoid): the curvature is taken in the logits that produced them.
        reduction: the loss's reduction: ``"sum_over_batch_size"``, ``"mean"`` or ``"sum"``.
        weight: the factor the loss is weighted by in the total loss.
        needs_logits: whether z must be logits (the cross-entropies) rather than
            the model output itself (mean squared error).
        ignore_class: the sparse label whose values the loss leaves out, or None.
    """

    distribution: PredictiveDistribution
    from_logits: bool
    reduction: str = "sum_over_batch_size"
    weight: float = 1.0
    needs_logits: bool = True
    ignore_class: int | None = None

    def network_output(self, y_pred: tf.Tensor) -> tf.Tensor:
        """The tensor z the distribution is defined on.

        Args:
            y_pred: the model's output.

        Returns:
            ``y_pred`` itself, or the logits behind its softmax or sigmoid when
            the distribution needs logits and the loss is not ``from_logits``.
        """
        if self.from_logits or not self.needs_logits:
            return y_pred
        logits = compat.output_logits(y_pred)
        if logits is None and getattr(y_pred, "op", None) is not None:
            if y_pred.op.type in ("Softmax", "Sigmoid"):
                logits = y_pred.op.inputs[0]
        if logits is None:
            raise ValueError(
                "KFAC needs the logits behind the model's probabilities to compute "
                "the Fisher of a cross-entropy loss, but the model output was not "
                "produced by a softmax/sigmoid activation. Compile with "
                "`from_logits=True` and a linear output layer, or end the model "
                "with a softmax/sigmoid activation."
            )
        return logits

    def _example_weights(self, z: tf.Tensor, sample_weight: Any) -> tf.Tensor:
        """B·w_n·c for each loss value (shape z.shape[:-1]), L = Σ_n w_n c NLL_n."""
        batch_size = tf.cast(tf.shape(z)[0], z.dtype)
        # Keras reduces per-example-and-location loss values (shape z.shape[:-1]).
        num_values = tf.cast(tf.reduce_prod(tf.shape(z)[:-1]), z.dtype)
        scale = tf.constant(self.weight, z.dtype)
        if self.distribution.averages_over_units:
            scale /= z.shape[-1]
        if self.reduction == "sum":
            scale *= batch_size
        else:
            scale *= batch_size / num_values
        weights = tf.fill(tf.shape(z)[:-1], scale)
        if sample_weight is not None:
            weights *= tf.cast(value_weights(z, sample_weight), z.dtype)
        return weights

    def reduced_hessian_product(self, z: tf.Tensor, v: tf.Tensor, sample_weight: Any) -> tf.Tensor:
        """H̃_n v_n with H̃_n the Hessian in z_n of the loss as Keras reduces it.

        Args:
            z: the network output, shape (B, ..., K).
            v: a vector per example, shaped like z.
            sample_weight: per-example or per-value weights, or None.

        Returns:
            The products, shaped like z.
        """
        batch_size = tf.cast(tf.shape(z)[0], z.dtype)
        weights = self._example_weights(z, sample_weight) / batch_size
        return weights[..., None] * self.distribution.hessian_product(z, v)

    def output_vectors(
        self,
        z: tf.Tensor,
        mode: str,
        y_true: Any,
        sample_weight: Any,
        seed: tf.Tensor,
    ) -> list[tf.Tensor]:
        """The vectors v_n at z whose back-propagation gives G (module docstring).

        They are scaled so that ``(1/B) Σ_n ĝ_n ĝ_nᵀ``, with ĝ_n the back-propagated
        vector, is the curvature of the loss exactly as Keras reduces it.

        Args:
            z: the network output, shape (B, ..., K).
            mode: ``"sampled"``, ``"empirical"`` or ``"exact"`` (``ESTIMATION_MODES``).
            y_true: the data's targets; needed by ``"empirical"`` only.
            sample_weight: per-example or per-value weights, or None.
            seed: a stateless random seed, shape (2,), for ``"sampled"``.

        Returns:
            The vectors, each shaped like z, with no gradient: one for
            ``"sampled"`` and ``"empirical"``, K for ``"exact"``.
        """
        z = tf.stop_gradient(z)
        scale = tf.sqrt(self._example_weights(z, sample_weight))[..., None]

        if mode == "sampled":
            vectors = [self.distribution.nll_gradient(z, self.distribution.sample(z, seed))]
        elif mode == "empirical":
            if y_true is None:
                raise ValueError("estimation_mode='empirical' needs targets in fit().")
            labels = self.distribution.labels(y_true, z)
            vectors = [self.distribution.nll_gradient(z, labels)]
        else:
            vectors = self.distribution.hessian_factor(z)
        return [tf.stop_gradient(scale * v) for v in vectors]


def masked_sample_weight(y_pred: Any, y_true: Any, sample_weight: Any, loss: RegisteredLoss) -> Any:
    """The weights a Keras loss applies to ``y_pred``'s values.

    They are ``sample_weight`` times the mask Keras attached to ``y_pred`` (a
    masked sequence output) and, with ``ignore_class``, the mask of the values
    whose label is not that class. As Keras' losses do, a mean reduction scales
    the kept values by (all values)/(kept values), so the loss is their mean.

    Args:
        y_pred: the model's output.
        y_true: the targets (read for ``ignore_class`` only).
        sample_weight: per-example or per-value weights, or None.
        loss: the registered loss, for its ``ignore_class`` and reduction.

    Returns:
        float32 weights of shape ``y_pred.shape[:-1]``; without a mask,
        ``sample_weight`` as it is.
    """
    mask = compat.output_mask(y_pred)
    if loss.ignore_class is not None:
        labels = tf.reshape(tf.cast(y_true, tf.float32), tf.shape(y_pred)[:-1])
        kept = tf.not_equal(labels, float(loss.ignore_class))
        mask = kept if mask is None else tf.logical_and(tf.cast(mask, tf.bool), kept)
    if mask is None:
        return sample_weight
    mask = tf.cast(mask, tf.float32)
    if loss.reduction in ("mean", "sum_over_batch_size"):
        total = tf.cast(tf.size(mask), tf.float32)
        mask = mask * tf.math.divide_no_nan(total, tf.reduce_sum(mask))
    if sample_weight is None:
        return mask
    return _to_rank(tf.cast(sample_weight, tf.float32), mask.shape.rank) * mask


def value_weights(z: tf.Tensor, sample_weight: Any) -> tf.Tensor:
    """``sample_weight`` (per example or per value) broadcast to the loss values, shape z.shape[:-1].

    Args:
        z: the network output, shape (..., K).
        sample_weight: per-example or per-value weights.

    Returns:
        float32 weights of shape ``z.shape[:-1]``.
    """
    weights = _to_rank(tf.cast(sample_weight, tf.float32), z.shape.rank - 1)
    return tf.broadcast_to(weights, tf.shape(z)[:-1])


def _to_rank(weights: tf.Tensor, rank: int) -> tf.Tensor:
    """Per-example (or per-value) weights brought to ``rank`` by trailing axes of size 1, as Keras does."""
    while weights.shape.rank < rank:
        weights = weights[..., tf.newaxis]
    while weights.shape.rank > rank:
        weights = tf.squeeze(weights, -1)
    return weights


def _unsupported(loss: Any) -> ValueError:
    return ValueError(
        f"KFAC does not know the predictive distribution of the loss {loss!r}. "
        "Supported compiled losses: sparse_categorical_crossentropy, "
        "categorical_crossentropy, binary_crossentropy, mean_squared_error "
        "(as strings, functions or keras.losses objects). For another loss, "
        "register one of these that has the same curvature with "
        "`LayerCollection.register_loss(...)`."
    )


def resolve_loss(loss: Any, weight: float = 1.0) -> RegisteredLoss:
    """The ``RegisteredLoss`` of a Keras loss identifier (string, function, Loss).

    A string is read as ``model.compile`` reads it (``keras.losses.get``), so
    every name Keras accepts for a supported loss works ("mse", "bce",
    "BinaryCrossentropy", ...).

    Args:
        loss: a Keras loss identifier of (sparse) categorical or binary
            cross-entropy or mean squared error, over the last axis.
        weight: the factor the loss is weighted by in the total loss.

    Returns:
        The ``RegisteredLoss``; ValueError for a loss or reduction K-FAC does not support.
    """
    identified = loss
    if isinstance(loss, str):
        try:
            identified = keras.losses.get(loss)
        except ValueError:
            raise _unsupported(loss) from None
    reduction = "sum_over_batch_size"
    kwargs: dict[str, Any] = {}
    fn = identified
    if isinstance(identified, keras.losses.Loss):
        reduction = identified.reduction
        fn = getattr(identified, "fn", None)
        kwargs = compat.loss_arguments(identified)
    name = getattr(fn, "__name__", None)
    if name in _LOSS_NAMES and fn is not getattr(keras.losses, name, None):
        raise _unsupported(loss)
    if name not in _LOSS_NAMES:
        raise _unsupported(loss)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"KFAC supports the loss reductions {_REDUCTIONS}; got {reduction!r}.")
    axis = kwargs.get("axis", -1)
    if axis != -1:
        raise ValueError(f"KFAC supports losses over the last axis only; got axis={axis}.")
    make_distribution, needs_logits = _LOSS_NAMES[name]
    ignore_class = kwargs.get("ignore_class")
    return RegisteredLoss(
        distribution=make_distribution(float(kwargs.get("label_smoothing", 0.0))),
        from_logits=bool(kwargs.get("from_logits", False)),
        reduction=reduction,
        weight=float(weight),
        needs_logits=needs_logits,
        ignore_class=None if ignore_class is None else int(ignore_class),
    )


def resolve_compiled_loss(model: keras.Model) -> RegisteredLoss:
    """The ``RegisteredLoss`` of the loss ``model`` was compiled with.

    Args:
        model: a model compiled with a single supported loss (and optionally its
            ``loss_weights``).

    Returns:
        The ``RegisteredLoss``, weighted by the compiled loss weight.
    """
    loss = getattr(model, "loss", None)
    if loss is None:
        raise ValueError(
            "KFAC could not find a compiled loss on the model: compile it with a "
            "loss, or register one with `LayerCollection.register_loss(...)`."
        )
    weights = compat.compiled_loss_weights(model)
    if isinstance(loss, (list, tuple, dict)):
        items = list(loss.values()) if isinstance(loss, dict) else list(loss)
        if len(items) != 1:
            raise ValueError(f"KFAC supports models with a single loss; got {len(items)} compiled losses.")
        loss = items[0]
        if isinstance(weights, dict):
            weights = list(weights.values())
    if isinstance(weights, (list, tuple)):
        weights = weights[0]
    return resolve_loss(loss, weight=1.0 if weights is None else float(weights))
