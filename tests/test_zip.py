"""End-to-end behaviour of zip_models on small models."""

import dataclasses
import keras
import numpy as np
import pytest

import tf_mtz
from tf_mtz.experimental import ExperimentalConfig
from conftest import mlp, permuted_copy, small_cnn


def predict(model, x):
    return model.predict(x, verbose=0, batch_size=512)


def output_gap(originals, x, squared):
    """A function measuring how far a zipped model's outputs are from the original models' on `x`."""
    teacher = {t: predict(m, x) for t, m in originals.items()}

    def gap(model):
        out = predict(model, x)
        return sum(np.mean(np.square(out[t] - teacher[t]) if squared else np.abs(out[t] - teacher[t]))
                   for t in teacher)

    return gap


@pytest.mark.parametrize("builder,shape", [(mlp, (20,)), (small_cnn, (12, 12, 1))])
@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_permuted_copy_reproduces_outputs_and_costs_vanish(rng, builder, shape, sharing):
    model = builder("a")
    copy, perms = permuted_copy(model, seed=1)
    x = rng.normal(size=(400,) + shape).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing, verbose=0)
    expected = predict(model, x)
    outputs = predict(zipped, x)
    for task in ("a", "b"):
        np.testing.assert_allclose(outputs[task], expected, atol=1e-5)
    report = zipped.zip_report
    hidden = [layer for layer in report.layers if not layer.head]
    for layer, perm in zip(hidden, perms):
        assert layer.shared == round(sharing * layer.units["a"])
        assert layer.cost_max <= 1e-5 * max(1.0, layer.cost_sum + 1.0)
        # Shared unit i merges unit i of A with the unit of B that is a copy of it.
        np.testing.assert_array_equal(np.argsort(perm)[layer.shared_units["a"]], layer.shared_units["b"])


def test_three_models_with_different_widths_and_heads(rng):
    a = small_cnn("a", filters=(6, 8), dense=20, classes=10, seed=0)
    b = small_cnn("b", filters=(7, 9), dense=24, classes=3, seed=1)
    c = small_cnn("c", filters=(6, 10), dense=22, classes=4, seed=2)
    x = rng.normal(size=(300, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b, "c": c}, x, sharing=1.0, verbose=0)
    out = predict(zipped, x[:10])
    assert {k: v.shape for k, v in out.items()} == {"a": (10, 10), "b": (10, 3), "c": (10, 4)}
    assert all(np.isfinite(v).all() for v in out.values())
    assert [layer.shared for layer in zipped.zip_report.layers] == [6, 8, 20, 0]
    assert zipped.zip_report.params_zipped == zipped.count_params()
    assert sum(layer.params_after for layer in zipped.zip_report.layers) == zipped.count_params()


def test_three_permuted_copies_reproduce_outputs(rng):
    model = mlp("a", widths=(12, 10))
    b, _ = permuted_copy(model, seed=1)
    c, _ = permuted_copy(model, seed=2)
    x = rng.normal(size=(300, 20)).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": b, "c": c}, x, verbose=0)
    out = predict(zipped, x)
    for task in "abc":
        np.testing.assert_allclose(out[task], predict(model, x), atol=1e-5)


def test_fully_shared_prefix_is_one_trunk_and_partial_layers_share_weights(rng):
    a, b = mlp("a", widths=(16, 12, 8, 6), seed=0), mlp("b", widths=(16, 12, 8, 6), seed=1)
    x = rng.normal(size=(200, 20)).astype("float32")
    sharing = {"fc1": 1.0, "fc2": 0.5, "fc3": 1.0, "fc4": 1.0}
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing=sharing, verbose=0)
    names = [layer.name for layer in zipped.layers]
    assert "fc1_shared" in names and "a_fc1" not in names and "b_fc1" not in names
    # fc1 and the shared half of fc2 read only the common trunk: computed once for both tasks.
    assert len(zipped.get_layer("fc1_shared")._inbound_nodes) == 1
    assert len(zipped.get_layer("fc2_shared")._inbound_nodes) == 1
    # fc3's shared units also get each task's own fc2 units, added per task ...
    assert len(zipped.get_layer("fc3_shared")._inbound_nodes) == 1
    assert {"a_fc3_into_shared", "b_fc3_into_shared", "a_fc2", "b_fc2"} <= set(names)
    # ... so from there on the shared weights run on two branches.
    assert len(zipped.get_layer("fc4_shared")._inbound_nodes) == 2
    assert zipped.zip_report.params_zipped == zipped.count_params()


