"""Recurrent layers (SimpleRNN, LSTM, GRU, Bidirectional): a unit is one hidden unit across its gates, the
recurrent kernel is permuted on both axes, and the layers are shared all or none from a fully shared input."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from tf_mtz import costs, zipper
from conftest import relative_error

VOCABULARY, STEPS = 40, 9


def recurrent_model(kind, name="model", seed=0, width=10):
    """Token ids -> Embedding -> a recurrent stack of `kind` -> Dense -> 3 classes, with random biases so
    that a permutation that misses them shows."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((STEPS,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCABULARY, 12, name="embed")(x)
    if kind == "lstm":
        x = keras.layers.LSTM(width, name="rnn")(x)
    elif kind == "stacked":  # a sequence into a second layer
        x = keras.layers.LSTM(width, return_sequences=True, name="rnn")(x)
        x = keras.layers.SimpleRNN(8, name="rnn2")(x)
    elif kind == "gru":
        x = keras.layers.GRU(width, name="rnn")(x)
    elif kind == "gru_reset_before":
        x = keras.layers.GRU(width, reset_after=False, go_backwards=True, name="rnn")(x)
    elif kind == "bidirectional":
        x = keras.layers.Bidirectional(keras.layers.LSTM(width // 2, return_sequences=True), name="rnn")(x)
        x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x), name=name)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([w + rng.normal(0, 0.2, w.shape).astype("float32") for w in weights])
    return model


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCABULARY, (256, STEPS)).astype("int32")


KINDS = ["lstm", "stacked", "gru", "gru_reset_before", "bidirectional"]


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_permuted_copy_gives_back_the_outputs(tokens, kind, sharing):
    model = recurrent_model(kind)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    expected = model.predict(tokens, verbose=0)
    assert relative_error(copy.predict(tokens, verbose=0), expected) < 1e-5
    assert not np.allclose(copy.get_layer("rnn").get_weights()[1], model.get_layer("rnn").get_weights()[1])
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, sharing=sharing, verbose=0)
    outputs = zipped.predict(tokens, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    # The recurrent layer is one layer of the full width for both tasks: shared all or none, so a uniform
    # fraction shares it (and the embedding feeding it) whole, and the Dense layer after it by the fraction.
    shared = zipped.get_layer("rnn_shared")
    assert type(shared) is type(model.get_layer("rnn"))
    assert shared.output.shape[-1] == model.get_layer("rnn").output.shape[-1]
    assert zipped.get_layer("embed_shared").output_dim == 12
    assert zipped.get_layer("fc_shared").units == round(16 * sharing)


@pytest.mark.parametrize("kind", ["lstm", "bidirectional", "gru"])
def test_tflite_reproduces_keras_with_builtin_ops(tokens, kind):
    model = recurrent_model(kind)
    zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=2)}, tokens,
                               sharing=0.5, verbose=0)
    outputs = zipped.predict(tokens[:4], verbose=0)
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    operators = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "WHILE" in operators and not any(op.startswith("Flex") or op == "CUSTOM" for op in operators)
    dynamic = Interpreter(model_content=tf_mtz.tflite_bytes(zipped, quantization="dynamic"))
    lite = dynamic.get_signature_runner("serving_default")(tokens=tokens[:1])
    np.testing.assert_allclose(lite["a"], outputs["a"][:1], atol=0.05)
    with pytest.raises(tf_mtz.ZipError, match="int8"):
        tf_mtz.tflite_bytes(zipped, quantization="int8", representative_data=tokens)
    for signature, tasks in (("serving_default", ("a", "b")), ("b", ("b",))):
        runner = interpreter.get_signature_runner(signature)
        for row in range(4):  # the recurrent TFLite model takes one sample per call
            lite = runner(tokens=tokens[row:row + 1])
            for task in tasks:
                np.testing.assert_allclose(lite[task], outputs[task][row:row + 1], atol=1e-6)


def test_two_models_zip_with_both_recipes_retrain_and_reload(tokens, tmp_path):
    models = {"a": recurrent_model("lstm", "a", seed=0), "b": recurrent_model("lstm", "b", seed=3),
              "c": recurrent_model("lstm", "c", seed=4)}
    for config in (None, tf_mtz.ZipConfig.paper()):
        zipped = tf_mtz.zip_models(models, tokens, config=config, verbose=0)
        report = zipped.zip_report
        rnn = next(layer for layer in report.layers if layer.name == "rnn")
        assert rnn.shared == 10 and rnn.kind == "LSTM"
        outputs = zipped.predict(tokens, verbose=0)
        assert all(np.isfinite(outputs[t]).all() for t in models)
    # One LSTM for three tasks: its parameters counted once.
    lstm_parameters = models["a"].get_layer("rnn").count_params()
    assert zipped.get_layer("rnn_shared").count_params() == lstm_parameters
    assert report.params_shared >= lstm_parameters
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    reloaded = keras.models.load_model(path)
    again = reloaded.predict(tokens, verbose=0)
    for task in models:
        np.testing.assert_array_equal(again[task], outputs[task])


def test_retrained_recurrent_weights_reach_the_result(tokens):
    models = {"a": recurrent_model("gru", "a", seed=0), "b": recurrent_model("gru", "b", seed=3)}
    plain = tf_mtz.zip_models(models, tokens, verbose=0)
    retrained = tf_mtz.zip_models(models, tokens, verbose=0,
                                  retrain=tf_mtz.Retrain(data=tokens, steps_per_layer=0, final_steps=20))
    before = plain.get_layer("rnn_shared").get_weights()
    after = retrained.get_layer("rnn_shared").get_weights()
    assert [w.shape for w in before] == [w.shape for w in after]
    # The recurrent kernel moved: training changed it, and the result holds the trained values.
    assert not np.allclose(before[1], after[1])
    assert retrained.zip_report.layers[-1].retrain_loss is not None


