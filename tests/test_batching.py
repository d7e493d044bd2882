"""Calibration batches: 256 samples, more for small networks, exactly `ZipConfig.batch_size` where it is set."""

import keras
import numpy as np

import tf_mtz
from tf_mtz import zipper
from conftest import mlp


def _sequence_model(name):
    x = keras.Input((None, 8))
    h = keras.layers.LSTM(6, name=f"{name}_lstm")(x)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax", name=f"{name}_head")(h), name=name)


def _wide_cnn(name):
    x = keras.Input((64, 64, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name=f"{name}_conv")(x)  # 131,072 a sample
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, keras.layers.Dense(4, activation="softmax", name=f"{name}_head")(h), name=name)


def _attention_model(name):
    x = keras.Input((16, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name=f"{name}_attention")(x, x)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax", name=f"{name}_head")(h), name=name)


def test_batch_size_follows_the_widest_layer_output_unless_set():
    config = tf_mtz.ZipConfig()
    small = {"a": mlp("a"), "b": mlp("b", seed=1)}
    assert zipper._batch_size(small, config) == 2048  # widest output: 24 values a sample
    assert zipper._batch_size({"a": _wide_cnn("a"), "b": _wide_cnn("b")}, config) == 256  # 16M / 131,072 = 128
    assert zipper._batch_size({"a": _sequence_model("a"), "b": _sequence_model("b")}, config) == 256  # any length
    # 128 values an output, but heads x queries x keys = 512 scores a sample inside: outputs bound nothing.
    assert zipper._batch_size({"a": _attention_model("a"), "b": _attention_model("b")}, config) == 256
    assert zipper._batch_size(small, tf_mtz.ZipConfig(batch_size=32)) == 32


def test_zip_does_not_depend_on_the_calibration_batches(rng):
    """The statistics stream over batches: 600 samples in one batch or in batches of 64 give one zip, up to
    float rounding."""
    models = {"a": mlp("a"), "b": mlp("b", seed=1)}
    x = rng.normal(size=(600, 20)).astype("float32")
    whole = tf_mtz.zip_models(models, x, sharing=0.75, verbose=0)
    batched = tf_mtz.zip_models(models, x, sharing=0.75, config=tf_mtz.ZipConfig(batch_size=64), verbose=0)
    assert [layer.shared for layer in whole.zip_report.layers] == [layer.shared for layer in batched.zip_report.layers]
    for got, want in zip(whole.get_weights(), batched.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
