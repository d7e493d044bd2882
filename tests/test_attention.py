"""MultiHeadAttention (self-attention in residual blocks): its units are the stream's, its heads are matched
inside the layer (query/key dims, value dims and output-projection rows moving together)."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from tf_mtz import matching
from conftest import randomize_weights, relative_error

WIDTH, HEADS = 16, 4


def encoder_block(h, label, post_norm, ff_width, **attention_options):
    """A pre-LN (ViT) or post-LN (BERT) encoder block on the stream `h`; a post-LN block's attention takes
    `attention_options` (masks)."""
    if post_norm:
        a = keras.layers.MultiHeadAttention(HEADS, WIDTH // HEADS, name=f"{label}_mha")(h, h, **attention_options)
        h = keras.layers.LayerNormalization(name=f"{label}_ln1")(keras.layers.Add()([h, a]))
        f = keras.layers.Dense(ff_width, activation="gelu", name=f"{label}_ff1")(h)
        f = keras.layers.Dense(WIDTH, name=f"{label}_ff2")(f)
        return keras.layers.LayerNormalization(name=f"{label}_ln2")(keras.layers.Add()([h, f]))
    y = keras.layers.LayerNormalization(name=f"{label}_ln1")(h)
    h = keras.layers.Add()([h, keras.layers.MultiHeadAttention(HEADS, WIDTH // HEADS, name=f"{label}_mha")(y, y)])
    y = keras.layers.LayerNormalization(name=f"{label}_ln2")(h)
    y = keras.layers.Dense(ff_width, activation="gelu", name=f"{label}_ff1")(y)
    return keras.layers.Add()([h, keras.layers.Dense(WIDTH, name=f"{label}_ff2")(y)])


def vit(name="vit", seed=0, blocks=2, ff_width=32):
    """ViT-style: 7x7 patches of a 28x28 image (a strided Conv2D), pre-LN blocks, a final LayerNorm,
    pooled output, 5 classes."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Reshape((16, WIDTH))(keras.layers.Conv2D(WIDTH, 7, strides=7, name="patches")(x))
    for block in range(blocks):
        h = encoder_block(h, f"block{block}", post_norm=False, ff_width=ff_width)
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization(name="final_ln")(h))
    return randomize_weights(keras.Model(inputs, keras.layers.Dense(5, name="head")(h), name=name), seed)


