"""Zipping without data: calibration inputs made up from the models (their BatchNormalization statistics,
an input Normalization, or a given distribution), and a report that says so."""

import keras
import numpy as np
import pytest

import tf_mtz
from tf_mtz import synthesis
from conftest import mlp, randomize_batch_norms, relative_error, resnet


def _residual(name, seed):
    return randomize_batch_norms(resnet(name, depth=8, width=8, input_shape=(12, 12, 3), seed=seed), seed)


def _mismatch(model, x) -> float:
    """Relative distance of the batch statistics at every BatchNormalization's input to the stored ones."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    values = keras.Model(model.inputs, [layer.input for layer in norms])(x)
    total = 0.0
    for value, layer in zip(values, norms):
        value = np.asarray(value).reshape(-1, value.shape[-1])
        mean, variance = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
        total += np.sum((value.mean(0) - mean) ** 2) / np.sum(variance) + \
            np.sum((value.var(0) - variance) ** 2) / np.sum(variance ** 2)
    return float(total)


def test_inputs_made_to_match_the_batch_norm_statistics():
    model = _residual("a", 0)
    spec = tf_mtz.SyntheticInputs(samples=128, steps=200, batch_size=128)
    made = synthesis.synthesize({"a": model}, spec)["a"]
    start = np.random.default_rng(0).normal(size=made.shape).astype("float32")
    assert made.shape == (128, 12, 12, 3) and np.isfinite(made).all()
    assert _mismatch(model, made) < 0.25 * _mismatch(model, start)  # random statistics: not all reachable


def test_zip_without_data_reproduces_a_permuted_copy_and_says_so():
    model = _residual("a", 0)
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, tf_mtz.SyntheticInputs(samples=128, steps=30), verbose=0)
    x = np.random.default_rng(3).normal(size=(16, 12, 12, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    for task in ("a", "b"):
        assert relative_error(zipped.predict(x, verbose=0)[task], expected) < 1e-4
    report = zipped.zip_report
    assert report.synthetic_calibration and "no real data was used" in str(report)
    assert "no real data was used" in report.to_markdown()
    real = tf_mtz.zip_models({"a": model, "b": copy}, x, verbose=0).zip_report
    assert not real.synthetic_calibration and "no real data" not in str(real)


def test_retraining_distills_on_made_up_inputs():
    models = {"a": _residual("a", 0), "b": _residual("b", 1)}
    zipped = tf_mtz.zip_models(models, tf_mtz.SyntheticInputs(samples=64, steps=10), verbose=0,
                               retrain=tf_mtz.Retrain(steps_per_layer=0, final_steps=5, batch_size=16))
    assert zipped.zip_report.layers[-1].retrain_loss is not None


def test_normalization_and_given_distributions_and_their_errors():
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((4,), name="features")
    norm = keras.layers.Normalization(mean=[1.0, 2.0, 3.0, 4.0], variance=[1.0, 4.0, 9.0, 16.0])
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(6)(norm(x))))
    made = synthesis.synthesize({"a": model}, tf_mtz.SyntheticInputs(samples=4000))["a"]
    np.testing.assert_allclose(made.mean(0), [1, 2, 3, 4], atol=0.2)
    np.testing.assert_allclose(made.std(0), [1, 2, 3, 4], rtol=0.1)
    other = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(6)(norm(x))))
    assert tf_mtz.zip_models({"a": model, "b": other}, None, verbose=0).zip_report.synthetic_calibration
    plain = mlp("a")
    with pytest.raises(tf_mtz.ZipError, match="no BatchNormalization statistics and no input Normalization"):
        tf_mtz.zip_models({"a": plain, "b": mlp("b", seed=1)}, None, verbose=0)
    uniform = tf_mtz.SyntheticInputs(samples=200, distribution=lambda rng, n: rng.uniform(-1, 1, (n, 20)))
    zipped = tf_mtz.zip_models({"a": plain, "b": mlp("b", seed=1)}, uniform, verbose=0)
    assert zipped.zip_report.synthetic_calibration
    wrong = tf_mtz.SyntheticInputs(samples=10, distribution=lambda rng, n: rng.uniform(-1, 1, (n, 3)))
    with pytest.raises(tf_mtz.ZipError, match="distribution gave inputs of shape"):
        tf_mtz.zip_models({"a": plain, "b": mlp("b", seed=1)}, wrong, verbose=0)
    tokens = keras.Input((5,), dtype="int32")
    text = keras.Model(tokens, keras.layers.Dense(2)(keras.layers.Embedding(9, 3)(tokens)))
    with pytest.raises(tf_mtz.ZipError, match="int32 inputs"):
        synthesis.synthesize({"a": text}, tf_mtz.SyntheticInputs())
    with pytest.raises(tf_mtz.ZipError, match="samples"):
        tf_mtz.SyntheticInputs(samples=0)
