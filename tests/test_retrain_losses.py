"""Per-head retraining losses: chosen from each head's activation, overridden per task, weighted per task."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtz
from tf_mtz import retrain as retrain_lib
from conftest import mlp


def regressor(name, seed, outputs=2):
    keras.utils.set_random_seed(seed)
    x = keras.Input((20,), name="features")
    h = keras.layers.Dense(24, activation="relu", name="fc1")(x)
    h = keras.layers.Dense(16, activation="relu", name="fc2")(h)
    return keras.Model(x, keras.layers.Dense(outputs, name="head")(h), name=name)


def test_relative_squared_error_does_not_depend_on_the_targets_units(rng):
    target = rng.normal(size=(64, 3)).astype("float32") * np.array([1.0, 10.0, 0.1], "float32")
    prediction = target + rng.normal(size=target.shape).astype("float32") * target.std(axis=0)
    loss = retrain_lib._loss_fn("distill", "linear", 2.0, None, "relative_mse")
    base = float(loss(tf.constant(target), tf.constant(prediction)))
    scaled = float(loss(tf.constant(target * 250.0), tf.constant(prediction * 250.0)))
    assert scaled == pytest.approx(base, rel=1e-4)
    # Each unit's error over its variance: about 1 here, where the plain squared error is ruled by unit 2.
    assert base == pytest.approx(1.0, abs=0.3)
    plain = retrain_lib._loss_fn("distill", "linear", 2.0, None, None)
    assert float(plain(tf.constant(target), tf.constant(prediction))) == pytest.approx(
        float(np.mean((target - prediction) ** 2)), rel=1e-5)


def test_the_loss_follows_the_head_unless_overridden():
    teacher = tf.constant([[2.0, -1.0, 0.5]])
    student = tf.constant([[0.0, 0.0, 0.0]])
    for activation, expected in (("softmax", "kl"), ("sigmoid", "binary_cross_entropy"), ("linear", "mse")):
        chosen = retrain_lib._loss_fn("distill", activation, 1.0, None)(teacher, student)
        named = retrain_lib._loss_fn("distill", "linear", 1.0, None, expected)(teacher, student)
        assert float(chosen) == pytest.approx(float(named))
    assert float(retrain_lib._loss_fn("distill", "softmax", 1.0, None, "mse")(teacher, student)) == pytest.approx(
        float(np.mean(np.square([2.0, -1.0, 0.5]))))


def test_a_task_weighted_zero_keeps_its_head_and_a_custom_loss_trains_the_other(rng):
    x = rng.normal(size=(256, 20)).astype("float32")
    models = {"a": mlp("a", seed=0), "b": regressor("b", seed=1)}
    calls = []

    def absolute_error(target, logits):
        calls.append(1)  # traced once into the training step
        return tf.reduce_mean(tf.abs(target - logits))

    plain = tf_mtz.zip_models(models, x, verbose=0)
    retrain = tf_mtz.Retrain(steps_per_layer=0, final_steps=30, loss_weights={"a": 0.0},
                             losses={"b": absolute_error})
    trained = tf_mtz.zip_models(models, x, retrain=retrain, verbose=0)
    assert calls
    np.testing.assert_array_equal(trained.get_layer("a_head").get_weights()[0],
                                  plain.get_layer("a_head").get_weights()[0])
    assert not np.array_equal(trained.get_layer("b_head").get_weights()[0], plain.get_layer("b_head").get_weights()[0])
    error = {z: float(np.abs(m.predict(x, verbose=0)["b"] - models["b"].predict(x, verbose=0)).mean())
             for z, m in (("plain", plain), ("trained", trained))}
    assert error["trained"] < error["plain"]


def test_bad_losses_and_weights_are_refused_by_name(rng):
    x = rng.normal(size=(64, 20)).astype("float32")
    models = {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}
    with pytest.raises(tf_mtz.ZipError, match=r"Retrain.losses\['a'\] must be one of .*'relative_mse'"):
        tf_mtz.zip_models(models, x, retrain=tf_mtz.Retrain(losses={"a": "hinge"}), verbose=0)
    with pytest.raises(tf_mtz.ZipError, match=r"loss_weights\['b'\] must be a finite number >= 0"):
        tf_mtz.zip_models(models, x, retrain=tf_mtz.Retrain(loss_weights={"b": -1.0}), verbose=0)
    with pytest.raises(tf_mtz.ZipError, match=r"Retrain.losses names \['c'\].*not outputs"):
        tf_mtz.zip_models(models, x, retrain=tf_mtz.Retrain(steps_per_layer=1, losses={"c": "mse"}), verbose=0)


def test_retraining_datasets_run_without_tf_data_autotuning():
    """Deleting an iterator of an autotuned pipeline waits for tf.data's model thread, which sleeps up to
    seconds: every retraining phase (and a user's dataset in it) must go without autotuning."""
    import tensorflow as tf

    from tf_mtz import retrain as retrain_lib

    inputs = [keras.KerasTensor((4,), name="x")]
    arrays = np.zeros((10, 4), "float32")
    user = tf.data.Dataset.from_tensor_slices(arrays).map(lambda v: v * 2, num_parallel_calls=tf.data.AUTOTUNE)
    for data in (arrays, {"a": user.batch(5), "b": arrays}):
        datasets = retrain_lib.training_datasets(tf_mtz.Retrain(data=data), ["a", "b"], inputs)
        assert all(d.options().autotune.enabled is False for d in datasets.values())
