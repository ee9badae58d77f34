"""Ā and G of Dense, Conv1D, Conv2D and Embedding blocks against explicit float64 numpy computations.

The references build per-example Jacobians by the chain rule, the loss Hessian of
the compiled (reduced) loss, and convolution patches by explicit loops; nothing is
shared with the package. With ``ema_decay`` irrelevant on the first step (ε = 0),
the factors after one ``train_on_batch`` are the batch estimates.
"""

import math
import zlib

import keras
import numpy as np
import pytest

import keras_kfac

B, D_IN, HIDDEN, K = 5, 3, 4, 3


def _mlp_reference(params, x):
    """Forward pass: ā_0, ā_1 (with 1 appended), hidden tanh, output z (float64)."""
    (k1, b1), (k2, b2) = params
    a0 = np.concatenate([x, np.ones((len(x), 1))], 1)
    s1 = a0 @ np.concatenate([k1, b1[None]], 0)
    h = np.tanh(s1)
    a1 = np.concatenate([h, np.ones((len(x), 1))], 1)
    z = a1 @ np.concatenate([k2, b2[None]], 0)
    return a0, a1, h, z


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _nll_hessian(loss, z):
    """∇²_z NLL_n per example, and the per-example coefficient c (1/K for unit means)."""
    if loss == "cce":
        p = _softmax(z)
        return np.stack([np.diag(q) - np.outer(q, q) for q in p]), 1.0
    if loss == "bce":
        p = 1 / (1 + np.exp(-z))
        return np.stack([np.diag(q * (1 - q)) for q in p]), 1.0 / z.shape[1]
    return np.stack([2.0 * np.eye(z.shape[1])] * len(z)), 1.0 / z.shape[1]


def _nll_gradient(loss, z, y):
    if loss == "cce":  # class indices, or one label vector per example
        return _softmax(z) - (np.eye(z.shape[1])[y] if y.ndim == 1 else y)
    if loss == "bce":
        return 1 / (1 + np.exp(-z)) - y
    return 2.0 * (z - y)


def _reference_factors(loss, mode, params, x, y, sample_weight):
    """[(Ā_i, G_i)] with G_i = Σ_n J_niᵀ H̃_n J_ni (exact) or its label version (empirical)."""
    (_, _), (k2, _) = params
    a0, a1, h, z = _mlp_reference(params, x)
    hessians, c = _nll_hessian(loss, z)
    weights = np.ones(len(x)) if sample_weight is None else sample_weight
    grads = _nll_gradient(loss, z, y)
    g0 = np.zeros((HIDDEN, HIDDEN))
    g1 = np.zeros((K, K))
    for n in range(len(x)):
        jac_out = np.eye(K)  # ∂z/∂s_1
        jac_hidden = (k2 * (1 - h[n] ** 2)[:, None]).T  # ∂z/∂s_0 = W2ᵀ diag(tanh')
        if mode == "exact":
            curvature = weights[n] * c * hessians[n] / len(x)
        else:
            curvature = weights[n] * c * np.outer(grads[n], grads[n]) / len(x)
        g1 += jac_out.T @ curvature @ jac_out
        g0 += jac_hidden.T @ curvature @ jac_hidden
    # Ā is the expectation under the examples' weights: Σ_n w_n ā_n ā_nᵀ / Σ_n w_n.
    return [((a0.T * weights) @ a0 / weights.sum(), g0), ((a1.T * weights) @ a1 / weights.sum(), g1)]


