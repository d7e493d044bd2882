"""Every public entry point on every model kind tf_mtz accepts or produces: Sequential and Functional,
built in the process or loaded from .keras/.h5, one or several inputs and outputs, nested; subclassed and
unbuilt models get a clear error."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import tf_mtz

FEATURES = 12


def sequential(seed, classes=4, name=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((FEATURES,), name="features"),
                             keras.layers.Dense(40, activation="relu", name="fc1"),
                             keras.layers.Dense(classes, activation="softmax", name="head")], name=name)


def functional(seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((FEATURES,), name="features")
    h = keras.layers.Dense(40, activation="relu", name="fc1")(x)
    return keras.Model(x, keras.layers.Dense(4, activation="softmax", name="head")(h), name=f"functional{seed}")


def list_outputs():
    keras.utils.set_random_seed(2)
    x = keras.Input((FEATURES,), name="features")
    h = keras.layers.Dense(40, activation="relu", name="trunk")(x)
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(h)
    box = keras.layers.Dense(4, name="box")(h)
    return keras.Model(x, [classes, box], name="detector")


def dict_outputs():
    keras.utils.set_random_seed(3)
    x = keras.Input((FEATURES,), name="features")
    h = keras.layers.Dense(40, activation="relu", name="trunk")(x)
    return keras.Model(x, {"score": keras.layers.Dense(1, activation="sigmoid", name="score")(h),
                           "value": keras.layers.Dense(2, name="value")(h)}, name="dict_outputs")


def two_inputs():
    keras.utils.set_random_seed(4)
    a, b = keras.Input((FEATURES,), name="left"), keras.Input((5,), name="right")
    h = keras.layers.Concatenate(name="join")([keras.layers.Dense(30, activation="relu", name="fa")(a),
                                               keras.layers.Dense(10, activation="relu", name="fb")(b)])
    return keras.Model([a, b], keras.layers.Dense(3, name="out")(h), name="two_inputs")


def nested(loaded_inner):
    x = keras.Input((FEATURES,), name="features")
    h = keras.layers.Dense(FEATURES, activation="tanh", name="pre")(x)
    return keras.Model(x, loaded_inner(h), name="nested")


def reload(model, tmp_path, suffix):
    path = str(tmp_path / f"{model.name}{suffix}")
    model.save(path)
    return keras.models.load_model(path)


def data(model, n=64):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(n,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]


def named(model, xs):
    """The model's outputs by the names the export gives them, computed by Keras itself."""
    out = model(xs if len(xs) > 1 else xs[0], training=False)
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return {name: np.asarray(v) for name, v in zip(model.output_names, out)}
    return {"output": np.asarray(out)}


