"""The K-FAC optimizer (Martens & Grosse 2015) for Keras 3 on TensorFlow."""

from __future__ import annotations

import functools
import math
import numbers
import random
import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_kfac import capture, compat, curvature, losses, replicas, statistics, tensorboard
from keras_kfac import fallback as fallback_rule
from keras_kfac.estimator import APPROXIMATIONS, AUTO_REGISTER_TYPES, CurvatureEstimator
from keras_kfac.registration import LayerCollection
from keras_kfac.step import Batch, Step, StepRule, StepState, require_inputs

_EAGER_MESSAGE = (
    "KFAC reads the activations and output gradients of the training step from "
    "its TensorFlow graph, and an eagerly executed step has none. Compile the "
    "model with run_eagerly=False (the default) and train with model.fit or "
    "model.train_on_batch."
)
# The default step (no learning rate, momentum or adaptation given); its
# neighbours race it in `benchmarks/zoo_race.py --candidates`.
DEFAULT_STEP = dict(
    learning_rate=1.0, momentum=0.5, norm_constraint=1e-3, statistics_update_period=5, inverse_update_period=25
)
# A step with a learning rate or momentum given.
CLASSIC_STEP = dict(
    learning_rate=0.01, momentum=0.9, norm_constraint=None, statistics_update_period=1, inverse_update_period=10
)
# The quadratic model's periods: statistics every 5th step, chosen on the zoo
# (`benchmarks/zoo_race.py --adaptive-periods`), inverses every 10; its trust
# region α²ΔᵀF̆Δ ≤ C (`--adaptive-bound`); its initial damping
# (`--adaptive-candidates`, `--dampings`).
ADAPTIVE_STEP = dict(statistics_update_period=5, inverse_update_period=10, norm_constraint=3e-3, relative_damping=0.3)
DEFAULT_RELATIVE_DAMPING = 3.0
# Floor of the adapted λ in units of tr(F̃)/n (see `relative_min_damping`).
DEFAULT_RELATIVE_MIN_DAMPING = 1e-2


def _layer_calls(blocks: list) -> dict[int, list]:
    """Each block's recorded calls in the current graph, by ``id(block)`` (blocks of one layer share them)."""
    by_layer: dict[int, list] = {}
    for block in blocks:
        if id(block.layer) not in by_layer:
            by_layer[id(block.layer)] = capture.RECORDER.pop(block.layer)
    return {id(b): by_layer[id(b.layer)] for b in blocks}


def _check_range(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_closed: bool = False,
) -> None:
    """Raises ValueError naming ``name`` unless ``value`` lies in the interval.

    The interval is [low, high), with ``low_open`` (low, …, and with
    ``high_closed`` …, high].
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
    above = high is not None and (value > high if high_closed else value >= high)
    if value < low or (low_open and value == low) or above:
        interval = (
            f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}{']' if high_closed else ')'}"
        )
        raise ValueError(f"`{name}` must be in {interval}; got {value!r}.")


def _check_period(name: str, value: Any) -> int:
    """``value`` as an int, or ValueError naming ``name`` unless it is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="keras_kfac")
