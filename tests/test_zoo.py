"""The keras.applications families (weights=None, reduced inputs): each zipped with a unit-permuted copy of
itself (`tf_mtz.testing.permuted_copy`: the tied groups tf_mtz finds, not written by hand) reproduces its
outputs at 100% and 50% sharing, and the zipped `.tflite` reproduces the zipped Keras model.

The quickest family (MobileNetV3Small: keras.ops, SE gates) runs in `make test`; the rest in `make test-slow`."""

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import randomize_batch_norms, relative_error

SLOW = pytest.mark.slow

# family -> (constructor keywords, input size); the smallest size each family accepts or needs.
FAMILIES = {
    "MobileNetV3Small": (dict(alpha=0.75), 32),
    "MobileNetV2": (dict(alpha=0.35), 32),
    "VGG16": ({}, 32),
    "ResNet50": ({}, 32),
    "ResNet50V2": ({}, 32),
    "MobileNet": (dict(alpha=0.25), 32),
    "MobileNetV3Large": (dict(alpha=0.75), 32),
    "EfficientNetB0": ({}, 32),
    "EfficientNetV2B0": ({}, 32),
    "DenseNet121": ({}, 32),
    "Xception": ({}, 71),
    "InceptionV3": ({}, 75),
    "NASNetMobile": ({}, 32),
}
QUICK = ("MobileNetV3Small",)


def _family(name):
    keywords, size = FAMILIES[name]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=5,
                                              classifier_activation=None, **keywords)
    return randomize_batch_norms(model), size


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=SLOW) for n in FAMILIES])
def test_family_zipped_with_its_permuted_copy_reproduces_it(name):
    import tensorflow as tf

    model, size = _family(name)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    assert not all(np.array_equal(u, v) for u, v in zip(model.get_weights(), copy.get_weights()))
    # Pixel-scaled inputs: several families rescale [0, 255] inside the model.
    x = (np.random.default_rng(0).uniform(0, 255, size=(32, size, size, 3))).astype("float32")
    expected = model.predict(x, verbose=0)
    assert relative_error(copy.predict(x, verbose=0), expected) < 1e-4
    for sharing in (1.0, 0.5):
        zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
        outputs = zipped.predict(x, verbose=0)
        for task in ("a", "b"):
            assert relative_error(outputs[task], expected) < 1e-4, (name, sharing, task)
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    runner = interpreter.get_signature_runner("b")
    input_name = next(iter(interpreter.get_signature_list()["b"]["inputs"]))
    out = next(iter(runner(**{input_name: x[:2]}).values()))
    assert relative_error(out, outputs["b"][:2]) < 1e-4


@SLOW
def test_convnext_zips_with_its_custom_layers_handled():
    """ConvNeXt's LayerScale and StochasticDepth (Keras-internal layers) have built-in handlers: a 1x1
    DepthwiseConv2D and the identity at inference; its grouped convolutions are depthwise."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=5,
                                            classifier_activation=None)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    x = np.random.default_rng(0).uniform(0, 255, size=(32, 32, 32, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    assert all(relative_error(outputs[t], expected) < 1e-4 for t in ("a", "b"))
    kinds = {type(layer).__name__ for layer in zipped.layers}
    assert "DepthwiseConv2D" in kinds and not kinds & {"LayerScale", "StochasticDepth"}
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    runner = interpreter.get_signature_runner("a")
    input_name = next(iter(interpreter.get_signature_list()["a"]["inputs"]))
    assert relative_error(next(iter(runner(**{input_name: x[:2]}).values())), outputs["a"][:2]) < 1e-4
    # LayerNormalization mixes every channel of its input: at half sharing the residual stream (which every
    # block normalises) is shared whole, the blocks' inner layers half.
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=0.5, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    assert all(relative_error(outputs[t], expected) < 1e-4 for t in ("a", "b"))
    shares = {layer.shared / layer.units["a"] for layer in zipped.zip_report.layers if not layer.head}
    assert shares == {0.5, 1.0}