LOSSES = {
    "cce_logits": ("cce", None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    "cce_softmax": ("cce", "softmax", "sparse_categorical_crossentropy"),
    "bce_logits": ("bce", None, keras.losses.BinaryCrossentropy(from_logits=True)),
    "bce_sigmoid": ("bce", "sigmoid", "binary_crossentropy"),
    "mse": ("mse", None, "mean_squared_error"),
}


def _targets(kind, rng):
    if kind == "cce":
        return rng.integers(0, K, size=B).astype("int32")
    if kind == "bce":
        return rng.integers(0, 2, size=(B, K)).astype("float32")
    return rng.normal(size=(B, K)).astype("float32")


def _params(model):
    return [
        (w.numpy().astype(np.float64), b.numpy().astype(np.float64))
        for w, b in zip(model.trainable_weights[::2], model.trainable_weights[1::2])
    ]


def _mlp(activation=None):
    return keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(K, activation=activation),
        ]
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_dense_factors_match_explicit_fisher(name, mode, weighted):
    kind, activation, compiled_loss = LOSSES[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}-{mode}-{weighted}".encode()))
    x = rng.normal(size=(B, D_IN)).astype("float32")
    y = _targets(kind, rng)
    sample_weight = rng.uniform(0.5, 2.0, size=B).astype("float32") if weighted else None
    model = _mlp(activation)
    params = _params(model)
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode=mode)
    model.compile(optimizer=opt, loss=compiled_loss)
    model.train_on_batch(x, y, sample_weight=sample_weight)
    expected = _reference_factors(
        kind, mode, params, x.astype(np.float64), y, None if sample_weight is None else sample_weight.astype(np.float64)
    )
    for block, (a, g) in zip(opt.blocks, expected):
        np.testing.assert_allclose(block.input_factor.cov.numpy(), a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_ignore_class_leaves_its_examples_out_of_both_factors(mode):
    """Keras drops the values labelled ``ignore_class`` and averages over the rest:
    the reference gives them weight 0 and the others B/(kept examples)."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(B, D_IN)).astype("float32")
    y = rng.integers(0, K, size=B).astype("int32")
    y[[1, 3]] = -1
    model = _mlp()
    params = _params(model)
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode=mode)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
    model.train_on_batch(x, y)
    kept = (y != -1).astype(np.float64)
    expected = _reference_factors("cce", mode, params, x.astype(np.float64), y, kept * B / kept.sum())
    for block, (a, g) in zip(opt.blocks, expected):
        np.testing.assert_allclose(block.input_factor.cov.numpy(), a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind", ["cce", "bce"])
def test_empirical_fisher_takes_the_labels_smoothed_as_the_loss_smooths_them(kind):
    """``label_smoothing`` s: the empirical G is built from ∇NLL at (1−s)·y + s/K
    (categorical) or (1−s)·y + s/2 (binary), as Keras' losses compute them."""
    rng = np.random.default_rng(22)
    smoothing = 0.2
    x = rng.normal(size=(B, D_IN)).astype("float32")
    if kind == "cce":
        y = np.eye(K, dtype="float32")[rng.integers(0, K, size=B)]
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
        smoothed = y * (1 - smoothing) + smoothing / K
    else:
        y = rng.integers(0, 2, size=(B, K)).astype("float32")
        loss = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing)
        smoothed = y * (1 - smoothing) + smoothing / 2
    model = _mlp()
    params = _params(model)
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="empirical")
    model.compile(optimizer=opt, loss=loss)
    model.train_on_batch(x, y)
    expected = _reference_factors(kind, "empirical", params, x.astype(np.float64), smoothed.astype(np.float64), None)
    for block, (_, g) in zip(opt.blocks, expected):
        np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("loss", ["binary_crossentropy", "mse"])
def test_empirical_fisher_takes_labels_one_rank_below_the_output(loss):
    """Labels (B,) for an output (B, 1), as Keras' losses accept: G of the output block = mean of (∇_z NLL)²."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(B, D_IN)).astype("float32")
    y = rng.integers(0, 2, size=B).astype("float32")
    g_out = []
    for labels in (y, y[:, None]):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((D_IN,)),
                keras.layers.Dense(1, activation="sigmoid" if loss != "mse" else None),
            ]
        )
        opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="empirical")
        model.compile(optimizer=opt, loss=loss)
        model.build((None, D_IN))
        kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
        model.train_on_batch(x, labels)
        g_out.append(opt.blocks[0].output_factor.cov.numpy()[0, 0])
    z = x.astype(np.float64) @ kernel[:, 0] + bias[0]
    gradient = 1 / (1 + np.exp(-z)) - y if loss != "mse" else 2.0 * (z - y)
    assert g_out[0] == pytest.approx(np.mean(gradient**2), rel=1e-4)
    assert g_out[1] == pytest.approx(g_out[0], rel=1e-6)


@pytest.mark.parametrize("name", ["cce_logits", "bce_logits", "mse"])
def test_one_example_kronecker_block_is_the_exact_fisher_block(name):
    """With B = 1, Ā ⊗ G equals the layer's block of F = Jᵀ H̃ J built parameter by parameter."""
    kind, activation, compiled_loss = LOSSES[name]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, D_IN)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(K),
        ]
    )
    params = [
        (w.numpy().astype(np.float64), b.numpy().astype(np.float64))
        for w, b in zip(model.trainable_weights[::2], model.trainable_weights[1::2])
    ]
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss=compiled_loss)
    y = _targets(kind, rng)[:1]
    model.train_on_batch(x, y)

    (k1, _), (k2, _) = params
    a0, a1, h, z = _mlp_reference(params, x.astype(np.float64))
    hessians, c = _nll_hessian(kind, z)
    # ∂z_k/∂W̄_0[i, j] = ā0_i tanh'_j W2[j, k];  ∂z_k/∂W̄_1[i, j] = ā1_i δ_jk (row-major vec).
    jac0 = np.einsum("i,j,jk->kij", a0[0], 1 - h[0] ** 2, k2).reshape(K, -1)
    jac1 = np.einsum("i,jk->kij", a1[0], np.eye(K)).reshape(K, -1)
    for block, jac in zip(opt.blocks, [jac0, jac1]):
        fisher_block = jac.T @ (c * hessians[0]) @ jac
        kron = np.kron(block.input_factor.cov.numpy(), block.output_factor.cov.numpy())
        np.testing.assert_allclose(kron, fisher_block, rtol=1e-4, atol=1e-7)


