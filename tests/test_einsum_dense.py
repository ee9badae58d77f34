"""EinsumDense blocks: factors against explicit float64 rows, Dense in disguise, attention projections."""

import keras
import numpy as np
import pytest

import keras_kfac
from keras_kfac.blocks import EinsumDenseBlock

K = 3  # outputs of the linear head


def test_factors_match_explicit_rows_for_a_transposed_equation():
    """'abc,dce->aebd': positions (a, b), input feature c, output features (d, e) stored as (e, ·, d).

    Ā = E_{a,b}[ā āᵀ] with ā = (x[a, b, :], 1); G = (1/B) Σ_{a,b} ds ds^T with ds
    the output vector at one position in the kernel's (d, e) order (exact MSE,
    linear head: ds = sqrt(2/K)·W_head[:, j] laid out as the output).
    """
    rng = np.random.default_rng(0)
    batch, length, channels, d, e = 4, 3, 2, 2, 3
    x = rng.normal(size=(batch, length, channels)).astype("float32")
    layer = keras.layers.EinsumDense("abc,dce->aebd", output_shape=(e, length, d), bias_axes="de", activation="tanh")
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input((length, channels)), layer, keras.layers.Flatten(), head])
    assert tuple(layer.bias.shape) == (e, 1, d)
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact", weight_sharing="expand")
    model.compile(optimizer=opt, loss="mse")
    model.train_on_batch(x, rng.normal(size=(batch, K)).astype("float32"))

    block = opt.layer_collection.block_for(layer)
    assert isinstance(block, EinsumDenseBlock) and (block.input_dim, block.output_dim) == (channels + 1, d * e)
    rows = np.concatenate([x.reshape(-1, channels).astype(np.float64), np.ones((batch * length, 1))], 1)
    np.testing.assert_allclose(block.input_factor.cov.numpy(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)

    # The pre-activation's gradient is the head's row times tanh' — the same
    # for every example only before the activation, so build it per example.
    kernel = layer.kernel.numpy().astype(np.float64)  # (d, c, e)
    bias = layer.bias.numpy().astype(np.float64)  # (e, 1, d)
    s = np.einsum("abc,dce->aebd", x.astype(np.float64), kernel) + bias
    w_head = head.kernel.numpy().astype(np.float64).reshape(e, length, d, K)
    g = np.zeros((d * e, d * e))
    for j in range(K):
        ds = np.sqrt(2.0 / K) * w_head[..., j][None] * (1.0 - np.tanh(s) ** 2)  # (batch, e, length, d)
        per_position = ds.transpose(0, 2, 3, 1).reshape(-1, d * e)  # rows (a, b), features (d, e)
        g += per_position.T @ per_position / batch
    np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-7)


def _train_once(model, x, y, **kwargs):
    opt = keras_kfac.KFAC(model=model, learning_rate=0.5, damping=0.01, momentum=0.0, estimation_mode="exact", **kwargs)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.train_on_batch(x, y)
    return opt, [w.numpy() - b for w, b in zip(model.trainable_weights, before)]