def test_weight_matching_alternates_with_the_recurrent_kernel(tokens, monkeypatch):
    """Units whose input weights are all alike are told apart by their recurrent weights alone: the pairing
    re-matches with the recurrent kernels' rows in the previous pairing's order until it settles. (From
    no input information at all it can also settle wrongly: seed 4 of the copy does, here.)"""
    model = recurrent_model("lstm", width=16)
    layer = model.get_layer("rnn")
    kernel, recurrent, bias = layer.get_weights()
    layer.set_weights([np.full_like(kernel, 0.3), 3 * recurrent, np.full_like(bias, 0.1)])
    copy = tf_mtz.testing.permuted_copy(model, seed=3)
    expected = model.predict(tokens, verbose=0)
    without_refit = tf_mtz.ZipConfig(refit=False)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, verbose=0, config=without_refit)
    assert relative_error(zipped.predict(tokens, verbose=0)["b"], expected) < 1e-4
    monkeypatch.setattr(zipper, "_RECURRENT_ROUNDS", 0)  # the input weights alone: any pairing ties
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, verbose=0, config=without_refit)
    assert relative_error(zipped.predict(tokens, verbose=0)["b"], expected) > 1e-2


def test_recurrent_matching_costs_are_the_recurrent_weights_inner_products():
    rng = np.random.default_rng(0)
    gates, units = 3, 5
    a = rng.normal(size=(gates, units + 1, units))
    b = rng.normal(size=(gates, units + 1, units))
    partner = rng.permutation(units)
    cost = costs.recurrent_matching_costs(a, b, partner)
    expected = np.zeros((units, units))
    for i in range(units):
        for j in range(units):
            incoming = sum(a[g, k, i] * b[g, partner[k], j] for g in range(gates) for k in range(units))
            incoming += sum(a[g, units, i] * b[g, units, j] for g in range(gates))
            outgoing = sum(a[g, i, m] * b[g, j, partner[m]] for g in range(gates) for m in range(units))
            expected[i, j] = -(incoming + outgoing)
    np.testing.assert_allclose(cost, expected, rtol=1e-5, atol=1e-5)
    # B a permuted copy of A, `partner` the permutation: each unit's own partner costs least.
    order = rng.permutation(units)
    copy = a[:, np.r_[order, units]][..., order]  # B's unit p is A's unit order[p]
    partner = np.argsort(order)
    np.testing.assert_array_equal(np.argmin(costs.recurrent_matching_costs(a, copy, partner), axis=1), partner)


def test_bad_recurrent_sharing_and_layers_get_clear_errors(tokens):
    models = {"a": recurrent_model("lstm", "a"), "b": recurrent_model("lstm", "b", seed=1)}
    with pytest.raises(tf_mtz.ZipError, match="'rnn' \\(LSTM\\).*all or none"):
        tf_mtz.zip_models(models, tokens, sharing={"embed": 1.0, "rnn": 0.5}, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="'rnn' \\(LSTM\\).*fully shared input"):
        tf_mtz.zip_models(models, tokens, sharing={"embed": 0.5, "rnn": 1.0}, verbose=0)
    wider = {"a": recurrent_model("lstm", "a"), "b": recurrent_model("lstm", "b", width=12)}
    with pytest.raises(tf_mtz.ZipError, match="all or none"):
        tf_mtz.zip_models(wider, tokens, verbose=0)

    def build(layer, head_layer=None):
        x = inputs = keras.Input((STEPS,), dtype="int32", name="tokens")
        x = layer(keras.layers.Embedding(VOCABULARY, 6)(x))
        if isinstance(x, (list, tuple)):
            x = x[0]
        return keras.Model(inputs, head_layer(x) if head_layer else keras.layers.Dense(2)(x))

    cases = [
        (lambda: build(keras.layers.LSTM(4, return_state=True)), "return_state=True"),
        (lambda: build(keras.layers.Bidirectional(keras.layers.GRU(4), merge_mode="sum")), "merge_mode='sum'"),
        (lambda: build(keras.layers.Dense(4), keras.layers.LSTM(3)), "Output .* comes from layer .*LSTM"),
    ]
    for make, message in cases:
        with pytest.raises(tf_mtz.ZipError, match=message):
            tf_mtz.zip_models({"a": make(), "b": make()}, tokens, verbose=0)


def test_auto_sharing_searches_recurrent_layers(tokens):
    """AutoSharing on LSTM models: the recurrent layer is shared whole or not at all, and the zip at the
    chosen counts is what the search judged."""
    models = {"a": recurrent_model("lstm", "a", seed=0), "b": recurrent_model("lstm", "b", seed=1)}
    zipped = tf_mtz.zip_models(models, tokens[:128], sharing=tf_mtz.AutoSharing(tolerance=0.2, data=tokens[128:]),
                               verbose=0)
    record = {r["layer"]: r for r in zipped.zip_report.auto_sharing}
    assert record["rnn"]["chosen"] in (0, record["rnn"]["width"])
    plain = tf_mtz.zip_models(models, tokens[:128], sharing={k: r["chosen"] for k, r in record.items()}, verbose=0)
    got, want = zipped.predict(tokens[128:], verbose=0), plain.predict(tokens[128:], verbose=0)
    for task in models:
        np.testing.assert_allclose(got[task], want[task], rtol=1e-5, atol=1e-5)
