"""More architectures: BatchNormalization (folded), nested models, pooling/padding/preprocessing layers,
and custom layers registered through the public handler interface."""

import keras
import numpy as np
import pytest

import tf_mtz
from tf_mtz.experimental import ExperimentalConfig
from conftest import permuted_copy as chain_permuted_copy, small_cnn
from tf_mtz import registry


def leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


def permuted_copy(model, seed=0):
    """A functionally identical copy whose hidden units (and their BatchNormalization) are permuted."""
    rng = np.random.default_rng(seed)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    units = [l for l in leaf_layers(clone) if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D))]
    previous = current = None
    for layer in leaf_layers(clone):
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            weights = layer.get_weights()
            kernel, bias = weights[0], (weights[1] if len(weights) > 1 else np.zeros(weights[0].shape[-1]))
            if previous is not None:
                per_unit = kernel.shape[-2] // previous.size
                kernel = kernel[..., (np.arange(per_unit)[:, None] * previous.size + previous).reshape(-1), :]
            current = None
            if layer is not units[-1]:
                current = rng.permutation(kernel.shape[-1])
                kernel, bias = kernel[..., current], bias[current]
            layer.set_weights([kernel, bias] if len(weights) > 1 else [kernel])
            previous = current
        elif isinstance(layer, keras.layers.BatchNormalization) and current is not None:
            layer.set_weights([w[current] for w in layer.get_weights()])
    return clone


def randomize_batch_norms(model, rng):
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(size=beta.shape) * 0.1,
                               rng.normal(size=mean.shape) * 0.1, rng.uniform(0.5, 2.0, variance.shape)])


def bn_cnn(name, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0)(x)
    h = keras.layers.ZeroPadding2D(1)(h)
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv1")(h)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(12, 3, padding="same", name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, name="fc")(h)
    h = keras.layers.BatchNormalization(name="bn3")(h)
    h = keras.layers.ReLU()(h)
    return keras.Model(x, keras.layers.Dense(5, activation="softmax", name="head")(h), name=name)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_batch_norm_model_permuted_copy_reproduces_outputs(rng, sharing):
    model = bn_cnn("bn")
    randomize_batch_norms(model, rng)
    copy = permuted_copy(model, seed=2)
    x = rng.uniform(0, 255, size=(200, 12, 12, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(copy.predict(x, verbose=0), expected, atol=1e-5)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    out = zipped.predict(x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(out[task], expected, atol=1e-4)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in zipped.layers)


def test_nested_model_is_flattened(rng):
    def nested(name, seed):
        keras.utils.set_random_seed(seed)
        trunk = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                                  keras.layers.Dense(12, activation="relu", name="fc2")], name=f"{name}_trunk")
        x = keras.Input((20,), name="features")
        head = keras.Sequential([keras.Input((12,)), keras.layers.Dense(4, activation="softmax", name="out")],
                                name=f"{name}_head")
        return keras.Model(x, head(trunk(x)), name=name)

    model = nested("outer", 0)
    copy = permuted_copy(model, seed=1)
    x = rng.normal(size=(300, 20)).astype("float32")
    exact = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(exact.predict(x, verbose=0)[task], model.predict(x, verbose=0), atol=1e-4)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0,
                               retrain=tf_mtz.Retrain(steps_per_layer=2))  # distillation reaches nested heads
    out = zipped.predict(x, verbose=0)
    assert [layer.name for layer in zipped.zip_report.layers] == ["fc1", "fc2", "out"]
    # Two retraining steps on a lossless zip move the outputs only a little.
    np.testing.assert_allclose(out["a"], model.predict(x, verbose=0), atol=0.05)