class KFAC(compat.WholeUpdateOptimizer):
    """Kronecker-factored Approximate Curvature (Martens & Grosse, 2015).

    Preconditions the gradient of each registered layer with the damped inverse
    of a Kronecker-factored approximation ``Ā ⊗ G`` of its Fisher block
    [KFAC §3]; convolutions use the KFC factors of Grosse & Martens (2016). The
    factors are moving averages of statistics gathered in the training step
    [KFAC §5]; their damped inverses [KFAC §6.3] are refreshed every
    ``inverse_update_period`` steps. The proposal of a block with gradient
    ``∇W̄`` is ``Δ = −U`` with

        U = (Ā + πγ I)⁻¹ ∇W̄ (G + (γ/π) I)⁻¹,

    and the update is ``δ = α Δ + μ δ₀`` (δ₀ the previous update), ``θ ← θ + δ``:

    - by default, and with a ``learning_rate`` or ``momentum`` given, α is the
      learning rate, shortened so that α²ΔᵀF̆Δ ≤ ``norm_constraint`` when one
      is set (a trust region in the model's predictions: "KL clipping", Ba et
      al. 2017), μ is ``momentum`` and γ = sqrt(λ + l2_reg), with λ a fixed
      multiple of the factored Fisher's mean eigenvalue unless ``damping`` is
      given. With neither given, the drop-in step: lr 1, μ 0.5, C 1e-3,
      statistics every 5th step, inverses every 25 (``DEFAULT_STEP``); with
      either given, the unset ones keep their earlier defaults (lr 0.01,
      μ 0.9, no constraint, periods 1 and 10: ``CLASSIC_STEP``);
    - with ``adaptive=True`` (the paper's recipe), α and μ minimise the quadratic
      model of the loss under the exact mini-batch Fisher [KFAC §7], the damping
      λ follows the Levenberg–Marquardt rule [KFAC §6.5] and γ is searched over
      {γ, ω₂γ, γ/ω₂} [KFAC §6.6]. Each of the three can be switched on its own.
      With the quadratic model the statistics are estimated every 5th step and
      the inverses refreshed every 10 (the paper: every step, on an eighth of
      the batch), α stays within the trust region α²ΔᵀF̆Δ ≤ 3e-3 (the paper
      has none) and λ starts at 0.3 · tr(F̃)/n (``ADAPTIVE_STEP``).

    Variables of layers with no block (normalization unless opted in, ...)
    are trained by the ``fallback`` optimizer, Keras' Adam by default.

    Every damping is in the units of the compiled loss: M(δ) = ½ δᵀ(F + (λ+η)I)δ
    + ∇hᵀδ with h the loss Keras reports.

    The optimizer reads what it needs from the graph Keras traces for
    ``model.fit``/``train_on_batch``, so the model must not run eagerly.
    Under a ``tf.distribute`` strategy the replicas all-reduce gradients,
    statistics, exact-Fisher products and losses (``replicas``), so each
    computes the update of the global batch.

    Args:
        model: the ``keras.Model`` being trained. Its Dense, EinsumDense,
            convolution, recurrent and Embedding layers are registered automatically, and its compiled
            loss defines the Fisher. Without it, KFAC finds the model it is
            compiled with when Keras builds it.
        layer_collection: a hand-made ``LayerCollection`` instead of (or in
            addition to) automatic registration. Its layers registered by
            hand and its registered loss are part of the configuration, so
            ``load_model`` rebuilds it.
        learning_rate: a float or a ``keras.optimizers.schedules`` schedule
            (default 1.0: the natural-gradient step, within the norm
            constraint; 0.01 when only ``momentum`` is given). Not used with
            the quadratic model.
        damping: Tikhonov damping λ ≥ 0 [KFAC §6] (with ``adapt_damping``, its
            initial value). None: ``relative_damping`` times the mean
            eigenvalue of the factored Fisher, set at the first step and, with
            a fixed learning rate, every ``inverse_update_period`` steps.
        momentum: heavy-ball μ in [0, 1) (default 0.5; 0.9 when only
            ``learning_rate`` is given). Not used with the quadratic model,
            which chooses μ.
        ema_decay: ε_max in [0, 1) of the factors' moving averages [KFAC §5].
        inverse_update_period: steps between recomputations of the damped
            inverses T₃ (default 25, 10 outside the drop-in step; also after
            each of the first 3 statistics updates). A factor of dimension
            n ≥ T₃ × the other keeps the Cholesky factor of its damped
            version instead (``curvature.inverse_form``).
        estimation_mode: ``"sampled"`` (targets drawn from the model: the true
            Fisher), ``"empirical"`` (the data's labels) or ``"exact"`` (the
            expectation over the predictive distribution, one backward pass per
            output unit).
        l2_reg: coefficient η ≥ 0 of an l2 penalty ½η‖θ‖² added to the
            objective (η·θ in the gradient) and to the damping (λ + η).
        norm_constraint: C > 0 bounds the step length α so that
            ``α² ΔᵀF̆Δ ≤ C``, a trust region under the factored Fisher ("KL
            clipping", Ba et al. 2017): the fixed step's learning rate is
            shortened to it, the quadratic model's α is chosen in
            [0, sqrt(C / ΔᵀF̆Δ)]. Default 1e-3, 3e-3 with the quadratic
            model (none when only ``learning_rate`` or ``momentum`` is
            given); ``math.inf`` turns it off.
        adaptive: turns on ``use_quadratic_model``, ``adapt_damping`` and
            ``adapt_gamma`` together (each can still be set on its own).
        use_quadratic_model: choose α and μ from the exact-Fisher quadratic model.
        adapt_damping: Levenberg–Marquardt adaptation of λ on each of the
            first ``damping_warmup`` steps, then every
            ``damping_adaptation_period`` (T₁) steps.
        adapt_gamma: search γ every ``gamma_adaptation_period`` (T₂) steps,
            decoupled from λ; when off, γ² = λ + η.
        damping_adaptation_period: T₁ (paper: 5); ω₁ = (19/20)^T₁.
        gamma_adaptation_period: T₂ (paper: 20); ω₂ = sqrt(19/20)^T₂.
        min_damping: floor of the adapted λ.
        relative_min_damping: a second floor of the adapted λ, this multiple
            of the factored Fisher's mean eigenvalue tr(F̃)/n: where ρ stays
            near 1 (a softmax output layer whose block is the only one), LM
            would otherwise drive λ to ``min_damping`` and the quadratic model
            take unbounded steps along directions of near-zero curvature.
        relative_damping: c of the default damping λ = c · tr(F̃)/n (default 3;
            0.3 with the quadratic model, where it is λ's initial value).
        fallback: the optimizer of the variables without a block: None for
            Keras' ``Adam()``, an optimizer, its name or configuration, or
            ``"momentum"`` for K-FAC's own step on their plain gradient.
        damping_warmup: the first steps on which ρ is checked at every step.
        max_momentum: the quadratic model's α ≥ 0 and 0 ≤ μ ≤ this; None
            leaves them unbounded (the paper).
        reject_below: a checked step whose ρ is below this, or not finite,
            is undone; None keeps every step (the paper).
        approximation: ``"block_diagonal"`` or ``"block_tridiagonal"``
            [KFAC §4.3] (the latter couples consecutive Dense layers of a chain).
        statistics_fraction: τ₁ in (0, 1]: the fraction of each batch the
            factor statistics are computed on. Below 1 they come from a
            forward and backward pass of that fraction alone (where the model
            has BatchNormalization, it normalises with that fraction's
            statistics in this pass).
        statistics_update_period: T_cov ≥ 1 (default 5, also with the
            quadratic model; 1 when only ``learning_rate`` or ``momentum`` is
            given): the factor
            statistics are estimated on every T_cov-th step only (the others
            skip their passes and products); the moving average counts these
            updates.
        patch_fraction: in (0, 1]: the fraction of a convolution's patch rows
            (examples × |T| locations) its Ā statistics are computed on, drawn
            uniformly at random each step (an unbiased estimate of the KFC
            expectation [KFC §3.1]; G uses every location). Ā's product, the
            bulk of a convolution's statistics, costs this fraction.
        weight_sharing: how the |T| locations of a convolution, or the
            positions of an EinsumDense (an attention projection) or of a
            Dense layer on a sequence, enter its factors (Eschenhagen et al. 2023): ``"expand"``, a row per location
            [KFC §3.1]; ``"reduce"``, one row per example, ā the mean of its
            patches and ĝ the sum of its locations' vectors. Where the loss
            sees the layer only through the mean over its locations, each
            example's gradient is then exactly ĝ āᵀ; the factor products no
            longer grow with |T|, and ``patch_fraction`` does not apply.
            None (default): expand for convolutions and Dense, reduce for EinsumDense
            (with expand the zoo's transformer stalls; BENCHMARKS.md).
        curvature_fraction: τ₂ in (0, 1]: the fraction of each batch the exact
            Fisher products of the quadratic model and ρ are computed on, at
            least 32 examples when below 1 (the paper: 1/4 [KFAC §8]).
        seed: seed of the target sampling; random when None.
        name: the optimizer's name.
        **kwargs: other ``keras.optimizers.Optimizer`` arguments (``clipnorm``, ...).
    """

    def __init__(
        self,
        model: keras.Model | None = None,
        layer_collection: LayerCollection | None = None,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule | None = None,
        damping: float | None = None,
        momentum: float | None = None,
        ema_decay: float = 0.95,
        inverse_update_period: int | None = None,
        estimation_mode: str = "sampled",
        l2_reg: float = 0.0,
        norm_constraint: float | None = None,
        adaptive: bool = False,
        use_quadratic_model: bool | None = None,
        adapt_damping: bool | None = None,
        adapt_gamma: bool | None = None,
        damping_adaptation_period: int = 5,
        gamma_adaptation_period: int = 20,
        min_damping: float = 1e-8,
        approximation: str = "block_diagonal",
        statistics_fraction: float = 1.0,
        statistics_update_period: int | None = None,
        patch_fraction: float = 1.0,
        weight_sharing: str | None = None,
        curvature_fraction: float = 1.0,
        seed: int | None = None,
        fallback: keras.optimizers.Optimizer | str | dict | None = None,
        relative_damping: float | None = None,
        relative_min_damping: float = DEFAULT_RELATIVE_MIN_DAMPING,
        damping_warmup: int = 20,
        max_momentum: float | None = 1.0,
        reject_below: float | None = 0.0,
        name: str = "kfac",
        **kwargs: Any,
    ):
        adaptive = bool(adaptive)
        use_quadratic_model = adaptive if use_quadratic_model is None else bool(use_quadratic_model)
        adapt_damping = adaptive if adapt_damping is None else bool(adapt_damping)
        adapt_gamma = adaptive if adapt_gamma is None else bool(adapt_gamma)
        if use_quadratic_model:
            for arg, value in (("learning_rate", learning_rate), ("momentum", momentum)):
                if value is not None:
                    raise ValueError(
                        f"`{arg}` is not used when the quadratic model chooses the step "
                        "(adaptive=True or use_quadratic_model=True); leave it unset."
                    )
        # Without a learning rate, momentum or the quadratic model: the default step.
        default_step = learning_rate is None and momentum is None and not use_quadratic_model
        defaults = DEFAULT_STEP if default_step else ADAPTIVE_STEP if use_quadratic_model else CLASSIC_STEP
        if statistics_update_period is None:
            statistics_update_period = defaults["statistics_update_period"]
        if inverse_update_period is None:
            inverse_update_period = defaults["inverse_update_period"]
        if norm_constraint is None:
            norm_constraint = defaults["norm_constraint"]
        if relative_damping is None:
            relative_damping = defaults.get("relative_damping", DEFAULT_RELATIVE_DAMPING)
        if not use_quadratic_model:
            learning_rate = defaults["learning_rate"] if learning_rate is None else learning_rate
            momentum = defaults["momentum"] if momentum is None else momentum
            if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
                _check_range("learning_rate", learning_rate, 0.0)
            _check_range("momentum", momentum, 0.0, 1.0)
        if damping is not None:
            _check_range("damping", damping, 0.0)
        _check_range("relative_damping", relative_damping, 0.0, low_open=True)
        if isinstance(damping_warmup, bool) or not isinstance(damping_warmup, numbers.Integral) or damping_warmup < 0:
            raise ValueError(f"`damping_warmup` must be an integer >= 0; got {damping_warmup!r}.")
        if max_momentum is not None:
            _check_range("max_momentum", max_momentum, 0.0)
        if reject_below is not None:
            _check_range("reject_below", reject_below, -math.inf)
        _check_range("ema_decay", ema_decay, 0.0, 1.0)
        _check_range("l2_reg", l2_reg, 0.0)
        _check_range("min_damping", min_damping, 0.0)
        _check_range("relative_min_damping", relative_min_damping, 0.0)
        if norm_constraint is not None and norm_constraint != math.inf:
            _check_range("norm_constraint", norm_constraint, 0.0, low_open=True)
        _check_range("statistics_fraction", statistics_fraction, 0.0, 1.0, low_open=True, high_closed=True)
        _check_range("curvature_fraction", curvature_fraction, 0.0, 1.0, low_open=True, high_closed=True)
        _check_range("patch_fraction", patch_fraction, 0.0, 1.0, low_open=True, high_closed=True)
        inverse_update_period = _check_period("inverse_update_period", inverse_update_period)
        statistics_update_period = _check_period("statistics_update_period", statistics_update_period)
        damping_adaptation_period = _check_period("damping_adaptation_period", damping_adaptation_period)
        gamma_adaptation_period = _check_period("gamma_adaptation_period", gamma_adaptation_period)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**31) <= seed < 2**31
        ):
            raise ValueError(f"`seed` must be an int32 integer, in [-2**31, 2**31); got {seed!r}.")
        if estimation_mode not in losses.ESTIMATION_MODES:
            raise ValueError(f"`estimation_mode` must be one of {losses.ESTIMATION_MODES}; got {estimation_mode!r}.")
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"`approximation` must be one of {tuple(APPROXIMATIONS)}; got {approximation!r}.")
        if weight_sharing is not None and weight_sharing not in statistics.WEIGHT_SHARING:
            raise ValueError(
                f"`weight_sharing` must be None or one of {statistics.WEIGHT_SHARING}; got {weight_sharing!r}."
            )
        if weight_sharing == "reduce" and patch_fraction < 1.0:
            raise ValueError(
                "`patch_fraction` subsamples a convolution's patch rows, which weight_sharing='reduce' "
                "replaces by one row per example; leave patch_fraction at 1."
            )
        if model is not None and not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model; got {model!r}.")
        if isinstance(layer_collection, dict):  # from a saved configuration
            layer_collection = LayerCollection.from_config(layer_collection)
        if layer_collection is not None and not isinstance(layer_collection, LayerCollection):
            raise TypeError(f"`layer_collection` must be a keras_kfac.LayerCollection; got {layer_collection!r}.")
        super().__init__(learning_rate=1.0 if learning_rate is None else learning_rate, name=name, **kwargs)
        self.adaptive = adaptive
        self.use_quadratic_model = use_quadratic_model
        self.adapt_damping = adapt_damping
        self.adapt_gamma = adapt_gamma
        self.initial_damping = None if damping is None else float(damping)
        self.momentum = None if momentum is None else float(momentum)
        self.ema_decay = float(ema_decay)
        self.inverse_update_period = inverse_update_period
        self.estimation_mode = estimation_mode
        self.l2_reg = float(l2_reg)
        self.norm_constraint = None if norm_constraint is None else float(norm_constraint)
        self.damping_adaptation_period = damping_adaptation_period
        self.gamma_adaptation_period = gamma_adaptation_period
        self.min_damping = float(min_damping)
        self.relative_min_damping = float(relative_min_damping)
        self.approximation = approximation
        self.statistics_fraction = float(statistics_fraction)
        self.statistics_update_period = statistics_update_period
        self.patch_fraction = float(patch_fraction)
        self.weight_sharing = weight_sharing
        self.curvature_fraction = float(curvature_fraction)
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        self.fallback = fallback_rule.resolve(fallback)
        self.relative_damping = float(relative_damping)
        self.damping_warmup = int(damping_warmup)
        self.max_momentum = None if max_momentum is None else float(max_momentum)
        self.reject_below = None if reject_below is None else float(reject_below)
        # A plain (untracked) object: the optimizer does not own the model.
        self.layer_collection = layer_collection or LayerCollection()
        layer_types = AUTO_REGISTER_TYPES.get(approximation)
        if layer_types is not None:
            self.layer_collection.auto_register_types = layer_types
        if model is not None:
            self.layer_collection.register_model(model)
        if self.layer_collection.model is not None:
            tensorboard.feed_stock_tensorboard(self.layer_collection.model)
        self.layer_collection.prepare()

    # ------------------------------------------------------------------ state

    @property
    def blocks(self) -> list:
        """The curvature blocks this optimizer preconditions with."""
        return self.layer_collection.blocks

    @property
    def damping(self):
        """The current damping λ (a variable once built; NaN before a relative λ is first set)."""
        if self.built:
            return self._damping
        return float("nan") if self.initial_damping is None else self.initial_damping

    @property
    def gamma(self):
        """The current factored-Tikhonov γ (a variable once built)."""
        return self._gamma if self.built else math.sqrt(self.damping + self.l2_reg)

    @property
    def _count(self) -> tf.Tensor:
        """The number of K-FAC steps before this one (the schedules' k − 1)."""
        return self.iterations - self._start

    @property
    def alpha(self):
        """α of the last update δ = αΔ + μδ₀: the effective learning rate (0 before any)."""
        return self._alpha if self.built else 0.0

    @property
    def mu(self):
        """μ of the last update δ = αΔ + μδ₀: the effective momentum (0 before any)."""
        return self._mu if self.built else 0.0

    @property
    def rho(self):
        """ρ of the last Levenberg–Marquardt check [KFAC §6.5] (NaN before any)."""
        return self._rho if self.built else float("nan")

    @property
    def quadratic_change(self):
        """M(δ) − M(0) of the last update under the exact-Fisher quadratic model (0 before any)."""
        return self._quadratic_change if self.built else 0.0

    def build(self, variables: list) -> None:
        """Creates K-FAC's state for ``variables``; Keras calls it before the first step.

        Meets the model first when it was not given (a KFAC restored by
        ``load_model`` or made from its config), registers and hooks its layers,
        then creates each block's factors, the velocities δ₀, the adapted
        scalars and the approximation's own state, and builds the ``fallback``
        optimizer on the variables without a block.

        Args:
            variables: the trainable variables to train, the registered layers'
                among them (ValueError otherwise).
        """
        # Every check comes before the first variable: an optimizer whose build
        # fails stays unbuilt, and can be compiled again with a mended model.
        if self.built:
            return
        collection = self.layer_collection
        if collection.model is None:
            # A KFAC restored by ``load_model`` or made from its config meets
            # its model here, built by the model's own code.
            model = capture.calling_model(lambda optimizer: optimizer is self)
            # Inside the first traced step, the step recorded nothing unless an
            # earlier KFAC hooked this model already: that step is spent hooking
            # it, and the training function is traced again for the next one.
            if model is not None and tf.inside_function() and not getattr(model, "_kfac_hooked", False):
                self._unrecorded_step = True
                model.make_train_function(force=True)
            if model is not None:
                collection.register_model(model)
                tensorboard.feed_stock_tensorboard(model)
        collection.prepare()
        self._check_blocks_are_trained(variables)
        owned = {self.variable_key(v) for block in collection.blocks for v in block.variables}
        # Built for a compiled model (inside its first step, before it is
        # traced, or by a call of build after compile): the compiled loss
        # must be one K-FAC knows, and is checked before any variable exists.
        if tf.inside_function() or getattr(collection.model, "compiled", False):
            collection.loss()
        super().build(variables)
        # Variables in the order saved optimizers hold them: the blocks'
        # factors, the velocities, the scalars, then the approximation's own.
        for block in collection.blocks:
            block.create_state(self)
        # The variables K-FAC's own update δ = αΔ + μδ₀ moves, each with its δ₀,
        # by key (a list of model variables would be tracked as the optimizer's).
        self._velocities = {
            self.variable_key(v): self.add_variable_from_reference(v, name="velocity")
            for v in variables
            if self.fallback is None or self.variable_key(v) in owned
        }

        def scalar(name: str, value: float):
            return self.add_variable((), initializer=keras.initializers.Constant(value), dtype="float32", name=name)

        # A relative damping is set at the first step, before the first inverses.
        initial = 0.0 if self.initial_damping is None else self.initial_damping
        self._damping = scalar("damping", initial)
        self._gamma = scalar("gamma", math.sqrt(initial + self.l2_reg))
        self._alpha = scalar("alpha", 0.0)
        self._mu = scalar("mu", 0.0)
        self._rho = scalar("rho", float("nan"))
        self._quadratic_change = scalar("quadratic_change", 0.0)
        # The iteration K-FAC's schedules count from: 1 when the first step
        # met the model too late to record it.
        self._start = self.add_variable((), initializer="zeros", dtype="int64", name="start")
        self._estimator = CurvatureEstimator(
            self,
            collection.blocks,
            self.approximation,
            self.estimation_mode,
            self.ema_decay,
            self.statistics_update_period,
            self.statistics_fraction,
            self.patch_fraction,
            self.inverse_update_period,
            self.weight_sharing,
        )
        unowned = [v for v in variables if self.variable_key(v) not in owned]
        if self.fallback is not None and unowned:
            self.fallback.build(unowned)
        self._warn_fallback(unowned)

    def _check_blocks_are_trained(self, variables: list) -> None:
        """ValueError unless every registered layer's weights are among ``variables``.

        Args:
            variables: the variables being trained.
        """
        blocks = self.layer_collection.blocks
        trainable = {self.variable_key(v) for v in variables}
        if (
            blocks
            and not any(self.variable_key(v) in trainable for b in blocks for v in b.variables)
            and any(b.layer.trainable for b in blocks)
        ):
            raise ValueError(
                f"KFAC's registered layers ({', '.join(b.name for b in blocks)}) are "
                "not among the variables it is asked to train: create one KFAC per model, with "
                "`KFAC(model=model)` for the model you compile it with."
            )
        for block in blocks:
            if not all(self.variable_key(v) in trainable for v in block.variables):
                raise ValueError(
                    f"Layer '{block.name}' is registered with KFAC but its weights "
                    "are not among the variables being trained (is it frozen?)."
                )

    def _warn_fallback(self, unowned: list) -> None:
        """One warning naming the variables the fallback rule trains."""
        if not unowned:
            return
        rule = (
            "a plain momentum step on their gradient"
            if self.fallback is None
            else f"the fallback optimizer {type(self.fallback).__name__}"
        )
        names = ", ".join(v.path if hasattr(v, "path") else v.name for v in unowned)
        if not self.blocks:
            warnings.warn(
                f"KFAC found no layer it can precondition in this model, so every variable is trained by {rule}.",
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"KFAC has no curvature block for these variables and trains them with {rule}: {names}", stacklevel=3
            )

    @property
    def variables(self) -> list:
        """The optimizer's variables, the fallback optimizer's included (saved with it)."""
        own = list(super().variables)
        if self.fallback is None or not self.fallback.built:
            return own
        return own + [v for v in self.fallback.variables]

    # ------------------------------------------------------------------ step

    def update_all(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        """One K-FAC step on every trainable variable, the fallback rule's included.

        Runs inside the traced training step (RuntimeError when eager).

        Args:
            grads: this replica's gradients, one per variable; the replicas'
                add up to the global batch's.
            trainable_variables: the variables, in the order of ``grads``.
            learning_rate: the current learning rate (unused with the quadratic model).
        """
        if tf.executing_eagerly():
            raise RuntimeError(_EAGER_MESSAGE)
        if self.layer_collection.model is None:
            raise RuntimeError(
                "KFAC has no model: create it with KFAC(model=model) or a LayerCollection that registered the model."
            )
        self._check_replicated_passes()
        # Built before the step on all the model's trainable variables: a
        # layer frozen since, or a custom step training only some, is caught here.
        self._check_blocks_are_trained(trainable_variables)
        if getattr(self, "_unrecorded_step", False):
            self._unrecorded_step = False
            self._start.assign(self.iterations + 1)
            return
        # Keras scales each replica's loss by 1/replicas (or sums it): the
        # replicas' gradients add up to the global batch's.
        grads = replicas.total([tf.convert_to_tensor(g) for g in grads])
        if self.l2_reg:
            grads = [g + tf.cast(self.l2_reg, g.dtype) * v for g, v in zip(grads, trainable_variables)]
        grads_finite = curvature.all_finite(grads)
        own = [self.variable_key(v) in self._velocities for v in trainable_variables]
        variables = [v for v, o in zip(trainable_variables, own) if o]
        own_grads = [g for g, o in zip(grads, own) if o]
        batch = self._take_records()
        self._update_curvature(batch, grads_finite)
        step = Step(
            self._step_rule(),
            StepState(self._damping, self._gamma, self._rho, self._min_damping),
            self._estimator.preconditioner,
            batch,
            variables,
            own_grads,
            [self._velocities[self.variable_key(v)] for v in variables],
            self.variable_key,
            forward=lambda x: self._forward(x)[::2],
            loss_of=functools.partial(capture.training_loss, self.layer_collection.model),
            assign=self.assign,
        )
        if self.adapt_gamma:
            # On steps that refresh the inverses when T₂ is a multiple of T₃: γ's own are then stored.
            due = tf.logical_and(self._count > 0, tf.equal(self._count % self.gamma_adaptation_period, 0))
            step.adapt_gamma(learning_rate, due, self.gamma_adaptation_period % self.inverse_update_period == 0)
        update, coefficients, change = step.update(learning_rate)
        finite = tf.logical_and(grads_finite, curvature.all_finite(update + [coefficients, change]))
        # θ before the update, restored exactly if a check rejects it.
        before = [tf.identity(v) for v in variables] if self.adapt_damping and self.reject_below is not None else []
        # One branch for every variable instead of a select per element: a
        # non-finite step leaves θ and δ₀ as they were.
        applied, new_velocities = update, update
        if update:
            applied, new_velocities = tf.cond(
                finite,
                lambda: (update, update),
                lambda: ([tf.zeros_like(d) for d in update], step.previous),
            )
        for variable, velocity, delta, new_velocity in zip(variables, step.velocities, applied, new_velocities):
            self.assign(velocity, new_velocity)
            self.assign_add(variable, delta)
        self._alpha.assign(tf.where(finite, coefficients[0], self._alpha))
        self._mu.assign(tf.where(finite, coefficients[1], self._mu))
        self._quadratic_change.assign(tf.where(finite, change, self._quadratic_change))
        if self.adapt_damping:
            due = tf.logical_or(
                self._count < self.damping_warmup,
                tf.equal((self._count + 1) % self.damping_adaptation_period, 0),
            )
            kept = step.adapt_damping(update, change, before, tf.logical_and(finite, due))
            finite = tf.logical_and(finite, kept)
        if not self.adapt_gamma:
            self._gamma.assign(tf.sqrt(self._damping + self.l2_reg))
        rest = [(g, v) for g, v, o in zip(grads, trainable_variables, own) if not o]
        if rest:  # after ρ's forward pass, which judges K-FAC's update alone
            fallback_rule.apply(self.fallback, [g for g, _ in rest], [v for _, v in rest], finite)

    def _check_replicated_passes(self) -> None:
        """Rejects, under several replicas, layers that all-reduce in their forward
        pass when K-FAC runs extra forward passes in ``tf.cond`` branches: a
        strategy cannot all-reduce inside a branch."""
        if replicas.count() == 1:
            return
        model = self.layer_collection.model
        synchronized = [layer.name for layer in compat.nested_layers(model) if getattr(layer, "synchronized", False)]
        conditional = [
            name
            for name, used in (
                ("statistics_update_period > 1", self.statistics_update_period > 1),
                ("adapt_damping", self.adapt_damping),
                ("adapt_gamma", self.adapt_gamma),
            )
            if used
        ]
        if synchronized and conditional:
            raise NotImplementedError(
                f"Under a multi-replica strategy, the synchronized layers {synchronized} "
                "all-reduce in their forward pass, which tf.distribute cannot do inside "
                f"the tf.cond branches where KFAC runs the extra passes of {conditional}. "
                "Use BatchNormalization(synchronized=False) or turn those options off."
            )

    def _take_records(self) -> Batch:
        """This step's recorded loss inputs and layer calls (see ``capture``)."""
        collection = self.layer_collection
        loss_calls = capture.RECORDER.pop(collection.model)
        if not loss_calls:
            raise RuntimeError(
                "KFAC found no training loss in this step's graph. It must run inside "
                "model.fit / model.train_on_batch of the model it was created with."
            )
        return Batch(
            loss_call=loss_calls[-1],
            layer_calls=_layer_calls(collection.blocks),
            loss=collection.loss(),
        )

    def _update_curvature(self, batch: Batch, gradients_finite: tf.Tensor) -> None:
        """The factors' moving averages, the relative damping, then the scheduled inverses [KFAC §5, §6.3]."""
        estimator = self._estimator
        estimator.update(batch, self._count, gradients_finite, self._sampling_seed(), lambda x: self._forward(x)[:2])
        if self.initial_damping is None and self.blocks:
            self._set_relative_damping(tf.equal(self._count % self.inverse_update_period, 0))
        estimator.refresh_inverses(self._count, self._gamma)

    def _set_relative_damping(self, refresh: tf.Tensor) -> None:
        """λ = ``relative_damping`` · tr(F̃)/n, F̃ = ⊕ Ā ⊗ G the factored Fisher [KFAC §6.3].

        tr(F̃)/n = Σ tr Ā·tr G / Σ dim Ā·dim G is the mean eigenvalue of F̃, so
        λ is in the units of the compiled loss whatever its scale. It is set at
        the first step whose statistics are accepted (λ is 0 until then); with
        a fixed step it then follows F̃ at every ``refresh`` (each T₃-th
        step), adapted it is only λ₀.
        """
        mean_eigenvalue = self._estimator.mean_eigenvalue()
        damping = tf.maximum(self.relative_damping * mean_eigenvalue, self.min_damping)
        due = tf.equal(self._damping, 0.0)
        if not self.adapt_damping:
            due = tf.logical_or(due, refresh)
        # Factors stay 0 until a batch's statistics are accepted.
        due = tf.logical_and(due, self._estimator.accepted())
        self._damping.assign(tf.where(due, damping, self._damping))
        self._gamma.assign(tf.where(due, tf.sqrt(self._damping + self.l2_reg), self._gamma))

    def _min_damping(self) -> tf.Tensor:
        """The adapted λ's floor: ``min_damping``, or ``relative_min_damping``·tr(F̃)/n if larger."""
        floor = tf.constant(self.min_damping, tf.float32)
        if self.blocks and self.relative_min_damping > 0.0:
            floor = tf.maximum(floor, self.relative_min_damping * self._estimator.mean_eigenvalue())
        return floor

    def _sampling_seed(self) -> tf.Tensor:
        """The stateless seed of this step's sampled targets (one stream per replica)."""
        seed = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(self.iterations, tf.int32)])
        if replicas.count() > 1:
            seed = tf.random.experimental.stateless_fold_in(seed, replicas.index_tensor())
        return seed

    def _forward(self, x) -> tuple[Any, dict, list]:
        """The model's output on ``x`` at the current weights, its blocks' layer calls
        and the losses its layers added (activity regularization).

        Runs in a ``keras.StatelessScope``: state updates of training mode
        (BatchNormalization's moving statistics, ...) belong to the training
        step's own forward pass, not to K-FAC's extra ones. Random seeds do
        advance, so each pass draws its own dropout masks.
        """
        model = self.layer_collection.model
        with keras.StatelessScope(collect_losses=True) as scope:
            y_pred = model(require_inputs(x), training=True)
        weights = {id(w) for w in model.weights}
        for seed_state in (v for v in model.variables if id(v) not in weights):
            advanced = scope.get_current_value(seed_state)
            if advanced is not None:
                seed_state.assign(advanced)
        layer_calls = _layer_calls(self.blocks)
        return y_pred, layer_calls, list(scope.losses)

    def _step_rule(self) -> StepRule:
        """The settings the step follows."""
        return StepRule(
            use_quadratic_model=self.use_quadratic_model,
            momentum=self.momentum,
            norm_constraint=self.norm_constraint,
            max_momentum=self.max_momentum,
            l2_reg=self.l2_reg,
            curvature_fraction=self.curvature_fraction,
            adapt_damping=self.adapt_damping,
            adapt_gamma=self.adapt_gamma,
            damping_adaptation_period=self.damping_adaptation_period,
            gamma_adaptation_period=self.gamma_adaptation_period,
            reject_below=self.reject_below,
        )

    def load_own_variables(self, store) -> None:
        """Keras' loading of the saved variables, then each Cholesky-form factor's ``restore_form``.

        Args:
            store: the saved variables, by index.
        """
        super().load_own_variables(store)
        if self.built:
            for block in self.blocks:
                for factor in (block.input_factor, block.output_factor):
                    if isinstance(factor, curvature.CholeskyFactor):
                        factor.restore_form()

    def get_config(self) -> dict:
        """The optimizer's configuration, for saving.

        Returns:
            The Keras optimizer configuration plus every KFAC argument but
            ``model``: ``learning_rate`` is None with the quadratic model,
            ``fallback`` is serialized and ``layer_collection`` is its ``get_config()``.
        """
        config = super().get_config()
        if self.use_quadratic_model:
            config["learning_rate"] = None
        config.update(
            {
                "damping": self.initial_damping,
                "momentum": self.momentum,
                "ema_decay": self.ema_decay,
                "inverse_update_period": self.inverse_update_period,
                "estimation_mode": self.estimation_mode,
                "l2_reg": self.l2_reg,
                "norm_constraint": self.norm_constraint,
                "adaptive": self.adaptive,
                "use_quadratic_model": self.use_quadratic_model,
                "adapt_damping": self.adapt_damping,
                "adapt_gamma": self.adapt_gamma,
                "damping_adaptation_period": self.damping_adaptation_period,
                "gamma_adaptation_period": self.gamma_adaptation_period,
                "min_damping": self.min_damping,
                "relative_min_damping": self.relative_min_damping,
                "approximation": self.approximation,
                "statistics_fraction": self.statistics_fraction,
                "statistics_update_period": self.statistics_update_period,
                "patch_fraction": self.patch_fraction,
                "weight_sharing": self.weight_sharing,
                "curvature_fraction": self.curvature_fraction,
                "seed": self.seed,
                "fallback": fallback_rule.config(self.fallback),
                "relative_damping": self.relative_damping,
                "damping_warmup": self.damping_warmup,
                "max_momentum": self.max_momentum,
                "reject_below": self.reject_below,
                "layer_collection": self.layer_collection.get_config(),
            }
        )
        return config
