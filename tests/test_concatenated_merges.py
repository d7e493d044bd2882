"""Element-wise merges of Concatenates (NASNet's cells add a layer's units to a Concatenate of two
others'): the coarser input is cut into column blocks, each block tied to the block it meets; a model
zipped with a unit-permuted copy of itself still reproduces its outputs, and its `.tflite` the zipped model."""

import keras
import numpy as np
import pytest

import tf_mtz


def _cell_model(seed=0):
    """`Add(conv_a, Concatenate(conv_b, conv_c))`, `Add` of two alike Concatenates, then a conv tied to the
    merged space by another `Add`, and a BN on a cut space."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 3), name="image")
    stem = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="stem")(x)
    a = keras.layers.Conv2D(8, 1, name="conv_a")(stem)
    a = keras.layers.BatchNormalization(name="bn_a")(a)
    bc = keras.layers.Concatenate(name="concat_bc")([keras.layers.Conv2D(3, 1, name="conv_b")(stem),
                                                      keras.layers.Conv2D(5, 3, padding="same", name="conv_c")(stem)])
    de = keras.layers.Concatenate(name="concat_de")([keras.layers.Conv2D(3, 3, padding="same", name="conv_d")(stem),
                                                      keras.layers.Conv2D(5, 1, name="conv_e")(stem)])
    h = keras.layers.Add(name="add_a_bc")([a, bc])
    h = keras.layers.Add(name="add_de")([h, de])
    h = keras.layers.Activation("relu", name="relu")(h)
    f = keras.layers.Conv2D(8, 3, padding="same", name="conv_f")(h)
    h = keras.layers.Add(name="add_f")([f, h])
    h = keras.layers.BatchNormalization(name="bn_h")(h)
    h = keras.layers.Conv2D(7, 3, strides=2, activation="relu", name="conv_g")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(x, keras.layers.Dense(4, name="head")(h), name="cells")
    return tf_mtz.testing.randomize_batch_norms(model, seed)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_merged_concatenates_zip_with_a_permuted_copy(rng, sharing):
    model = _cell_model()
    copy = tf_mtz.testing.permuted_copy(model, seed=3)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(copy.predict(x, verbose=0), expected, atol=1e-4)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    out = zipped.predict(x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(out[task], expected, atol=1e-4)
    names = {layer.name for layer in zipped.zip_report.layers}
    # conv_a, conv_f (tied to it) are cut where conv_b meets conv_c: 3 + 5 units.
    assert {"conv_a_block0", "conv_a_block1", "conv_f_block0", "conv_f_block1"} <= names
    assert {"conv_a", "conv_f"}.isdisjoint(names)
    widths = {layer.name: layer.units["a"] for layer in zipped.zip_report.layers}
    assert (widths["conv_a_block0"], widths["conv_a_block1"]) == (3, 5)
    if sharing == 1.0:
        # A block and the block it is added to are one unit group: the same shared units.
        report = {layer.name: layer for layer in zipped.zip_report.layers}
        assert report["conv_a_block0"].shared_units == report["conv_b"].shared_units
        assert report["conv_f_block1"].shared_units == report["conv_e"].shared_units
    interpreter = tf_mtz.tflite_bytes(zipped)
    import tensorflow as tf

    runner = tf.lite.Interpreter(model_content=interpreter).get_signature_runner("a")
    result = next(iter(runner(image=x[:4]).values()))
    np.testing.assert_allclose(result, out["a"][:4], atol=1e-4)


def test_concatenates_cut_differently_in_different_models_are_refused(rng):
    def build(widths):
        keras.utils.set_random_seed(0)
        x = keras.Input((6,), name="features")
        parts = [keras.layers.Dense(w, name=f"d{i}")(x) for i, w in enumerate(widths)]
        h = keras.layers.Add(name="add")([keras.layers.Dense(8, name="whole")(x),
                                          keras.layers.Concatenate(name="cat")(parts)])
        return keras.Model(x, keras.layers.Dense(2, name="head")(h))

    with pytest.raises(ValueError, match="different widths in different models"):
        tf_mtz.zip_models({"a": build([3, 5]), "b": build([4, 4])}, rng.normal(size=(32, 6)).astype("float32"),
                          verbose=0)
