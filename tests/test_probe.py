"""The probe: layer inputs carried forward in bounded memory, and handlers dispatching by kind."""

import glob
import os
import tempfile

import keras
import numpy as np
import pytest

import tf_mtz
from tf_mtz import registry
from conftest import small_cnn


def _residual_cnn(name, seed):
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(6, 3, padding="same")(x)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name=name)


@pytest.mark.parametrize("make", [small_cnn, _residual_cnn])
def test_activations_spilled_to_disk_give_the_same_zip_and_are_removed(make, rng):
    models = {"a": make("a", seed=0), "b": make("b", seed=1)}
    x = rng.normal(size=(96, 12, 12, 1) if make is small_cnn else (96, 10, 10, 1)).astype("float32")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "tf_mtz_probe_*")))
    in_memory = tf_mtz.zip_models(models, x, config=tf_mtz.ZipConfig(batch_size=32), verbose=0)
    spilled = tf_mtz.zip_models(models, x, config=tf_mtz.ZipConfig(batch_size=32, activation_memory_gib=0),
                                verbose=0)
    for a, b in zip(in_memory.get_weights(), spilled.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tf_mtz_probe_*"))) == before


def test_spill_budget_is_respected_and_returned(rng):
    from tf_mtz import probe
    import tensorflow as tf

    spill = probe._Spill(budget_bytes=3 * 4 * 10)  # three batches of ten float32 values
    batches = probe.Batches(spill, (tf.constant(rng.normal(size=(10,)).astype("float32")) for _ in range(5)))
    assert spill.held == 3 * 40 and spill.written == 2 * 40
    assert len(os.listdir(spill.directory)) == 2
    values = [b.numpy() for b in batches]
    assert len(values) == 5 and all(v.shape == (10,) for v in values)
    del batches
    assert spill.held == 0 and os.listdir(spill.directory) == []


def test_bad_activation_memory_is_refused():
    with pytest.raises(ValueError, match="activation_memory_gib must be a finite number >= 0"):
        tf_mtz.ZipConfig(activation_memory_gib=-1)


def test_every_handler_kind_dispatches_to_its_own_visitor_method():
    calls = []

    class Recorder(registry.PositionVisitor):
        def units(self, name):
            calls.append(("units", name))

        def passthrough(self, name):
            calls.append(("passthrough", name))

    layers = {"dense": keras.layers.Dense(2), "add": keras.layers.Add(), "relu": keras.layers.ReLU(),
              "concat": keras.layers.Concatenate(), "norm": keras.layers.LayerNormalization()}
    for name, layer in layers.items():
        registry.handler_for(layer).visit(Recorder(), name)
    # Kinds the visitor does not override fall back to its passthrough method.
    assert calls == [("units", "dense"), ("passthrough", "add"), ("passthrough", "relu"),
                     ("passthrough", "concat"), ("passthrough", "norm")]


def test_a_handler_that_names_no_kind_is_refused():
    class Kindless(registry.LayerHandler):
        pass

    with pytest.raises(TypeError, match="UnitLayerHandler or PassThroughHandler"):
        tf_mtz.register_layer_handler(keras.layers.Dropout, Kindless())
