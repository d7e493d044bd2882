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


def _runs_per_position(models, x, sharing, monkeypatch):
    """How often the probe ran each position of a zipped network, per position name."""
    from tf_mtz import probe as probe_lib

    runs = {}
    run = probe_lib._TaskRunner.units

    def counted(self, task, position, values):
        runs[position.name] = runs.get(position.name, 0) + 1
        return run(self, task, position, values)

    monkeypatch.setattr(probe_lib._TaskRunner, "units", counted)
    zipped = tf_mtz.zip_models(models, x, sharing=sharing, config=tf_mtz.ZipConfig(batch_size=32), verbose=0)
    monkeypatch.undo()
    return runs, zipped


def test_a_fully_shared_trunk_is_computed_once_for_all_tasks(rng, monkeypatch):
    """One calibration set and full sharing: after a layer's merge both tasks' networks compute the same
    values there, and the probe computes them once; with half sharing every task runs its own."""
    models = {"a": _residual_cnn("a", seed=0), "b": _residual_cnn("b", seed=1)}
    x = rng.normal(size=(64, 10, 10, 1)).astype("float32")
    shared, _ = _runs_per_position(models, x, 1.0, monkeypatch)
    apart, _ = _runs_per_position(models, x, 0.5, monkeypatch)
    convolutions = [layer.name for layer in models["a"].layers if isinstance(layer, keras.layers.Conv2D)]
    assert shared == {name: 1 for name in convolutions}  # one run serves both tasks
    assert apart == {name: 2 for name in convolutions}


def test_tasks_with_different_calibration_data_are_never_shared(rng):
    from tf_mtz import probe as probe_lib

    first = rng.normal(size=(8, 3)).astype("float32")
    same = probe_lib._shared_batches(["a", "b", "c"], {"a": [first], "b": [first.copy()], "c": [first + 1]})
    assert same["a"] is same["b"] and same["c"] is not same["a"]


def test_calibration_datasets_of_unknown_length_are_read_once_and_compared(rng):
    """A generator dataset has no length: its batches are read once per task and the tasks' trunks are
    still shared when the batches are equal."""
    import tensorflow as tf

    x = rng.normal(size=(64, 10, 10, 1)).astype("float32")
    dataset = tf.data.Dataset.from_generator(lambda: iter(x), output_signature=tf.TensorSpec((10, 10, 1)))
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    models = {"a": _residual_cnn("a", seed=0), "b": _residual_cnn("b", seed=1)}
    from_generator = tf_mtz.zip_models(models, dataset, config=tf_mtz.ZipConfig(batch_size=32), verbose=0)
    from_array = tf_mtz.zip_models(models, x, config=tf_mtz.ZipConfig(batch_size=32), verbose=0)
    for u, v in zip(from_generator.get_weights(), from_array.get_weights()):
        np.testing.assert_array_equal(u, v)
