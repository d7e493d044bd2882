"""Bad input gets a ValueError (tf_mtz.ZipError) that names the model, layer or task at fault."""

import re

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import mlp, small_cnn


@pytest.fixture
def pair():
    return mlp("model_a", seed=0), mlp("model_b", seed=1)


@pytest.fixture
def x(rng):
    return rng.normal(size=(100, 20)).astype("float32")


def zip_raises(match, models, data, **kwargs):
    with pytest.raises(ValueError, match=match):
        tf_mtz.zip_models(models, data, verbose=0, **kwargs)


def test_different_depths_zip_their_common_prefix(pair, x):
    deeper = mlp("deeper", widths=(24, 16, 8))
    y = np.argmax(pair[0].predict(x, verbose=0), axis=-1)
    zipped = tf_mtz.zip_models({"a": pair[0], "b": deeper}, x, evaluation_data={"a": (x, y), "b": (x, y)}, verbose=0)
    assert zipped.zip_report.prefix["branches"] == {"a": ["head"], "b": ["fc3", "head"]}
    assert zipped.zip_report.accuracy_original["a"] == 1.0  # its own predictions are the labels
    assert set(zipped.zip_report.accuracy_final) == {"a", "b"}
    assert "output layers of model 'model_a'" in zipped.zip_report.prefix["stopped"]


def test_different_layer_types_at_same_position(pair, x):
    inp = keras.Input((20,))
    h = keras.layers.Dense(24, activation="relu", name="fc1")(inp)
    h = keras.layers.Dropout(0.1, name="odd_dropout")(h)
    h = keras.layers.Dense(16, activation="relu", name="fc2")(h)
    out = keras.layers.Dense(5, activation="softmax")(h)
    other = keras.Model(inp, out, name="with_dropout")
    zipped = tf_mtz.zip_models({"a": pair[0], "b": other}, x, verbose=0)
    assert re.search(r"'fc2' \(Dense\) in model 'model_a' but 'odd_dropout' \(Dropout\) in model 'with_dropout'",
                     zipped.zip_report.prefix["stopped"])
    assert zipped.zip_report.prefix["prefix_layers"] == ["fc1"]


def test_different_input_shapes(pair, x):
    other = mlp("wide_input", inputs=30)
    zip_raises(r"'wide_input'.*\(30,\).*'model_a'.*\(20,\)", {"a": pair[0], "b": other}, x)


def test_unsupported_layer_named_with_how_to_register(pair, x):
    inp = keras.Input((20,))
    h = keras.layers.Dense(24, name="fc1")(inp)
    h = keras.layers.UnitNormalization(name="norm")(h)
    h = keras.layers.Dense(16, name="fc2")(h)
    out = keras.layers.Dense(5)(h)
    odd = keras.Model(inp, out, name="odd")
    zip_raises(r"'norm' \(UnitNormalization\) of model 'odd' is not supported.*Dense.*register_layer_handler",
               {"a": odd, "b": pair[1]}, x)


def test_empty_calibration_data(pair):
    zip_raises(r"Calibration data for task 'a' is empty", dict(a=pair[0], b=pair[1]),
               {"a": np.zeros((0, 20), "float32"), "b": np.ones((5, 20), "float32")})


def test_nan_in_calibration_data(pair, x):
    bad = x.copy()
    bad[3, 4] = np.nan
    zip_raises(r"task 'b' contains NaN or Inf", dict(a=pair[0], b=pair[1]), {"a": x, "b": bad})


def test_nan_in_calibration_dataset(pair, x):
    import tensorflow as tf

    bad = x.copy()
    bad[3, 4] = np.inf
    zip_raises(r"task 'a' contains NaN or Inf", dict(a=pair[0], b=pair[1]),
               {"a": tf.data.Dataset.from_tensor_slices(bad), "b": x})


def test_wrong_calibration_shape(pair, rng):
    zip_raises(r"task 'a' has samples of shape \(21,\); the models take \(20,\)", dict(a=pair[0], b=pair[1]),
               rng.normal(size=(10, 21)))


