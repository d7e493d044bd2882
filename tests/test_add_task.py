"""add_task: further models zipped into a zipped model, matched against its shared units."""

import keras
import numpy as np
import pytest

import tf_mtz
from tf_mtz.tasks import task_models
from conftest import mlp, relative_error


def test_added_copy_leaves_the_zipped_tasks_unchanged_and_reproduces_its_model(rng, tmp_path):
    x = rng.normal(size=(400, 20)).astype("float32")
    models = {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}
    zipped = tf_mtz.zip_models(models, x, config=tf_mtz.ZipConfig(refit=False), verbose=0)
    before = zipped.predict(x, verbose=0)
    # A permuted copy of task a's zipped network: its units pair with the shared ones exactly.
    c = tf_mtz.testing.permuted_copy(task_models(zipped)["a"], seed=3)
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    grown = tf_mtz.add_task(keras.models.load_model(path), {"c": c}, x, config=tf_mtz.ZipConfig(refit=False),
                            verbose=0)
    after = grown.predict(x, verbose=0)
    assert set(after) == {"a", "b", "c"}
    for task in ("a", "b"):  # shared units kept their weights (reordered: equal up to float rounding)
        np.testing.assert_allclose(after[task], before[task], rtol=1e-5, atol=1e-6)
    assert relative_error(after["c"], before["a"]) < 1e-4
    assert grown.count_params() == zipped.count_params() + grown.get_layer("c_head").count_params()
    assert [layer.name for layer in grown.zip_report.layers] == ["fc1", "fc2", "head"]  # names as zipped


def test_adding_a_trained_model_and_the_errors(rng):
    x = rng.normal(size=(400, 20)).astype("float32")
    models = {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}
    zipped = tf_mtz.zip_models(models, x, verbose=0)
    grown = tf_mtz.add_task(zipped, {"c": mlp("c", seed=2)}, x, verbose=0)
    assert [layer.shared for layer in grown.zip_report.layers[:2]] == [24, 16]
    with pytest.raises(tf_mtz.ZipError, match="already in the zipped model"):
        tf_mtz.add_task(zipped, {"a": mlp("c", seed=2)}, x, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="outputs keyed by task"):
        tf_mtz.add_task(models["a"], {"c": mlp("c", seed=2)}, x, verbose=0)
    half = tf_mtz.zip_models(models, x, sharing=0.5, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="shares its hidden layers whole"):
        tf_mtz.add_task(half, {"c": mlp("c", seed=2)}, x, verbose=0)


def test_teachers_make_the_final_retraining_distil_the_zipped_tasks_from_their_own_models(rng):
    x = rng.normal(size=(600, 20)).astype("float32")
    own = {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}
    # A poor A+B zip (no refit, paper-free averaging): its own outputs are a bad teacher for a and b.
    zab = tf_mtz.zip_models(own, x, config=tf_mtz.ZipConfig(refit=False), verbose=0)
    retrain = tf_mtz.Retrain(steps_per_layer=0, final_steps=300)
    gap = {}
    for label, teachers in (("zipped", None), ("own", own)):
        grown = tf_mtz.add_task(zab, {"c": mlp("c", seed=2)}, x, retrain=retrain, teachers=teachers, verbose=0)
        out = grown.predict(x, verbose=0)
        gap[label] = {t: float(np.abs(out[t] - own[t].predict(x, verbose=0)).mean()) for t in own}
    assert all(gap["own"][t] < 0.8 * gap["zipped"][t] for t in own), gap
    assert grown.zip_report.settings["retrain"]["teachers"] == ["a", "b"]
    with pytest.raises(tf_mtz.ZipError, match=r"teachers name \['c'\]"):
        tf_mtz.add_task(zab, {"c": mlp("c", seed=2)}, x, retrain=retrain, teachers={"c": own["a"]}, verbose=0)


def test_a_deeper_model_is_added_over_the_zipped_trunk_and_a_shallower_one_is_refused(rng):
    """A model with one more hidden layer, whose first two are a permuted copy of task a's zipped network:
    it zips over the common prefix (the whole zipped trunk), the zipped tasks keep their outputs and the new
    one reproduces its model. A model that stops inside the zipped trunk would pull it apart: refused."""
    x = rng.normal(size=(400, 20)).astype("float32")
    zipped = tf_mtz.zip_models({"a": mlp("a", seed=0), "b": mlp("b", seed=1)}, x,
                               config=tf_mtz.ZipConfig(refit=False), verbose=0)
    before = zipped.predict(x, verbose=0)
    copy = tf_mtz.testing.permuted_copy(task_models(zipped)["a"], seed=3)
    deeper = mlp("deeper", widths=(24, 16, 12), seed=4)
    for name in ("fc1", "fc2"):
        deeper.get_layer(name).set_weights(copy.get_layer(name).get_weights())
    grown = tf_mtz.add_task(zipped, {"c": deeper}, x, config=tf_mtz.ZipConfig(refit=False), verbose=0)
    after = grown.predict(x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(after[task], before[task], rtol=1e-5, atol=1e-6)
    assert relative_error(after["c"], deeper.predict(x, verbose=0)) < 1e-4
    assert grown.zip_report.prefix["branches"]["c"] == ["fc3", "head"]
    # One trunk: the two zipped layers once, then task c's own fc3 and the three heads.
    assert sum(isinstance(layer, keras.layers.Dense) for layer in grown.layers) == 2 + 1 + 3
    with pytest.raises(tf_mtz.ZipError, match=r"share layers after that \(\['fc2'"):
        tf_mtz.add_task(zipped, {"c": mlp("shallow", widths=(24,), seed=5)}, x, verbose=0)
