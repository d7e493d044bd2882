"""Models of different depths: the common prefix is zipped and each model keeps the rest as its own branch."""

import keras
import numpy as np
import pytest

import tf_mtz
from conftest import (permuted_copy, permuted_graph_copy, randomize_batch_norms, randomize_weights, relative_error,
                      resnet)


def conv_net(name, convs, seed, classes=5, bn=False):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 12, 1), name="image")
    h = x
    for k in range(convs):
        h = keras.layers.Conv2D(6 + 2 * k, 3, padding="same", activation=None if bn else "relu",
                                name=f"conv{k + 1}")(h)
        if bn:
            h = keras.layers.ReLU(name=f"relu{k + 1}")(keras.layers.BatchNormalization(name=f"bn{k + 1}")(h))
    h = keras.layers.Flatten(name="flatten")(h)
    return keras.Model(x, keras.layers.Dense(classes, activation="softmax", name="head")(h), name=name)


def deeper_with_prefix_of(shallow, deeper):
    """`deeper` with the weights of every layer it has in common with `shallow` (by name) taken from it."""
    for layer in shallow.layers:
        if layer.get_weights() and layer.name in [l.name for l in deeper.layers] and layer.name != "head":
            deeper.get_layer(layer.name).set_weights(layer.get_weights())
    return deeper


def outputs_of(model, x):
    out = model.predict(x, verbose=0)
    return out if isinstance(out, dict) else {"out": out}


