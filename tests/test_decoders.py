"""Encoder-decoder networks: Conv2DTranspose and UpSampling2D decoders with skip Concatenates (U-Net), zipped
like any other unit layers, with a per-pixel segmentation head."""

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import randomize_batch_norms


def unet(name, width=6, seed=0):
    """A two-level U-Net (Ronneberger et al. 2015): conv blocks with BN, max pooling down, one level up by a
    strided Conv2DTranspose and one by UpSampling2D + conv, skip connections concatenated on channels,
    a 1x1 convolution giving per-pixel class logits."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((16, 16, 3))

    def block(h, filters, label):
        h = keras.layers.Conv2D(filters, 3, padding="same", name=f"{label}_conv")(h)
        h = keras.layers.BatchNormalization(name=f"{label}_bn")(h)
        return keras.layers.ReLU(name=f"{label}_relu")(h)

    skip1 = block(x, width, "down1")
    skip2 = block(keras.layers.MaxPooling2D()(skip1), 2 * width, "down2")
    bottom = block(keras.layers.MaxPooling2D()(skip2), 3 * width, "bottom")
    up2 = keras.layers.Conv2DTranspose(2 * width, 3, strides=2, padding="same", name="up2")(bottom)
    h = block(keras.layers.Concatenate(name="skip2")([up2, skip2]), 2 * width, "decode2")
    up1 = keras.layers.Conv2D(width, 1, name="up1_conv")(keras.layers.UpSampling2D(name="up1")(h))
    h = block(keras.layers.Concatenate(name="skip1")([skip1, up1]), width, "decode1")
    return keras.Model(inputs, keras.layers.Conv2D(4, 1, name="classes")(h), name=name)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_permuted_copy_of_a_unet_reproduces_its_segmentation(sharing, rng):
    model = randomize_batch_norms(unet("m"))
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    transposed = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert not np.array_equal(transposed[0].get_weights()[0], copy.get_layer(transposed[0].name).get_weights()[0])
    x = rng.normal(size=(48, 16, 16, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(copy.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    for out in zipped.predict(x, verbose=0).values():
        assert out.shape == (48, 16, 16, 4)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert any(isinstance(layer, keras.layers.Conv2DTranspose) for layer in zipped.layers)


def test_two_unets_zip_to_a_plain_keras_model_that_converts_to_tflite(rng):
    import tensorflow as tf

    a, b = randomize_batch_norms(unet("a", seed=0), 0), randomize_batch_norms(unet("b", seed=1), 1)
    x = rng.normal(size=(64, 16, 16, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    report = zipped.zip_report
    assert report.params_zipped < 0.6 * report.params_original
    expected = zipped.predict(x[:2], verbose=0)
    for task, model in (("a", a), ("b", b)):
        own = model.predict(x, verbose=0)
        relative = np.linalg.norm(zipped.predict(x, verbose=0)[task] - own) / np.linalg.norm(own)
        assert relative < 1.0  # zipped without retraining: close to, not equal to, each own model
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    for task in ("a", "b"):
        runner = interpreter.get_signature_runner(task)
        name = next(iter(interpreter.get_signature_list()[task]["inputs"]))
        np.testing.assert_allclose(next(iter(runner(**{name: x[:2]}).values())), expected[task], atol=1e-4)


def test_transposed_convolution_with_output_padding_is_refused_by_name():
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2DTranspose(3, 3, strides=2, output_padding=1, name="odd_up")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(x), name="decoder")
    other = keras.models.clone_model(model)
    with pytest.raises(ValueError, match=r"Conv2DTranspose 'odd_up' of model 'decoder' uses dilation or output_padding"):
        tf_mtz.zip_models({"a": model, "b": other}, np.zeros((4, 6, 6, 2), "float32"), verbose=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_a_bias_free_transposed_convolution_changing_the_width_reproduces_a_permuted_copy(batch_norm, rng):
    """Keras keeps a Conv2DTranspose kernel as (kh, kw, filters, inputs): a bias-free one's zero bias and
    a BatchNormalization folded into it must count the filters, not the inputs (here 8 -> 5)."""
    keras.utils.set_random_seed(3)
    x = inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down")(x)
    h = keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same", use_bias=False, name="up")(h)
    if batch_norm:
        h = keras.layers.BatchNormalization(name="up_bn")(h)
    h = keras.layers.ReLU(name="up_relu")(h)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="head")(h))
    if batch_norm:
        randomize_batch_norms(model, seed=3)
    data = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=4)}, data, verbose=0)
    expected = model.predict(data, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(zipped.predict(data, verbose=0)[task], expected, atol=1e-4)
