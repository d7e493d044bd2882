"""The tfmot path: a zipped Keras 3 model rebuilt in tf_keras, then quantization-aware training."""

import numpy as np

import tf_mtz
from conftest import small_cnn


def test_to_tf_keras_reproduces_outputs_and_takes_qat(rng):
    import tensorflow_model_optimization as tfmot
    import tf_keras

    a, b = small_cnn("a", seed=0), small_cnn("b", classes=4, seed=1)
    x = rng.normal(size=(64, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing={"conv1": 1.0, "conv2": 0.5, "fc": 1.0}, verbose=0)
    legacy = tf_mtz.to_tf_keras(zipped)
    assert isinstance(legacy, tf_keras.Model)
    assert legacy.count_params() == zipped.count_params()
    expected = zipped.predict(x, verbose=0)
    got = legacy.predict(x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_array_equal(got[task], expected[task])
    # The same graph: every layer is called as often as in the zipped model (shared layers stay shared).
    for layer in zipped.layers:
        assert len(legacy.get_layer(layer.name)._inbound_nodes) == len(layer._inbound_nodes), layer.name

    qat = tfmot.quantization.keras.quantize_model(legacy)
    qat.compile(optimizer=tf_keras.optimizers.Adam(1e-4), loss={t: "kl_divergence" for t in ("a", "b")})
    history = qat.fit(x, expected, epochs=3, batch_size=16, verbose=0)  # training sets the int8 ranges
    assert np.isfinite(history.history["loss"]).all()
    quantized = qat.predict(x, verbose=0)
    for task in ("a", "b"):
        assert np.mean(np.argmax(quantized[task], 1) == np.argmax(expected[task], 1)) > 0.8
