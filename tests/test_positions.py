"""Position embeddings and class tokens of transformers (custom layers, registered through the registry):
their tables follow the stream's units, and the zipped model computes them with standard layers."""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from tests.test_attention import WIDTH, encoder_block
from conftest import randomize_weights, relative_error


class AddedPositions(keras.layers.Layer):
    """y = x + P, P one learnt vector per position (a ViT's position embedding)."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), initializer="random_normal", name="table")

    def call(self, x):
        return x + self.table


class PositionTableOnly(keras.layers.Layer):
    """Returns P broadcast to x's shape, P cut from a longer table (as keras-hub's PositionEmbedding)."""

    def __init__(self, length, **kwargs):
        super().__init__(**kwargs)
        self.length = length

    def build(self, input_shape):
        self.position_embeddings = self.add_weight(shape=(self.length, input_shape[-1]), name="position_embeddings")

    def call(self, x):
        return keras.ops.broadcast_to(self.position_embeddings[: x.shape[1]], keras.ops.shape(x))


class ClassToken(keras.layers.Layer):
    """[c; x]: a learnt vector put before the sequence."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal", name="token")

    def call(self, x):
        token = keras.ops.broadcast_to(self.token, (keras.ops.shape(x)[0], 1, x.shape[-1]))
        return keras.ops.concatenate([token, x], axis=1)


@pytest.fixture(autouse=True)
def handlers():
    tf_mtz.register_layer_handler(AddedPositions, tf_mtz.PositionEmbeddingHandler("table"))
    tf_mtz.register_layer_handler(PositionTableOnly, tf_mtz.PositionEmbeddingHandler(adds_input=False))
    tf_mtz.register_layer_handler(ClassToken, tf_mtz.ClassTokenHandler("token"))
    yield
    for layer_class in (AddedPositions, PositionTableOnly, ClassToken):
        tf_mtz.unregister_layer_handler(layer_class)


def vit(name="vit", seed=0, readout="token"):
    """ViT-style: 7x7 patches, a class token, position embeddings, two pre-LN blocks, the class token's
    final state (or the mean over positions) read out."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Reshape((16, WIDTH))(keras.layers.Conv2D(WIDTH, 7, strides=7, name="patches")(x))
    h = AddedPositions(name="positions")(ClassToken(name="class_token")(h))
    for block in range(2):
        h = encoder_block(h, f"block{block}", post_norm=False, ff_width=32)
    h = keras.layers.LayerNormalization(name="final_ln")(h)
    h = h[:, 0] if readout == "token" else keras.layers.GlobalAveragePooling1D()(h)
    return randomize_weights(keras.Model(inputs, keras.layers.Dense(5, name="head")(h), name=name), seed)


def bert(name="bert", seed=0):
    """BERT-style: token embedding plus position embedding (a table longer than the sequence), post-LN blocks
    whose attention skips the padding (token 0)."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12,), dtype="int32", name="tokens")
    padding = keras.ops.expand_dims(keras.ops.not_equal(x, 0), axis=1)
    h = keras.layers.Embedding(50, WIDTH, name="embed")(x)
    h = keras.layers.Add(name="embed_sum")([h, PositionTableOnly(20, name="positions")(h)])
    h = keras.layers.LayerNormalization(name="embed_ln")(h)
    for block in range(2):
        h = encoder_block(h, f"block{block}", post_norm=True, ff_width=24, attention_mask=padding)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return randomize_weights(keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name=name), seed)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(96, 28, 28, 1)).astype("float32")


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, (96, 12)).astype("int32")
    ids[np.arange(12)[None, :] >= rng.integers(3, 13, 96)[:, None]] = 0  # padded after each sequence
    return ids


def _custom_layers(model) -> set:
    return {type(layer).__name__ for layer in model.layers if not type(layer).__module__.startswith("keras")}


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("architecture", ["vit", "bert"])
def test_permuted_copy_gives_back_the_outputs(images, tokens, architecture, sharing):
    model, x = (vit(), images) if architecture == "vit" else (bert(), tokens)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    expected = model.predict(x, verbose=0)
    assert relative_error(copy.predict(x, verbose=0), expected) < 1e-5
    table = model.get_layer("positions").get_weights()[0]
    assert not np.allclose(table, copy.get_layer("positions").get_weights()[0])  # its columns were permuted
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4
    assert not _custom_layers(zipped)  # standard layers only: the tables are Embeddings of the positions
    shared_table = zipped.get_layer("positions_shared_table").get_weights()[0]
    assert shared_table.shape == ((17, WIDTH) if architecture == "vit" else (12, WIDTH))