def test_inputs_untouched_and_keras_round_trip_without_custom_objects(rng, tmp_path):
    a, b = small_cnn("a", seed=0), small_cnn("b", seed=1)
    before = [w.copy() for m in (a, b) for w in m.get_weights()]
    x = rng.normal(size=(200, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    after = [w for m in (a, b) for w in m.get_weights()]
    assert all(np.array_equal(u, v) for u, v in zip(before, after))
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    loaded = keras.models.load_model(path)
    for task, value in predict(zipped, x).items():
        np.testing.assert_array_equal(predict(loaded, x)[task], value)
    standard = {cls.__module__.split(".")[0] for cls in map(type, loaded.layers)}
    assert standard == {"keras"}


def test_optimal_matching_total_cost_not_above_greedy(rng):
    a, b = mlp("a", widths=(30,), seed=0), mlp("b", widths=(30,), seed=5)
    x = rng.normal(size=(500, 20)).astype("float32")
    greedy = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig(matching="greedy"), verbose=0).zip_report
    optimal = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0).zip_report
    assert optimal.layers[0].cost_sum <= greedy.layers[0].cost_sum + 1e-6
    assert greedy.layers[0].cost_sum > 0


def test_reported_cost_equals_measured_preactivation_error_undamped(rng):
    """Zipping a linear hidden layer: report.cost_sum is ½ Σ_tasks E‖z_zipped − z_task‖² on the data."""
    a = mlp("a", widths=(10,), activation="linear", seed=0)
    b = mlp("b", widths=(10,), activation="linear", seed=1)
    x_a = rng.normal(size=(2000, 20)).astype("float32")
    x_b = (rng.normal(size=(2000, 20)) * 2 + 0.3).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, {"a": x_a, "b": x_b}, config=tf_mtz.ZipConfig(damping=0.0), verbose=0)
    layer = zipped.zip_report.layers[0]
    shared = keras.Model(zipped.inputs, zipped.get_layer("fc1_shared").output)
    measured = 0.0
    for task, model, x in (("a", a, x_a), ("b", b, x_b)):
        original = keras.Model(model.inputs, model.get_layer("fc1").output)
        z = predict(original, x)[:, layer.shared_units[task]]
        measured += 0.5 * np.mean(np.sum((predict(shared, x) - z) ** 2, axis=1))
    np.testing.assert_allclose(layer.cost_sum, measured, rtol=2e-3)


def test_retraining_and_fine_tune_reduce_distillation_gap(rng):
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(2000, 20)).astype("float32")
    gap = output_gap({"a": a, "b": b}, x, squared=False)

    raw = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig.paper(), verbose=0)
    retrained = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig.paper(), verbose=0,
                                  retrain=tf_mtz.Retrain(steps_per_layer=150, learning_rate=3e-3))
    assert gap(retrained) < 0.7 * gap(raw)
    losses = [layer.retrain_loss for layer in retrained.zip_report.layers if not layer.head]
    assert all(np.isfinite(losses))
    before = gap(raw)
    tf_mtz.fine_tune(raw, tf_mtz.Retrain(data=x, learning_rate=3e-3), steps=200, teachers={"a": a, "b": b},
                     verbose=0)
    assert gap(raw) < 0.7 * before


def test_label_retraining_improves_accuracy(rng):
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(3000, 20)).astype("float32")
    w = rng.normal(size=(20, 5))
    y = np.argmax(x @ w, axis=1)
    retrain = tf_mtz.Retrain(data=(x, y), steps_per_layer=200, loss="labels", learning_rate=3e-3)
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, retrain=retrain, evaluation_data=(x, y), verbose=0)
    out = predict(zipped, x)
    accuracy = {t: np.mean(np.argmax(out[t], 1) == y) for t in ("a", "b")}
    assert accuracy["a"] > 0.6 and accuracy["b"] > 0.6
    report = zipped.zip_report
    for t in ("a", "b"):
        np.testing.assert_allclose(report.accuracy_final[t], accuracy[t])
        np.testing.assert_allclose(report.accuracy_original[t], np.mean(np.argmax(predict({"a": a, "b": b}[t], x),
                                                                                  1) == y))
        # Retraining on the labels raised accuracy over the freshly zipped layer.
        assert report.layers[1].accuracy_retrained[t] > report.layers[1].accuracy_zipped[t]
    assert ("fc1 zipped", report.layers[0].accuracy_zipped) in report.accuracy_rows()


def test_refit_brings_zipped_outputs_closer_to_the_originals(rng):
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(2000, 20)).astype("float32")
    gap = output_gap({"a": a, "b": b}, x, squared=True)

    paper = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig.paper(), verbose=0)
    refitted = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    assert refitted.zip_report.settings["refit"] and not paper.zip_report.settings["refit"]
    assert gap(refitted) < 0.5 * gap(paper)


@pytest.mark.parametrize("pairing,merge,matching", [("euclidean", "average", "greedy"), ("weights", "average", "optimal"),
                                                    ("correlation", "average", "greedy"), ("random", "average", "greedy"),
                                                    ("hessian", "first", "greedy")])
