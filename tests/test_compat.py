"""The Keras seam: the private surfaces it reaches exist on the installed Keras, and nothing else reaches them."""

import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import keras_kfac
from keras_kfac import compat

PACKAGE = Path(keras_kfac.__file__).parent
# Private Keras/TF names the package reaches (see compat's docstrings).
PRIVATE = re.compile(
    r"\._var_key|\._flatten_layers|\._inbound_nodes|_keras_logits|_keras_mask|\._compile_loss|"
    r"_user_loss_weights|__internal__|object\.__setattr__|\.f_back|_backend_update_step|"
    r"\._clip_gradients|\._apply_weight_decay|self\._variables\b|_fn_kwargs"
)


def test_only_the_seam_reaches_private_keras_surfaces():
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert offenders == []


def test_the_seams_surfaces_answer_on_the_installed_keras():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="inner_dense")], name="inner")
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    names = [layer.name for layer in compat.nested_layers(model)]
    assert names.index("inner") < names.index("inner_dense") < names.index("head")
    assert compat.inbound_nodes(model.get_layer("head"))[0].parent_nodes[0].operation is inner
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", loss_weights=[0.5])
    assert compat.compiled_loss_weights(model) == [0.5]

    @tf.function
    def logits_are_kept(x):
        y_pred = model(x)
        assert compat.is_symbolic(y_pred)
        return compat.output_logits(y_pred) is not None

    assert logits_are_kept(np.zeros((2, 3), "float32"))
    assert not compat.is_symbolic(tf.constant(1.0))
    masked = keras.layers.Masking()(tf.constant([[[0.0], [1.0]]]))
    assert compat.output_mask(masked) is not None


def test_the_whole_update_and_the_callers_are_reached():
    class Recording(compat.WholeUpdateOptimizer):
        def update_all(self, grads, trainable_variables, learning_rate):
            self.seen = [self.variable_key(v) for v in trainable_variables]
            for g, v in zip(grads, trainable_variables):
                v.assign_sub(learning_rate * g)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = Recording(learning_rate=0.1)
    model.compile(optimizer=optimizer, loss="mse")
    before = model.get_weights()
    model.train_on_batch(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    assert len(optimizer.seen) == 2 and len(set(optimizer.seen)) == 2
    assert not np.allclose(before[0], model.get_weights()[0])

    class Caller:
        def call(self):
            return list(compat.calling_objects())

    caller = Caller()
    assert caller.call()[0] is caller