def _patches(x, kh, kw, stride, dilation, padding):
    """(B, Ho, Wo, kh·kw·c) patches by loops, with TensorFlow's 'same'/'valid' padding."""
    b, height, width, channels = x.shape
    eff_h, eff_w = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    if padding == "same":
        out_h, out_w = -(-height // stride), -(-width // stride)
        pad_h = max((out_h - 1) * stride + eff_h - height, 0)
        pad_w = max((out_w - 1) * stride + eff_w - width, 0)
        top, left = pad_h // 2, pad_w // 2
    else:
        out_h, out_w = (height - eff_h) // stride + 1, (width - eff_w) // stride + 1
        top = left = 0
    out = np.zeros((b, out_h, out_w, kh * kw * channels))
    for i in range(out_h):
        for j in range(out_w):
            values = []
            for di in range(kh):
                for dj in range(kw):
                    r, s = i * stride + di * dilation - top, j * stride + dj * dilation - left
                    inside = 0 <= r < height and 0 <= s < width
                    values.append(x[:, r, s, :] if inside else np.zeros((b, channels)))
            out[:, i, j] = np.concatenate(values, axis=1)
    return out


@pytest.mark.parametrize(
    "stride, dilation, padding", [(1, 1, "valid"), (1, 1, "same"), (2, 1, "same"), (2, 1, "valid"), (1, 2, "same")]
)
def test_conv2d_factors_match_explicit_patches_and_location_sums(stride, dilation, padding):
    """KFC: Ā = E_{n,t}[ā_t ā_tᵀ], G = (1/B) Σ_{n,t} ds_t ds_tᵀ (= |T|·E_{n,t}) for exact MSE."""
    rng = np.random.default_rng(stride * 10 + dilation)
    x = rng.normal(size=(4, 6, 5, 2)).astype("float32")
    conv = keras.layers.Conv2D(3, (3, 2), strides=stride, dilation_rate=dilation, padding=padding)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((6, 5, 2)), conv, keras.layers.Flatten(), head])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, rng.normal(size=(4, K)).astype("float32"))

    patches = _patches(x.astype(np.float64), 3, 2, stride, dilation, padding)
    rows = np.concatenate([patches.reshape(-1, patches.shape[-1]), np.ones((patches[..., 0].size, 1))], 1)
    block = opt.layer_collection.block_for(conv)
    np.testing.assert_allclose(block.input_factor.cov.numpy(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)

    # Linear head and MSE: the j-th exact output vector sqrt(2/K)·e_j reaches the
    # conv output as ds = sqrt(2/K)·W_head[:, j], the same for every example.
    out_shape = patches.shape[1:3] + (3,)
    w_head = head.kernel.numpy().astype(np.float64)
    g = np.zeros((3, 3))
    for j in range(K):
        ds = np.sqrt(2.0 / K) * w_head[:, j].reshape(out_shape).reshape(-1, 3)
        g += ds.T @ ds  # (1/B) Σ_n over B identical examples
    np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stride, padding", [(1, "valid"), (2, "same")])
def test_conv2d_reduce_factors_are_per_example_patch_means_and_location_sums(stride, padding):
    """K-FAC-reduce: Ā = Σ_n w_n ā_n ā_nᵀ / Σ_n w_n with ā_n the mean of example n's patches,
    G = (1/B) Σ_n w_n (Σ_t ds_t)(Σ_t ds_t)ᵀ."""
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(4, 6, 5, 2)).astype("float32")
    sample_weight = np.array([1.0, 0.5, 2.0, 0.0], "float32")
    conv = keras.layers.Conv2D(3, (3, 2), strides=stride, padding=padding)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((6, 5, 2)), conv, keras.layers.Flatten(), head])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact", weight_sharing="reduce")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, rng.normal(size=(4, K)).astype("float32"), sample_weight=sample_weight)

    patches = _patches(x.astype(np.float64), 3, 2, stride, 1, padding)
    means = np.concatenate([patches.mean(axis=(1, 2)), np.ones((4, 1))], 1)
    weights = sample_weight.astype(np.float64)
    a = (means * weights[:, None]).T @ means / weights.sum()
    block = opt.layer_collection.block_for(conv)
    np.testing.assert_allclose(block.input_factor.cov.numpy(), a, rtol=1e-5, atol=1e-6)

    # Linear head and MSE: the j-th exact output vector sqrt(2/K)·e_j reaches the
    # conv output as ds = sqrt(2/K)·W_head[:, j], the same at every example; the
    # examples' weights scale their vectors by sqrt(w_n).
    out_shape = patches.shape[1:3] + (3,)
    w_head = head.kernel.numpy().astype(np.float64)
    g = np.zeros((3, 3))
    for j in range(K):
        summed = (np.sqrt(2.0 / K) * w_head[:, j].reshape(out_shape).reshape(-1, 3)).sum(axis=0)
        g += np.mean(weights) * np.outer(summed, summed)
    np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="weight_sharing"):
        keras_kfac.KFAC(weight_sharing="sum")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_conv2d_reduce_is_the_exact_fisher_block_when_the_loss_sees_only_the_mean_over_locations(jit_compile):
    """A linear conv, global average pooling, a linear head, MSE: K-FAC-reduce's Ā ⊗ G is the exact
    Fisher block of the conv (Eschenhagen et al. 2023, §3.2; G is the same for every example here, so the
    Kronecker factorisation over examples is exact too); K-FAC-expand's is not."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 5, 4, 2)).astype("float32")
    y = rng.normal(size=(3, K)).astype("float32")
    factors = {}
    for sharing in ("reduce", "expand"):
        keras.utils.set_random_seed(0)
        conv = keras.layers.Conv2D(3, (2, 2))
        head = keras.layers.Dense(K)
        model = keras.Sequential([keras.Input((5, 4, 2)), conv, keras.layers.GlobalAveragePooling2D(), head])
        opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact", weight_sharing=sharing)
        model.compile(optimizer=opt, loss="mse", jit_compile=jit_compile)
        model.train_on_batch(x, y)
        block = opt.layer_collection.block_for(conv)
        factors[sharing] = np.kron(block.input_factor.cov.numpy(), block.output_factor.cov.numpy())

    # z_n = W_headᵀ (mean_t W̄ᵀ ā_nt) + b, so ∂z_nk/∂W̄[i, j] = m_ni W_head[j, k] with m_n the
    # mean patch of example n (its homogeneous 1 included); MSE over K outputs has H = (2/K) I,
    # and the mean loss over B examples gives F = (1/B) Σ_n J_nᵀ H J_n.
    patches = _patches(x.astype(np.float64), 2, 2, 1, 1, "valid").reshape(3, -1, 8)
    w_head = head.kernel.numpy().astype(np.float64)
    fisher_block = 0.0
    for n in range(3):
        m = np.append(patches[n].mean(axis=0), 1.0)
        jacobian = np.einsum("i,jk->kij", m, w_head).reshape(K, -1)
        fisher_block = fisher_block + (2.0 / K) * jacobian.T @ jacobian / 3
    np.testing.assert_allclose(factors["reduce"], fisher_block, rtol=1e-4, atol=1e-7)
    assert np.abs(factors["expand"] - fisher_block).max() > 0.1 * np.abs(fisher_block).max()


def _sequence_patches(x, size, stride, dilation, padding):
    """(B, T, size·c) Conv1D patches by loops, with 'valid', 'same' (TensorFlow's split) or 'causal' padding."""
    b, length, channels = x.shape
    span = (size - 1) * dilation + 1
    if padding == "valid":
        steps, left = (length - span) // stride + 1, 0
    elif padding == "same":
        steps = -(-length // stride)
        left = max((steps - 1) * stride + span - length, 0) // 2
    else:  # causal: the output at t sees inputs t − (size − 1)·dilation … t
        steps, left = -(-length // stride), span - 1
    out = np.zeros((b, steps, size * channels))
    for t in range(steps):
        values = []
        for k in range(size):
            position = t * stride + k * dilation - left
            values.append(x[:, position, :] if 0 <= position < length else np.zeros((b, channels)))
        out[:, t] = np.concatenate(values, axis=1)
    return out


@pytest.mark.parametrize(
    "stride, dilation, padding",
    [
        (1, 1, "valid"),
        (1, 1, "same"),
        (2, 1, "same"),
        (2, 1, "valid"),
        (1, 2, "same"),
        (1, 2, "causal"),
        (2, 1, "causal"),
    ],
)
def test_conv1d_factors_match_explicit_patches_and_step_sums(stride, dilation, padding):
    """KFC over output steps: Ā = E_{n,t}[ā_t ā_tᵀ], G = (1/B) Σ_{n,t} ds_t ds_tᵀ for exact MSE."""
    rng = np.random.default_rng(stride * 10 + dilation + len(padding))
    x = rng.normal(size=(4, 7, 2)).astype("float32")
    conv = keras.layers.Conv1D(3, 3, strides=stride, dilation_rate=dilation, padding=padding)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((7, 2)), conv, keras.layers.Flatten(), head])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, rng.normal(size=(4, K)).astype("float32"))

    patches = _sequence_patches(x.astype(np.float64), 3, stride, dilation, padding)
    assert conv.compute_output_shape((4, 7, 2))[1] == patches.shape[1]
    rows = np.concatenate([patches.reshape(-1, patches.shape[-1]), np.ones((patches[..., 0].size, 1))], 1)
    block = opt.layer_collection.block_for(conv)
    assert type(block).__name__ == "Conv1DBlock"
    np.testing.assert_allclose(block.input_factor.cov.numpy(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)

    # Linear head and MSE: the j-th exact output vector sqrt(2/K)·e_j reaches the
    # conv output as ds = sqrt(2/K)·W_head[:, j], the same for every example.
    w_head = head.kernel.numpy().astype(np.float64)
    g = np.zeros((3, 3))
    for j in range(K):
        ds = np.sqrt(2.0 / K) * w_head[:, j].reshape(patches.shape[1], 3)
        g += ds.T @ ds  # (1/B) Σ_n over B identical examples
    np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-7)