def bert(name="bert", seed=0):
    """BERT-style: token embedding, two post-LN blocks, pooled output, 3 classes."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(50, WIDTH, name="embed")(x)
    for block in range(2):
        h = encoder_block(h, f"block{block}", post_norm=True, ff_width=24)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return randomize_weights(keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name=name), seed)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(128, 28, 28, 1)).astype("float32")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, 50, (128, 12)).astype("int32")


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("architecture", ["vit", "bert"])
def test_permuted_copy_gives_back_the_outputs(images, tokens, architecture, sharing):
    model, x = (vit(), images) if architecture == "vit" else (bert(), tokens)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    expected = model.predict(x, verbose=0)
    assert relative_error(copy.predict(x, verbose=0), expected) < 1e-5
    # The copy's heads and the dims within them are reordered, not only the stream's units.
    query = [m.get_layer("block0_mha")._query_dense.kernel.numpy() for m in (model, copy)]
    assert not np.allclose(np.sort(np.abs(query[0]), axis=0)[..., 0], np.sort(np.abs(query[1]), axis=0)[..., 0])
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    # The stream and its attention are shared whole (LayerNormalizations mix all its units); the
    # feed-forward hidden layers by the fraction.
    assert isinstance(zipped.get_layer("block0_mha_shared"), keras.layers.MultiHeadAttention)
    assert zipped.get_layer("block1_ff1_shared").units == round((32 if architecture == "vit" else 24) * sharing)


def test_tflite_reproduces_keras_with_builtin_ops(images):
    model = vit()
    zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=2)}, images,
                               sharing=0.5, verbose=0)
    outputs = zipped.predict(images[:8], verbose=0)
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    operators = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "SOFTMAX" in operators and not any(op.startswith("Flex") or op == "CUSTOM" for op in operators)
    for signature, tasks in (("serving_default", ("a", "b")), ("a", ("a",))):
        lite = interpreter.get_signature_runner(signature)(image=images[:8])
        for task in tasks:
            np.testing.assert_allclose(lite[task], outputs[task], atol=1e-5)


def test_three_models_zip_with_both_recipes_and_reload(images, tmp_path):
    models = {t: vit(t, seed=s) for t, s in (("a", 0), ("b", 3), ("c", 4))}
    for config in (None, tf_mtz.ZipConfig.paper()):
        zipped = tf_mtz.zip_models(models, images, config=config, verbose=0)
        outputs = zipped.predict(images, verbose=0)
        assert all(np.isfinite(outputs[t]).all() for t in models)
        mha = next(layer for layer in zipped.zip_report.layers if layer.name == "block0_mha")
        assert mha.shared == WIDTH and mha.kind == "MultiHeadAttention"
    # One attention layer for three tasks: its parameters counted once in the model and the report.
    attention = models["a"].get_layer("block0_mha").count_params()
    assert zipped.get_layer("block0_mha_shared").count_params() == attention
    assert mha.params_before == 3 * attention and mha.params_after == attention
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    again = keras.models.load_model(path).predict(images, verbose=0)
    for task in models:
        np.testing.assert_array_equal(again[task], outputs[task])


def test_retrained_attention_weights_reach_the_result(images):
    models = {"a": vit("a", seed=0, blocks=1), "b": vit("b", seed=3, blocks=1)}
    plain = tf_mtz.zip_models(models, images, verbose=0)
    retrained = tf_mtz.zip_models(models, images, verbose=0,
                                  retrain=tf_mtz.Retrain(data=images, steps_per_layer=0, final_steps=10))
    before = plain.get_layer("block0_mha_shared").get_weights()
    after = retrained.get_layer("block0_mha_shared").get_weights()
    assert [w.shape for w in before] == [w.shape for w in after]
    assert not np.allclose(before[0], after[0])  # the query projection was trained, and kept


def test_match_heads_recovers_permuted_heads_and_dims():
    rng = np.random.default_rng(0)
    heads, key_dim, value_dim = 4, 5, 3
    key, value = rng.normal(size=(heads, 9, key_dim)), rng.normal(size=(heads, 11, value_dim))
    order = rng.permutation(heads)
    key_orders = np.stack([rng.permutation(key_dim) for _ in range(heads)])
    value_orders = np.stack([rng.permutation(value_dim) for _ in range(heads)])
    # B's head h is A's head order[h], its dims within reordered.
    key_b = np.stack([key[order[h]][:, key_orders[h]] for h in range(heads)])
    value_b = np.stack([value[order[h]][:, value_orders[h]] for h in range(heads)])
    found, key_dims, value_dims, costs = matching.match_heads(key, value, key_b, value_b)
    inverse = np.argsort(order)
    np.testing.assert_array_equal(found, inverse)
    for h in range(heads):
        np.testing.assert_array_equal(key_b[found[h]][:, key_dims[h]], key[h])
        np.testing.assert_array_equal(value_b[found[h]][:, value_dims[h]], value[h])
    # A matched pair's cost is −aᵀb of its matched columns: −‖a‖² for a copy.
    np.testing.assert_allclose(costs, -(np.sum(key ** 2, axis=(1, 2)) + np.sum(value ** 2, axis=(1, 2))))


def test_unsupported_attention_gets_clear_errors(images):
    def build(call):
        x = inputs = keras.Input((16, WIDTH), name="sequence")
        h = keras.layers.Dense(WIDTH, name="project")(x)
        h = call(h)
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling1D()(h)))

    sequences = images.reshape(-1, 16, 49)[..., :WIDTH]
    cases = [
        (lambda h: keras.layers.Add()([h, keras.layers.MultiHeadAttention(2, 8)(
            h, keras.layers.Dense(WIDTH)(h), key=keras.layers.Dense(WIDTH)(h))]), "key other than its value"),
        (lambda h: keras.layers.Add()([h, keras.layers.MultiHeadAttention(2, 8)(
            h, h, attention_mask=keras.layers.Dense(16)(h))]), "mask computed from a layer"),
        (lambda h: keras.layers.MultiHeadAttention(2, 8)(h, h), "not inside a residual block"),
    ]
    for call, message in cases:
        with pytest.raises(tf_mtz.ZipError, match=message):
            tf_mtz.zip_models({"a": build(call), "b": build(call)}, sequences, verbose=0)


def masked_encoder(name="masked", seed=0, mask="padding"):
    """Post-LN encoder blocks over token ids with 0 as padding: the attention mask keeps padded keys out
    (`mask="padding"`, computed from the ids with keras.ops), or each position sees only those before it
    (`"causal"`), or the mask is a model input of its own (`"input"`), or there is none (`"none"`)."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    inputs = tokens
    if mask == "input":
        padding = keras.Input((12,), dtype="bool", name="padding_mask")
        inputs = [tokens, padding]
    else:
        padding = keras.ops.not_equal(tokens, 0)
    attention_mask = keras.ops.expand_dims(padding, axis=1)  # (batch, 1, keys): every query alike
    h = keras.layers.Embedding(50, WIDTH, name="embed")(tokens)
    options = ({"use_causal_mask": True} if mask == "causal" else {} if mask == "none"
               else {"attention_mask": attention_mask})
    for block in range(2):
        h = encoder_block(h, f"block{block}", post_norm=True, ff_width=24, **options)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return randomize_weights(keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name=name), seed)


