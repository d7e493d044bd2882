"""Models as users really have them (issue 21): layers shared within one model (weight tying), frozen layers,
mixed-precision policies (global or per layer), models loaded from `.keras` and legacy `.h5` files.

Each kind is zipped with a unit-permuted copy of itself (`tf_mtz.testing.permuted_copy`), so the zipped model
must reproduce the original's outputs; it must then save and load with `keras.models.load_model` and export
with `tf_mtz.tflite_bytes` (LiteRT outputs equal to Keras'). A kind tf_mtz cannot zip must get a
`tf_mtz.ZipError` naming the layer and the model.

What the zipped model does with frozen layers: every layer with weights is trainable. A zipped layer holds
merged weights, not the pretrained ones the user froze; retraining (`Retrain`, `fine_tune`) has to move
them to win back accuracy; and a trunk layer shared by a frozen and a trainable model has no single right
flag. The originals keep their flags and weights; the user freezes what they want in the zipped model.
"""

import contextlib

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from conftest import mlp, relative_error, small_cnn

# float16 has a 2^-11 relative rounding step and bfloat16 2^-8: the originals themselves compute at that
# precision, so a zipped copy agrees with them to a few rounding steps.
TOLERANCE = {"float32": 1e-4, "mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}


def _data(model, n=128, seed=0):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype("float32")


def _outputs(model, x):
    out = model.predict(x, verbose=0)
    if isinstance(out, dict):
        return {k: np.asarray(v, np.float32) for k, v in out.items()}
    return np.asarray(out, np.float32)


def _zip_with_permuted_copy(model, x, tmp_path, tolerance=1e-4):
    """Zips `model` with a unit-permuted copy, checks both heads reproduce `model`, and that the zipped
    model saves and loads unchanged; returns the zipped model."""
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
    expected = _outputs(model, x)
    out = _outputs(zipped, x)
    for task in ("a", "b"):
        assert relative_error(out[task], expected) < tolerance, task
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    again = _outputs(keras.models.load_model(path), x)
    for task in ("a", "b"):
        np.testing.assert_array_equal(again[task], out[task])
    return zipped


def _check_tflite(zipped, x, atol=1e-5):
    runner = Interpreter(model_content=tf_mtz.tflite_bytes(zipped)).get_signature_runner("serving_default")
    lite = runner(**{zipped.inputs[0].name: x[:16]})
    expected = _outputs(zipped, x[:16])
    assert set(lite) == set(expected)
    for task in expected:
        np.testing.assert_allclose(lite[task], expected[task], atol=atol)


@contextlib.contextmanager
def _global_policy(name):
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def restore_policy():
    """Whatever a test does to the global dtype policy, the next test starts in float32."""
    yield
    keras.mixed_precision.set_dtype_policy("float32")


# --- weight tying -------------------------------------------------------------------------------------


def _tied_dense(name, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((20,), name="features")
    tied = keras.layers.Dense(20, activation="relu", name="tied")
    return keras.Model(x, keras.layers.Dense(5, activation="softmax", name="head")(tied(tied(x))), name=name)


def _tied_conv(name, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 12, 4), name="image")
    tied = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="tied")
    h = keras.layers.Add(name="add")([tied(x), tied(tied(x))])
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(5, name="head")(h), name=name)


def _tied_submodel(name, seed):
    """A Siamese-style encoder: one inner model called twice."""
    keras.utils.set_random_seed(seed)
    inner_input = keras.Input((20,))
    encoder = keras.Model(inner_input, keras.layers.Dense(20, activation="relu", name="tied")(inner_input),
                          name="encoder")
    x = keras.Input((20,), name="features")
    return keras.Model(x, keras.layers.Dense(5, name="head")(encoder(encoder(x))), name=name)


@pytest.mark.parametrize("build", [_tied_dense, _tied_conv, _tied_submodel])
def test_weight_tying_is_refused_naming_the_layer_and_model(build):
    models = {"a": build("tied_a", 0), "b": build("tied_b", 1)}
    x = _data(models["a"], 32)
    with pytest.raises(tf_mtz.ZipError, match=r"Layer 'tied' of model 'tied_a' \(task 'a'\) is called more than "
                                              r"once.*use separate layers"):
        tf_mtz.zip_models(models, x, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="Layer 'tied' .* is called more than once"):
        tf_mtz.testing.permuted_copy(models["a"])


# --- frozen layers ------------------------------------------------------------------------------------


def _frozen_mlp():
    model = mlp("frozen_mlp")
    model.trainable = False
    return model


def _partly_frozen_cnn():
    model = small_cnn("partly_frozen_cnn")
    for name in ("conv1", "fc"):
        model.get_layer(name).trainable = False
    return model


