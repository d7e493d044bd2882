"""Masked embeddings (`Embedding(mask_zero=True)`): the mask Keras derives from the token ids reaches the
layers that use it (recurrent layers, pooling, attention) explicitly in the zipped model, which then needs
no masked Embedding of its own."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from conftest import randomize_weights, relative_error

VOCABULARY, LENGTH = 40, 10


def masked_model(kind, name="model", seed=0, mask_zero=True):
    """A text classifier over padded token ids (0 = padding): Embedding(mask_zero) -> `kind` -> head.

    kind: "lstm" (its last unmasked state), "bidirectional" (GRUs), "pooling" (a Dense per token, the
    masked mean), "attention" (a post-LN encoder block whose attention reads the Keras mask, then the
    masked mean)."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((LENGTH,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCABULARY, 12, mask_zero=mask_zero, name="embed")(x)
    if kind == "lstm":
        h = keras.layers.LSTM(10, name="rnn")(h)
    elif kind == "bidirectional":
        h = keras.layers.Bidirectional(keras.layers.GRU(6, return_sequences=True), name="rnn")(h)
        h = keras.layers.GlobalAveragePooling1D(name="mean")(h)
    elif kind == "pooling":
        h = keras.layers.Dense(14, activation="relu", name="per_token")(h)
        h = keras.layers.GlobalAveragePooling1D(name="mean")(h)
    else:
        a = keras.layers.MultiHeadAttention(3, 4, name="mha")(h, h)
        h = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add()([h, a]))
        f = keras.layers.Dense(16, activation="gelu", name="ff1")(h)
        h = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add()([h, keras.layers.Dense(12, name="ff2")(f)]))
        h = keras.layers.GlobalAveragePooling1D(name="mean")(h)
    h = keras.layers.Dense(8, activation="relu", name="fc")(h)
    return randomize_weights(keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name=name), seed, scale=0.3)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCABULARY, (128, LENGTH)).astype("int32")
    ids[np.arange(LENGTH)[None, :] >= rng.integers(2, LENGTH + 1, 128)[:, None]] = 0  # padding at the end
    return ids


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["lstm", "bidirectional", "pooling", "attention"])
def test_permuted_copy_gives_back_the_masked_outputs(tokens, kind, sharing):
    model = masked_model(kind)
    expected = model.predict(tokens, verbose=0)
    unmasked = masked_model(kind, mask_zero=False)
    unmasked.set_weights(model.get_weights())
    assert relative_error(unmasked.predict(tokens, verbose=0), expected) > 1e-3  # the mask matters here
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, sharing=sharing, verbose=0)
    outputs = zipped.predict(tokens, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    embeddings = [layer for layer in zipped.layers if isinstance(layer, keras.layers.Embedding)]
    assert embeddings and not any(layer.mask_zero for layer in embeddings)  # the mask is explicit


@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_tflite_and_reload_keep_the_mask(tokens, kind, tmp_path):
    model = masked_model(kind)
    zipped = tf_mtz.zip_models({"a": model, "b": masked_model(kind, "b", seed=1)}, tokens, verbose=0)
    outputs = zipped.predict(tokens[:1], verbose=0)  # the .tflite of a recurrent model takes one sample
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    operators = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in operators)
    lite = interpreter.get_signature_runner("serving_default")(tokens=tokens[:1])
    for task in ("a", "b"):
        np.testing.assert_allclose(lite[task], outputs[task], atol=1e-5)
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    again = keras.models.load_model(path).predict(tokens, verbose=0)
    np.testing.assert_array_equal(again["a"], zipped.predict(tokens, verbose=0)["a"])


def test_retraining_a_masked_model(tokens):
    models = {"a": masked_model("lstm", "a"), "b": masked_model("lstm", "b", seed=1)}
    zipped = tf_mtz.zip_models(models, tokens, verbose=0,
                               retrain=tf_mtz.Retrain(data=tokens, steps_per_layer=5, final_steps=5))
    assert all(np.isfinite(v).all() for v in zipped.predict(tokens, verbose=0).values())