def test_embedding_factors_are_token_frequencies_and_output_sums():
    """diag Ā = count(token)/(B·steps); G = (1/B) Σ_{n,t} ds_t ds_tᵀ for exact MSE through a linear head."""
    rng = np.random.default_rng(4)
    vocabulary, steps = 9, 5
    ids = rng.integers(0, vocabulary - 2, size=(6, steps)).astype("int32")  # the last two tokens unseen
    embedding = keras.layers.Embedding(vocabulary, 3)
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((steps,), dtype="int32"), embedding, keras.layers.Flatten(), head])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.1, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    model.build((None, steps))
    table = embedding.embeddings.numpy().copy()
    w_head = head.kernel.numpy().astype(np.float64)  # before the step moves it
    model.train_on_batch(ids, rng.normal(size=(6, K)).astype("float32"))

    block = opt.layer_collection.block_for(embedding)
    frequencies = np.bincount(ids.ravel(), minlength=vocabulary) / ids.size
    np.testing.assert_allclose(block.input_factor.cov.numpy(), frequencies, rtol=1e-6)
    # The j-th exact output vector sqrt(2/K)·e_j reaches position t as sqrt(2/K)·W_head[3t:3t+3, j].
    ds = (np.sqrt(2.0 / K) * w_head.T).reshape(K * steps, 3)
    np.testing.assert_allclose(block.output_factor.cov.numpy(), ds.T @ ds, rtol=1e-4, atol=1e-7)
    # Unseen tokens have no gradient, so their rows do not move.
    moved = embedding.embeddings.numpy()
    np.testing.assert_array_equal(moved[-2:], table[-2:])
    assert not np.allclose(moved[:-2], table[:-2])


