"""The block registry: a block for a layer class of the user's own, without touching the package."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.blocks import DenseBlock, KroneckerBlock, RecurrentInputBlock, registry


class Affine(keras.layers.Layer):
    """A user's own layer: s = x W + b, not a Dense subclass."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, inputs):
        return inputs @ self.kernel + self.bias


class AffineBlock(KroneckerBlock):
    layer_types = (Affine,)
    kind = "test_affine"

    def input_patches(self, inputs):
        return tf.reshape(inputs, [-1, self.kernel_matrix_rows])


class MyDense(keras.layers.Dense):
    pass


class MyDenseBlock(DenseBlock):
    layer_types = (MyDense,)
    kind = "test_my_dense"


@pytest.fixture
def user_blocks(monkeypatch):
    """The registry with the test's block types added, restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", list(registry._REGISTRY))
    keras_kfac.register_block_type(AffineBlock)
    keras_kfac.register_block_type(MyDenseBlock)


def _model(first: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((5,))
    hidden = keras.layers.Activation("tanh")(first(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def test_a_users_layer_gets_its_block_and_the_dense_update(user_blocks):
    """Auto-registration finds the user's block; its factors are the explicit float64 ones and its
    K-FAC step is the one of the equivalent Dense layer."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    custom = _model(Affine(4))
    plain = _model(keras.layers.Dense(4))
    plain.set_weights(custom.get_weights())
    results = []
    for model in (custom, plain):
        opt = keras_kfac.KFAC(model=model, learning_rate=0.1, damping=1e-2, momentum=0.0, seed=0)
        model.compile(optimizer=opt, loss="mse")
        model.train_on_batch(x, y)
        results.append((opt, [w.numpy() for w in model.weights]))
    (opt, after), (_, expected) = results
    assert [type(b) for b in opt.blocks] == [AffineBlock, DenseBlock]
    rows = np.concatenate([x, np.ones((32, 1))], axis=1).astype(np.float64)
    np.testing.assert_allclose(opt.blocks[0].input_factor.cov.numpy(), rows.T @ rows / 32, rtol=1e-5, atol=1e-6)
    for got, want in zip(after, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_nearest_layer_class_chooses_the_block(user_blocks):
    assert registry.block_type_for(MyDense(2)) is MyDenseBlock
    assert registry.block_type_for(keras.layers.Dense(2)) is DenseBlock
    assert registry.block_type_for(Affine(2)) is AffineBlock
    assert registry.block_type_for(keras.layers.SimpleRNN(2)) is RecurrentInputBlock
    assert registry.block_type_for(keras.layers.UnitNormalization()) is None
    collection = keras_kfac.LayerCollection()
    assert Affine in collection.auto_register_types and keras.layers.EinsumDense in collection.auto_register_types
    assert keras.layers.LayerNormalization not in collection.auto_register_types  # opt-in


def test_a_users_block_is_saved_by_kind_and_restored(user_blocks):
    model = _model(Affine(4))
    model.build((None, 5))
    collection = keras_kfac.LayerCollection()
    collection.register_model(model)
    collection.register(model.layers[1])
    config = collection.get_config()
    assert [entry["kind"] for entry in config["layers"]] == ["test_affine"]
    restored = keras_kfac.LayerCollection.from_config(config)
    restored.register_model(model)
    assert [type(b) for b in restored.blocks] == [AffineBlock]
    config["layers"][0]["kind"] = "unknown_kind"
    with pytest.raises(ValueError, match="No block type 'unknown_kind'"):
        keras_kfac.LayerCollection.from_config(config).register_model(model)


def test_bad_block_types_and_layers_are_named(user_blocks):
    with pytest.raises(TypeError, match="KroneckerBlock subclass"):
        keras_kfac.register_block_type(int)

    class NoLayers(AffineBlock):
        layer_types = ()

    class NoKind(AffineBlock):
        kind = ""

    with pytest.raises(ValueError, match="layer_types"):
        keras_kfac.register_block_type(NoLayers)
    with pytest.raises(ValueError, match="kind"):
        keras_kfac.register_block_type(NoKind)

    class InheritsKind(DenseBlock):
        layer_types = (MyDense,)

    class TakesKind(DenseBlock):
        layer_types = (MyDense,)
        kind = "dense"

    with pytest.raises(ValueError, match="its own kind"):
        keras_kfac.register_block_type(InheritsKind)
    with pytest.raises(ValueError, match="'dense' is taken by DenseBlock"):
        keras_kfac.register_block_type(TakesKind)
    assert registry.block_type_for(keras.layers.Dense(2)) is DenseBlock
    collection = keras_kfac.LayerCollection()
    with pytest.raises(TypeError, match="No curvature block serves layer 'depthwise'"):
        collection.register(keras.layers.DepthwiseConv1D(2, name="depthwise"))
    with pytest.raises(TypeError, match="AffineBlock serves Affine"):
        collection.register(keras.layers.Dense(2), AffineBlock)


def test_lora_layers_are_refused_by_hand_and_left_to_the_fallback_automatically():
    dense = keras.layers.Dense(3, name="adapted")
    model = keras.Sequential([keras.Input((4,)), dense, keras.layers.Dense(2)])
    dense.enable_lora(2)
    with pytest.raises(ValueError, match="'adapted' has LoRA enabled"):
        keras_kfac.LayerCollection().register_dense(dense)
    collection = keras_kfac.LayerCollection()
    with pytest.warns(UserWarning, match="fallback rule.*'adapted' has LoRA"):
        collection.auto_register(model)
    assert [b.layer for b in collection.blocks] == [model.layers[1]]


def test_a_block_left_out_of_automatic_registration_stays_out(user_blocks):
    class QuietBlock(DenseBlock):
        layer_types = (MyDense,)
        kind = "test_quiet"
        auto_register = False

    keras_kfac.register_block_type(QuietBlock)
    model = keras.Sequential([keras.Input((4,)), MyDense(3), keras.layers.Dense(2)])
    collection = keras_kfac.LayerCollection()
    collection.auto_register(model)
    assert [type(b) for b in collection.blocks] == [DenseBlock]
    opted_in = keras_kfac.LayerCollection()
    opted_in.auto_register_types += (MyDense,)
    opted_in.auto_register(model)
    assert [type(b) for b in opted_in.blocks] == [QuietBlock, DenseBlock]


def test_an_unregistered_block_type_trains_but_is_not_saved_as_another(user_blocks):
    class UnlistedBlock(DenseBlock):
        layer_types = (keras.layers.Dense,)
        kind = "test_unlisted"

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    collection = keras_kfac.LayerCollection()
    collection.register_model(model)
    collection.register(model.layers[0], UnlistedBlock)
    with pytest.raises(ValueError, match="register it"):
        collection.get_config()


def test_summary_says_which_layer_has_which_block_and_what_it_covers():
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.Reshape((16, 4))(x)
    x = keras.layers.LSTM(5, name="lstm")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    optimizer = keras_kfac.KFAC(model=model)
    lines = []
    optimizer.layer_collection.summary(print_fn=lines.append)
    rows = {line.split()[0]: line.split() for line in lines if line and line.split()[0] in ("conv", "norm", "logits")}
    assert rows["conv"][1:] == ["Conv2D", "conv2d", "Ā", "10", "G", "4", "40"]  # 3·3·1 + bias; 4 filters
    assert rows["norm"][1:] == ["LayerNormalization", "fallback", "8"]
    assert rows["logits"][1:] == ["Dense", "dense", "Ā", "6", "G", "3", "18"]
    lstm = [line.split()[1:] for line in lines if line.split()[:1] == ["lstm"]]
    assert lstm == [  # the input kernel and bias (4 + 1 rows), the recurrent kernel (5 rows); 4 gates × 5 units
        ["LSTM", "recurrent_input", "Ā", "5", "G", "20", "100"],
        ["LSTM", "recurrent_kernel", "Ā", "5", "G", "20", "100"],
    ]
    covered = 40 + 200 + 18
    assert f" Parameters in K-FAC blocks: {covered} of {model.count_params()} trainable (97.0%)" in lines
    assert f" Parameters left to the fallback rule: {model.count_params() - covered}" in lines

    by_hand = keras_kfac.LayerCollection()
    by_hand.register_dense(model.get_layer("logits"))
    lines = []
    by_hand.summary(print_fn=lines.append)
    assert any(line.split()[:3] == ["logits", "Dense", "dense"] for line in lines)
    assert not any(line.split()[:1] == ["conv"] for line in lines)
    assert any("the model is not known yet" in line for line in lines)


def _three_layers() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh", name="a"),
            keras.layers.Dense(4, activation="tanh", name="b"),
            keras.layers.Dense(3, name="c"),
        ]
    )