def test_zipped_tables_are_the_average_of_the_matched_columns(images):
    models = {"a": vit("a", seed=0), "b": vit("b", seed=3)}
    zipped = tf_mtz.zip_models(models, images, verbose=0)
    report = {layer.name: layer for layer in zipped.zip_report.layers}
    assert report["patches"].shared == WIDTH
    table = zipped.get_layer("positions_shared_table").get_weights()[0]
    token = zipped.get_layer("class_token_shared_table").get_weights()[0]
    # Shared unit i merges unit shared_units[t][i] of every task: the tables average those columns.
    units = report["patches"].shared_units
    tables = {t: m.get_layer("positions").get_weights()[0][:, units[t]] for t, m in models.items()}
    np.testing.assert_allclose(table, (tables["a"] + tables["b"]) / 2, atol=1e-6)
    tokens = {t: m.get_layer("class_token").get_weights()[0].reshape(-1)[units[t]] for t, m in models.items()}
    np.testing.assert_allclose(token[0], (tokens["a"] + tokens["b"]) / 2, atol=1e-6)
    np.testing.assert_array_equal(token[1:], 0)  # only the class token's own row is set


def test_tflite_save_and_reload(images, tokens, tmp_path):
    for model, x, name in ((vit(), images, "image"), (bert(), tokens, "tokens")):
        zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=2)}, x,
                                   sharing=0.5, verbose=0)
        outputs = zipped.predict(x[:8], verbose=0)
        interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
        operators = {op["op_name"] for op in interpreter._get_ops_details()}
        assert not any(op.startswith("Flex") or op == "CUSTOM" for op in operators)
        lite = interpreter.get_signature_runner("serving_default")(**{name: x[:8]})
        for task in ("a", "b"):
            np.testing.assert_allclose(lite[task], outputs[task], atol=1e-5)
        path = str(tmp_path / f"{name}.keras")
        zipped.save(path)
        again = keras.models.load_model(path).predict(x[:8], verbose=0)
        for task in ("a", "b"):
            np.testing.assert_array_equal(again[task], outputs[task])


def test_retrained_tables_reach_the_result(images):
    models = {"a": vit("a", seed=0), "b": vit("b", seed=3)}
    plain = tf_mtz.zip_models(models, images, verbose=0)
    retrained = tf_mtz.zip_models(models, images, verbose=0,
                                  retrain=tf_mtz.Retrain(data=images, steps_per_layer=0, final_steps=10))
    before = plain.get_layer("positions_shared_table").get_weights()[0]
    after = retrained.get_layer("positions_shared_table").get_weights()[0]
    assert not np.allclose(before, after)


def test_class_token_readout_and_bad_tables_get_clear_errors(images):
    sequences = images.reshape(-1, 16, 49)[..., :WIDTH]

    def build(table_length=None, readout=lambda h: h[:, 0], positions=16):
        x = inputs = keras.Input((positions, WIDTH), name="sequence")
        h = keras.layers.Dense(WIDTH, name="project")(x)
        if table_length is not None:
            h = keras.layers.Add()([h, PositionTableOnly(table_length, name="positions")(h)])
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(readout(h)))

    with pytest.raises(tf_mtz.ZipError, match="'positions'.*sequences of a fixed length"):
        tf_mtz.zip_models({"a": build(20, positions=None), "b": build(20, positions=None)}, sequences, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="cannot apply unit by unit"):
        tf_mtz.zip_models({"a": build(readout=lambda h: h[..., 0:2]), "b": build(readout=lambda h: h[..., 0:2])},
                          sequences, verbose=0)
    zipped = tf_mtz.zip_models({"a": build(), "b": build()}, sequences, verbose=0)  # h[:, 0] picks a position
    assert zipped.predict(sequences[:4], verbose=0)["a"].shape == (4, 2)


def test_int8_export_of_a_zipped_transformer(images):
    model = vit()
    zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=1)}, images, verbose=0)
    expected = zipped.predict(images[:16], verbose=0)
    interpreter = Interpreter(model_content=tf_mtz.tflite_bytes(zipped, quantization="int8",
                                                               representative_data=images))
    int8_tensors = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8]
    assert len(int8_tensors) > 20  # the projections, the attention's matmuls and the tables are quantized
    lite = interpreter.get_signature_runner("serving_default")(image=images[:16])
    for task in ("a", "b"):
        assert relative_error(lite[task], expected[task]) < 0.25  # int8 rounding, not a wrong graph