def test_a_net_zipped_with_a_deeper_net_that_starts_with_its_permuted_copy_reproduces_both(rng, tmp_path):
    shallow = conv_net("three_convs", 3, seed=1, bn=True)
    randomize_batch_norms(shallow, seed=1)
    deeper = deeper_with_prefix_of(permuted_graph_copy(shallow, seed=2), conv_net("five_convs", 5, seed=3, bn=True))
    x = rng.normal(size=(300, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": shallow, "b": deeper}, x, verbose=0)

    out = zipped.predict(x[:64], verbose=0)
    assert relative_error(out["a"], shallow.predict(x[:64], verbose=0)) < 1e-4
    assert relative_error(out["b"], deeper.predict(x[:64], verbose=0)) < 1e-4
    report = zipped.zip_report
    assert report.prefix["prefix_layers"][-1] == "relu3"
    assert "flatten" in report.prefix["stopped"] and "conv4" in report.prefix["stopped"]
    assert report.prefix["branches"]["a"] == ["flatten", "head"]
    assert [layer.shared for layer in report.layers if not layer.head] == [6, 8, 10]
    # One trunk computes the three shared convolutions for both tasks.
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in zipped.layers) == 3 + 2
    assert report.params_zipped < report.params_original
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    loaded = keras.models.load_model(path)
    assert relative_error(loaded.predict(x[:64], verbose=0)["b"], out["b"]) < 1e-6


def test_resnet20_and_resnet32_zip_over_their_first_stage(rng):
    """ResNet-20 and ResNet-32 agree up to the end of the first stage (3 blocks): the 20 goes on to the
    strided second stage, the 32 to a fourth block whose identity shortcut reads the cut itself."""
    r20 = randomize_batch_norms(resnet("resnet20", depth=20, width=4, input_shape=(16, 16, 3), seed=1), seed=1)
    r32 = randomize_batch_norms(resnet("resnet32", depth=32, width=4, input_shape=(16, 16, 3), seed=2), seed=2)
    r32 = deeper_with_prefix_of(permuted_graph_copy(r20, seed=3), r32)
    x = rng.normal(size=(200, 16, 16, 3)).astype("float32")
    zipped = tf_mtz.zip_models({"r20": r20, "r32": r32}, x, verbose=0)

    out = zipped.predict(x[:48], verbose=0)
    assert relative_error(out["r20"], r20.predict(x[:48], verbose=0)) < 1e-4
    assert relative_error(out["r32"], r32.predict(x[:48], verbose=0)) < 1e-4
    prefix = zipped.zip_report.prefix
    assert prefix["prefix_layers"][-1] == "s1b3_out" and prefix["cuts"] == ["s1b3_out"]
    assert {"s2b1_conv1", "s2b1_shortcut"} <= set(prefix["branches"]["r20"]) and "s1b1_conv1" not in prefix["branches"]["r20"]
    assert prefix["branches"]["r32"][0] == "s1b4_conv1" and "s5b1_conv1" not in prefix["branches"]["r32"]
    assert tf_mtz.tflite_bytes(zipped)  # standard layers only


def test_an_alignment_zips_a_shorter_prefix_and_the_branches_still_reproduce(rng):
    shallow = conv_net("three_convs", 3, seed=1)
    deeper = deeper_with_prefix_of(permuted_copy(shallow, seed=2)[0], conv_net("five_convs", 5, seed=3))
    x = rng.normal(size=(300, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": shallow, "b": deeper}, x, alignment={"conv2": "conv2"}, verbose=0)

    assert zipped.zip_report.prefix["prefix_layers"] == ["conv1", "conv2"]
    assert zipped.zip_report.prefix["branches"]["b"][0] == "conv3"
    out = zipped.predict(x[:64], verbose=0)
    assert relative_error(out["a"], shallow.predict(x[:64], verbose=0)) < 1e-4
    assert relative_error(out["b"], deeper.predict(x[:64], verbose=0)) < 1e-4


def test_the_final_distillation_trains_the_branches_and_the_prefix_together(rng):
    # Sharpened outputs and no refit leave a gap that only the retraining of the whole model can close.
    a = randomize_weights(conv_net("three_convs", 3, seed=1), seed=1, scale=0.3)
    b = randomize_weights(conv_net("five_convs", 5, seed=2), seed=2, scale=0.3)
    x = rng.normal(size=(1024, 12, 12, 1)).astype("float32")

    def divergence(teacher, student):
        return float(np.mean(np.sum(teacher * (np.log(teacher + 1e-9) - np.log(student + 1e-9)), axis=-1)))

    kl = {}
    for steps in (0, 300):
        retrain = tf_mtz.Retrain(steps_per_layer=0, final_steps=steps) if steps else None
        zipped = tf_mtz.zip_models({"a": a, "b": b}, x, retrain=retrain, config=tf_mtz.ZipConfig(refit=False),
                                   verbose=0)
        out = zipped.predict(x, verbose=0)
        kl[steps] = [divergence(m.predict(x, verbose=0), out[t]) for t, m in (("a", a), ("b", b))]
    assert all(after < 0.6 * before for before, after in zip(kl[0], kl[300])), kl
    assert zipped.zip_report.settings["retrain"]["final_steps"] == 300


def test_models_with_no_common_prefix_or_a_bad_alignment_are_refused(rng):
    x = rng.normal(size=(64, 12, 12, 1)).astype("float32")
    dense_first = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Flatten(), keras.layers.Dense(8),
                                    keras.layers.Dense(5, activation="softmax")], name="dense_first")
    with pytest.raises(tf_mtz.ZipError, match="No layer with units lines up.*'flatten.*' \\(Flatten\\).*'conv1'"):
        tf_mtz.zip_models({"a": dense_first, "b": conv_net("convs", 3, seed=1)}, x, verbose=0)
    a, b = conv_net("three_convs", 3, seed=1), conv_net("five_convs", 5, seed=2)
    with pytest.raises(tf_mtz.ZipError, match="'conv2' of model 'three_convs' with 'conv3'.*layers 2 and 3"):
        tf_mtz.zip_models({"a": a, "b": b}, x, alignment={"conv2": "conv3"}, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="does not have"):
        tf_mtz.zip_models({"a": a, "b": b}, x, alignment={"conv9": "conv3"}, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="differ before it"):
        tf_mtz.zip_models({"a": a, "b": b}, x, alignment={"flatten": "conv4"}, verbose=0)


def test_heads_with_other_kernels_become_branches_whose_linear_maps_fold_into_them(rng):
    """A full-map 'valid' convolution head next to a 1x1 head: they read other rows, so each is a branch,
    and the maps giving them their own features fold into their kernels (no extra layer)."""
    def model(name, kernel, units, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((8, 8, 1), name="image")
        h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
        return keras.Model(x, keras.layers.Flatten(name="flat")(
            keras.layers.Conv2D(units, kernel, padding="valid", name="head")(h)), name=name)

    a = model("full_map", 8, 3, 0)
    b = model("one_by_one", 1, 1, 1)
    b.get_layer("conv").set_weights(permuted_copy(a, seed=2)[0].get_layer("conv").get_weights())
    x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    out = zipped.predict(x[:32], verbose=0)
    assert relative_error(out["a"], a.predict(x[:32], verbose=0)) < 1e-4
    assert relative_error(out["b"], b.predict(x[:32], verbose=0)) < 1e-4
    assert zipped.zip_report.prefix["branches"] == {"a": ["head", "flat"], "b": ["head", "flat"]}
    assert not [layer.name for layer in zipped.layers if layer.name.endswith("_branch_input")]
    assert zipped.count_params() == 4 * 9 + 4 + (8 * 8 * 4 + 1) * 3 + (4 + 1) * 1


def test_auto_sharing_judges_a_zipped_prefix_through_each_models_branch(rng):
    """AutoSharing on models of different depths chooses the prefix's sharing by the whole models' outputs:
    a deeper model starting with the shallow one's permuted copy passes at full sharing (nothing is lost), and
    for two unrelated nets the loss it records for the last choice is the one the assembled model gives."""
    x = rng.normal(size=(200, 12, 12, 1)).astype("float32")
    shallow = conv_net("three_convs", 3, seed=1)
    deeper = deeper_with_prefix_of(permuted_graph_copy(shallow, seed=2), conv_net("five_convs", 5, seed=3))
    zipped = tf_mtz.zip_models({"a": shallow, "b": deeper}, x, sharing=tf_mtz.AutoSharing(0.0, step=0.5),
                               verbose=0)
    assert [layer.shared for layer in zipped.zip_report.layers if not layer.head] == [6, 8, 10]
    assert all(record["chosen"] == record["width"] for record in zipped.zip_report.auto_sharing)

    a, b = conv_net("three_convs", 3, seed=4), conv_net("five_convs", 5, seed=5)
    own = {"a": a.predict(x, verbose=0), "b": b.predict(x, verbose=0)}
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing=tf_mtz.AutoSharing(0.5, step=0.25), verbose=0)
    records = zipped.zip_report.auto_sharing
    assert [r["layer"] for r in records] == ["conv1", "conv2", "conv3"]
    last = records[-1]
    assert last["chosen"] > 0
    losses = dict(last["candidates"])[last["chosen"]]
    out = zipped.predict(x, verbose=0)
    for t in ("a", "b"):  # the judge's loss of a softmax head without labels: top-1 departures
        assert 0 < losses[t] <= 0.5 + 1e-9
        assert abs(float(np.mean(np.argmax(out[t], -1) != np.argmax(own[t], -1))) - losses[t]) <= 1 / len(x)