def test_custom_layer_through_the_registry(rng):
    class Swish(keras.layers.Layer):
        def call(self, x):
            return x * keras.ops.sigmoid(x)

    def with_swish(name, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((10,), name="features")
        h = Swish(name="swish")(keras.layers.Dense(8, name="fc1")(x))
        return keras.Model(x, keras.layers.Dense(3, name="head")(keras.layers.Dense(6, name="fc2")(h)), name=name)

    model = with_swish("m", 0)
    copy = permuted_copy(model, seed=4)
    x = rng.normal(size=(200, 10)).astype("float32")
    with pytest.raises(ValueError, match=r"'swish' \(Swish\).*not supported.*register_layer_handler"):
        tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
    tf_mtz.register_layer_handler(Swish, tf_mtz.registry.ChannelwiseHandler())
    try:
        zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
        np.testing.assert_allclose(zipped.predict(x, verbose=0)["b"], model.predict(x, verbose=0), atol=1e-5)
    finally:
        assert isinstance(tf_mtz.unregister_layer_handler(Swish), tf_mtz.registry.ChannelwiseHandler)
    with pytest.raises(ValueError, match=r"'swish' \(Swish\).*not supported"):
        tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
    with pytest.raises(KeyError, match="No handler is registered for 'Swish'"):
        tf_mtz.unregister_layer_handler(Swish)
    with pytest.raises(TypeError, match="keras.layers.Layer subclass"):
        tf_mtz.register_layer_handler(int, tf_mtz.registry.ChannelwiseHandler())


def test_batch_norm_on_the_raw_input_is_refused(rng):
    """Every other BatchNormalization is kept as an affine map (tests/test_preactivation.py); on the input
    the tasks' statistics differ and nothing before it could absorb them."""
    def input_bn(name):
        x = keras.Input((10,))
        h = keras.layers.BatchNormalization(name="input_bn")(x)
        return keras.Model(x, keras.layers.Dense(3)(keras.layers.Dense(6)(h)), name=name)

    with pytest.raises(ValueError, match=r"'input_bn' \(BatchNormalization\) of model 'a' acts on the model input"):
        tf_mtz.zip_models({"a": input_bn("a"), "b": input_bn("b")}, rng.normal(size=(20, 10)), verbose=0)


def test_preprocessing_only_before_the_first_unit_layer(rng):
    def late_rescale(name):
        x = keras.Input((10,))
        h = keras.layers.Rescaling(2.0, name="late_scale")(keras.layers.Dense(8, name="fc1")(x))
        return keras.Model(x, keras.layers.Dense(3)(keras.layers.Dense(6)(h)), name=name)

    with pytest.raises(ValueError, match=r"'late_scale' \(Rescaling\).*only before the first"):
        tf_mtz.zip_models({"a": late_rescale("a"), "b": late_rescale("b")}, rng.normal(size=(20, 10)), verbose=0)


def test_normalization_layer_keeps_its_adapted_statistics(rng):
    x = (rng.normal(size=(300, 10)) * 5 + 3).astype("float32")

    def normed(name, seed):
        keras.utils.set_random_seed(seed)
        norm = keras.layers.Normalization(name="norm")
        norm.adapt(x)
        inputs = keras.Input((10,), name="features")
        h = keras.layers.Dense(8, activation="relu", name="fc1")(norm(inputs))
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name=name)

    model = normed("m", 0)
    zipped = tf_mtz.zip_models({"a": model, "b": permuted_copy(model, seed=5)}, x, verbose=0)
    np.testing.assert_allclose(zipped.predict(x, verbose=0)["a"], model.predict(x, verbose=0), atol=1e-4)


def test_conv1d_model_permuted_copy_and_patch_hessian(rng):
    def conv1d(name, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((24, 3), name="signal")
        h = keras.layers.Conv1D(8, 5, padding="same", activation="relu", name="c1")(x)
        h = keras.layers.MaxPooling1D(2)(h)
        h = keras.layers.Conv1D(10, 3, strides=2, activation="relu", name="c2")(h)
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(x, keras.layers.Dense(4, activation="softmax", name="head")(h), name=name)

    model = conv1d("m", 0)
    copy = permuted_copy(model, seed=6)
    x = rng.normal(size=(150, 24, 3)).astype("float32")
    for conv_hessian in ("channel", "patch"):
        zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, config=ExperimentalConfig(conv_hessian=conv_hessian), verbose=0)
        np.testing.assert_allclose(zipped.predict(x, verbose=0)["b"], model.predict(x, verbose=0), atol=1e-5)
        assert max(layer.cost_max for layer in zipped.zip_report.layers) < 1e-4

    # The im2col samples of a Conv1D times its flattened kernel are its pre-activation.
    layer = model.get_layer("c2")
    handler = registry.handler_for(layer)
    inputs = rng.normal(size=(2, 12, 8)).astype("float32")
    samples = handler.hessian_samples(layer, inputs, "patch").numpy()
    blocks = handler.to_blocks(*handler.kernel_and_bias(layer), "patch")[0]
    pre_activation = keras.ops.convert_to_numpy(keras.ops.conv(inputs, layer.kernel, strides=2)) + layer.bias.numpy()
    np.testing.assert_allclose(samples @ blocks[:-1] + blocks[-1], pre_activation.reshape(-1, 10), atol=1e-5)


def test_repair_keeps_exact_merges_exact_and_fixes_the_spread(rng):
    model = small_cnn("m", seed=0)
    copy, _ = chain_permuted_copy(model, seed=3)
    x = rng.normal(size=(120, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, config=ExperimentalConfig(repair=True), verbose=0)
    np.testing.assert_allclose(zipped.predict(x, verbose=0)["b"], model.predict(x, verbose=0), atol=1e-4)
    assert zipped.zip_report.settings["repair"] is True
    # Two unrelated models: averaged units lose spread; repair restores each merged unit's pre-activation
    # standard deviation to the average of the originals'.
    other = small_cnn("o", seed=5)
    plain = tf_mtz.zip_models({"a": model, "b": other}, x, config=ExperimentalConfig(refit=False), verbose=0)
    repaired = tf_mtz.zip_models({"a": model, "b": other}, x, config=ExperimentalConfig(refit=False, repair=True), verbose=0)

    def conv1_std(zipped_model):
        layer = zipped_model.get_layer("conv1_shared")
        return np.std(keras.ops.convert_to_numpy(keras.ops.conv(x, layer.kernel, padding="same")) +
                      keras.ops.convert_to_numpy(layer.bias), axis=(0, 1, 2))

    def original_std(m):
        layer = m.get_layer("conv1")
        return np.std(keras.ops.convert_to_numpy(keras.ops.conv(x, layer.kernel, padding="same")) +
                      keras.ops.convert_to_numpy(layer.bias), axis=(0, 1, 2))

    target = 0.5 * (np.sort(original_std(model)) + np.sort(original_std(other)))
    assert abs(np.mean(conv1_std(repaired)) - np.mean(target)) < abs(np.mean(conv1_std(plain)) - np.mean(target))
    np.testing.assert_allclose(np.mean(conv1_std(repaired)), np.mean(target), rtol=0.05)
