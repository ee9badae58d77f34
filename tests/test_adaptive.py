"""The paper's adaptive recipe inside model.fit: α/μ, LM damping, γ search, fractions."""

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.step import MIN_CURVATURE_EXAMPLES, Step, sub_batch


def _autoencoder():
    return keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(12),
        ]
    )


def _images(n=128):
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 12))
    return (1 / (1 + np.exp(-(rng.normal(size=(n, 3)) @ basis)))).astype("float32")


@pytest.fixture
def any_curvature_sub_batch(monkeypatch):
    """τ₂'s sub-batch without its minimum of 32 examples, so that the small batches here are split."""
    monkeypatch.setattr(keras_kfac.step, "MIN_CURVATURE_EXAMPLES", 1)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_adaptive_recipe_trains_and_exposes_its_state(jit_compile):
    keras.utils.set_random_seed(0)
    x = _images()
    model = _autoencoder()
    opt = keras_kfac.KFAC(model=model, adaptive=True, damping_adaptation_period=2, gamma_adaptation_period=3, seed=0)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=jit_compile)
    history = model.fit(x, x, batch_size=32, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert float(opt.damping.numpy()) > 0.0
    assert np.isfinite(float(opt.rho.numpy()))
    assert float(opt.alpha.numpy()) > 0
    assert float(opt.quadratic_change.numpy()) < 0
    gamma, damping = float(opt.gamma.numpy()), float(opt.damping.numpy())
    assert gamma != pytest.approx(np.sqrt(damping))  # decoupled from λ


def _mean_eigenvalue(opt) -> float:
    """tr(F̃)/n of the factored Fisher ⊕ Ā ⊗ G, in float64 from the factor variables."""
    trace, size = 0.0, 0
    for block in opt.blocks:
        a = block.input_factor.cov.numpy().astype(np.float64)
        g = block.output_factor.cov.numpy().astype(np.float64)
        trace += np.trace(np.kron(a, g))
        size += a.shape[0] * g.shape[0]
    return trace / size


def test_one_damping_unit_what_is_passed_is_what_is_used_and_read():
    """No conversion of λ: 150 passed is λ = 150 in the compiled loss's units
    (here a mean over 12 outputs), before and after steps, and in γ."""
    x = _images(32)
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    for kwargs in (dict(adaptive=True, damping_warmup=0), dict(learning_rate=0.1)):
        keras.utils.set_random_seed(0)
        model = _autoencoder()
        opt = keras_kfac.KFAC(model=model, damping=150.0, **kwargs)
        assert float(opt.damping) == 150.0
        model.compile(optimizer=opt, loss=loss)
        model.train_on_batch(x, x)  # λ adapts at step T₁ = 5 only
        assert float(opt.damping.numpy()) == 150.0
        assert float(opt.gamma.numpy()) == pytest.approx(np.sqrt(150.0))
        assert keras_kfac.KFAC.from_config(opt.get_config()).initial_damping == 150.0


@pytest.mark.parametrize("kwargs, relative", [({}, 3.0), (dict(adaptive=True, damping_warmup=0), 0.3)])
def test_default_damping_is_relative_to_the_factored_fishers_mean_eigenvalue(kwargs, relative):
    """λ = c · tr(F̃)/n after the first statistics (Σ tr Ā · tr G / Σ dim Ā · dim G): c = 3, λ₀ with c = 0.3."""
    keras.utils.set_random_seed(0)
    x = _images(32)
    model = _autoencoder()
    opt = keras_kfac.KFAC(model=model, **kwargs)
    assert np.isnan(opt.damping) and opt.get_config()["damping"] is None
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.train_on_batch(x, x)
    expected = relative * _mean_eigenvalue(opt)
    assert float(opt.damping.numpy()) == pytest.approx(expected, rel=1e-5)
    assert float(opt.gamma.numpy()) == pytest.approx(np.sqrt(expected), rel=1e-5)
    config = opt.get_config()
    assert config["damping"] is None and keras_kfac.KFAC.from_config(config).get_config() == config


@pytest.mark.parametrize("relative_min_damping", [1e-2, 0.0])
def test_adapted_damping_stays_above_a_multiple_of_the_mean_eigenvalue(relative_min_damping):
    """LM's λ is at least max(min_damping, c · tr(F̃)/n), F̃ from the step's updated statistics."""
    keras.utils.set_random_seed(0)
    x = _images(32)
    model = _autoencoder()
    opt = keras_kfac.KFAC(
        model=model,
        adaptive=True,
        damping=1e-12,
        damping_warmup=1,
        reject_below=None,
        min_damping=1e-10,
        relative_min_damping=relative_min_damping,
        seed=0,
    )
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.train_on_batch(x, x)
    assert np.isfinite(float(opt.rho.numpy()))
    expected = max(1e-10, relative_min_damping * _mean_eigenvalue(opt))
    assert float(opt.damping.numpy()) == pytest.approx(expected, rel=1e-5)
    assert opt.get_config()["relative_min_damping"] == relative_min_damping
    with pytest.raises(ValueError, match="relative_min_damping"):
        keras_kfac.KFAC(model=model, relative_min_damping=-1.0)


def test_relative_damping_waits_for_a_batch_whose_statistics_are_accepted():
    """A first batch that weighs nothing adds no statistics: λ stays unset (0), then 3 · tr(F̃)/n."""
    keras.utils.set_random_seed(0)
    x = _images(32)
    model = _autoencoder()
    opt = keras_kfac.KFAC(model=model, statistics_update_period=1, seed=0)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.train_on_batch(x, x, sample_weight=np.zeros(32, "float32"))
    assert float(opt.damping.numpy()) == 0.0
    assert all(not np.any(b.input_factor.cov.numpy()) for b in opt.blocks)
    model.train_on_batch(x, x)
    expected = 3.0 * _mean_eigenvalue(opt)
    assert expected > 0 and float(opt.damping.numpy()) == pytest.approx(expected, rel=1e-5)


def test_damping_adaptation_with_a_fixed_learning_rate():
    keras.utils.set_random_seed(1)
    x = _images()
    model = _autoencoder()
    opt = keras_kfac.KFAC(
        model=model, learning_rate=0.05, momentum=0.5, damping=1.0, adapt_damping=True, damping_adaptation_period=1
    )
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, x, batch_size=32, epochs=2, verbose=0)
    assert float(opt.alpha.numpy()) == pytest.approx(0.05)
    assert float(opt.mu.numpy()) == pytest.approx(0.5)
    rho = float(opt.rho.numpy())
    assert np.isfinite(rho)
    # Small, cautious steps are predicted well (ρ > 3/4): λ went down from 1.
    assert rho > 0.75 and float(opt.damping.numpy()) < 1.0
    assert float(opt.gamma.numpy()) == pytest.approx(np.sqrt(float(opt.damping.numpy())), rel=1e-5)