KINDS = {
    "sequential": lambda tmp: sequential(0, name="seq"),
    "sequential.keras": lambda tmp: reload(sequential(0, name="seq"), tmp, ".keras"),
    "sequential.h5": lambda tmp: reload(sequential(0, name="seq"), tmp, ".h5"),
    "functional.keras": lambda tmp: reload(functional(1), tmp, ".keras"),
    "functional.h5": lambda tmp: reload(functional(1), tmp, ".h5"),
    "list_outputs.keras": lambda tmp: reload(list_outputs(), tmp, ".keras"),
    "dict_outputs.keras": lambda tmp: reload(dict_outputs(), tmp, ".keras"),
    "two_inputs.keras": lambda tmp: reload(two_inputs(), tmp, ".keras"),
    "nested_sequential.keras": lambda tmp: nested(reload(sequential(5, classes=FEATURES, name="inner"), tmp,
                                                         ".keras")),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_exports_to_tflite_and_saved_model(kind, tmp_path):
    model = KINDS[kind](tmp_path)
    xs = data(model)
    expected = named(model, xs)
    names = [t.name for t in model.inputs]
    runner = Interpreter(model_content=tf_mtz.tflite_bytes(model)).get_signature_runner("serving_default")
    lite = runner(**dict(zip(names, xs)))
    assert set(lite) == set(expected)
    for key in expected:
        np.testing.assert_allclose(lite[key], expected[key], atol=1e-5)
    loaded = tf.saved_model.load(tf_mtz.export_saved_model(model, str(tmp_path / "saved" / "1")))
    served = loaded.signatures["serving_default"](**{n: tf.constant(x) for n, x in zip(names, xs)})
    for key in expected:
        np.testing.assert_allclose(served[key].numpy(), expected[key], atol=1e-5)
    if len(expected) > 1:  # one signature per output, each computing only its own
        for key in expected:
            alone = loaded.signatures[key](**{n: tf.constant(x) for n, x in zip(names, xs)})
            assert set(alone) == {key}


@pytest.mark.parametrize("kind", ["sequential.keras", "sequential.h5", "list_outputs.keras", "two_inputs.keras"])
@pytest.mark.parametrize("quantization,atol", [("dynamic", 0.05), ("float16", 1e-2), ("int8", 0.15)])
def test_every_quantization_on_loaded_models(kind, quantization, atol, tmp_path):
    model = KINDS[kind](tmp_path)
    xs = data(model, 200)
    expected = named(model, xs)
    path = str(tmp_path / "q.tflite")
    representative = xs if len(xs) > 1 else xs[0]
    assert tf_mtz.export_tflite(model, path, quantization=quantization, representative_data=representative) > 0
    interpreter = Interpreter(model_path=path)
    lite = interpreter.get_signature_runner("serving_default")(**dict(zip([t.name for t in model.inputs], xs)))
    for key in expected:
        np.testing.assert_allclose(lite[key], expected[key], atol=atol)
    if quantization == "int8":
        assert np.int8 in {d["dtype"] for d in interpreter.get_tensor_details()}


def test_int8_representative_data_must_fit_every_input(tmp_path):
    model = two_inputs()
    left, right = data(model)
    with pytest.raises(ValueError, match=r"takes 2 inputs \['left', 'right'\]"):
        tf_mtz.tflite_bytes(model, "int8", representative_data=left)
    with pytest.raises(ValueError, match=r"no array for input\(s\) \['right'\]"):
        tf_mtz.tflite_bytes(model, "int8", representative_data={"left": left})
    with pytest.raises(ValueError, match="input 'right' takes \\(5,\\)"):
        tf_mtz.tflite_bytes(model, "int8", representative_data=[left, left])


def test_zipped_model_loaded_from_keras_file_exports(tmp_path):
    loaded = {t: reload(sequential(seed, name=f"m{seed}"), tmp_path, ".keras") for t, seed in (("a", 0), ("b", 1))}
    x = data(loaded["a"], 128)[0]
    zipped = tf_mtz.zip_models(loaded, x, sharing=0.75, verbose=0)
    restored = reload(zipped, tmp_path, ".keras")
    expected = named(zipped, [x])
    lite = Interpreter(model_content=tf_mtz.tflite_bytes(restored))
    for task in ("a", "b"):
        np.testing.assert_allclose(lite.get_signature_runner(task)(features=x)[task], expected[task], atol=1e-5)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = keras.layers.Dense(3)

    def call(self, inputs):
        return self.dense(inputs)


def unbuilt():
    return keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(3)], name="unbuilt")


def subclassed():
    model = Subclassed()
    model(np.zeros((1, FEATURES), "float32"))
    return model


ENTRY_POINTS = {
    "export_tflite": lambda m, tmp: tf_mtz.export_tflite(m, str(tmp / "m.tflite")),
    "tflite_bytes": lambda m, tmp: tf_mtz.tflite_bytes(m),
    "export_saved_model": lambda m, tmp: tf_mtz.export_saved_model(m, str(tmp / "saved")),
    "to_tf_keras": lambda m, tmp: tf_mtz.to_tf_keras(m),
    "fine_tune": lambda m, tmp: tf_mtz.fine_tune(m, tf_mtz.Retrain(data=np.zeros((8, FEATURES), "float32")), 1,
                                                 teachers={}),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("make,message", [(subclassed, r"'subclassed' is a subclassed keras.Model"),
                                          (unbuilt, r"'unbuilt' is not built")])
def test_subclassed_and_unbuilt_models_get_a_clear_error(entry, make, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](make(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_to_tf_keras_on_loaded_sequential(tmp_path):
    model = reload(sequential(0, name="seq"), tmp_path, ".keras")
    x = data(model)[0]
    legacy = tf_mtz.to_tf_keras(model)
    np.testing.assert_allclose(legacy.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_loaded_sequential_models_zip_and_fine_tune_against_loaded_teachers(tmp_path):
    loaded = {t: reload(sequential(seed, name=f"m{seed}"), tmp_path, suffix)
              for t, seed, suffix in (("a", 0, ".keras"), ("b", 1, ".h5"))}
    x = data(loaded["a"], 256)[0]
    retrain = tf_mtz.Retrain(data=x, steps_per_layer=5, batch_size=32)
    zipped = tf_mtz.zip_models(loaded, x, sharing=1.0, retrain=retrain, verbose=0)
    assert zipped.zip_report.layers[0].shared == 40

    def distillation_gap(model):
        out = model.predict(x, verbose=0)
        return sum(float(np.mean((out[t] - loaded[t].predict(x, verbose=0)) ** 2)) for t in loaded)

    before = distillation_gap(zipped)
    tf_mtz.fine_tune(zipped, tf_mtz.Retrain(data=x, batch_size=32, learning_rate=1e-3), 60, teachers=loaded,
                     verbose=0)
    assert distillation_gap(zipped) < before
