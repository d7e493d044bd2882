"""keras.ops calls in the graph (`x + 3.0`, `keras.ops.relu6(x)`, `x * gate`) and squeeze-and-excitation
gates: applied unit by unit, their units tied to the channels they scale, and the zipped model still plain
Keras (saves, loads and converts to TFLite without custom objects)."""

import os
import re

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import randomize_batch_norms


def _hard_sigmoid(x):
    return keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)  # two keras.ops nodes around a layer


def gated_cnn(name, width=8, seed=0):
    """MobileNetV3's pieces: hard-swish written with keras.ops, a squeeze-and-excitation gate (pooling ->
    1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid) scaling the feature map, a residual Add, an ops-level
    product of two tensors."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = x * _hard_sigmoid(x)  # hard-swish as keras.applications wrote it before the Activation existed
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    y = keras.layers.BatchNormalization(name="depthwise_bn")(y)
    y = keras.ops.relu6(y)
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(y)
    gate = keras.layers.Conv2D(4, 1, name="reduce")(gate)
    gate = keras.layers.ReLU()(gate)
    gate = keras.layers.Conv2D(width, 1, name="expand")(gate)
    y = keras.layers.Multiply(name="excite")([y, _hard_sigmoid(gate)])
    y = keras.layers.Conv2D(width, 1, name="project")(y)
    x = keras.layers.Add(name="residual")([x, y])
    x = keras.layers.Conv2D(width, 3, padding="same", name="last")(x)
    x = keras.layers.Activation("hard_swish")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name=name)


def _operations(model) -> list:
    return [op for op in model.operations if not isinstance(op, keras.layers.Layer)]


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_permuted_copy_of_a_gated_network_reproduces_its_outputs(sharing, rng):
    model = randomize_batch_norms(gated_cnn("m"))
    assert len(_operations(model)) >= 6
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    x = rng.normal(size=(64, 10, 10, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(copy.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    for out in zipped.predict(x, verbose=0).values():
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The operations are replayed on fresh operations: the originals gained no calls.
    assert all(len(op._inbound_nodes) == 1 for op in _operations(model) + _operations(copy))


def test_gated_zip_is_plain_keras_and_converts_to_tflite(rng, tmp_path):
    import tensorflow as tf

    a = randomize_batch_norms(gated_cnn("a", seed=0), seed=0)
    b = randomize_batch_norms(gated_cnn("b", seed=1), seed=1)
    x = rng.normal(size=(64, 10, 10, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    assert _operations(zipped)  # x + 3 and friends stay keras.ops nodes
    path = os.path.join(tmp_path, "zipped.keras")
    zipped.save(path)
    loaded = keras.models.load_model(path)
    expected = zipped.predict(x[:4], verbose=0)
    for task, out in loaded.predict(x[:4], verbose=0).items():
        np.testing.assert_allclose(out, expected[task], rtol=1e-6, atol=1e-6)
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    for task in ("a", "b"):
        runner = interpreter.get_signature_runner(task)
        name = next(iter(interpreter.get_signature_list()[task]["inputs"]))
        out = next(iter(runner(**{name: x[:4]}).values()))
        np.testing.assert_allclose(out, expected[task], atol=1e-4 * max(1.0, np.abs(expected[task]).max()))


def _with_operation(name, make_output):
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((6,))
    x = keras.layers.Dense(4, name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(make_output(x)), name=name)


@pytest.mark.parametrize("make_output,message", [
    (lambda x: keras.ops.softmax(x), r"Operation '.*' \(Softmax\) of model 'odd' .* cannot apply unit by unit"),
    (lambda x: x - keras.ops.mean(x, axis=-1, keepdims=True), r"\(Mean\) of model 'odd'"),
    (lambda x: x * np.arange(4, dtype="float32"), r"\(Multiply\) of model 'odd' uses a constant of shape \(4,\)"),
])
def test_operations_that_mix_units_are_refused_by_name(make_output, message):
    model = _with_operation("odd", make_output)
    other = keras.models.clone_model(model)
    with pytest.raises(ValueError, match=message):
        tf_mtz.zip_models({"a": model, "b": other}, np.zeros((8, 6), "float32"), verbose=0)


def test_models_whose_constants_differ_are_refused():
    first = _with_operation("first", lambda x: x + 3.0)
    second = _with_operation("second", lambda x: x + 2.0)
    # The layers before the operation are zipped; from the operation on each model keeps its own branch.
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    zipped = tf_mtz.zip_models({"a": first, "b": second}, x, verbose=0)
    assert zipped.zip_report.prefix["prefix_layers"] == ["hidden"]
    assert re.search(r"configured differently: constants .*3\.0.* vs .*2\.0", zipped.zip_report.prefix["stopped"])
    out = zipped.predict(x, verbose=0)
    assert np.abs(out["b"] - second.predict(x, verbose=0)).max() < 1e-4
