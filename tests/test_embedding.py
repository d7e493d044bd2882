"""Embedding layers: the embedding dimensions are the units, a unit's incoming weights its column of the
table, and the Hessian is the tokens' frequencies (a diagonal matrix, never formed)."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from tf_mtz import costs, statistics
from conftest import relative_error

VOCABULARY = 300


def text_model(name, seed=0, vocabulary=VOCABULARY, dim=24, convolution=True, **embedding_options):
    """Token ids -> Embedding -> (Conv1D) -> average over the sequence -> Dense -> 4 classes."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((16,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocabulary, dim, name="embed", **embedding_options)(x)
    if convolution:
        x = keras.layers.Conv1D(20, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(32, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="head")(x), name=name)


@pytest.fixture(scope="module")
def tokens():
    # Zipf-like frequencies: a few tokens common, many rare, some never seen.
    rng = np.random.default_rng(0)
    return np.minimum(rng.zipf(1.3, size=(256, 16)) - 1, VOCABULARY - 1).astype("int32")


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("convolution", [True, False])
def test_permuted_copy_gives_back_the_outputs_in_keras_and_tflite(tokens, sharing, convolution):
    model = text_model("text", convolution=convolution)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    expected = model.predict(tokens, verbose=0)
    assert relative_error(copy.predict(tokens, verbose=0), expected) < 1e-5  # a real permutation of it
    assert not np.allclose(copy.get_layer("embed").get_weights()[0], model.get_layer("embed").get_weights()[0])
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, sharing=sharing, verbose=0)
    outputs = zipped.predict(tokens, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    # The shared units of the table are one Embedding of the shared width.
    shared = zipped.get_layer("embed_shared")
    assert isinstance(shared, keras.layers.Embedding) and shared.output_dim == round(24 * sharing)
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    lite = interpreter.get_signature_runner("serving_default")(tokens=tokens[:8])
    for task in ("a", "b"):
        np.testing.assert_allclose(lite[task], outputs[task][:8], atol=1e-6)


def test_two_models_zip_with_both_recipes_and_retraining(tokens):
    models = {"a": text_model("a", seed=0), "b": text_model("b", seed=5)}
    for config in (None, tf_mtz.ZipConfig.paper()):
        zipped = tf_mtz.zip_models(models, tokens, config=config, verbose=0)
        embed = zipped.zip_report.layers[0]
        assert embed.name == "embed" and embed.shared == 24 and embed.cost_sum > 0
        assert embed.calibration_samples == {"a": tokens.size, "b": tokens.size}
        assert all(np.isfinite(v).all() for v in zipped.predict(tokens, verbose=0).values())
    retrain = tf_mtz.Retrain(data=tokens, steps_per_layer=0, final_steps=20)
    zipped = tf_mtz.zip_models(models, tokens, retrain=retrain, verbose=0)
    path = "/tmp/tf_mtz_embedding_test.keras"
    zipped.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(tokens, verbose=0)["b"], zipped.predict(tokens, verbose=0)["b"],
                               atol=1e-6)


def test_int8_tflite_and_tf_keras_take_token_inputs(tokens):
    zipped = tf_mtz.zip_models({"a": text_model("a"), "b": text_model("b", seed=2)}, tokens, sharing=0.5, verbose=0)
    expected = zipped.predict(tokens[:8], verbose=0)
    content = tf_mtz.tflite_bytes(zipped, quantization="int8", representative_data=tokens)
    lite = Interpreter(model_content=content).get_signature_runner("a")(tokens=tokens[:8])
    np.testing.assert_allclose(lite["a"], expected["a"], atol=0.02)
    legacy = tf_mtz.to_tf_keras(zipped)
    np.testing.assert_array_equal(legacy.predict(tokens[:8], verbose=0)["b"], expected["b"])


def test_token_hessian_is_the_gram_matrix_of_one_hot_tokens(tokens):
    """The frequencies are exactly the diagonal of the one-hot tokens' second moment (which is diagonal),
    and its quadratic form and product agree with the dense matrix."""
    hessian = statistics.token_hessian([tokens[:100], tokens[100:]], VOCABULARY, task="a", layer_name="embed")
    one_hot = np.eye(VOCABULARY)[tokens.reshape(-1)]
    gram = one_hot.T @ one_hot / len(one_hot)
    np.testing.assert_allclose(np.diag(gram), hessian.frequencies, atol=1e-15)
    assert np.count_nonzero(gram - np.diag(np.diag(gram))) == 0
    assert hessian.samples == tokens.size and hessian.dim == VOCABULARY + 1
    damped = statistics.damped(hessian, 0.01)
    w = np.random.default_rng(1).normal(size=(VOCABULARY + 1, 5))
    np.testing.assert_allclose(damped.quadratic(w), np.einsum("dn,de,en->n", w, damped.dense(), w), rtol=1e-12)
    np.testing.assert_allclose(damped.matmul(w), damped.dense() @ w, rtol=1e-12)
    both = damped + damped
    np.testing.assert_allclose(both.dense(), 2 * damped.dense(), rtol=1e-12)


def test_diagonal_pair_costs_and_merge_equal_the_dense_formulas(tokens):
    rng = np.random.default_rng(2)
    hessians = [statistics.damped(statistics.token_hessian([tokens[i::2]], VOCABULARY, task="t", layer_name="e"),
                                  0.01) for i in (0, 1)]
    blocks_a, blocks_b = rng.normal(size=(1, VOCABULARY + 1, 7)), rng.normal(size=(1, VOCABULARY + 1, 6))
    blocks_a[:, -1] = blocks_b[:, -1] = 0.0  # an Embedding's bias
    dense = [h.dense() for h in hessians]
    np.testing.assert_allclose(costs.cost_matrix(blocks_a, blocks_b, *hessians, dtype=tf_float64()),
                               costs.cost_matrix(blocks_a, blocks_b, *dense, dtype=tf_float64()), rtol=1e-9)
    merged = costs.merged_weights(blocks_a[:, :, :6], blocks_b, *hessians)
    np.testing.assert_allclose(merged, costs.merged_weights(blocks_a[:, :, :6], blocks_b, *dense), atol=1e-12)
    assert np.all(merged[:, -1] == 0.0)  # the bias stays zero: its coordinate is decoupled


def tf_float64():
    import tensorflow as tf

    return tf.float64


def test_a_large_vocabulary_zips_with_the_papers_costs_without_dense_hessians():
    rng = np.random.default_rng(3)
    vocabulary = 50_000  # a dense (V + 1)² float64 Hessian would take 20 GB
    tokens = rng.integers(0, vocabulary, size=(64, 16)).astype("int32")
    models = {t: text_model(t, seed=s, vocabulary=vocabulary, dim=8, convolution=False) for t, s in (("a", 0),
                                                                                                   ("b", 1))}
    zipped = tf_mtz.zip_models(models, tokens, config=tf_mtz.ZipConfig.paper(), verbose=0)
    assert zipped.get_layer("embed_shared").input_dim == vocabulary


def test_bad_embeddings_are_refused_with_the_layer_named(tokens):
    with pytest.raises(ValueError, match=r"'embed' \(Embedding\) in model 'b', configured differently: input_dim 300 vs"):
        tf_mtz.zip_models({"a": text_model("a"), "b": text_model("b", vocabulary=VOCABULARY + 1)}, tokens, verbose=0)
    model = text_model("a")
    with pytest.raises(ValueError, match=r"token ids outside 0\.\.299.*layer 'embed'"):
        tf_mtz.zip_models({"a": model, "b": text_model("b", seed=1)}, tokens + VOCABULARY, verbose=0)
