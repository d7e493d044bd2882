"""Models with several outputs (a detector's class and box heads): each output is a head of its own, the
zipped model's outputs are keyed "task/output", and every export signature follows (one per task with all
of that task's outputs)."""

import os

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import randomize_batch_norms


def detector(name, classes=3, seed=0):
    """A conv trunk, then a class head and a box branch (one hidden Dense, then 4 coordinates): outputs
    {"class": softmax probabilities, "box": coordinates}."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    scores = keras.layers.Dense(classes, name="class_logits")(features)
    box = keras.layers.Dense(10, activation="relu", name="box_hidden")(features)
    box = keras.layers.Dense(4, name="box")(box)
    return randomize_batch_norms(keras.Model(
        inputs, {"class": keras.layers.Softmax(name="class")(scores), "box": box}, name=name), seed)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_permuted_copy_of_a_two_output_model_reproduces_both_outputs(sharing, rng):
    model = detector("m")
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    x = rng.normal(size=(64, 12, 12, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    assert sorted(outputs) == ["a/box", "a/class", "b/box", "b/class"]
    for task in ("a", "b"):
        for name in ("class", "box"):
            np.testing.assert_allclose(outputs[f"{task}/{name}"], expected[name], rtol=1e-4,
                                       atol=1e-4 * np.abs(expected[name]).max())
    layers = zipped.zip_report.layers
    assert [layer.name for layer in layers if layer.head] == ["class_logits", "box"]
    assert any(layer.name == "box_hidden" and layer.shared for layer in layers)  # a hidden layer of one branch


def test_two_detectors_zip_retrain_and_export_with_one_signature_per_task(rng, tmp_path):
    import tensorflow as tf

    a, b = detector("a", seed=0), detector("b", classes=5, seed=1)
    x = rng.normal(size=(128, 12, 12, 3)).astype("float32")
    retrain = tf_mtz.Retrain(steps_per_layer=0, final_steps=30, batch_size=32)
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, retrain=retrain, verbose=0)
    outputs = zipped.predict(x[:4], verbose=0)
    assert outputs["a/class"].shape == (4, 3) and outputs["b/class"].shape == (4, 5)
    np.testing.assert_allclose(outputs["b/class"].sum(axis=-1), 1.0, rtol=1e-5)  # the suffix (softmax) kept
    path = os.path.join(tmp_path, "zipped.keras")
    zipped.save(path)
    loaded = keras.models.load_model(path).predict(x[:4], verbose=0)
    for key in outputs:
        np.testing.assert_allclose(loaded[key], outputs[key], rtol=1e-6)
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    signatures = interpreter.get_signature_list()
    assert {"a", "b"} <= set(signatures)
    runner = interpreter.get_signature_runner("b")
    result = runner(**{signatures["b"]["inputs"][0]: x[:4]})
    assert len(result) == 2  # the task's two outputs
    for value in result.values():
        matches = [key for key in ("b/class", "b/box") if value.shape == outputs[key].shape]
        np.testing.assert_allclose(value, outputs[matches[0]], atol=1e-5)


def test_an_output_read_by_another_layer_and_label_losses_are_refused(rng):
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(x)
    first = keras.layers.Dense(3, name="first")(h)
    second = keras.layers.Dense(2, name="second")(first)  # reads the other output
    model = keras.Model(inputs, [first, second], name="chained")
    with pytest.raises(ValueError, match=r"Output 'first' of model 'chained'.*its own output layer"):
        tf_mtz.zip_models({"a": model, "b": keras.models.clone_model(model)}, np.zeros((8, 6), "float32"),
                          verbose=0)
    data = rng.normal(size=(32, 12, 12, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"loss='labels'.*2 outputs"):
        tf_mtz.zip_models({"a": detector("a"), "b": detector("b", seed=1)}, data,
                          retrain=tf_mtz.Retrain(data=(data, np.zeros(32)), loss="labels"), verbose=0)
