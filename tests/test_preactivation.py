"""Pre-activation networks: BatchNormalization that does not follow a Dense/Conv is kept as a per-unit
affine map, merged over paired units, and the zipped model is still plain Keras and converts to TFLite."""

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import permuted_graph_copy, randomize_batch_norms, resnet


def preact_resnet(name, width=8, blocks=2, seed=0):
    """ResNet-v2 style (He et al. 2016b): BN -> ReLU -> conv inside each block, identity shortcuts from
    the un-normalised block input, a final BN -> ReLU before pooling."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", name="stem")(x)
    for b in range(blocks):
        y = keras.layers.BatchNormalization(name=f"b{b}_preact_bn")(x)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(width, 3, padding="same", name=f"b{b}_conv1")(y)
        y = keras.layers.BatchNormalization(name=f"b{b}_bn")(y)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(width, 3, padding="same", name=f"b{b}_conv2")(y)
        x = keras.layers.Add()([x, y])
    x = keras.layers.BatchNormalization(name="post_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name=name)


def densenet(name, growth=4, seed=0):
    """DenseNet style (Huang et al. 2017): each layer BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv,
    concatenated to its input; a transition BN -> ReLU -> 1x1 conv -> pooling; BN -> ReLU before the head."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(x)
    for block in range(2):
        for layer in range(2):
            y = keras.layers.BatchNormalization(name=f"d{block}{layer}_bn1")(x)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(4 * growth, 1, use_bias=False, name=f"d{block}{layer}_conv1")(y)
            y = keras.layers.BatchNormalization(name=f"d{block}{layer}_bn2")(y)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(growth, 3, padding="same", use_bias=False, name=f"d{block}{layer}_conv2")(y)
            x = keras.layers.Concatenate(name=f"d{block}{layer}_concat")([x, y])
        if block == 0:
            x = keras.layers.BatchNormalization(name="transition_bn")(x)
            x = keras.layers.ReLU()(x)
            x = keras.layers.Conv2D(8, 1, use_bias=False, name="transition_conv")(x)
            x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.BatchNormalization(name="post_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name=name)


def bn_after_activation_mlp(name, seed=0):
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((10,))
    x = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dense(12, activation="relu", name="fc2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name=name)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
@pytest.mark.parametrize("make,shape", [(preact_resnet, (12, 12, 3)), (densenet, (12, 12, 3)),
                                        (bn_after_activation_mlp, (10,))])
def test_permuted_copy_reproduces_outputs(make, shape, sharing, rng):
    model = randomize_batch_norms(make("m"))
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    assert not all(np.array_equal(u, v) for u, v in zip(model.get_weights(), copy.get_weights()))
    x = rng.normal(size=(64,) + shape).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    expected = model.predict(x, verbose=0)
    for task, out in zipped.predict(x, verbose=0).items():
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The unfoldable normalisations survive as frozen BatchNormalization layers (a·x + b).
    norms = [layer for layer in zipped.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)
    tflite = tf_mtz.tflite_bytes(zipped)
    np.testing.assert_allclose(_run_tflite(tflite, x[:4]), zipped.predict(x[:4], verbose=0)["a"], atol=1e-4)


def _run_tflite(content, x):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content)
    runner = interpreter.get_signature_runner("a")
    name = next(iter(interpreter.get_signature_list()["a"]["inputs"]))
    return next(iter(runner(**{name: x}).values()))


def test_different_models_merge_the_affine_maps_and_stay_close_after_refit(rng):
    a = randomize_batch_norms(preact_resnet("a", seed=0), seed=0)
    b = randomize_batch_norms(preact_resnet("b", seed=1), seed=1)
    x = rng.normal(size=(128, 12, 12, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    shared = [layer for layer in zipped.layers if isinstance(layer, keras.layers.BatchNormalization)
              and layer.name.endswith("_shared")]
    assert shared  # one map for each fully shared normalisation, for both tasks
    for task, model in (("a", a), ("b", b)):
        out, expected = zipped.predict(x, verbose=0)[task], model.predict(x, verbose=0)
        relative = np.linalg.norm(out - expected) / np.linalg.norm(expected)
        assert np.isfinite(out).all() and relative < 1.0


def test_batch_norm_over_another_axis_is_refused():
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization(axis=1, name="rows_bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)), name="odd")
    other = keras.models.clone_model(model)
    with pytest.raises(ValueError, match=r"BatchNormalization 'rows_bn' of model 'odd' normalises axis 1"):
        tf_mtz.zip_models({"a": model, "b": other}, np.zeros((4, 6, 6, 3), "float32"), verbose=0)


@pytest.mark.parametrize("make,shape", [
    (lambda: preact_resnet("m"), (12, 12, 3)),
    (lambda: resnet("r", depth=8, width=8, input_shape=(16, 16, 3)), (16, 16, 3)),
    (lambda: keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=4), (32, 32, 3)),
])
def test_tf_mtz_permuted_copy_agrees_with_an_independent_reading_of_the_groups(make, shape, rng):
    """tf_mtz's groups and the test suite's own reading of the graph permute alike: both copies compute
    the original function, and their weights differ from the original's."""
    model = randomize_batch_norms(make())
    x = rng.normal(size=(8,) + shape).astype("float32")
    expected = model.predict(x, verbose=0)
    for copy in (tf_mtz.testing.permuted_copy(model, seed=3), permuted_graph_copy(model, seed=3)):
        np.testing.assert_allclose(copy.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
        assert not all(np.array_equal(u, v) for u, v in zip(model.get_weights(), copy.get_weights()))


class _Scale(keras.layers.Layer):
    """A custom per-channel layer: y = w·x."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


class _ScaleHandler(tf_mtz.registry.ChannelUnitsHandler):
    def kernel_and_bias(self, layer):
        w = keras.ops.convert_to_numpy(layer.w)
        return w, np.zeros_like(w)


class _ScaleShift(keras.layers.Layer):
    """A custom per-channel layer keeping both its weights in one (C, 2) array, the units first (a layout
    permuted_copy cannot guess): y = w[:, 0]·x + w[:, 1]."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], 2), initializer="ones")

    def call(self, x):
        return x * self.w[:, 0] + self.w[:, 1]


class _ScaleShiftHandler(tf_mtz.registry.ChannelUnitsHandler):
    def kernel_and_bias(self, layer):
        w = keras.ops.convert_to_numpy(layer.w)
        return w[:, 0], w[:, 1]


def test_permuted_copy_permutes_custom_per_unit_weights_and_names_a_layer_it_cannot_permute(rng):
    tf_mtz.register_layer_handler(_Scale, _ScaleHandler())
    tf_mtz.register_layer_handler(_ScaleShift, _ScaleShiftHandler())
    try:
        keras.utils.set_random_seed(0)
        x = inputs = keras.Input((5,))
        scale = _Scale(name="scale")
        x = scale(keras.layers.Dense(4)(x))
        scale.w.assign(rng.uniform(0.5, 1.5, 4).astype("float32"))
        model = keras.Model(inputs, keras.layers.Dense(2)(x))
        copy = tf_mtz.testing.permuted_copy(model, seed=1)  # one weight per unit: permuted with its units
        data = rng.normal(size=(8, 5)).astype("float32")
        np.testing.assert_allclose(copy.predict(data, verbose=0), model.predict(data, verbose=0), rtol=1e-5)
        x = inputs = keras.Input((5,))
        x = _ScaleShift(name="scale_shift")(keras.layers.Dense(4)(x))
        other = keras.Model(inputs, keras.layers.Dense(2)(x))
        with pytest.raises(ValueError, match=r"cannot permute the weights of layer 'scale_shift' \(_ScaleShift\)"):
            tf_mtz.testing.permuted_copy(other)
    finally:
        tf_mtz.unregister_layer_handler(_Scale)
        tf_mtz.unregister_layer_handler(_ScaleShift)


def test_a_weighted_layer_registered_as_weightless_is_refused():
    """A pass-through handler would rebuild the layer from its configuration, silently losing its weights."""
    tf_mtz.register_layer_handler(_Scale, tf_mtz.registry.ChannelwiseHandler())
    try:
        keras.utils.set_random_seed(0)
        x = inputs = keras.Input((5,))
        x = _Scale(name="scale")(keras.layers.Dense(4)(x))
        model = keras.Model(inputs, keras.layers.Dense(2)(x), name="custom")
        other = keras.models.clone_model(model)
        with pytest.raises(ValueError, match=r"'scale' \(_Scale\) of model 'custom' has weights"):
            tf_mtz.zip_models({"a": model, "b": other}, np.zeros((8, 5), "float32"), verbose=0)
    finally:
        tf_mtz.unregister_layer_handler(_Scale)


def test_a_depthwise_grouped_convolution_is_zipped_as_a_depthwise_convolution(rng):
    """Conv2D(groups=C) with C filters on C channels (ConvNeXt) is a DepthwiseConv2D: per-channel weights
    following the units before it."""
    def grouped(name, groups):
        keras.utils.set_random_seed(0)
        x = inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(6, 3, padding="same", groups=groups, name="grouped")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
        return randomize_batch_norms(keras.Model(inputs, keras.layers.Dense(3)(x), name=name))

    model = grouped("depthwise", groups=6)
    copy = tf_mtz.testing.permuted_copy(model, seed=2)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    for sharing in (1.0, 0.5):
        zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
        for out in zipped.predict(x, verbose=0).values():
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
        assert any(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in zipped.layers)
    # Groups of two channels are read group by group (tests/test_grouped.py): no DepthwiseConv2D then.
    other = grouped("pairs", groups=3)
    expected = other.predict(x, verbose=0)
    zipped = tf_mtz.zip_models({"a": other, "b": tf_mtz.testing.permuted_copy(other, seed=2)}, x, verbose=0)
    for out in zipped.predict(x, verbose=0).values():
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in zipped.layers)