class _TokensAndPositions(keras.layers.Layer):
    """Token and position embeddings, the positions looked up as one constant (B-less) vector."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(7, 3)
        self.positions = keras.layers.Embedding(4, 3)

    def call(self, ids):
        return self.tokens(ids) + self.positions(keras.ops.arange(4))


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_layer_called_on_a_constant_needs_the_sampled_mode(mode):
    """Its output is shared by the batch: sampled vectors are independent across examples, exact ones are not."""
    rng = np.random.default_rng(5)
    inputs = keras.Input((4,), dtype="int32")
    embedded = _TokensAndPositions()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(embedded)))
    opt = keras_kfac.KFAC(model=model, learning_rate=0.1, estimation_mode=mode)
    model.compile(optimizer=opt, loss="mse")
    ids, y = rng.integers(0, 7, size=(8, 4)), rng.normal(size=(8, 2)).astype("float32")
    if mode == "exact":
        with pytest.raises(NotImplementedError, match="called on a constant"):
            model.train_on_batch(ids, y)
    else:
        model.train_on_batch(ids, y)
        positions = [b for b in opt.blocks if b.input_dim == 4][0]
        np.testing.assert_allclose(positions.input_factor.cov.numpy(), np.full(4, 0.25), rtol=1e-6)


def test_statistics_update_period_averages_only_every_period_th_batch():
    """With T_cov = 3, Ā after 6 steps is the moving average of batches 0 and 3 only (ε = min(1 − 1/k, ε_max))."""
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(8, 3)).astype("float32") for _ in range(6)]
    labels = rng.integers(0, 2, size=8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(
        model=model,
        learning_rate=0.0,
        momentum=0.0,
        estimation_mode="empirical",
        statistics_update_period=3,
        ema_decay=0.95,
    )
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for x in batches:
        model.train_on_batch(x, labels)

    def a_bar(x):
        rows = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
        return rows.T @ rows / len(x)

    expected = 0.5 * a_bar(batches[0]) + 0.5 * a_bar(batches[3])
    np.testing.assert_allclose(opt.blocks[0].input_factor.cov.numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="statistics_update_period"):
        keras_kfac.KFAC(statistics_update_period=0)


def test_subsampled_rows_are_a_uniform_draw_without_replacement():
    import tensorflow as tf

    from keras_kfac import statistics

    rows = tf.reshape(tf.range(10, dtype=tf.float32), [10, 1])
    counts = np.zeros(10)
    for step in range(400):
        drawn, weights = statistics.subsample_rows(rows, rows[:, 0] + 1.0, 0.3, tf.constant([7, step]))
        drawn = drawn.numpy()[:, 0]
        np.testing.assert_array_equal(weights.numpy(), drawn + 1.0)  # each row keeps its weight
        assert len(drawn) == 3 and len(set(drawn)) == 3 and set(drawn) <= set(range(10))
        counts[drawn.astype(int)] += 1
    # Each row is drawn with probability 3/10: 120 of 400 expected, sd ≈ 9.2.
    assert np.all(np.abs(counts - 120) < 40), counts
    np.testing.assert_array_equal(
        statistics.subsample_rows(rows, None, 1.0, tf.constant([7, 0]))[0].numpy(), rows.numpy()
    )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_patch_fraction_gives_an_unbiased_conv2d_input_factor(jit_compile):
    """Ā from a random quarter of the patch rows: the running mean of the draws → E_{n,t}[ā_t ā_tᵀ]; G from all."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 5, 5, 2)).astype("float32")
    y = rng.normal(size=(4, K)).astype("float32")
    conv = keras.layers.Conv2D(3, (2, 2), padding="valid")
    model = keras.Sequential([keras.Input((5, 5, 2)), conv, keras.layers.Flatten(), keras.layers.Dense(K)])
    # ema_decay → 1: ε_k = 1 − 1/k, so the factor is the plain mean of the steps' estimates.
    opt = keras_kfac.KFAC(
        model=model,
        learning_rate=0.0,
        momentum=0.0,
        estimation_mode="exact",
        ema_decay=1 - 1e-9,
        patch_fraction=0.25,
        seed=3,
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=jit_compile)
    block = opt.layer_collection.block_for(conv)

    patches = _patches(x.astype(np.float64), 2, 2, 1, 1, "valid")
    rows = np.concatenate([patches.reshape(-1, 8), np.ones((64, 1))], 1)  # 4 examples × 16 locations
    full = rows.T @ rows / len(rows)
    # E‖mean of k of N rows − full‖² (without replacement), k = 16 of N = 64.
    outer = np.einsum("ni,nj->nij", rows, rows) - full
    one_draw = np.sqrt((64 - 16) / (63 * 16) * np.mean(np.sum(outer**2, axis=(1, 2))))

    model.train_on_batch(x, y)
    first_a, first_g = block.input_factor.cov.numpy(), block.output_factor.cov.numpy()
    assert np.linalg.norm(first_a - full) > 0.2 * one_draw  # a subsample, not all rows
    assert first_a[-1, -1] == pytest.approx(1.0)
    steps = 200
    for _ in range(steps - 1):
        model.train_on_batch(x, y)
    assert np.linalg.norm(block.input_factor.cov.numpy() - full) < 3 * one_draw / np.sqrt(steps)
    # G is not subsampled: every step's estimate is the same, and so is their mean.
    np.testing.assert_allclose(block.output_factor.cov.numpy(), first_g, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="patch_fraction"):
        keras_kfac.KFAC(patch_fraction=1.5)


