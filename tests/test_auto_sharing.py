"""AutoSharing: the largest sharing per layer, from the input, within a tolerance of the own models."""

import numpy as np
import pytest

import tf_mtz
from tf_mtz import auto_sharing
from conftest import mlp


def test_largest_passing_finds_the_largest_passing_count_by_interpolation_or_bisection():
    candidates = list(range(0, 21))
    for threshold in (0, 1, 7, 19, 20):
        for kind in ("linear", "steep", "step"):
            tried = []

            def judge(count):
                tried.append(count)
                ratio = {"linear": (count + 0.5) / (threshold + 1), "steep": ((count + 0.5) / (threshold + 1)) ** 4,
                         "step": 0.0 if count <= threshold else np.inf}[kind]
                return count <= threshold, ratio

            assert auto_sharing.largest_passing(candidates, judge) == threshold, (kind, threshold)
            assert len(tried) <= 1 + 3 * int(np.ceil(np.log2(len(candidates)))), (kind, tried)
            if kind == "linear":  # the loss in proportion to the count: the full share, the boundary, its neighbour
                assert len(tried) <= 3, tried
            if kind == "step":  # ratios that say nothing beyond pass or fail: a bisection
                assert len(tried) <= 1 + int(np.ceil(np.log2(len(candidates)))), tried
    assert auto_sharing.candidate_counts(10, 0.25) == [0, 2, 5, 8, 10]  # 2.5 and 7.5 round to even
    assert auto_sharing.candidate_counts(3, 0.05) == [0, 1, 2, 3]
    assert auto_sharing.candidate_counts(10, 0.25, least=1) == [1, 2, 5, 8, 10]


def test_judge_losses_with_and_without_labels():
    own = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    zipped = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7]])  # one top-1 changed of 4
    labels = np.array([0, 1, 1, 1])  # own: 1 error of 4 (25 %); zipped: 2 of 4 (50 %)
    tasks = ("a", "b", "c", "d", "e")
    judge = auto_sharing.Judge({t: 0.3 for t in tasks}, dict.fromkeys(tasks), {**dict.fromkeys(tasks), "a": labels},
                               {"a": own, "b": own, "c": own[:, :1], "d": own, "e": own},
                               {"a": "softmax", "b": "softmax", "c": "linear", "d": "linear", "e": "sigmoid"})
    losses = judge.losses({"a": zipped, "b": zipped, "c": zipped[:, :1], "d": zipped, "e": zipped})
    assert losses["a"] == pytest.approx(25.0)  # percentage points above its own model
    assert losses["b"] == pytest.approx(0.25)  # a fraction of departed top-1 outputs
    assert losses["c"] == pytest.approx(np.linalg.norm(zipped[:, 0] - own[:, 0]) / np.linalg.norm(own[:, 0]))
    # A linear head of several units (a regression of (y, x), a heat map) is judged by its values, not
    # by its arg-max; a sigmoid head by the units that flip.
    assert losses["d"] == pytest.approx(np.linalg.norm(zipped - own) / np.linalg.norm(own))
    assert losses["e"] == pytest.approx(2 / 8)
    assert not judge.passes(losses)
    per_task = auto_sharing.Judge({"a": 30.0, "b": 0.3}, {"a": None, "b": None}, {"a": labels, "b": None},
                                  {"a": own, "b": own}, {"a": "softmax", "b": "softmax"})
    assert per_task.passes(per_task.losses({"a": zipped, "b": zipped}))
    labels = np.zeros(5000, int)
    at_tolerance = auto_sharing.Judge({"a": 0.3}, {"a": None}, {"a": labels}, {"a": np.tile([[1.0, 0.0]], (5000, 1))},
                                      {"a": "softmax"})
    wrong = np.tile([[1.0, 0.0]], (5000, 1))
    wrong[:15] = [0.0, 1.0]  # 15 of 5,000 images: 0.3 points, up to rounding
    assert at_tolerance.passes(at_tolerance.losses({"a": wrong}))


def _tasks(rng):
    x = rng.normal(size=(600, 20)).astype("float32")
    models = {"a": mlp("a", widths=(32, 16), seed=0), "b": mlp("b", widths=(32, 16), seed=1)}
    return models, x


