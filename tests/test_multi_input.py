"""Models with several inputs (an image and a vector of sensor readings, say): every model takes the same
inputs, the zipped model takes them once, and data is given per input as a list (in the models' input
order) or a dict by input name; `(features, labels)` adds labels."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtz
from conftest import randomize_batch_norms


def image_and_sensors(name, classes=4, seed=0):
    """An image branch (Conv-BN-ReLU, pooling) and a sensor branch (Dense), concatenated, then a hidden Dense
    and the head. The sensor input also feeds a skip Dense that is added to the hidden layer."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((10, 10, 3), name="image")
    sensors = keras.Input((7,), name="sensors")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    s = keras.layers.Dense(6, activation="relu", name="sensor_fc")(sensors)
    h = keras.layers.Dense(12, name="fc")(keras.layers.Concatenate()([x, s]))
    h = keras.layers.Add()([h, keras.layers.Dense(12, name="skip")(sensors)])
    h = keras.layers.Activation("relu")(h)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(h)
    return randomize_batch_norms(keras.Model([image, sensors], out, name=name), seed)


@pytest.fixture
def features(rng):
    return [rng.normal(size=(96, 10, 10, 3)).astype("float32"), rng.normal(size=(96, 7)).astype("float32")]


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_permuted_copy_of_a_two_input_model_reproduces_its_outputs(sharing, features):
    model = image_and_sensors("m")
    copy = tf_mtz.testing.permuted_copy(model, seed=3)
    expected = model.predict(features, verbose=0)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, features, sharing=sharing, verbose=0)
    assert [x.name for x in zipped.inputs] == ["image", "sensors"]
    outputs = zipped.predict(features, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(outputs[task], expected, rtol=1e-4, atol=1e-5)
    shared = {layer.name for layer in zipped.zip_report.layers if layer.shared}
    assert {"conv", "sensor_fc", "fc", "skip"} <= shared


def test_data_by_input_name_and_tf_data_give_the_same_zip(features):
    a, b = image_and_sensors("a", seed=0), image_and_sensors("b", classes=3, seed=1)
    from_list = tf_mtz.zip_models({"a": a, "b": b}, features, verbose=0)
    by_name = {"sensors": features[1], "image": features[0]}
    from_dict = tf_mtz.zip_models({"a": a, "b": b}, by_name, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((tuple(features), np.zeros(96, np.int64)))  # batched by tf_mtz
    from_dataset = tf_mtz.zip_models({"a": a, "b": b}, dataset, verbose=0)
    for other in (from_dict, from_dataset):
        for w, v in zip(from_list.get_weights(), other.get_weights()):
            np.testing.assert_allclose(w, v, rtol=1e-5, atol=1e-6)


def test_two_input_zip_retrains_saves_and_exports(features, tmp_path):
    a, b = image_and_sensors("a", seed=0), image_and_sensors("b", classes=3, seed=1)
    labels = np.arange(96) % 3
    retrain = tf_mtz.Retrain(data={"a": (features, labels % 4), "b": (features, labels)}, loss="labels",
                             steps_per_layer=0, final_steps=20, batch_size=32)
    zipped = tf_mtz.zip_models({"a": a, "b": b}, features, retrain=retrain, verbose=0)
    distilled = tf_mtz.zip_models({"a": a, "b": b}, features, verbose=0,
                                  retrain=tf_mtz.Retrain(steps_per_layer=0, final_steps=20, batch_size=32))
    assert np.isfinite(distilled.predict(features, verbose=0)["a"]).all()
    path = os.path.join(tmp_path, "zipped.keras")
    zipped.save(path)
    expected = zipped.predict(features, verbose=0)
    loaded = keras.models.load_model(path).predict(features, verbose=0)
    for task in expected:
        np.testing.assert_allclose(loaded[task], expected[task], rtol=1e-6)
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    result = interpreter.get_signature_runner("serving_default")(image=features[0][:5], sensors=features[1][:5])
    for task in ("a", "b"):
        np.testing.assert_allclose(result[task], expected[task][:5], atol=1e-5)
    assert interpreter.get_signature_runner("b")(image=features[0][:5], sensors=features[1][:5]).keys() == {"b"}


def test_bad_multi_input_data_names_the_input(features):
    a, b = image_and_sensors("a", seed=0), image_and_sensors("b", seed=1)
    with pytest.raises(ValueError, match=r"no values for input\(s\) \['sensors'\]"):
        tf_mtz.zip_models({"a": a, "b": b}, {"image": features[0]}, verbose=0)
    with pytest.raises(ValueError, match=r"the models take 2 inputs \['image', 'sensors'\]"):
        tf_mtz.zip_models({"a": a, "b": b}, features[0], verbose=0)
    with pytest.raises(ValueError, match=r"input 'sensors'\) has samples of shape \(6,\)"):
        tf_mtz.zip_models({"a": a, "b": b}, [features[0], features[1][:, :6]], verbose=0)
    with pytest.raises(ValueError, match=r"different sample counts per input: \[96, 50\]"):
        tf_mtz.zip_models({"a": a, "b": b}, [features[0], features[1][:50]], verbose=0)


def test_models_taking_different_inputs_are_refused(features):
    a = image_and_sensors("a")
    image = keras.Input((10, 10, 3), name="image")
    sensors = keras.Input((8,), name="sensors")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, name="conv")(image))
    wider = keras.Model([image, sensors], keras.layers.Dense(4)(keras.layers.Concatenate()(
        [x, keras.layers.Dense(6, name="sensor_fc")(sensors)])), name="wider")
    with pytest.raises(ValueError, match=r"'wider' \(task 'b'\) takes input 1 \(8,\) float32 but model 'a'"):
        tf_mtz.zip_models({"a": a, "b": wider}, features, verbose=0)