def _weighting_model(kind):
    keras.utils.set_random_seed(3)
    if kind == "conv2d":
        return keras.Sequential(
            [
                keras.Input((5, 5, 2)),
                keras.layers.Conv2D(3, 3, activation="tanh"),
                keras.layers.Flatten(),
                keras.layers.Dense(K),
            ]
        )
    if kind == "tokens":
        return keras.Sequential(
            [
                keras.Input((6,), dtype="int32"),
                keras.layers.Embedding(5, 3),
                keras.layers.Conv1D(4, 3, activation="tanh"),
                keras.layers.Dense(3, activation="tanh"),
                keras.layers.Flatten(),
                keras.layers.Dense(K),
            ]
        )
    return keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(K),
        ]
    )


REPEATS = {  # reduction: (weights of (x0, x1, x2, x3), the examples of the repeated batch)
    "sum_over_batch_size": ([2.0, 1.0, 0.0, 1.0], [0, 0, 1, 3]),
    "sum": ([3.0, 1.0, 0.0, 2.0], [0, 0, 0, 1, 3, 3]),
}


@pytest.mark.parametrize("reduction", sorted(REPEATS))
@pytest.mark.parametrize("approximation", ["block_diagonal", "block_tridiagonal"])
@pytest.mark.parametrize("kind", ["dense", "conv2d", "tokens"])
def test_integer_sample_weights_are_repeated_examples(kind, approximation, reduction):
    """Integer weights on (x0, x1, x2, x3) give every factor of the batch that repeats each example as often.

    Mean loss: weights (2, 1, 0, 1) and (x0, x0, x1, x3) both give (1/4)(2ℓ0 + ℓ1 + ℓ3).
    Summed loss: weights (3, 1, 0, 2), whose sum is not B, and (x0, x0, x0, x1, x3, x3)
    both give 3ℓ0 + ℓ1 + 2ℓ3. Equal losses have one Fisher: Ā weighs the examples as
    G does, by Σ w rather than by the number of rows, and an example of weight 0 is
    absent from both.
    """
    if approximation == "block_tridiagonal" and kind != "dense":
        pytest.skip("the tridiagonal approximation takes a chain of Dense layers")
    repeat_weights, repeated = REPEATS[reduction]
    rng = np.random.default_rng(11)
    if kind == "conv2d":
        x = rng.normal(size=(4, 5, 5, 2)).astype("float32")
    elif kind == "tokens":
        x = rng.integers(0, 5, size=(4, 6)).astype("int32")
    else:
        x = rng.normal(size=(4, D_IN)).astype("float32")
    y = rng.normal(size=(4, K)).astype("float32")
    factors = []
    for inputs, targets, weights in ((x, y, np.array(repeat_weights, "float32")), (x[repeated], y[repeated], None)):
        model = _weighting_model(kind)
        opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact", approximation=approximation)
        model.compile(optimizer=opt, loss=keras.losses.MeanSquaredError(reduction=reduction))
        model.train_on_batch(inputs, targets, sample_weight=weights)
        factors.append([v.numpy() for v in opt.variables if v.name.endswith(("_cov", "_cross"))])
    assert len(factors[0]) >= 4
    for weighted, repeated in zip(*factors):
        np.testing.assert_allclose(weighted, repeated, rtol=1e-5, atol=1e-7)


