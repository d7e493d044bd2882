"""Checkpoints: a zip killed at any point resumes from its last layer step and ends bit-identical to an
uninterrupted run; a checkpoint of another zip, or a damaged one, is refused."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tf_mtz
from tf_mtz import checkpoint as checkpoint_lib
from tf_mtz import zipper
from conftest import mlp, small_cnn

TESTS = os.path.dirname(os.path.abspath(__file__))

# A zip with retraining after every layer, run in a child process; `kill` makes the child SIGKILL itself
# at one point: the 4th Gram of the statistics, the 3rd retraining phase halfway, or the rename of the
# 3rd checkpoint it writes. It saves the weights and the report (times left out) when it finishes.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import tf_mtz
    from tf_mtz import checkpoint, retrain, statistics
    from conftest import small_cnn

    kill, out, directory = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
    calls = {{"n": 0}}

    def dies_on(call, patch):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                return patch(*args, **kwargs)
            return wrapped.original(*args, **kwargs)
        return wrapped

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill == "statistics":
        original_augment = statistics.augment
        statistics.augment = dies_on(4, die)
        statistics.augment.original = original_augment
    if kill == "retraining":
        original_run = retrain.JointTrainer.run
        def halfway(self, steps, *args, **kwargs):
            original_run(self, steps // 2, *args, **kwargs)
            die()
        retrain.JointTrainer.run = dies_on(3, halfway)
        retrain.JointTrainer.run.original = original_run
    if kill == "writing":
        checkpoint.os.replace = dies_on(3, die)
        checkpoint.os.replace.original = os.replace

    x = np.random.default_rng(0).normal(size=(240, 12, 12, 1)).astype("float32")
    models = {{"a": small_cnn("a", seed=0), "b": small_cnn("b", seed=1)}}
    zipped = tf_mtz.zip_models(models, x, sharing=0.75, retrain=tf_mtz.Retrain(steps_per_layer=12, final_steps=8),
                               checkpoint_dir=directory, verbose=0)
    np.savez(out + ".npz", *zipped.get_weights())
    report = json.loads(zipped.zip_report.to_json())
    for layer in report["layers"]:
        layer.pop("seconds", None)
        layer.pop("stage_seconds", None)
    report["settings"].pop("seconds", None)
    with open(out + ".json", "w") as f:
        json.dump(report, f, sort_keys=True)
""")


def _run_child(tmp_path, kill, out, directory=None):
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD.format(tests=TESTS))
    args = [sys.executable, str(script), kill, str(out)] + ([str(directory)] if directory else [])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def _result(out):
    weights = np.load(str(out) + ".npz")
    with open(str(out) + ".json") as f:
        return [weights[k] for k in sorted(weights.files, key=lambda k: int(k.split("_")[1]))], f.read()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights and report of the child's zip run without a checkpoint and without a kill."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = _run_child(folder, "none", folder / "reference")
    assert run.returncode == 0, run.stderr[-3000:]
    return _result(folder / "reference")


# Each kill costs two child processes (a minute on 2 cores): the default run kills during the retraining,
# `make test-slow` at the other two points.
@pytest.mark.parametrize("kill", [pytest.param("statistics", marks=pytest.mark.slow), "retraining",
                                  pytest.param("writing", marks=pytest.mark.slow)])
def test_a_zip_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_one(tmp_path, kill, uninterrupted):
    directory = tmp_path / "checkpoints"
    killed = _run_child(tmp_path, kill, tmp_path / "killed", directory)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "killed.npz").exists()
    resumed = _run_child(tmp_path, "none", tmp_path / "resumed", directory)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected_weights, expected_report = uninterrupted
    weights, report = _result(tmp_path / "resumed")
    assert len(weights) == len(expected_weights)
    for got, expected in zip(weights, expected_weights):
        np.testing.assert_array_equal(got, expected)
    assert report == expected_report
    assert [name for name in os.listdir(directory)] == [checkpoint_lib.FILE_NAME]


def test_resuming_in_process_after_an_interruption_and_after_the_end(rng, tmp_path, monkeypatch):
    x = rng.normal(size=(200, 20)).astype("float32")
    models = {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}
    auto = tf_mtz.AutoSharing(tolerance=5.0, data=x[:100], step=0.25)
    reference = tf_mtz.zip_models(models, x, sharing=auto, verbose=0)

    original = zipper._LayerSteps.zip_layer
    calls = []

    def interrupted(self, index):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(zipper._LayerSteps, "zip_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tf_mtz.zip_models(models, x, sharing=auto, checkpoint_dir=tmp_path, verbose=0)
    monkeypatch.setattr(zipper._LayerSteps, "zip_layer", original)
    resumed = tf_mtz.zip_models(models, x, sharing=auto, checkpoint_dir=tmp_path, verbose=0)
    for got, expected in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, expected)
    assert resumed.zip_report.auto_sharing == reference.zip_report.auto_sharing

    # A finished zip's checkpoint returns the same result without zipping a layer again.
    monkeypatch.setattr(zipper._LayerSteps, "zip_layer", lambda self, index: pytest.fail("zipped again"))
    again = tf_mtz.zip_models(models, x, sharing=auto, checkpoint_dir=tmp_path, verbose=0)
    for got, expected in zip(again.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, expected)


def test_a_checkpoint_of_another_zip_or_a_damaged_one_is_refused(rng, tmp_path):
    x = rng.normal(size=(100, 12, 12, 1)).astype("float32")
    models = {"a": small_cnn("a", seed=0), "b": small_cnn("b", seed=1)}
    tf_mtz.zip_models(models, x, checkpoint_dir=tmp_path, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="belongs to another zip"):
        tf_mtz.zip_models(models, x[:90], checkpoint_dir=tmp_path, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="belongs to another zip"):
        tf_mtz.zip_models(models, x, sharing=0.5, checkpoint_dir=tmp_path, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="belongs to another zip"):
        tf_mtz.zip_models({"a": models["a"], "b": small_cnn("b", seed=2)}, x, checkpoint_dir=tmp_path, verbose=0)
    path = tmp_path / checkpoint_lib.FILE_NAME
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(tf_mtz.ZipError, match="is damaged"):
        tf_mtz.zip_models(models, x, checkpoint_dir=tmp_path, verbose=0)
    path.write_bytes(bytes(content[: len(content) // 3]))
    with pytest.raises(tf_mtz.ZipError, match="is damaged"):
        tf_mtz.zip_models(models, x, checkpoint_dir=tmp_path, verbose=0)


def test_add_task_writes_and_resumes_checkpoints(rng, tmp_path, monkeypatch):
    x = rng.normal(size=(200, 20)).astype("float32")
    zipped = tf_mtz.zip_models({"a": mlp("a", seed=0), "b": mlp("b", seed=1)}, x, verbose=0)
    grown = tf_mtz.add_task(zipped, {"c": mlp("c", seed=2)}, x, checkpoint_dir=tmp_path, verbose=0)
    assert (tmp_path / checkpoint_lib.FILE_NAME).exists()
    monkeypatch.setattr(zipper._LayerSteps, "zip_layer", lambda self, index: pytest.fail("zipped again"))
    again = tf_mtz.add_task(zipped, {"c": mlp("c", seed=2)}, x, checkpoint_dir=tmp_path, verbose=0)
    for got, expected in zip(again.get_weights(), grown.get_weights()):
        np.testing.assert_array_equal(got, expected)