def test_cli_takes_one_npz_array_per_input_name(features, tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    from test_cli import run_cli

    image_and_sensors("a", seed=0).save(tmp_path / "a.keras")
    image_and_sensors("b", classes=3, seed=1).save(tmp_path / "b.keras")
    np.savez(tmp_path / "calibration.npz", image=features[0], sensors=features[1])
    result = run_cli("zip", f"--model=a={tmp_path / 'a.keras'}", f"--model=b={tmp_path / 'b.keras'}",
                     f"--calibration={tmp_path / 'calibration.npz'}", f"--output={tmp_path / 'zipped.keras'}",
                     f"--tflite={tmp_path / 'zipped.tflite'}", "--quantization=int8")
    assert result.returncode == 0, result.stderr[-3000:]
    zipped = keras.models.load_model(tmp_path / "zipped.keras")
    expected = zipped.predict(features, verbose=0)
    lite = Interpreter(model_path=str(tmp_path / "zipped.tflite")).get_signature_runner("serving_default")
    got = lite(image=features[0][:8], sensors=features[1][:8])
    assert np.abs(got["b"] - expected["b"][:8]).max() < 0.1  # int8: close, not equal


def test_to_tf_keras_keeps_both_inputs(features):
    zipped = tf_mtz.zip_models({"a": image_and_sensors("a", seed=0), "b": image_and_sensors("b", seed=1)},
                               features, verbose=0)
    rebuilt = tf_mtz.to_tf_keras(zipped)
    expected = zipped.predict(features, verbose=0)
    got = rebuilt.predict(features, verbose=0)
    assert [x.name.split(":")[0] for x in rebuilt.inputs] == ["image", "sensors"]
    for task in ("a", "b"):
        np.testing.assert_allclose(got[task], expected[task], rtol=1e-5, atol=1e-6)


def test_the_same_inputs_in_another_order_are_refused(features):
    a = image_and_sensors("a")
    image = keras.Input((10, 10, 3), name="image")
    sensors = keras.Input((7,), name="sensors")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, name="conv")(image))
    out = keras.layers.Dense(4)(keras.layers.Concatenate()([x, keras.layers.Dense(6, name="sensor_fc")(sensors)]))
    swapped = keras.Model([sensors, image], out, name="swapped")
    with pytest.raises(ValueError, match=r"'swapped' \(task 'b'\) takes its inputs in the order \['sensors', "
                                         r"'image'\] but model 'a' \(task 'a'\) in the order \['image', 'sensors'\]"):
        tf_mtz.zip_models({"a": a, "b": swapped}, features, verbose=0)