@pytest.mark.parametrize("equation", ["ab,bc->ac", "ab,cb->ac"])
def test_a_plain_matmul_gives_the_dense_update(equation):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 4)).astype("float32")
    y = rng.integers(0, 3, size=24).astype("int32")
    kernel = rng.normal(size=(4, 5)).astype("float32") * 0.5
    bias = rng.normal(size=5).astype("float32") * 0.1
    head = [rng.normal(size=(5, 3)).astype("float32") * 0.5, np.zeros(3, "float32")]
    transposed = equation == "ab,cb->ac"

    einsum = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.EinsumDense(equation, 5, bias_axes="c", activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    einsum.set_weights([kernel.T if transposed else kernel, bias, *head])
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    dense.set_weights([kernel, bias, *head])
    einsum_opt, einsum_steps = _train_once(einsum, x, y)
    dense_opt, dense_steps = _train_once(dense, x, y)
    np.testing.assert_allclose(
        einsum_opt.blocks[0].input_factor.cov.numpy(),
        dense_opt.blocks[0].input_factor.cov.numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        einsum_opt.blocks[0].output_factor.cov.numpy(),
        dense_opt.blocks[0].output_factor.cov.numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        einsum_steps[0].T if transposed else einsum_steps[0], dense_steps[0], rtol=1e-4, atol=1e-6
    )
    for einsum_step, dense_step in zip(einsum_steps[1:], dense_steps[1:]):
        np.testing.assert_allclose(einsum_step, dense_step, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_attention_style_projection_gives_the_dense_update_on_the_sequence(sharing):
    """'abc,cde->abde' (query/key/value) equals Dense(d·e) on the sequence, reshaped, either way."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5, 4)).astype("float32")
    y = rng.integers(0, 3, size=12).astype("int32")
    kernel = rng.normal(size=(4, 2, 3)).astype("float32") * 0.5
    bias = rng.normal(size=(2, 3)).astype("float32") * 0.1
    head = [rng.normal(size=(30, 3)).astype("float32") * 0.3, np.zeros(3, "float32")]
    einsum = keras.Sequential(
        [
            keras.Input((5, 4)),
            keras.layers.EinsumDense("abc,cde->abde", (5, 2, 3), bias_axes="de"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    einsum.set_weights([kernel, bias, *head])
    dense = keras.Sequential(
        [
            keras.Input((5, 4)),
            keras.layers.Dense(6),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    dense.set_weights([kernel.reshape(4, 6), bias.reshape(6), *head])
    einsum_opt, einsum_steps = _train_once(einsum, x, y, weight_sharing=sharing)
    dense_opt, dense_steps = _train_once(dense, x, y, weight_sharing=sharing)
    for einsum_block, dense_block in zip(einsum_opt.blocks, dense_opt.blocks):
        np.testing.assert_allclose(
            einsum_block.input_factor.cov.numpy(), dense_block.input_factor.cov.numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            einsum_block.output_factor.cov.numpy(), dense_block.output_factor.cov.numpy(), rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(einsum_steps[0].reshape(4, 6), dense_steps[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(einsum_steps[1].reshape(6), dense_steps[1], rtol=1e-4, atol=1e-6)


def test_multi_head_attention_projections_are_registered_and_train():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    hidden = attention(inputs, inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    opt = keras_kfac.KFAC(model=model, seed=0)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kinds = sorted(type(b).__name__ for b in opt.blocks)
    assert kinds == ["DenseBlock"] + ["EinsumDenseBlock"] * 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 8)).astype("float32")
    y = rng.integers(0, 3, size=64).astype("int32")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert history.history["loss"][-1] < history.history["loss"][0]
    owned = {id(v) for b in opt.blocks for v in b.variables}
    assert all(id(v) in owned for v in model.trainable_variables)


@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, problem",
    [
        ("abc,bcd->abd", (3, 4), None, "also positions"),
        ("abc,cd->ad", (4,), None, "summed without the kernel"),
        ("abc,cde->abde", (3, 2, 4), "e", "not over its output features"),
    ],
)
def test_an_einsum_that_is_not_a_dense_layer_per_position_is_refused(equation, output_shape, bias_axes, problem):
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    layer.build((None, 3, 5))
    with pytest.raises(ValueError, match=problem):
        keras_kfac.LayerCollection().register_einsum_dense(layer)


def test_reduce_is_the_exact_fisher_block_of_a_projection_the_loss_sees_through_its_mean():
    """'abc,cd->abd' (a projection of a sequence), mean over positions, a linear head, MSE: with
    weight_sharing="reduce" Ā ⊗ G is the exact Fisher block (ā_n the mean of example n's positions,
    ĝ_n the sum of its positions' vectors; Eschenhagen et al. 2023, §3.2); with "expand" it is not."""
    rng = np.random.default_rng(7)
    batch, length, channels, units = 3, 4, 2, 3
    x = rng.normal(size=(batch, length, channels)).astype("float32")
    factors = {}
    for sharing in ("reduce", "expand"):
        keras.utils.set_random_seed(0)
        layer = keras.layers.EinsumDense("abc,cd->abd", (length, units), bias_axes="d")
        head = keras.layers.Dense(K)
        model = keras.Sequential([keras.Input((length, channels)), layer, keras.layers.GlobalAveragePooling1D(), head])
        opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact", weight_sharing=sharing)
        model.compile(optimizer=opt, loss="mse")
        model.train_on_batch(x, rng.normal(size=(batch, K)).astype("float32"))
        block = opt.layer_collection.block_for(layer)
        assert block.rows_are_positions
        factors[sharing] = np.kron(block.input_factor.cov.numpy(), block.output_factor.cov.numpy())

    # z_n = W_headᵀ mean_t(W̄ᵀ ā_nt) + b: ∂z_nk/∂W̄[i, j] = m_ni W_head[j, k], m_n the mean row of example n.
    w_head = head.kernel.numpy().astype(np.float64)
    fisher_block = 0.0
    for n in range(batch):
        m = np.append(x[n].astype(np.float64).mean(axis=0), 1.0)
        jacobian = np.einsum("i,jk->kij", m, w_head).reshape(K, -1)
        fisher_block = fisher_block + (2.0 / K) * jacobian.T @ jacobian / batch
    np.testing.assert_allclose(factors["reduce"], fisher_block, rtol=1e-4, atol=1e-7)
    assert np.abs(factors["expand"] - fisher_block).max() > 0.1 * np.abs(fisher_block).max()
