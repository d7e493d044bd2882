"""Real data: two small MLPs trained on real MNIST (different seeds) zip with little loss."""

import os
import sys

import keras
import numpy as np
import pytest

import tf_mtz

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tflite_examples"))
from mnist_data import load_mnist  # noqa: E402


def error(probabilities, y):
    return 100.0 * np.mean(np.argmax(probabilities, axis=-1) != y)


def train(seed, x, y):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Dense(128, activation="relu", name="fc1")(inputs)
    h = keras.layers.Dense(64, activation="relu", name="fc2")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="logits")(h), name=f"m{seed}")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=3, verbose=0)
    return model


@pytest.fixture(scope="module")
def mnist_pair():
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    return train(1, x_train, y_train), train(2, x_train, y_train), x_train, (x_test, y_test)


def test_zipped_mnist_mlps_keep_accuracy_and_tflite_agrees(mnist_pair, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model_a, model_b, x_train, (x_test, y_test) = mnist_pair
    base = {"a": error(model_a.predict(x_test, verbose=0), y_test),
            "b": error(model_b.predict(x_test, verbose=0), y_test)}
    calibration = x_train[:10000]
    raw = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration, verbose=0)
    retrained = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration, verbose=0,
                                  retrain=tf_mtz.Retrain(data=x_train, steps_per_layer=300))
    raw_out = raw.predict(x_test, verbose=0)
    out = retrained.predict(x_test, verbose=0)
    for task in ("a", "b"):
        assert base[task] < 4.0  # the bases really learned MNIST
        assert error(raw_out[task], y_test) < 20.0  # merged without retraining: still a working classifier
        assert error(out[task], y_test) <= base[task] + 0.5
    assert retrained.zip_report.shared_fraction > 0.99

    path = str(tmp_path / "mnist.tflite")
    tf_mtz.export_tflite(retrained, path)
    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    lite = runner(image=x_test[:1000])
    for task in ("a", "b"):
        np.testing.assert_allclose(lite[task], out[task][:1000], atol=1e-5)