def test_a_diagonal_block_keeps_the_diagonals_and_preconditions_with_them():
    """approximation="diagonal": Ā and G are the diagonals of the Kronecker block's, and the step is
    (diag Ā + πγ)⁻¹ ∇W̄ (diag G + γ/π)⁻¹, the explicit diagonal matrix solved in float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    blocks = {}
    for approximation in ("kronecker", "diagonal"):
        model = _three_layers()
        collection = keras_kfac.LayerCollection()
        block = collection.register(model.get_layer("b"), approximation=approximation)
        collection.auto_register(model)
        opt = keras_kfac.KFAC(model=model, layer_collection=collection, learning_rate=0.0, estimation_mode="exact")
        model.compile(optimizer=opt, loss="mse")
        model.train_on_batch(x, y)
        blocks[approximation] = block
    full, diagonal = blocks["kronecker"], blocks["diagonal"]
    a, g = diagonal.input_factor.cov.numpy(), diagonal.output_factor.cov.numpy()
    np.testing.assert_allclose(a, np.diag(full.input_factor.cov.numpy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, np.diag(full.output_factor.cov.numpy()), rtol=1e-5, atol=1e-9)

    gamma = 0.1
    gradients = [rng.normal(size=v.shape).astype("float32") for v in diagonal.variables]
    got = diagonal.precondition([tf.constant(v) for v in gradients], diagonal.damped_inverses(tf.constant(gamma)))
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    pi = np.sqrt(a64.mean() / g64.mean())
    damped = np.kron(np.diag(a64 + pi * gamma), np.diag(g64 + gamma / pi))
    w = np.concatenate([gradients[0], gradients[1][None]]).astype(np.float64)
    expected = np.linalg.solve(damped, w.reshape(-1)).reshape(w.shape)
    np.testing.assert_allclose(got[0].numpy(), expected[:-1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[1].numpy(), expected[-1], rtol=1e-4, atol=1e-7)


def test_per_layer_choices_train_print_and_are_saved(tmp_path):
    model = _three_layers()
    collection = keras_kfac.LayerCollection()
    assert collection.register(model.get_layer("a"), approximation="fallback") is None
    collection.register(model.get_layer("b"), approximation="diagonal")
    collection.auto_register(model)
    assert [(b.name, b.diagonal) for b in collection.blocks] == [("b", True), ("c", False)]
    with pytest.raises(ValueError, match="`approximation` must be one of"):
        collection.register(model.get_layer("a"), approximation="block")
    lines = []
    collection.summary(print_fn=lines.append)
    rows = {
        line.split()[0].rpartition("/")[2]: line.split()[1:]
        for line in lines
        if line.split()[:1] in ([f"{model.name}/a"], [f"{model.name}/b"])
    }
    assert rows == {"a": ["Dense", "fallback", "24"], "b": ["Dense", "dense", "diagonal", "Ā", "5", "G", "4", "20"]}

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 5)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    model.compile(optimizer=keras_kfac.KFAC(model=model, layer_collection=collection), loss="mse")
    with pytest.warns(UserWarning, match="no curvature block"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [(b.name, b.diagonal) for b in loaded.optimizer.blocks] == [("b", True), ("c", False)]
    for model_ in (model, loaded):
        model_.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for mine, reference in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)


def test_a_diagonal_embedding_keeps_token_frequencies_and_the_diagonal_of_g():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 7, size=(12, 5))
    y = rng.normal(size=(12, 3)).astype("float32")
    factors = {}
    for approximation in ("kronecker", "diagonal"):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,), dtype="int32")
        embedding = keras.layers.Embedding(7, 4, name="tokens")
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(embedding(inputs))))
        collection = keras_kfac.LayerCollection()
        block = collection.register(embedding, approximation=approximation)
        collection.auto_register(model)
        opt = keras_kfac.KFAC(model=model, layer_collection=collection, learning_rate=0.1, estimation_mode="exact")
        model.compile(optimizer=opt, loss="mse")
        model.train_on_batch(tokens, y)
        factors[approximation] = (block.input_factor.cov.numpy(), block.output_factor.cov.numpy())
        assert all(np.isfinite(w).all() for w in model.get_weights())
    np.testing.assert_allclose(factors["diagonal"][0], factors["kronecker"][0], rtol=1e-6)  # Ā is diagonal anyway
    np.testing.assert_allclose(factors["diagonal"][1], np.diag(factors["kronecker"][1]), rtol=1e-5, atol=1e-9)