def test_fractions_of_the_batch():
    """τ₁: statistics from the first ⌈τ₁B⌉ examples; τ₂: a sub-batch quadratic model."""
    keras.utils.set_random_seed(2)
    x = _images(40)
    model = _autoencoder()
    opt = keras_kfac.KFAC(
        model=model, use_quadratic_model=True, damping=0.1, statistics_fraction=0.25, curvature_fraction=0.5
    )
    model.compile(optimizer=opt, loss="mse")
    first = model.layers[0]
    model.train_on_batch(x, x)
    rows = np.concatenate([x[:10], np.ones((10, 1), "float32")], 1).astype(np.float64)
    np.testing.assert_allclose(
        opt.layer_collection.block_for(first).input_factor.cov.numpy(), rows.T @ rows / 10, rtol=1e-5, atol=1e-6
    )
    history = model.fit(x, x, batch_size=40, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_adaptive_arguments_are_validated_and_round_trip():
    with pytest.raises(ValueError, match="learning_rate"):
        keras_kfac.KFAC(adaptive=True, learning_rate=0.1)
    with pytest.raises(ValueError, match="momentum"):
        keras_kfac.KFAC(use_quadratic_model=True, momentum=0.9)
    with pytest.raises(ValueError, match="approximation"):
        keras_kfac.KFAC(approximation="full")
    with pytest.raises(ValueError, match="statistics_fraction"):
        keras_kfac.KFAC(statistics_fraction=0.0)
    with pytest.raises(ValueError, match="curvature_fraction"):
        keras_kfac.KFAC(curvature_fraction=1.5)
    with pytest.raises(ValueError, match="damping_adaptation_period"):
        keras_kfac.KFAC(adapt_damping=True, damping_adaptation_period=0)
    opt = keras_kfac.KFAC(adaptive=True, adapt_gamma=False, l2_reg=1e-5, seed=1)
    config = opt.get_config()
    assert config["learning_rate"] is None and config["momentum"] is None
    clone = keras_kfac.KFAC.from_config(copy.deepcopy(config))
    assert clone.get_config() == config
    assert clone.use_quadratic_model and clone.adapt_damping and not clone.adapt_gamma


def test_extra_forward_passes_leave_batch_normalization_statistics_alone():
    """τ₁, τ₂ < 1 and the LM check run forward passes of their own; only the training pass updates moving statistics."""
    keras.utils.set_random_seed(3)
    x = _images(40)
    dense = keras.layers.Dense(6, activation="tanh")
    norm = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Sequential([keras.Input((12,)), dense, norm, keras.layers.Dense(12)])
    opt = keras_kfac.KFAC(
        model=model,
        adaptive=True,
        damping_adaptation_period=1,
        statistics_fraction=0.25,
        curvature_fraction=0.5,
        seed=0,
    )
    model.compile(optimizer=opt, loss="mse")
    with pytest.warns(UserWarning, match="no curvature block"):
        model.build((None, 12))
        opt.build(model.trainable_variables)
    kernel, bias = (v.numpy().astype(np.float64) for v in dense.weights)
    model.train_on_batch(x, x)
    h = np.tanh(x.astype(np.float64) @ kernel + bias)
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm.moving_variance.numpy(), 0.9 + 0.1 * h.var(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("curvature_fraction", [1.0, 0.5])
@pytest.mark.usefixtures("any_curvature_sub_batch")
def test_reduction_ratio_counts_activity_regularization(curvature_fraction):
    """ρ = (h(θ+δ) − h(θ)) / M(δ) [KFAC §6.5] with h the whole training loss, activity penalty included."""
    keras.utils.set_random_seed(4)
    x = _images(32)
    hidden = keras.layers.Dense(6, activation="tanh", activity_regularizer=keras.regularizers.L2(0.05))
    output = keras.layers.Dense(12)
    model = keras.Sequential([keras.Input((12,)), hidden, output])
    opt = keras_kfac.KFAC(
        model=model,
        learning_rate=0.05,
        momentum=0.0,
        damping=1.0,
        adapt_damping=True,
        damping_adaptation_period=1,
        curvature_fraction=curvature_fraction,
    )
    model.compile(optimizer=opt, loss="mse")
    rows = x[: int(np.ceil(curvature_fraction * len(x)))].astype(np.float64)

    def h() -> float:
        w1, b1, w2, b2 = (v.numpy().astype(np.float64) for v in model.trainable_variables)
        a = np.tanh(rows @ w1 + b1)
        return np.mean((a @ w2 + b2 - rows) ** 2) + 0.05 * np.sum(a**2) / len(rows)

    before = h()
    model.train_on_batch(x, x)
    expected = (h() - before) / float(opt.quadratic_change.numpy())
    assert float(opt.rho.numpy()) == pytest.approx(expected, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.usefixtures("any_curvature_sub_batch")
def test_sub_batches_estimate_the_whole_batch_for_mean_and_sum_losses(reduction):
    """τ₁ = τ₂ = 1/2 on a batch of two identical halves: the same factors, α, μ, M and ρ as the whole batch.

    A `sum` loss grows with the batch, so a half batch's loss and curvature count double;
    a weight regularizer's penalty does not depend on the batch and must not be scaled.
    """
    rng = np.random.default_rng(6)
    half = _images(8)
    x = np.concatenate([half, half])
    weights = np.tile(rng.uniform(0.5, 2.0, size=8).astype("float32"), 2)
    results = []
    for fraction in (1.0, 0.5):
        keras.utils.set_random_seed(6)
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01)),
                keras.layers.Dense(12),
            ]
        )
        opt = keras_kfac.KFAC(
            model=model,
            adaptive=True,
            damping=0.1,
            damping_adaptation_period=1,
            estimation_mode="exact",
            statistics_fraction=fraction,
            curvature_fraction=fraction,
        )
        model.compile(optimizer=opt, loss=keras.losses.MeanSquaredError(reduction=reduction))
        for _ in range(3):
            model.train_on_batch(x, x, sample_weight=weights)
        results.append(opt)
    whole, halves = results
    for a, b in zip(whole.blocks, halves.blocks):
        np.testing.assert_allclose(b.input_factor.cov.numpy(), a.input_factor.cov.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(b.output_factor.cov.numpy(), a.output_factor.cov.numpy(), rtol=1e-4, atol=1e-7)
    for name in ("alpha", "mu", "quadratic_change", "rho", "damping"):
        assert float(getattr(halves, name).numpy()) == pytest.approx(float(getattr(whole, name).numpy()), rel=1e-3), (
            name
        )


@pytest.mark.parametrize("wrapper", ["loss_scale", "gradient_accumulation"])
def test_quadratic_model_inside_a_conditional_update(wrapper):
    """A LossScaleOptimizer or gradient accumulation applies the update in a tf.cond: same α, μ, ρ and weights."""
    x = _images(32)
    runs = []
    for wrapped in (False, True):
        keras.utils.set_random_seed(7)
        model = _autoencoder()
        opt = keras_kfac.KFAC(
            model=model,
            adaptive=True,
            damping=0.01,
            damping_adaptation_period=1,
            gradient_accumulation_steps=2 if wrapped and wrapper == "gradient_accumulation" else None,
        )
        optimizer = keras.optimizers.LossScaleOptimizer(opt) if wrapped and wrapper == "loss_scale" else opt
        model.compile(optimizer=optimizer, loss="mse")
        for _ in range(2):
            batches = (x, x) if wrapped and wrapper == "gradient_accumulation" else (x,)
            for batch in batches:  # two accumulated copies of a batch have its gradient
                model.train_on_batch(batch, batch)
        runs.append((opt, model))
    (plain, plain_model), (wrapped_opt, wrapped_model) = runs
    assert float(plain.alpha.numpy()) != 0.0
    for name in ("alpha", "mu", "rho", "quadratic_change"):
        assert float(getattr(wrapped_opt, name).numpy()) == pytest.approx(
            float(getattr(plain, name).numpy()), rel=1e-4
        ), name
    for a, b in zip(plain_model.get_weights(), wrapped_model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("any_curvature_sub_batch")
def test_integer_sample_weights_of_a_sum_loss_sub_batch_are_not_truncated():
    """B = 15, τ₁ = τ₂ = 1/2: the 8 examples count 15/8 times each, with int or float weights alike."""
    x = _images(15)
    weights = np.arange(15) % 3 + 1
    results = []
    for dtype in ("float32", "int32"):
        keras.utils.set_random_seed(6)
        model = _autoencoder()
        opt = keras_kfac.KFAC(
            model=model,
            adaptive=True,
            damping=0.1,
            damping_adaptation_period=1,
            estimation_mode="exact",
            statistics_fraction=0.5,
            curvature_fraction=0.5,
        )
        model.compile(optimizer=opt, loss=keras.losses.MeanSquaredError(reduction="sum"))
        model.train_on_batch(x, x, sample_weight=weights.astype(dtype))
        results.append(opt)
    for a, b in zip(results[0].blocks, results[1].blocks):
        np.testing.assert_allclose(b.output_factor.cov.numpy(), a.output_factor.cov.numpy(), rtol=1e-5, atol=1e-8)
    for name in ("alpha", "quadratic_change", "rho"):
        assert float(getattr(results[1], name).numpy()) == pytest.approx(
            float(getattr(results[0], name).numpy()), rel=1e-5
        )


@pytest.mark.parametrize(
    "batch, fraction, size", [(1000, 0.25, 250), (128, 0.25, 32), (200, 0.1, 32), (32, 0.25, 32), (20, 0.25, 20)]
)
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_curvature_sub_batch_keeps_at_least_32_examples(batch, fraction, size, reduction):
    """τ₂'s sub-batch: the first max(⌈τ₂B⌉, min(B, 32)) examples, each counted B/size times by a sum loss."""
    x = np.arange(batch, dtype="float32")[:, None]
    data = (tf.constant(x), tf.constant(x), None)
    rows, targets, weights = sub_batch(data, tf.constant(batch), fraction, reduction, MIN_CURVATURE_EXAMPLES)
    np.testing.assert_array_equal(rows.numpy(), x[:size])
    np.testing.assert_array_equal(targets.numpy(), x[:size])
    if reduction == "sum":
        np.testing.assert_allclose(weights.numpy(), np.full(size, batch / size), rtol=1e-6)
    else:
        assert weights is None


def test_a_quarter_of_a_batch_of_32_is_the_whole_batch():
    """τ₂ = 1/4 on a batch of 32 takes all 32 examples: the same α, μ, M, ρ and λ as τ₂ = 1."""
    x = _images(32)
    runs = []
    for fraction in (0.25, 1.0):
        keras.utils.set_random_seed(3)
        model = _autoencoder()
        opt = keras_kfac.KFAC(
            model=model,
            adaptive=True,
            damping_adaptation_period=1,
            estimation_mode="exact",
            seed=0,
            curvature_fraction=fraction,
        )
        model.compile(optimizer=opt, loss="mse")
        for _ in range(3):
            model.train_on_batch(x, x)
        runs.append(opt)
    quarter, whole = runs
    assert float(whole.alpha.numpy()) > 0.0
    for name in ("alpha", "mu", "quadratic_change", "rho", "damping"):
        assert float(getattr(quarter, name).numpy()) == pytest.approx(float(getattr(whole, name).numpy()), rel=1e-4), (
            name
        )


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.usefixtures("any_curvature_sub_batch")
def test_masked_sequence_output_weighs_the_curvature_as_the_loss_does(fraction):
    """A Keras mask on the output (mask_zero) is the loss's per-position weight; K-FAC's curvature uses it too.

    The same model without the mask, trained with the weights Keras derives from it
    (mask · positions/kept positions), must take the same steps.
    """
    rng = np.random.default_rng(8)
    ids = rng.integers(1, 6, size=(8, 5))
    ids[:4, 3:] = 0  # padding: 3 of 5 positions kept in each half of the batch
    ids[4:, :2] = 0
    labels = rng.integers(0, 3, size=(8, 5))
    mask = (ids != 0).astype("float32")
    weights = mask * mask.size / mask.sum()  # = each half's own mask · positions/kept
    runs = []
    for masked in (True, False):
        keras.utils.set_random_seed(9)
        model = keras.Sequential(
            [
                keras.Input((5,), dtype="int32"),
                keras.layers.Embedding(6, 4, mask_zero=masked),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(3),
            ]
        )
        opt = keras_kfac.KFAC(
            model=model,
            adaptive=True,
            damping=0.1,
            damping_adaptation_period=1,
            estimation_mode="exact",
            statistics_fraction=fraction,
            curvature_fraction=fraction,
        )
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(2):
            if masked:
                model.train_on_batch(ids, labels)
            else:
                model.train_on_batch(ids, labels, sample_weight=weights)
        runs.append((opt, model))
    (masked_opt, masked_model), (weighted_opt, weighted_model) = runs
    for a, b in zip(masked_opt.blocks, weighted_opt.blocks):
        np.testing.assert_allclose(a.output_factor.cov.numpy(), b.output_factor.cov.numpy(), rtol=1e-4, atol=1e-7)
    for name in ("alpha", "mu", "rho"):
        assert float(getattr(masked_opt, name).numpy()) == pytest.approx(
            float(getattr(weighted_opt, name).numpy()), rel=1e-3
        )
    for a, b in zip(masked_model.get_weights(), weighted_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_extra_forward_passes_draw_fresh_dropout_masks():
    """The τ₁ pass advances the dropout seed as a training pass does: its mask is not the next step's."""
    advances = []
    for fraction in (1.0, 0.5):
        keras.utils.set_random_seed(5)
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dropout(0.5),
                keras.layers.Dense(12),
            ]
        )
        opt = keras_kfac.KFAC(model=model, learning_rate=0.05, damping=1.0, statistics_fraction=fraction)
        model.compile(optimizer=opt, loss="mse")
        model.build((None, 12))
        weights = {id(w) for w in model.weights}
        (seed_state,) = [v for v in model.variables if id(v) not in weights]
        start = seed_state.numpy().astype(np.int64)
        model.train_on_batch(_images(16), _images(16))
        advances.append(int(np.sum(seed_state.numpy().astype(np.int64) - start)))
    assert advances[0] > 0 and advances[1] == 2 * advances[0], advances


def test_damping_warmup_checks_rho_on_each_of_its_first_steps():
    """ρ is measured from the first step during the warm-up, only at step T₁ without it."""
    x = _images(32)
    rhos = {}
    for warmup in (0, 3):
        keras.utils.set_random_seed(0)
        model = _autoencoder()
        opt = keras_kfac.KFAC(model=model, adaptive=True, damping_warmup=warmup, seed=0)
        model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
        rhos[warmup] = []
        for _ in range(4):
            model.train_on_batch(x, x)
            rhos[warmup].append(float(opt.rho.numpy()))
    assert all(np.isnan(rhos[0]))  # the first check is at step T₁ = 5
    assert all(np.isfinite(rhos[3][:3]))
    assert rhos[3][3] == rhos[3][2]  # step 4 is not checked


def test_a_rejected_step_is_undone():
    """reject_below above any ρ: the checked step leaves weights and momentum as they were."""
    keras.utils.set_random_seed(0)
    x = _images(32)
    model = _autoencoder()
    before = [w.copy() for w in model.get_weights()]
    opt = keras_kfac.KFAC(model=model, adaptive=True, damping_warmup=1, reject_below=1e9, seed=0)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.train_on_batch(x, x)
    assert np.isfinite(float(opt.rho.numpy()))
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert all(not np.any(opt._velocities[opt._var_key(v)].numpy()) for v in model.trainable_variables)
    model.train_on_batch(x, x)  # not checked (T₁ = 5): kept
    assert any(np.any(a != b) for a, b in zip(model.get_weights(), before))


def test_gamma_search_on_a_refresh_step_reuses_the_stored_inverses(monkeypatch):
    """With T₂ a multiple of T₃, γ's own candidate reads the just-refreshed inverses and keeping γ
    stores nothing: the same γ and weights as a search that recomputes and stores every candidate."""
    x = _images(64)
    search = Step.adapt_gamma
    results = []
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(Step, "adapt_gamma", lambda self, lr, due, _: search(self, lr, due, False))
        keras.utils.set_random_seed(0)
        model = _autoencoder()
        opt = keras_kfac.KFAC(
            model=model,
            adaptive=True,
            damping=1e-4,
            statistics_update_period=1,
            inverse_update_period=4,
            gamma_adaptation_period=8,
            seed=0,
        )
        model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
        gammas = []
        for _ in range(10):
            model.fit(x, x, batch_size=16, epochs=2, verbose=0, shuffle=False)  # 8 steps: one search
            gammas.append(float(opt.gamma.numpy()))
        results.append((gammas, model.get_weights()))
    (gammas, weights), (reference_gammas, reference_weights) = results
    moves = np.sign(np.diff(np.log([1e-2] + gammas)).round(6))
    assert {-1.0, 0.0, 1.0} <= set(moves)  # searches lowered, kept and raised γ
    np.testing.assert_allclose(gammas, reference_gammas, rtol=1e-6)
    for mine, reference in zip(weights, reference_weights):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)