def _padded_tokens(count=96, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, (count, 12)).astype("int32")
    lengths = rng.integers(3, 13, count)
    ids[np.arange(12)[None, :] >= lengths[:, None]] = 0
    return ids


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("mask", ["padding", "causal", "input"])
def test_masked_attention_zips_with_its_mask(mask, sharing):
    model = masked_encoder(mask=mask)
    ids = _padded_tokens()
    x = [ids, ids != 0] if mask == "input" else ids
    expected = model.predict(x, verbose=0)
    # The mask matters: the same ids with the padding attended to give other outputs.
    unmasked = masked_encoder(mask="none" if mask != "causal" else "padding")
    unmasked.set_weights(model.get_weights())
    assert relative_error(unmasked.predict(ids, verbose=0), expected) > 1e-3
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    operators = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in operators)
    feed = {"tokens": ids[:8]} if mask != "input" else {"tokens": ids[:8], "padding_mask": ids[:8] != 0}
    lite = interpreter.get_signature_runner("serving_default")(**feed)
    for task in ("a", "b"):
        np.testing.assert_allclose(lite[task], outputs[task][:8], atol=1e-5)


def encoder_decoder(name="seq2seq", seed=0, causal=True):
    """An encoder (a self-attention block over token embeddings) and a decoder reading the same ids through
    an embedding of its own: causal self-attention, then cross-attention to the encoder's output, post-LN."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    memory = encoder_block(keras.layers.Embedding(50, WIDTH, name="enc_embed")(tokens), "enc", post_norm=True,
                           ff_width=24)
    h = keras.layers.Embedding(50, WIDTH, name="dec_embed")(tokens)
    a = keras.layers.MultiHeadAttention(HEADS, WIDTH // HEADS, name="dec_self")(h, h, use_causal_mask=causal)
    h = keras.layers.LayerNormalization(name="dec_ln1")(keras.layers.Add()([h, a]))
    c = keras.layers.MultiHeadAttention(HEADS, WIDTH // HEADS, name="dec_cross")(h, memory)
    h = keras.layers.LayerNormalization(name="dec_ln2")(keras.layers.Add()([h, c]))
    f = keras.layers.Dense(24, activation="gelu", name="dec_ff1")(h)
    h = keras.layers.LayerNormalization(name="dec_ln3")(keras.layers.Add()([h, keras.layers.Dense(WIDTH, name="dec_ff2")(f)]))
    return randomize_weights(keras.Model(tokens, keras.layers.Dense(3, name="head")(h), name=name), seed)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_cross_attention_zips_with_its_memory(tokens, sharing):
    model = encoder_decoder()
    expected = model.predict(tokens, verbose=0)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tokens, sharing=sharing, verbose=0)
    outputs = zipped.predict(tokens, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    cross = zipped.get_layer("dec_cross_shared")
    assert cross.count_params() == model.get_layer("dec_cross").count_params()
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    lite = interpreter.get_signature_runner("serving_default")(tokens=tokens[:8])
    for task in ("a", "b"):
        np.testing.assert_allclose(lite[task], outputs[task][:8], atol=1e-5)


def test_cross_attention_of_two_trained_models_and_its_errors(tokens):
    models = {"a": encoder_decoder("a", seed=0), "b": encoder_decoder("b", seed=3)}
    zipped = tf_mtz.zip_models(models, tokens, verbose=0)
    assert all(np.isfinite(v).all() for v in zipped.predict(tokens, verbose=0).values())
    with pytest.raises(tf_mtz.ZipError, match="memory it attends to"):
        tf_mtz.zip_models(models, tokens, sharing={"dec_embed": 16, "dec_self": 16, "dec_cross": 16}, verbose=0)


def test_auto_sharing_searches_attention_layers(tokens):
    """AutoSharing on a transformer: attention layers follow the residual stream (shared whole or not at
    all), a feed-forward layer writing into a shared stream keeps some shared units (it may not choose none:
    the stream's shared units need shared inputs), and the zip at its choice is what it judged."""
    models = {"a": bert("a", seed=0), "b": bert("b", seed=1)}
    zipped = tf_mtz.zip_models(models, tokens[:64], sharing=tf_mtz.AutoSharing(tolerance=1.0, data=tokens[64:]),
                               verbose=0)
    shared = {layer.name: layer.shared for layer in zipped.zip_report.layers}
    assert shared["embed"] == 16 and shared["block0_mha"] == shared["block1_mha"] == 16
    assert shared["block1_ff1"] >= 1
    record = {r["layer"]: r for r in zipped.zip_report.auto_sharing}
    plain = tf_mtz.zip_models(models, tokens[:64], sharing={k: r["chosen"] for k, r in record.items()}, verbose=0)
    got, want = zipped.predict(tokens[64:], verbose=0), plain.predict(tokens[64:], verbose=0)
    for task in models:
        np.testing.assert_allclose(got[task], want[task], rtol=1e-5, atol=1e-5)