def test_masked_positions_are_absent_from_the_input_factors():
    """Embedding(mask_zero) → per-position Dense: Ā of both is their float64 mean over the kept positions only."""
    rng = np.random.default_rng(12)
    vocabulary, steps, units = 6, 5, 4
    ids = rng.integers(1, vocabulary, size=(4, steps)).astype("int32")
    ids[0, 2:] = 0
    ids[2, 1:] = 0
    embedding = keras.layers.Embedding(vocabulary, 3, mask_zero=True)
    dense = keras.layers.Dense(units, activation="tanh")
    model = keras.Sequential([keras.Input((steps,), dtype="int32"), embedding, dense, keras.layers.Dense(K)])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(ids, rng.integers(0, K, size=(4, steps)))

    kept = ids[ids != 0]
    frequencies = np.bincount(kept, minlength=vocabulary) / kept.size
    np.testing.assert_allclose(
        opt.layer_collection.block_for(embedding).input_factor.cov.numpy(), frequencies, rtol=1e-6
    )
    table = embedding.embeddings.numpy().astype(np.float64)
    rows = np.concatenate([table[kept], np.ones((kept.size, 1))], axis=1)
    np.testing.assert_allclose(
        opt.layer_collection.block_for(dense).input_factor.cov.numpy(), rows.T @ rows / kept.size, rtol=1e-5, atol=1e-7
    )
    layer_outputs = np.tanh(
        np.concatenate([table[kept], np.ones((kept.size, 1))], axis=1)
        @ np.concatenate([dense.kernel.numpy(), dense.bias.numpy()[None]], 0)
    )
    head_rows = np.concatenate([layer_outputs, np.ones((kept.size, 1))], axis=1)
    np.testing.assert_allclose(
        opt.blocks[-1].input_factor.cov.numpy(), head_rows.T @ head_rows / kept.size, rtol=1e-5, atol=1e-6
    )