@pytest.mark.parametrize("build", [_frozen_mlp, _partly_frozen_cnn])
def test_frozen_layers_zip_into_a_trainable_network(build, tmp_path):
    model = build()
    flags = {layer.name: layer.trainable for layer in model.layers}
    weights = [w.copy() for w in model.get_weights()]
    x = _data(model)
    zipped = _zip_with_permuted_copy(model, x, tmp_path)
    weighted = [layer for layer in zipped.layers if layer.weights]
    assert weighted and all(layer.trainable for layer in weighted)
    assert zipped.non_trainable_weights == [] and len(zipped.trainable_weights) == len(zipped.weights)
    _check_tflite(zipped, x)
    # Retraining moves the zipped weights, frozen in the originals or not, and leaves the originals alone.
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    retrained = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0,
                                  retrain=tf_mtz.Retrain(steps_per_layer=0, final_steps=3, batch_size=32))
    assert any(not np.array_equal(p, q) for p, q in zip(zipped.get_weights(), retrained.get_weights()))
    assert {layer.name: layer.trainable for layer in model.layers} == flags
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_frozen_model_loaded_from_h5_zips(tmp_path):
    path = str(tmp_path / "frozen.h5")
    _frozen_mlp().save(path)
    loaded = keras.models.load_model(path)
    zipped = _zip_with_permuted_copy(loaded, _data(loaded), tmp_path)
    assert all(layer.trainable for layer in zipped.layers if layer.weights)


# --- mixed precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("build", [mlp, small_cnn])
def test_a_global_mixed_precision_policy_is_kept(policy, build, tmp_path, restore_policy):
    with _global_policy(policy):
        model = build("mixed")
    x = _data(model)
    zipped = _zip_with_permuted_copy(model, x, tmp_path, TOLERANCE[policy])
    weighted = [layer for layer in zipped.layers if layer.weights]
    assert {layer.dtype_policy.name for layer in weighted} == {policy}
    assert all(v.dtype == "float32" for v in zipped.weights)  # mixed precision keeps float32 variables
    # The statistics are gathered in float32: the zip of two different models is the float32 zip's.
    with _global_policy(policy):
        mixed = {"a": build("a", seed=0), "b": build("b", seed=1)}
    plain = {"a": build("a", seed=0), "b": build("b", seed=1)}
    for a, b in zip(tf_mtz.zip_models(mixed, x, verbose=0).get_weights(),
                    tf_mtz.zip_models(plain, x, verbose=0).get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _per_layer_policies():
    keras.utils.set_random_seed(0)
    x = keras.Input((20,), name="features")
    h = keras.layers.Dense(24, activation="relu", name="fc1", dtype="mixed_float16")(x)
    h = keras.layers.Dense(16, activation="relu", name="fc2", dtype="mixed_bfloat16")(h)
    return keras.Model(x, keras.layers.Dense(5, activation="softmax", name="head", dtype="float32")(h),
                       name="per_layer")


def test_per_layer_dtype_policies_are_kept(tmp_path):
    model = _per_layer_policies()
    zipped = _zip_with_permuted_copy(model, _data(model), tmp_path, TOLERANCE["mixed_bfloat16"])
    policies = {layer.name: layer.dtype_policy.name for layer in zipped.layers}
    assert policies["fc1_shared"] == "mixed_float16" and policies["fc2_shared"] == "mixed_bfloat16"
    assert policies["a_head"] == policies["b_head"] == "float32"


def test_models_under_different_policies_zip(restore_policy):
    """A float32 model and a mixed_float16 one: both tasks are reproduced at float16 precision, and each
    head keeps its model's policy (the shared trunk currently takes the first model's policy)."""
    a = mlp("a32")
    with _global_policy("mixed_float16"):
        b = mlp("b16")
    b.set_weights(a.get_weights())
    b = tf_mtz.testing.permuted_copy(b, seed=1)
    x = _data(a)
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    out = _outputs(zipped, x)
    expected = _outputs(a, x)
    for task in ("a", "b"):
        assert relative_error(out[task], expected) < TOLERANCE["mixed_float16"], task
    assert zipped.get_layer("a_head").dtype_policy.name == "float32"
    assert zipped.get_layer("b_head").dtype_policy.name == "mixed_float16"


def _global(policy):
    def build():
        with _global_policy(policy):
            return mlp("mixed")
    return build


@pytest.mark.parametrize("build", [_global("mixed_float16"), _global("mixed_bfloat16"), _per_layer_policies],
                         ids=["mixed_float16", "mixed_bfloat16", "per_layer"])
def test_mixed_precision_models_export_to_tflite(build, restore_policy):
    """LiteRT has no float16 MatMul or Conv2D kernels: the export converts a float32 copy (exact, as the
    variables are float32 already)."""
    model = build()
    x = _data(model)
    zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=1)}, x, verbose=0)
    _check_tflite(zipped, x, atol=1e-2)


# --- models loaded from files -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("build", [mlp, small_cnn])
def test_models_loaded_from_files_zip(build, suffix, tmp_path):
    path = str(tmp_path / f"model{suffix}")
    build("saved").save(path)
    loaded = keras.models.load_model(path)
    x = _data(loaded)
    zipped = _zip_with_permuted_copy(loaded, x, tmp_path)
    _check_tflite(zipped, x)