def test_baseline_strategies_zip_permuted_copies(rng, pairing, merge, matching):
    """Every pairing but random finds the permutation of a permuted copy, and then any merge keeps the outputs."""
    model = mlp("a", widths=(12, 10))
    copy, _ = permuted_copy(model, seed=3)
    x = rng.normal(size=(400, 20)).astype("float32")
    config = ExperimentalConfig(pairing=pairing, merge=merge, matching=matching, refit=False)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, config=config, verbose=0)
    error = np.abs(predict(zipped, x)["a"] - predict(model, x)).max()
    if pairing == "random":
        assert error > 1e-3 and zipped.zip_report.layers[0].cost_sum > 0
    else:
        assert error < 1e-5
        assert zipped.zip_report.settings["pairing"] == pairing


def test_same_inputs_give_bit_identical_weights(rng):
    a, b = small_cnn("a", seed=0), small_cnn("b", seed=1)
    x = rng.normal(size=(256, 12, 12, 1)).astype("float32")
    runs = [tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0, sharing=0.75,
                              retrain=tf_mtz.Retrain(steps_per_layer=20, seed=3)) for _ in range(2)]
    first, second = (run.get_weights() for run in runs)
    assert len(first) == len(second)
    for u, v in zip(first, second):
        np.testing.assert_array_equal(u, v)


def _relative_preactivation_mismatch(zipped, originals, layer, x):
    """Σ_t ‖zipped − original‖² / (n·var) of `layer`'s pre-activations, measured with Keras."""
    total = 0.0
    for t, model in originals.items():
        kernel, bias = model.get_layer(layer).get_weights()
        before = model.get_layer(layer).input
        original = keras.Model(model.inputs, before).predict(x, verbose=0) @ kernel + bias
        zipped_layer = zipped.get_layer(f"{t}_{layer}")
        z_kernel, z_bias = zipped_layer.get_weights()
        z_input = keras.Model(zipped.inputs, zipped_layer.input).predict(x, verbose=0)
        z_input = z_input[t] if isinstance(z_input, dict) else z_input
        total += np.sum((z_input @ z_kernel + z_bias - original) ** 2) / np.sum((original - original.mean(0)) ** 2)
    return total


def test_reported_mismatch_equals_measured_relative_error_of_the_refit_layer(rng):
    """The refit's leftover mismatch, computed from Gram statistics, is the error Keras measures; it is
    reported on the layer that was refit (fc2, whose inputs fc1's merge changed), not on fc1."""
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(600, 20)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing={"fc1": 1.0}, verbose=0)
    assert zipped.zip_report.layers[0].mismatch is None  # fc1 reads the model input: nothing to refit
    reported = zipped.zip_report.layers[1].mismatch
    measured = _relative_preactivation_mismatch(zipped, {"a": a, "b": b}, "fc2", x)
    assert 1e-3 < measured < 2.0
    np.testing.assert_allclose(reported, measured, rtol=1e-3)


def test_config_presets_and_explicit_options(rng):
    """The documented presets: the default pairs by weight matching with the optimal assignment, averages
    and refits; ZipConfig.paper() is the published procedure; explicit options override a preset; the
    report records the configuration used."""
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(300, 20)).astype("float32")
    pick = ("pairing", "matching", "merge", "refit")
    assert [getattr(tf_mtz.ZipConfig(), k) for k in pick] == ["weights", "optimal", "average", True]
    assert [getattr(tf_mtz.ZipConfig.paper(), k) for k in pick] == ["hessian", "greedy", "hessian", False]
    explicit = tf_mtz.ZipConfig(matching="greedy", pairing="hessian")
    assert [getattr(explicit, k) for k in pick] == ["hessian", "greedy", "average", True]
    assert tf_mtz.ZipConfig.paper(refit=True).refit and explicit.replace(damping=0.5).damping == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        explicit.damping = 1.0
    default = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    paper = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig.paper(), verbose=0)
    assert {k: default.zip_report.settings[k] for k in pick} == {k: getattr(tf_mtz.ZipConfig(), k) for k in pick}
    assert paper.zip_report.settings["pairing"] == "hessian" and paper.zip_report.layers[0].mismatch is None
    assert default.zip_report.layers[1].mismatch is not None  # the default refits fc2 after fc1 is zipped
    np.testing.assert_array_less(0, paper.zip_report.layers[0].cost_sum)
    # The baselines are refused by ZipConfig with a pointer to where they are, and work from there.
    with pytest.raises(ValueError, match=r"pairing must be one of \('weights', 'hessian'\).*experimental"):
        tf_mtz.ZipConfig(pairing="random")
    assert ExperimentalConfig.paper(pairing="random").pairing == "random"