def test_ignore_class_and_a_sequence_mask_both_drop_positions():
    """Embedding(mask_zero) → per-position Dense with ignore_class: Ā of the head is
    the float64 mean over the positions that neither the mask nor the label drops."""
    rng = np.random.default_rng(23)
    vocabulary, steps = 6, 5
    ids = rng.integers(1, vocabulary, size=(4, steps)).astype("int32")
    ids[1, 3:] = 0
    labels = rng.integers(0, K, size=(4, steps))
    labels[0, 1] = labels[2, 4] = labels[1, 4] = -1  # (1, 4) is masked too
    embedding = keras.layers.Embedding(vocabulary, 3, mask_zero=True)
    model = keras.Sequential([keras.Input((steps,), dtype="int32"), embedding, keras.layers.Dense(K)])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
    model.train_on_batch(ids, labels)

    kept = (ids != 0) & (labels != -1)
    table = embedding.embeddings.numpy().astype(np.float64)
    rows = np.concatenate([table[ids[kept]], np.ones((kept.sum(), 1))], axis=1)
    np.testing.assert_allclose(
        opt.blocks[-1].input_factor.cov.numpy(), rows.T @ rows / kept.sum(), rtol=1e-5, atol=1e-7
    )


def test_row_weights_carry_the_loss_values_weights_to_a_layers_locations():
    """R = S: the values' own weights; R = B: each example's mean; R > S: the covering value; constants: 1."""
    import tensorflow as tf

    from keras_kfac import statistics
    from keras_kfac.capture import LayerCall

    values = tf.constant([[1.0, 0.0, 2.0], [4.0, 4.0, 1.0]])  # B = 2 examples, 3 positions

    @tf.function
    def weights(inputs, output_shape):  # traced, as in a training step: inputs are not constants
        return statistics.row_weights(LayerCall(inputs, tf.zeros(output_shape)), values, np.prod(output_shape[:-1]))

    np.testing.assert_allclose(weights(tf.ones([2, 3, 4]), [2, 3, 5]), [1, 0, 2, 4, 4, 1])
    np.testing.assert_allclose(weights(tf.ones([2, 4]), [2, 5]), [1, 3])
    np.testing.assert_allclose(weights(tf.ones([2, 6, 4]), [2, 6, 5]), [1, 1, 0, 0, 2, 2, 4, 4, 4, 4, 1, 1])
    constant_call = tf.function(lambda: statistics.row_weights(LayerCall(tf.range(4), tf.zeros([4, 5])), values, 4))
    np.testing.assert_allclose(constant_call(), np.ones(4))
    # A replica's empty share of the batch: no rows, no loss values.
    empty = tf.function(
        lambda: statistics.row_weights(LayerCall(tf.ones([0, 3, 4]), tf.zeros([0, 3, 5])), tf.ones([0, 3]), 0)
    )
    assert empty().shape == (0,)


def test_a_batch_whose_examples_all_weigh_zero_leaves_the_factors_unchanged():
    rng = np.random.default_rng(13)
    model = _weighting_model("dense")
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse")
    x, y = rng.normal(size=(4, D_IN)).astype("float32"), rng.normal(size=(4, K)).astype("float32")
    model.train_on_batch(x, y)
    before = [v.numpy() for v in opt.variables if v.name.endswith("_cov")]
    model.train_on_batch(2.0 * x, y, sample_weight=np.zeros(4, "float32"))
    after = [v.numpy() for v in opt.variables if v.name.endswith("_cov")]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_a_50000_token_embedding_allocates_no_vocabulary_squared_factor():
    vocabulary = 50_000
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(vocabulary, 8, name="tokens")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    opt = keras_kfac.KFAC(model=model)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.integers(0, vocabulary, size=(16, 6)), rng.integers(0, 2, size=16))
    block = opt.layer_collection.block_for(model.get_layer("tokens"))
    assert tuple(block.input_factor.cov.shape) == tuple(block.input_factor.inverse.shape) == (vocabulary,)
    assert max(math.prod(v.shape) for v in opt.variables) < vocabulary * 8 * 4  # the table's size, not V²
