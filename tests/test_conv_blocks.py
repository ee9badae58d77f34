"""Conv3D and transposed convolution blocks against explicit float64 numpy computations.

The references build patches by loops over output locations and kernel positions
(a transposed convolution's by its definition: input element i meets kernel
index j at output i·s + j·d − p), G from the exact Hessian factor of MSE through
a linear head, and the damped Kronecker product with ``np.kron``; nothing is
shared with the package. With ε = 0 on the first step, the factors after one
``train_on_batch`` are the batch estimates.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.blocks import Conv3DBlock, ConvTransposeBlock

K = 3  # outputs of the linear head
TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def _conv_patches(x, kernel_size, strides, dilations, padding):
    """(B, locations, k…·c) patches of a convolution by loops, with TensorFlow's 'same'/'valid' padding."""
    batch, *spatial, channels = x.shape
    outs, fronts = [], []
    for n, k, s, d in zip(spatial, kernel_size, strides, dilations):
        span = (k - 1) * d + 1
        out = -(-n // s) if padding == "same" else (n - span) // s + 1
        outs.append(out)
        fronts.append(max((out - 1) * s + span - n, 0) // 2 if padding == "same" else 0)
    rows = np.zeros((batch, *outs, math.prod(kernel_size) * channels))
    for o in np.ndindex(*outs):
        values = []
        for j in np.ndindex(*kernel_size):
            position = [oi * s + ji * d - f for oi, ji, s, d, f in zip(o, j, strides, dilations, fronts)]
            inside = all(0 <= p < n for p, n in zip(position, spatial))
            values.append(x[(slice(None), *position)] if inside else np.zeros((batch, channels)))
        rows[(slice(None), *o)] = np.concatenate(values, axis=1)
    return rows.reshape(batch, -1, rows.shape[-1])


def _transpose_patches(x, kernel_size, strides, dilations, padding, output_padding):
    """(B, locations, k…·c) rows of a transposed convolution, scattered by its definition.

    The output size is Keras'; p is the front padding TensorFlow's forward
    convolution from the output to the input takes. Input element i meets
    kernel index j at output o = i·s + j·d − p; the block's W̄ is the flipped
    kernel, so its row (k − 1 − j, c) at o holds x[i, c].
    """
    batch, *spatial, channels = x.shape
    output_padding = output_padding or (None,) * len(spatial)
    outs, fronts = [], []
    for n, k, s, d, op in zip(spatial, kernel_size, strides, dilations, output_padding):
        span = (k - 1) * d + 1
        if padding == "valid":
            out = (n - 1) * s + (max(span, s) if op is None else span + op)
        else:
            out = n * s if op is None else (n - 1) * s + span % 2 + op
        outs.append(out)
        fronts.append(max((n - 1) * s + span - out, 0) // 2 if padding == "same" else 0)
    rows = np.zeros((batch, *outs, *kernel_size, channels))
    for i in np.ndindex(*spatial):
        for j in np.ndindex(*kernel_size):
            o = [ii * s + ji * d - f for ii, ji, s, d, f in zip(i, j, strides, dilations, fronts)]
            if all(0 <= oi < out for oi, out in zip(o, outs)):
                flipped = tuple(k - 1 - ji for k, ji in zip(kernel_size, j))
                rows[(slice(None), *o, *flipped)] = x[(slice(None), *i)]
    return rows.reshape(batch, math.prod(outs), -1)


def _kernel_matrix(layer, kernel):
    """The kernel as W̄'s (patch, c_out) rows: a transposed convolution's flipped, with its channel axes swapped."""
    if isinstance(layer, TRANSPOSE):
        kernel = np.flip(kernel, axis=tuple(range(layer.rank))).swapaxes(-1, -2)
    return kernel.reshape(-1, kernel.shape[-1])


def _linear_head_model(conv, input_shape, jit_compile=False):
    """conv → Flatten → Dense(K), MSE, K-FAC with exact factors and learning rate 0."""
    head = keras.layers.Dense(K)
    model = keras.Sequential([keras.Input(input_shape), conv, keras.layers.Flatten(), head])
    opt = keras_kfac.KFAC(model=model, learning_rate=0.0, estimation_mode="exact")
    model.compile(optimizer=opt, loss="mse", jit_compile=jit_compile)
    return model, opt, head


def _check_factors(block, head, rows, batch, filters):
    """Ā = E_{n,t}[ā_t ā_tᵀ] (with the homogeneous 1), G = (1/B) Σ_{n,t} ds_t ds_tᵀ for exact MSE.

    Through a linear head the j-th exact output vector sqrt(2/K)·e_j reaches the
    conv output as ds = sqrt(2/K)·W_head[:, j], the same for every example.
    """
    rows = rows.reshape(-1, rows.shape[-1])
    rows = np.concatenate([rows, np.ones((len(rows), 1))], 1)
    np.testing.assert_allclose(block.input_factor.cov.numpy(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    w_head = head.kernel.numpy().astype(np.float64)
    g = np.zeros((filters, filters))
    for j in range(K):
        ds = np.sqrt(2.0 / K) * w_head[:, j].reshape(-1, filters)
        g += ds.T @ ds  # (1/B) Σ_n over B identical examples
    assert len(rows) == batch * len(ds)
    np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "strides, dilation, padding",
    [(2, 1, "same"), ((1, 2, 3), 1, "valid"), (1, (2, 1, 2), "valid"), (1, 2, "same")],
)
def test_conv3d_factors_match_explicit_patches_and_location_sums(strides, dilation, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4, 6, 2)).astype("float32")
    conv = keras.layers.Conv3D(3, (2, 3, 2), strides=strides, dilation_rate=dilation, padding=padding)
    model, opt, head = _linear_head_model(conv, x.shape[1:])
    model.train_on_batch(x, rng.normal(size=(3, K)).astype("float32"))

    block = opt.layer_collection.block_for(conv)
    assert isinstance(block, Conv3DBlock)
    rows = _conv_patches(x.astype(np.float64), (2, 3, 2), conv.strides, conv.dilation_rate, padding)
    _check_factors(block, head, rows, 3, 3)


TRANSPOSE_CASES = [
    (keras.layers.Conv2DTranspose, (3, 2), 2, 1, "same", None),
    (keras.layers.Conv2DTranspose, 3, (3, 2), 1, "same", (2, 1)),
    (keras.layers.Conv2DTranspose, 2, 1, 2, "same", None),  # dilation: TensorFlow runs it on XLA, not its CPU kernel
    (keras.layers.Conv1DTranspose, 2, 3, 1, "valid", None),
    (keras.layers.Conv3DTranspose, (1, 2, 3), (2, 1, 2), 1, "valid", (1, 0, 0)),
]


@pytest.mark.parametrize("layer_type, kernel_size, strides, dilation, padding, output_padding", TRANSPOSE_CASES)
def test_conv_transpose_factors_match_explicit_patches_and_location_sums(
    layer_type, kernel_size, strides, dilation, padding, output_padding
):
    rng = np.random.default_rng(1)
    conv = layer_type(
        4, kernel_size, strides=strides, padding=padding, output_padding=output_padding, dilation_rate=dilation
    )
    x = rng.normal(size=(3, *(4, 3, 2)[: conv.rank], 2)).astype("float32")
    model, opt, head = _linear_head_model(conv, x.shape[1:], jit_compile=dilation != 1)
    model.train_on_batch(x, rng.normal(size=(3, K)).astype("float32"))

    block = opt.layer_collection.block_for(conv)
    assert isinstance(block, ConvTransposeBlock)
    rows = _transpose_patches(
        x.astype(np.float64), conv.kernel_size, conv.strides, conv.dilation_rate, padding, conv.output_padding
    )
    # The reference rows times the flipped kernel are the layer's output (on XLA for a dilation).
    kernel, bias = (v.numpy().astype(np.float64) for v in (conv.kernel, conv.bias))
    output = tf.function(conv, jit_compile=dilation != 1)(x).numpy()
    np.testing.assert_allclose(rows @ _kernel_matrix(conv, kernel) + bias, output.reshape(3, -1, 4), atol=1e-5)
    _check_factors(block, head, rows, 3, 4)


@pytest.mark.parametrize(
    "layer_type, kernel_size, strides, padding, output_padding",
    [
        (keras.layers.Conv2DTranspose, (3, 2), 2, "same", None),
        (keras.layers.Conv2DTranspose, (3, 2), 2, "same", 1),
        # TensorFlow refuses "same" with output padding 0 and an even kernel: the output would be too short.
        (keras.layers.Conv2DTranspose, 3, 2, "same", 0),
        (keras.layers.Conv2DTranspose, (3, 2), 2, "valid", None),
        (keras.layers.Conv2DTranspose, (2, 3), 2, "valid", 1),
        (keras.layers.Conv2DTranspose, (1, 2), (3, 2), "valid", (2, 0)),
        (keras.layers.Conv2DTranspose, (2, 3), 1, "valid", None),
        (keras.layers.Conv2DTranspose, (2, 3), 1, "same", None),
        (keras.layers.Conv1DTranspose, 3, 2, "same", 1),
        (keras.layers.Conv3DTranspose, (3, 2, 1), (2, 3, 1), "same", None),
        (keras.layers.Conv3DTranspose, 2, 2, "valid", (1, 0, 1)),
        (keras.layers.Conv3D, (3, 2, 2), (2, 1, 3), "same", None),
        (keras.layers.Conv3D, (2, 3, 1), 1, "valid", None),
    ],
)
def test_rows_times_the_kernel_matrix_are_the_layer_output(layer_type, kernel_size, strides, padding, output_padding):
    """s = ā W̄ (+ b) at every output location, in the output's order: the patches and the kernel's layout agree."""
    rng = np.random.default_rng(2)
    options = {"output_padding": output_padding} if layer_type in TRANSPOSE else {}
    conv = layer_type(4, kernel_size, strides=strides, padding=padding, **options)
    x = rng.normal(size=(2, *(5, 4, 3)[: conv.rank], 3)).astype("float32")
    conv.build(x.shape)
    conv.bias.assign(rng.normal(size=4))
    output = conv(x)
    block = keras_kfac.blocks.block_type_for(conv)(conv)
    rows = block.input_rows(tf.constant(x))
    assert rows.shape == (math.prod(output.shape[:-1]), math.prod(conv.kernel_size) * 3 + 1)
    matrix = block.gradient_matrix([conv.kernel, conv.bias])
    np.testing.assert_allclose(tf.reshape(rows @ matrix, output.shape), output, rtol=1e-5, atol=1e-5)
    for part, variable in zip(block.split_matrix(matrix), block.variables):
        np.testing.assert_array_equal(part, variable.numpy())


@pytest.mark.parametrize(
    "conv",
    [
        lambda: keras.layers.Conv3D(3, (2, 1, 2), strides=(1, 2, 1), padding="same", use_bias=False),
        lambda: keras.layers.Conv2DTranspose(3, (3, 2), strides=2, padding="same", output_padding=1),
        lambda: keras.layers.Conv1DTranspose(3, 2, strides=2),
    ],
    ids=["conv3d", "conv2d_transpose", "conv1d_transpose"],
)
def test_preconditioned_gradient_is_the_damped_kronecker_solve(conv):
    """(Ā + πγI)⁻¹ ∇W̄ (G + (γ/π)I)⁻¹ = [(Ā + πγI) ⊗ (G + (γ/π)I)]⁻¹ vec ∇W̄ [KFAC §6.3], in the kernel's layout."""
    rng = np.random.default_rng(3)
    conv = conv()
    x = rng.normal(size=(4, *(3, 4, 3)[: conv.rank], 2)).astype("float32")
    y = rng.normal(size=(4, K)).astype("float32")
    model, opt, _ = _linear_head_model(conv, x.shape[1:])
    model.train_on_batch(x, y)
    block = opt.layer_collection.block_for(conv)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    gradients = tape.gradient(loss, block.variables)
    gamma = 0.1
    update = block.precondition(gradients, block.damped_inverses(tf.constant(gamma)))

    a = block.input_factor.cov.numpy().astype(np.float64)
    g = block.output_factor.cov.numpy().astype(np.float64)
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    damped = np.kron(a + pi * gamma * np.eye(len(a)), g + gamma / pi * np.eye(len(g)))
    kernel_grad, *bias_grad = (t.numpy().astype(np.float64) for t in gradients)
    matrix = np.concatenate([_kernel_matrix(conv, kernel_grad), *(b[None] for b in bias_grad)], 0)
    expected = np.linalg.solve(damped, matrix.reshape(-1)).reshape(matrix.shape)
    np.testing.assert_allclose(
        _kernel_matrix(conv, update[0].numpy()), expected[: len(matrix) - len(bias_grad)], rtol=1e-3
    )
    if conv.use_bias:
        np.testing.assert_allclose(update[1], expected[-1], rtol=1e-3)


def _dense_problem():
    """Inputs (24, 4), labels, and the weights of a Dense(5, tanh) layer and a Dense(3) head."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, 4)).astype("float32")
    y = rng.integers(0, 3, size=24).astype("int32")
    kernel = rng.normal(size=(4, 5)).astype("float32") * 0.5
    bias = rng.normal(size=5).astype("float32") * 0.1
    head = [rng.normal(size=(5, 3)).astype("float32") * 0.5, np.zeros(3, "float32")]
    return x, y, kernel, bias, head


def _train(model, x, y):
    """Three K-FAC steps with exact factors, fresh inverses every step and no momentum."""
    opt = keras_kfac.KFAC(
        model=model, learning_rate=0.5, damping=0.01, momentum=0.0, estimation_mode="exact", inverse_update_period=1
    )
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(3):
        model.train_on_batch(x, y)
    return opt


@pytest.fixture(scope="module")
def dense_training():
    """The Dense model's factors [(Ā, G) per block] and weights after ``_train``."""
    x, y, kernel, bias, head = _dense_problem()
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    dense.set_weights([kernel, bias, *head])
    opt = _train(dense, x, y)
    factors = [(b.input_factor.cov.numpy(), b.output_factor.cov.numpy()) for b in opt.blocks]
    return factors, dense.get_weights()


@pytest.mark.parametrize(
    "layer_type",
    [
        keras.layers.Conv1D,
        keras.layers.Conv2D,
        keras.layers.Conv3D,
        keras.layers.Conv1DTranspose,
        keras.layers.Conv2DTranspose,
        keras.layers.Conv3DTranspose,
    ],
)
def test_a_one_by_one_convolution_at_a_single_location_gives_the_dense_update(layer_type, dense_training):
    """A 1×…×1 convolution of stride 1 on inputs of spatial size 1 is a Dense layer: the same factors and steps."""
    x, y, kernel, bias, head = _dense_problem()
    layer = layer_type(5, 1, activation="tanh")
    rank = layer.rank

    def conv_kernel(dense_kernel):
        matrix = dense_kernel.T if layer_type in TRANSPOSE else dense_kernel
        return matrix.reshape((1,) * rank + matrix.shape)

    conv = keras.Sequential([keras.Input((1,) * rank + (4,)), layer, keras.layers.Flatten(), keras.layers.Dense(3)])
    conv.set_weights([conv_kernel(kernel), bias, *head])
    opt = _train(conv, x.reshape((len(x),) + (1,) * rank + (4,)), y)
    dense_factors, dense_weights = dense_training
    for block, (a, g) in zip(opt.blocks, dense_factors):
        np.testing.assert_allclose(block.input_factor.cov.numpy(), a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(block.output_factor.cov.numpy(), g, rtol=1e-5, atol=1e-7)
    conv_weights = conv.get_weights()
    np.testing.assert_allclose(conv_weights[0], conv_kernel(dense_weights[0]), rtol=1e-4, atol=1e-6)
    for conv_weight, dense_weight in zip(conv_weights[1:], dense_weights[1:]):
        np.testing.assert_allclose(conv_weight, dense_weight, rtol=1e-4, atol=1e-6)


def test_a_model_of_these_layers_trains_with_the_default_kfac():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 4, 2))
    volume = keras.layers.Conv3D(4, 2, strides=2, activation="relu")(inputs)  # (2, 2, 2, 4)
    volume = keras.layers.Conv3DTranspose(2, 2, strides=2, padding="same")(volume)  # (4, 4, 4, 2)
    image = keras.layers.Reshape((4, 4, 8))(volume)
    image = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", output_padding=1, activation="tanh")(image)
    sequence = keras.layers.Reshape((8 * 8, 3))(image)
    sequence = keras.layers.Conv1DTranspose(2, 2, strides=2, activation="tanh")(sequence)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(sequence))
    model = keras.Model(inputs, outputs)
    opt = keras_kfac.KFAC(model=model)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert sorted(type(b).__name__ for b in opt.blocks) == ["Conv3DBlock"] + ["ConvTransposeBlock"] * 3 + ["DenseBlock"]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(48, 4, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 3, size=48).astype("int32")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = model.get_weights()
    assert all(np.all(np.isfinite(w)) for w in after)
    assert all(np.any(w != b) for w, b in zip(after, before))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.Conv3D(2, 2, data_format="channels_first"),
        lambda: keras.layers.Conv2DTranspose(2, 2, data_format="channels_first"),
    ],
)
def test_channels_first_is_refused_with_the_layers_name(layer):
    layer = layer()
    layer.build((None, 3, 4, 4, 4)[: layer.rank + 2])
    with pytest.raises(ValueError, match=layer.name):
        keras_kfac.LayerCollection().register(layer)
