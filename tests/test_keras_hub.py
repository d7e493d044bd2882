"""keras-hub's transformer layers (an optional dependency) zip through the registry: TransformerEncoder and
TokenAndPositionEmbedding are read as the standard layers they are made of, PositionEmbedding as a
position table; the zipped model holds no keras-hub layer."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from conftest import randomize_weights, relative_error

keras_hub = pytest.importorskip("keras_hub")

LENGTH, VOCABULARY, WIDTH = 12, 50, 16


def hub_encoder(name="hub", seed=0, normalize_first=False, mask_zero=False, padding_mask=True):
    """Token and position embeddings, two keras-hub encoder blocks skipping the padding, mean pooling."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((LENGTH,), dtype="int32", name="tokens")
    h = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, LENGTH, WIDTH, mask_zero=mask_zero, name="embed")(ids)
    options = {"padding_mask": keras.ops.not_equal(ids, 0)} if padding_mask else {}
    for block in range(2):
        h = keras_hub.layers.TransformerEncoder(24, 4, normalize_first=normalize_first, name=f"encoder{block}")(
            h, **options)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return randomize_weights(keras.Model(ids, keras.layers.Dense(3, name="head")(h), name=name), seed)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCABULARY, (96, LENGTH)).astype("int32")
    ids[np.arange(LENGTH)[None, :] >= rng.integers(3, LENGTH + 1, 96)[:, None]] = 0
    return ids


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("normalize_first", [False, True])
def test_permuted_copy_of_a_keras_hub_encoder_gives_back_the_outputs(tokens, normalize_first, sharing):
    model = hub_encoder(normalize_first=normalize_first)
    expected = model.predict(tokens, verbose=0)
    unmasked = hub_encoder(normalize_first=normalize_first, padding_mask=False)
    unmasked.set_weights(model.get_weights())
    assert relative_error(unmasked.predict(tokens, verbose=0), expected) > 1e-3  # the mask matters
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    assert relative_error(copy.predict(tokens, verbose=0), expected) < 1e-5
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, sharing=sharing, verbose=0)
    outputs = zipped.predict(tokens, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    assert not [layer for layer in zipped.layers if type(layer).__module__.startswith("keras_hub")]
    # Each sublayer is zipped on its own, named inside its block.
    names = [layer.name for layer in zipped.zip_report.layers]
    assert names[:4] == ["embed/token_embedding", "encoder0/self_attention_layer",
                         "encoder0/feedforward_intermediate_dense", "encoder0/feedforward_output_dense"]
    assert zipped.get_layer("encoder1_self_attention_layer_shared").count_params() == \
        model.get_layer("encoder1")._self_attention_layer.count_params()


def test_zipped_keras_hub_encoders_export_and_reload(tokens, tmp_path):
    models = {"a": hub_encoder("a", seed=0), "b": hub_encoder("b", seed=3)}
    zipped = tf_mtz.zip_models(models, tokens, verbose=0)
    outputs = zipped.predict(tokens[:8], verbose=0)
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    operators = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in operators)
    lite = interpreter.get_signature_runner("serving_default")(tokens=tokens[:8])
    for task in models:
        np.testing.assert_allclose(lite[task], outputs[task], atol=1e-5)
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    again = keras.models.load_model(path).predict(tokens[:8], verbose=0)
    for task in models:
        np.testing.assert_array_equal(again[task], outputs[task])


def test_sharing_names_a_layer_inside_a_block(tokens):
    models = {"a": hub_encoder("a", seed=0), "b": hub_encoder("b", seed=3)}
    whole = ["embed/token_embedding", "encoder0/self_attention_layer", "encoder0/feedforward_intermediate_dense",
             "encoder0/feedforward_output_dense", "encoder1/self_attention_layer", "encoder1/feedforward_output_dense"]
    sharing = {**{name: 1.0 for name in whole}, "encoder1/feedforward_intermediate_dense": 12}
    zipped = tf_mtz.zip_models(models, tokens, sharing=sharing, verbose=0)
    shared = {layer.name: layer.shared for layer in zipped.zip_report.layers}
    assert shared["encoder1/feedforward_intermediate_dense"] == 12
    assert shared["encoder0/feedforward_intermediate_dense"] == 24


def test_a_mask_keras_hub_hands_over_at_run_time_only_is_refused(tokens):
    models = {t: hub_encoder(t, mask_zero=True, padding_mask=False) for t in ("a", "b")}
    with pytest.raises(tf_mtz.ZipError, match="'embed' \\(TokenAndPositionEmbedding\\).*mask_zero=True"):
        tf_mtz.zip_models(models, tokens, verbose=0)
