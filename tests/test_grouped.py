"""Grouped convolutions with several channels per group (ResNeXt, RegNet): read as one slice of the input
and one ungrouped convolution per group, so units are paired within their group and the zipped model
computes each group with standard layers, never with a dense kernel over all groups."""

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import randomize_batch_norms, relative_error


def resnext(name, seed=0, width=16, groups=4):
    """A ResNeXt-style block (1x1 -> BN -> ReLU -> grouped 3x3 -> BN -> ReLU -> 1x1, identity shortcut)
    and a grouped convolution with its own activation reading the residual stream."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    y = keras.layers.Conv2D(width, 1, name="reduce")(x)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
    y = keras.layers.Conv2D(width, 3, padding="same", groups=groups, use_bias=False, name="grouped")(y)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
    y = keras.layers.Conv2D(width, 1, name="expand")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.Conv2D(24, 3, padding="same", groups=2 * groups, activation="relu", name="stream_grouped")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return randomize_batch_norms(keras.Model(inputs, keras.layers.Dense(5, name="head")(x), name=name))


def zipped_giving_back(models: dict, data, expected, **zip_options):
    """Zips `models` on `data` and checks that every task's output is `expected` (relative 1e-4); returns the
    zipped model."""
    zipped = tf_mtz.zip_models(models, data, verbose=0, **zip_options)
    for task, out in zipped.predict(data, verbose=0).items():
        assert relative_error(out, expected) < 1e-4, (task, zip_options)
    return zipped


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(48, 10, 10, 3)).astype("float32")


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_resnext_block_zipped_with_its_permuted_copy_reproduces_it(x, sharing, tmp_path):
    import tensorflow as tf

    model = resnext("resnext")
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    assert not np.array_equal(model.get_layer("grouped").get_weights()[0], copy.get_layer("grouped").get_weights()[0])
    expected = model.predict(x, verbose=0)
    assert relative_error(copy.predict(x, verbose=0), expected) < 1e-5
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    outputs = zipped.predict(x, verbose=0)
    for task in ("a", "b"):
        assert relative_error(outputs[task], expected) < 1e-4, task
    # Standard layers only: it loads without custom objects and converts to TFLite.
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0)["b"], outputs["b"], atol=1e-6)
    interpreter = tf.lite.Interpreter(model_content=tf_mtz.tflite_bytes(zipped))
    runner = interpreter.get_signature_runner("b")
    input_name = next(iter(interpreter.get_signature_list()["b"]["inputs"]))
    assert relative_error(next(iter(runner(**{input_name: x[:4]}).values())), outputs["b"][:4]) < 1e-5


def test_fully_shared_groups_are_one_grouped_convolution_again(x):
    """Zipped group by group, fully shared groups are rebuilt as one Conv2D(groups=4) on the trunk: as many
    weights as the grouped layer (its BatchNormalization folded in as a bias), not groups times more, and
    no per-group slices or concatenations left in the zipped model."""
    model = resnext("resnext")
    other = resnext("other", seed=3)
    zipped = tf_mtz.zip_models({"a": model, "b": other}, x, verbose=0)
    assert np.isfinite(zipped.predict(x, verbose=0)["a"]).all()
    grouped = model.get_layer("grouped")
    (fused,) = [layer for layer in zipped.layers if layer.name.startswith("grouped")]
    assert isinstance(fused, keras.layers.Conv2D) and fused.groups == 4
    assert fused.count_params() == int(np.prod(grouped.kernel.shape)) + grouped.filters
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in zipped.layers)
    groups_in_report = [layer for layer in zipped.zip_report.layers if layer.name.startswith("grouped_group")]
    assert len(groups_in_report) == 4 and all(layer.shared == 4 for layer in groups_in_report)


def test_partly_shared_groups_stay_apart(x):
    zipped = tf_mtz.zip_models({"a": resnext("a"), "b": resnext("b", seed=3)}, x, sharing=0.5, verbose=0)
    assert not any(getattr(layer, "groups", 1) > 1 for layer in zipped.layers)
    assert any(layer.name.startswith("grouped_group") for layer in zipped.layers)


def test_retrained_weights_of_fused_groups_flow_back(x, monkeypatch):
    """Retraining trains the fused Conv2D(groups=4); its weights go back to each group's slot. The trainer
    is replaced by one that moves every weight at random: the model rebuilt from the zip state afterwards
    must compute what the moved student computed."""
    from tf_mtz import retrain as retrain_lib

    moved = {}

    def move_every_weight(self, steps, label="retrain", verbose=1):
        rng = np.random.default_rng(steps)
        for variable in self.variables:
            variable.assign(variable.numpy() + 0.05 * rng.normal(size=variable.shape).astype("float32"))
        moved.update({t: student(x, training=False).numpy() for t, student in self.students.items()})
        return 0.0

    monkeypatch.setattr(retrain_lib.JointTrainer, "run", move_every_weight)
    retrain = tf_mtz.Retrain(data=x, steps_per_layer=0, final_steps=3)
    zipped = tf_mtz.zip_models({"a": resnext("a"), "b": resnext("b", seed=3)}, x, retrain=retrain, verbose=0)
    assert any(getattr(layer, "groups", 1) == 4 for layer in zipped.layers)
    logits = {t: keras.Model(zipped.inputs, zipped.get_layer(f"{t}_head").output)(x).numpy() for t in ("a", "b")}
    for t in ("a", "b"):
        np.testing.assert_allclose(logits[t], moved[t], rtol=1e-5, atol=1e-5)


def test_groups_permuted_by_hand_are_found():
    """A copy permuted by hand within each group (independently of tf_mtz's own reading of the graph):
    the zipped model reproduces both tasks."""
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", groups=2, activation="relu", name="grouped")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    rng = np.random.default_rng(4)
    inputs_order = np.concatenate([rng.permutation(4), 4 + rng.permutation(4)])
    filters_order = np.concatenate([rng.permutation(3), 3 + rng.permutation(3)])
    copy = keras.models.clone_model(model)
    kernel, bias = model.get_layer("conv").get_weights()
    copy.get_layer("conv").set_weights([kernel[..., inputs_order], bias[inputs_order]])
    kernel, bias = model.get_layer("grouped").get_weights()  # (3, 3, 4, 6): rows of each group's 4 inputs
    kernel = np.concatenate([kernel[:, :, inputs_order[:4], :3], kernel[:, :, inputs_order[4:] - 4, 3:]], axis=-1)
    copy.get_layer("grouped").set_weights([kernel[..., filters_order], bias[filters_order]])
    kernel, bias = model.get_layer("head").get_weights()
    copy.get_layer("head").set_weights([kernel[filters_order], bias])
    data = np.random.default_rng(1).normal(size=(64, 8, 8, 3)).astype("float32")
    expected = model.predict(data, verbose=0)
    np.testing.assert_allclose(copy.predict(data, verbose=0), expected, rtol=1e-5, atol=1e-6)
    zipped_giving_back({"a": model, "b": copy}, data, expected)


def test_grouped_conv1d_and_a_grouped_convolution_on_the_input(rng):
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((16, 4))
    x = keras.layers.Conv1D(8, 3, padding="same", groups=2, activation="relu", name="on_input")(x)
    x = keras.layers.Conv1D(8, 3, padding="same", groups=4, activation="relu", name="grouped")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    copy = tf_mtz.testing.permuted_copy(model, seed=2)
    data = rng.normal(size=(64, 16, 4)).astype("float32")
    expected = model.predict(data, verbose=0)
    for sharing in (1.0, 0.5):
        zipped_giving_back({"a": model, "b": copy}, data, expected, sharing=sharing)


def test_sharing_by_the_grouped_layers_name_applies_to_every_group(x):
    model = resnext("resnext")
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing={"stem": 1.0, "reduce": 1.0, "grouped": 8}, verbose=0)
    shared = {layer.name: layer.shared for layer in zipped.zip_report.layers}
    assert [shared[f"grouped_group{k}"] for k in range(4)] == [2, 2, 2, 2]
    # The residual stream is cut at stream_grouped's 8 groups; "stem" names all of its blocks, and
    # "expand" (tied to it by the Add) follows.
    assert [shared[f"{name}_block{k}"] for name in ("stem", "expand") for k in range(8)] == [2] * 16
    assert all(shared[f"stream_grouped_group{k}"] == 0 for k in range(8))
    with pytest.raises(ValueError, match=r"sharing\['grouped'\] asks for 17 shared units"):
        tf_mtz.zip_models({"a": model, "b": copy}, x, sharing={"grouped": 17}, verbose=0)


def test_to_tf_keras_rebuilds_the_group_slices(x):
    """The zipped groups' channel slices become tf_keras slicing layers with the same outputs. (tfmot's
    quantize_model of such a model is not supported: its cloning drops tf_keras slices; docs/api.md.)"""
    pytest.importorskip("tf_keras")
    model = resnext("resnext")
    zipped = tf_mtz.zip_models({"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=1)}, x, sharing=0.5,
                               verbose=0)
    legacy = tf_mtz.to_tf_keras(zipped)
    expected = zipped.predict(x, verbose=0)
    rebuilt = legacy.predict(x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(rebuilt[task], expected[task], rtol=1e-5, atol=1e-6)


def test_fully_shared_grouped_model_takes_quantization_aware_training(x):
    """Fused back into one grouped Conv2D, a fully shared model has no slices: tfmot's quantize_model
    takes its tf_keras rebuild (partly shared ones, with slices, are refused by tfmot: docs/api.md)."""
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    zipped = tf_mtz.zip_models({"a": resnext("a"), "b": resnext("b", seed=3)}, x, verbose=0)
    legacy = tf_mtz.to_tf_keras(zipped)
    qat = tfmot.quantization.keras.quantize_model(legacy)
    assert sum(getattr(layer.layer, "groups", 1) == 4 for layer in qat.layers if hasattr(layer, "layer")) == 1
    expected = zipped.predict(x, verbose=0)
    import tf_keras

    qat.compile(optimizer=tf_keras.optimizers.Adam(1e-4), loss={t: "mse" for t in ("a", "b")})
    history = qat.fit(x, expected, epochs=5, batch_size=16, verbose=0)  # training sets the int8 ranges
    assert np.isfinite(history.history["loss"]).all()
    quantized = qat.predict(x, verbose=0)
    for task in ("a", "b"):  # random models' outputs span little: int8 follows them, not exactly
        assert np.corrcoef(quantized[task].ravel(), expected[task].ravel())[0, 1] > 0.7


def test_groups_in_another_order_are_lined_up_as_blocks(x):
    """`permuted_copy` also moves whole groups (with the channels they read and write). Zipped group k with
    group k, the copy's groups meet the wrong partners; lined up as blocks first (the default), both tasks
    come back exactly, and the report names the order found."""
    from tf_mtz.experimental import ExperimentalConfig

    model = resnext("resnext")
    copy = tf_mtz.testing.permuted_copy(model, seed=1)
    expected = model.predict(x, verbose=0)
    in_order = tf_mtz.zip_models({"a": model, "b": copy}, x, config=ExperimentalConfig(group_matching="in_order"),
                                 verbose=0)
    assert relative_error(in_order.predict(x, verbose=0)["b"], expected) > 1e-2
    zipped = zipped_giving_back({"a": model, "b": copy}, x, expected)
    orders = zipped.zip_report.settings["group_orders"]["b"]
    assert sorted(orders) == ["grouped", "stream_grouped"]
    assert sorted(orders["grouped"]) == [0, 1, 2, 3] and orders["grouped"] != [0, 1, 2, 3]
    # The copy's own group k is what the zipped model puts at index order[k]: its kernel columns there.
    kernel = copy.get_layer("grouped").get_weights()[0]
    reference = model.get_layer("grouped").get_weights()[0]
    per_group = kernel.shape[-1] // 4
    for k, old in enumerate(orders["grouped"]):
        got = np.sort(np.abs(kernel[..., old * per_group:(old + 1) * per_group]).ravel())
        want = np.sort(np.abs(reference[..., k * per_group:(k + 1) * per_group]).ravel())
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_block_costs_find_moved_blocks_and_score_identical_ones_by_their_width():
    from tf_mtz import group_pairing

    a = np.random.default_rng(0).normal(size=(500, 12))
    moved = np.concatenate([a[:, 8:12][:, [1, 0, 3, 2]], a[:, 0:4], a[:, 4:8][:, ::-1]], axis=1)
    costs = group_pairing.block_costs(a, moved, 3)
    assert np.argmin(costs, axis=1).tolist() == [1, 2, 0]
    # A block against its own units reordered: every unit pairs with itself at correlation 1.
    np.testing.assert_allclose([costs[0, 1], costs[1, 2], costs[2, 0]], -4.0, rtol=1e-9)
    assert costs[0, 0] > -2.0


def test_groups_whose_channels_another_grouping_reads_keep_their_order(rng):
    """Two grouped layers read one feature in 2 and in 4 groups: moving the 4 blocks would split the 2-group
    layer's groups, so neither moves (group k with group k), and the zip still gives back both tasks."""
    from tf_mtz import permute

    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", groups=2, name="grouped_a")(x)
    z = keras.layers.Conv2D(8, 3, padding="same", groups=4, name="grouped_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Concatenate()([y, z]))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layout = permute.read_layout(model, clone)
    assert layout.families == []
    copy = tf_mtz.testing.permuted_copy(model, seed=2)
    data = rng.normal(size=(32, 6, 6, 3)).astype("float32")
    expected = model.predict(data, verbose=0)
    np.testing.assert_allclose(copy.predict(data, verbose=0), expected, rtol=1e-5, atol=1e-6)
    zipped_giving_back({"a": model, "b": copy}, data, expected)


def test_three_tasks_each_lined_up_with_the_first_at_half_sharing(x):
    model = resnext("resnext")
    models = {"a": model, "b": tf_mtz.testing.permuted_copy(model, seed=1),
              "c": tf_mtz.testing.permuted_copy(model, seed=2)}
    zipped = zipped_giving_back(models, x, model.predict(x, verbose=0), sharing=0.5)
    orders = zipped.zip_report.settings["group_orders"]
    assert sorted(orders) == ["b", "c"] and orders["b"]["grouped"] != orders["c"]["grouped"]