def test_tolerance_decides_the_sharing(rng):
    models, x = _tasks(rng)
    loose = tf_mtz.zip_models(models, x[:400], sharing=tf_mtz.AutoSharing(tolerance=1.0, data=x[400:]), verbose=0)
    assert [layer.shared for layer in loose.zip_report.layers[:2]] == [32, 16]  # anything goes: all shared
    strict = tf_mtz.zip_models(models, x[:400], sharing=tf_mtz.AutoSharing(tolerance=0.0, data=x[400:]),
                               verbose=0)
    record = strict.zip_report.auto_sharing
    assert [r["layer"] for r in record] == [layer.name for layer in strict.zip_report.layers[:2]]
    # No top-1 output may depart: the chosen counts pass, every larger one tried failed.
    for r, layer in zip(record, strict.zip_report.layers):
        assert layer.shared == r["chosen"]
        for count, losses in r["candidates"]:
            if losses is not None and count > r["chosen"]:
                assert max(losses.values()) > 0.0
            if count == r["chosen"] and losses is not None:
                assert max(losses.values()) == 0.0
    assert strict.zip_report.layers[0].shared < 32
    outputs = strict.predict(x[400:], verbose=0)
    for t, model in models.items():
        own = np.argmax(model.predict(x[400:], verbose=0), -1)
        assert np.array_equal(np.argmax(outputs[t], -1), own)  # the zip repeats the accepted trials exactly


@pytest.mark.parametrize("paper", [False, True], ids=["default", "paper"])
def test_auto_sharing_gives_the_zip_of_its_chosen_counts(rng, paper):
    """The zip takes the trial of each chosen count (tried before a larger count that failed, not zipped
    again) and the layer's Hessians measured once for all its trials (the paper's pair costs read them too):
    the weights of a plain zip at the chosen counts."""
    models, x = _tasks(rng)
    config = tf_mtz.ZipConfig.paper() if paper else None
    auto = tf_mtz.zip_models(models, x[:400], sharing=tf_mtz.AutoSharing(tolerance=0.2, data=x[400:]),
                             config=config, verbose=0)
    record = auto.zip_report.auto_sharing
    chosen = {r["layer"]: r["chosen"] for r in record}
    assert any(0 < r["chosen"] < r["width"] and r["candidates"][-1][0] != r["chosen"] for r in record), record
    plain = tf_mtz.zip_models(models, x[:400], sharing=chosen, config=config, verbose=0)
    assert [layer.shared for layer in plain.zip_report.layers] == [layer.shared for layer in auto.zip_report.layers]
    for got, want in zip(auto.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_labelled_tolerance_in_points_and_bad_settings(rng):
    models, x = _tasks(rng)
    y = np.argmax(models["a"].predict(x, verbose=0), -1)
    zipped = tf_mtz.zip_models(models, x[:400], verbose=0,
                               sharing=tf_mtz.AutoSharing(tolerance=2.0, data={"a": (x[400:], y[400:]),
                                                                                "b": (x[400:], y[400:])}))
    assert all(r["candidates"] for r in zipped.zip_report.auto_sharing)
    for bad, message in (({"tolerance": -1}, "tolerance"), ({"tolerance": 0.1, "step": 0}, "step"),
                         ({"tolerance": 0.1, "max_samples": 0}, "max_samples")):
        with pytest.raises(tf_mtz.ZipError, match=message):
            tf_mtz.AutoSharing(**bad)


def test_report_keeps_and_plots_what_was_tried(rng, tmp_path):
    models, x = _tasks(rng)
    zipped = tf_mtz.zip_models(models, x[:400], sharing=tf_mtz.AutoSharing(tolerance=0.02, data=x[400:]), verbose=0)
    report = zipped.zip_report
    assert report.settings["sharing"]["tolerance"] == 0.02
    again = tf_mtz.ZipReport.from_json(report.to_json())
    assert [r["chosen"] for r in again.auto_sharing] == [r["chosen"] for r in report.auto_sharing]
    path = report.plot_auto_sharing(str(tmp_path / "auto.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tolerances_per_task_are_checked():
    assert tf_mtz.AutoSharing({"a": 0.3, "b": 5.0}).tolerances(["a", "b"]) == {"a": 0.3, "b": 5.0}
    assert tf_mtz.AutoSharing(0.3).tolerances(["a", "b"]) == {"a": 0.3, "b": 0.3}
    with pytest.raises(tf_mtz.ZipError, match=r"names tasks \['a'\]; give one for each of \['a', 'b'\]"):
        tf_mtz.AutoSharing({"a": 0.3}).tolerances(["a", "b"])
    with pytest.raises(tf_mtz.ZipError, match="must be a number >= 0"):
        tf_mtz.AutoSharing({"a": -1.0})
