"""Residual graphs, BatchNormalization, depthwise and separable convolutions: a model zipped with a
unit-permuted copy of itself reproduces its outputs."""

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import permuted_graph_copy, randomize_batch_norms, resnet


def assert_reproduces(model, zipped, x, atol=1e-4):
    expected = model.predict(x, verbose=0)
    out = zipped.predict(x, verbose=0)
    for task in out:
        np.testing.assert_allclose(out[task], expected, atol=atol)


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_resnet20_with_permuted_copy(rng, sharing):
    model = randomize_batch_norms(resnet("resnet20"))
    copy = permuted_graph_copy(model, seed=1)
    x = rng.normal(size=(24, 32, 32, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    assert_reproduces(model, zipped, x)
    report = zipped.zip_report
    assert all(layer.shared == (layer.units["a"] if sharing == 1.0 else round(layer.units["a"] / 2))
               for layer in report.layers if not layer.head)
    assert max(layer.cost_max for layer in report.layers) < 1e-6


def test_mobilenet_v2_with_permuted_copy(rng):
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3), classes=10)
    model = randomize_batch_norms(model)
    copy = permuted_graph_copy(model, seed=2)
    x = rng.normal(size=(8, 96, 96, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=1.0, config=tf_mtz.ZipConfig(refit=False), verbose=0)
    assert_reproduces(model, zipped, x)
    kinds = {type(layer).__name__ for layer in zipped.layers}
    assert {"DepthwiseConv2D", "Add", "Conv2D"} <= kinds


def _separable_net(name, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(x)
    h = keras.layers.BatchNormalization(name="stem_bn")(h)
    h = keras.layers.ReLU(name="stem_relu")(h)
    y = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(h)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(y)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    h = keras.layers.Add(name="add")([h, y])
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, keras.layers.Dense(4, name="head")(h), name=name)


def test_separable_conv_is_read_as_depthwise_and_pointwise(rng):
    a = randomize_batch_norms(_separable_net("a"))
    b = randomize_batch_norms(_separable_net("b", seed=1), seed=1)
    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing=0.5, verbose=0)
    report = zipped.zip_report
    assert [layer.name for layer in report.layers] == ["stem", "sep_pointwise", "head"]
    # The residual Add ties the stem and the pointwise convolution: both share the same number of units.
    assert report.layers[0].shared == report.layers[1].shared == 4
    out = zipped.predict(x, verbose=0)
    assert all(np.isfinite(v).all() for v in out.values())
    restored = keras.models.load_model(_save(zipped))
    np.testing.assert_allclose(restored.predict(x, verbose=0)["a"], out["a"], atol=1e-5)


def _save(model):
    import tempfile, os
    path = os.path.join(tempfile.mkdtemp(), "zipped.keras")
    model.save(path)
    return path


def _layer_norm_mlp(name, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12,), name="features")
    h = keras.layers.Dense(16, name="fc1")(x)
    h = keras.layers.LayerNormalization(name="ln1")(h)
    h = keras.layers.Activation("gelu", name="act1")(h)
    h = keras.layers.Dense(10, activation="relu", name="fc2")(h)
    model = keras.Model(x, keras.layers.Dense(3, name="head")(h), name=name)
    ln = model.get_layer("ln1")
    rng = np.random.default_rng(seed)
    ln.set_weights([rng.uniform(0.5, 1.5, 16), rng.normal(0, 0.2, 16)])
    return model


def test_layer_normalization_on_a_dense_stack(rng):
    model = _layer_norm_mlp("ln_model")
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    p1, p2 = np.random.default_rng(5).permutation(16), np.random.default_rng(6).permutation(10)
    fc1, ln, fc2, head = (copy.get_layer(n) for n in ("fc1", "ln1", "fc2", "head"))
    k, b = fc1.get_weights()
    fc1.set_weights([k[:, p1], b[p1]])
    ln.set_weights([w[p1] for w in ln.get_weights()])
    k, b = fc2.get_weights()
    fc2.set_weights([k[p1][:, p2], b[p2]])
    k, b = head.get_weights()
    head.set_weights([k[p2], b])
    x = rng.normal(size=(200, 12)).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0)
    assert_reproduces(model, zipped, x, atol=1e-5)
    assert "LayerNormalization" in {type(layer).__name__ for layer in zipped.layers}
    # fc2 may be shared partly; fc1's units are normalised together, so they are shared all or none.
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing={"fc1": 1.0, "fc2": 0.5}, verbose=0)
    assert_reproduces(model, zipped, x, atol=1e-5)
    # A uniform fraction shares such a group whole; the other layers as asked.
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=0.3, verbose=0)
    assert_reproduces(model, zipped, x, atol=1e-5)
    assert {layer.name: layer.shared for layer in zipped.zip_report.layers if not layer.head} == {"fc1": 16, "fc2": 3}
    # A count asked for by name is not rounded.
    with pytest.raises(ValueError, match=r"'ln1' \(LayerNormalization\) mixes all units of 'fc1'.*all or none"):
        tf_mtz.zip_models({"a": model, "b": copy}, x, sharing={"fc1": 0.5, "fc2": 0.5}, verbose=0)


def _dense_net(name, seed=0):
    """Concatenations of layer outputs and of the raw input, as in DenseNet, then a Flatten."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 3), name="image")
    a = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="a")(x)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="b")(a)
    d = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="d")(
        keras.layers.Concatenate(name="cat_ab")([a, b]))
    f = keras.layers.Conv2D(4, 1, activation="relu", name="f")(keras.layers.Concatenate(name="cat_xd")([x, d]))
    h = keras.layers.Flatten(name="flat")(keras.layers.MaxPooling2D(name="pool")(f))
    return keras.Model(x, keras.layers.Dense(3, name="head")(h), name=name)


def test_concatenate_with_permuted_copy(rng):
    model = _dense_net("dense")
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    perm = {n: np.random.default_rng(i).permutation(w) for i, (n, w) in enumerate(
        [("a", 6), ("b", 4), ("d", 5), ("f", 4)])}
    rows = {"a": None, "b": perm["a"], "d": np.concatenate([perm["a"], 6 + perm["b"]]),
            "f": np.concatenate([np.arange(3), 3 + perm["d"]])}
    for name in ("a", "b", "d", "f"):
        layer = copy.get_layer(name)
        kernel, bias = layer.get_weights()
        if rows[name] is not None:
            kernel = kernel[:, :, rows[name], :]
        layer.set_weights([kernel[..., perm[name]], bias[perm[name]]])
    head = copy.get_layer("head")
    kernel, bias = head.get_weights()
    flat_rows = (np.arange(9)[:, None] * 4 + perm["f"][None, :]).reshape(-1)
    head.set_weights([kernel[flat_rows], bias])
    x = rng.normal(size=(64, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(copy.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    for sharing in (1.0, 0.5, {"a": 1.0, "d": 0.6}):
        zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
        assert_reproduces(model, zipped, x)
    assert "Concatenate" in {type(layer).__name__ for layer in zipped.layers}