@pytest.mark.parametrize("sharing", [1.5, -0.1, {"fc1": 2.0}])
def test_sharing_outside_unit_interval(pair, x, sharing):
    zip_raises(r"sharing.*must be in \[0, 1\]", dict(a=pair[0], b=pair[1]), x, sharing=sharing)


def test_sharing_unknown_layer_and_head(pair, x):
    zip_raises(r"names layer 'fc9'.*hidden layers: \['fc1', 'fc2'\]", dict(a=pair[0], b=pair[1]), x,
               sharing={"fc9": 1.0})
    zip_raises(r"'head', an output layer", dict(a=pair[0], b=pair[1]), x, sharing={"head": 1.0})
    zip_raises(r"asks for 30 shared units, but the narrowest model has 24", dict(a=pair[0], b=pair[1]), x,
               sharing={"fc1": 30})


def test_bad_task_names_and_model_counts(pair, x):
    zip_raises(r"at least two", {"a": pair[0]}, x)
    zip_raises(r"'not valid' is not a valid identifier", {"not valid": pair[0], "b": pair[1]}, x)
    zip_raises(r"same model object", {"a": pair[0], "b": pair[0]}, x)
    zip_raises(r"no data for task\(s\) \['b'\]", {"a": pair[0], "b": pair[1]}, {"a": x})


def test_subclassed_and_unbuilt_models(pair, x):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.d = keras.layers.Dense(5)

        def call(self, inputs):
            return self.d(inputs)

    zip_raises(r"'sub'.*subclassed.*Functional or Sequential", {"a": pair[0], "b": Sub()}, x)
    unbuilt = keras.Sequential([keras.layers.Dense(24), keras.layers.Dense(16), keras.layers.Dense(5)],
                               name="unbuilt")
    zip_raises(r"'unbuilt'.*not built", {"a": pair[0], "b": unbuilt}, x)


def test_options_validated(pair, x):
    for field, value, message in (("matching", "hungarian", r"matching must be one of"),
                                  ("conv_hessian", "full", r"conv_hessian must be one of"),
                                  ("damping", -1.0, r"damping must be a finite number >= 0"),
                                  ("damping", float("nan"), r"damping must be a finite number >= 0"),
                                  ("pairing", "cosine", r"pairing must be one of"),
                                  ("merge", "max", r"merge must be one of"),
                                  ("refit", "yes", r"refit must be True or False"),
                                  ("batch_size", 0, r"batch_size must be a positive integer"),
                                  ("refit_rows_per_input", 0.5, r"refit_rows_per_input must be a positive")):
        with pytest.raises(ValueError, match=message):
            tf_mtz.ZipConfig(**{field: value})
    zip_raises(r"config must be a tf_mtz.ZipConfig or None, got dict", dict(a=pair[0], b=pair[1]), x,
               config={"matching": "greedy"})
    with pytest.raises(TypeError):
        tf_mtz.zip_models(dict(a=pair[0], b=pair[1]), x, method="paper")  # the old keyword: gone in 0.2
    zip_raises(r"Retrain.loss must be one of", dict(a=pair[0], b=pair[1]), x,
               retrain=tf_mtz.Retrain(loss="mse"))
    zip_raises(r"Retraining data for task 'a' has no labels", dict(a=pair[0], b=pair[1]), x,
               retrain=tf_mtz.Retrain(data=x, loss="labels"))


def _residual_mlp(name, chained):
    inp = keras.Input((20,))
    h1 = keras.layers.Dense(24, name="fc1")(inp)
    h2 = keras.layers.Dense(24, name="fc2")(h1 if chained else inp)
    h = keras.layers.Add(name="merge")([h1, h2])
    return keras.Model(inp, keras.layers.Dense(5, name="head")(h), name=name)


def branchy_copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def test_concatenate_axis_mismatched_wiring_and_activation(pair, x):
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Concatenate(axis=1, name="concat")([keras.layers.Conv2D(3, 3, name="c1")(inp),
                                                         keras.layers.Conv2D(3, 3, name="c2")(inp)])
    out = keras.layers.Dense(5)(keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(h)))
    branchy = keras.Model(inp, out, name="branchy")
    zip_raises(r"Concatenate 'concat' of model 'branchy' joins along axis 1.*last axis",
               {"a": branchy, "b": branchy_copy(branchy)}, np.zeros((4, 6, 6, 2), "float32"))
    wired = tf_mtz.zip_models({"a": _residual_mlp("chained", True), "b": _residual_mlp("side_by_side", False)}, x,
                              verbose=0)
    assert "'fc2' (Dense) in model 'side_by_side', wired to other layers" in wired.zip_report.prefix["stopped"]
    tanh = mlp("tanh_model", activation="tanh")
    zip_raises(r"No layer with units lines up.*'fc1' \(Dense\) in model 'tanh_model', configured differently: "
               r"activation 'relu' vs 'tanh'", {"a": pair[0], "b": tanh}, x)


def test_singular_hessian_from_constant_inputs_gives_finite_model(rng):
    a, b = small_cnn("a", seed=0), small_cnn("b", seed=1)
    x = np.zeros((50, 12, 12, 1), "float32")
    x[:, 4:8, 4:8] = rng.random((50, 4, 4, 1))  # border pixels always zero: singular Hessians
    for damping in (0.0, 1e-2):
        zipped = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig(damping=damping), verbose=0)
        out = zipped.predict(x, verbose=0)
        assert all(np.isfinite(v).all() for v in out.values())
        assert all(np.isfinite(w).all() for w in zipped.get_weights())


def test_different_input_dtypes(pair, x):
    inp = keras.Input((20,), dtype="float16")
    h = keras.layers.Dense(16, name="fc2")(keras.layers.Dense(24, name="fc1")(inp))
    half = keras.Model(inp, keras.layers.Dense(5)(h), name="half")
    zip_raises(r"'half'.*\(20,\) float16.*'model_a'.*float32", {"a": pair[0], "b": half}, x)


def test_models_with_different_input_counts(pair, x):
    a, b = keras.Input((10,)), keras.Input((10,))
    two = keras.Model([a, b], keras.layers.Dense(5)(keras.layers.Concatenate()([a, b])), name="two_inputs")
    zip_raises(r"'two_inputs' \(task 'b'\) takes 2 inputs but model '.*' \(task 'a'\) takes 1; all models must "
               "take the same inputs", {"a": pair[0], "b": two}, x)


def test_little_calibration_data_warns_rank_deficient(pair, rng):
    with pytest.warns(tf_mtz.RankDeficientWarning, match=r"Layer 'fc1'.*\['a', 'b'\].*8 < 21"):
        zipped = tf_mtz.zip_models(dict(a=pair[0], b=pair[1]), rng.normal(size=(8, 20)), verbose=0)
    assert zipped.zip_report.layers[0].rank_deficient == ["a", "b"]
    assert all(np.isfinite(w).all() for w in zipped.get_weights())


def test_retraining_data_missing_a_task(pair, x):
    zip_raises(r"Retraining data has no data for task\(s\) \['b'\]", dict(a=pair[0], b=pair[1]), x,
               retrain=tf_mtz.Retrain(data={"a": x}))


def test_tied_layers_given_different_sharing(x):
    a, b = _residual_mlp("res_a", True), _residual_mlp("res_b", True)
    zip_raises(r"sharing gives different values to layers \['fc1', 'fc2'\].*residual merge ties",
               {"a": a, "b": b}, x, sharing={"fc1": 1.0, "fc2": 0.5})
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing={"fc2": 0.5}, verbose=0)  # one name is enough
    assert [layer.shared for layer in zipped.zip_report.layers] == [12, 12, 0]


def test_layer_normalization_after_concatenate_is_refused(x):
    # (A merge after a Concatenate zips: tests/test_concatenated_merges.py.)
    def model(name):
        inp = keras.Input((20,))
        h1 = keras.layers.Dense(4, name="fc1")(inp)
        h2 = keras.layers.Dense(4, name="fc2")(inp)
        cat = keras.layers.Concatenate(name="cat")([h1, h2])
        h = keras.layers.LayerNormalization(name="norm")(cat)
        return keras.Model(inp, keras.layers.Dense(3, name="head")(h), name=name)

    zip_raises(r"'norm' \(LayerNormalization\) of model 'm1' reads the output of a Concatenate",
               {"a": model("m1"), "b": model("m2")}, x)
