"""TensorFlow Datasets pipelines work as calibration and retraining data, offline."""

import numpy as np
import pytest
import tensorflow as tf

import tf_mtz
from conftest import small_cnn

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def local_tfds(tmp_path_factory):
    """A tiny dataset written locally in TFDS format and read back through tfds.load (no download)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    rng = np.random.default_rng(0)
    images = (rng.random((64, 12, 12, 1)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, 64)
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(12, 12, 1)),
                                           "label": tfds.features.ClassLabel(num_classes=10)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_local_digits", version="1.0.0", features=features,
        split_datasets={"train": tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})},
        data_dir=data_dir, disable_shuffling=True)
    return data_dir, images.astype(np.float32), labels


def test_tfds_load_output_zips_like_numpy(local_tfds):
    data_dir, images, labels = local_tfds
    a, b = small_cnn("a", seed=0), small_cnn("b", seed=1)
    dicts = tfds.load("tiny_local_digits", split="train", data_dir=data_dir, download=False)
    supervised = dicts.map(lambda e: (e["image"], e["label"]))  # what as_supervised=True gives
    from_tfds = tf_mtz.zip_models({"a": a, "b": b}, {"a": dicts, "b": supervised}, verbose=0)
    from_numpy = tf_mtz.zip_models({"a": a, "b": b}, images, verbose=0)
    for ours, theirs in zip(from_tfds.zip_report.layers, from_numpy.zip_report.layers):
        np.testing.assert_allclose(ours.cost_sum, theirs.cost_sum, rtol=1e-4)
        assert ours.shared_units == theirs.shared_units
    retrain = tf_mtz.Retrain(data=supervised.batch(16), loss="labels", steps_per_layer=5, batch_size=16)
    trained = tf_mtz.zip_models({"a": a, "b": b}, dicts, retrain=retrain, verbose=0)
    assert all(np.isfinite(v).all() for v in trained.predict(images, verbose=0).values())


def test_ambiguous_dict_dataset_is_refused():
    a, b = small_cnn("a", seed=0), small_cnn("b", seed=1)
    ds = tf.data.Dataset.from_tensor_slices({"left": np.zeros((4, 12, 12, 1), np.float32),
                                             "right": np.zeros((4, 12, 12, 1), np.float32)})
    with pytest.raises(ValueError, match=r"keys \['left', 'right'\].*cannot tell which is the input"):
        tf_mtz.zip_models({"a": a, "b": b}, ds, verbose=0)


def test_cli_reads_tfds_calibration(local_tfds, tmp_path):
    import subprocess
    import sys

    data_dir, images, _ = local_tfds
    small_cnn("a", seed=0).save(tmp_path / "a.keras")
    small_cnn("b", seed=1).save(tmp_path / "b.keras")
    result = subprocess.run(
        [sys.executable, "-m", "tf_mtz.cli", "zip", f"--model=a={tmp_path / 'a.keras'}",
         f"--model=b={tmp_path / 'b.keras'}", "--calibration=tfds:tiny_local_digits/train",
         f"--data_dir={data_dir}", f"--output={tmp_path / 'z.keras'}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import keras

    assert set(keras.models.load_model(tmp_path / "z.keras").predict(images, verbose=0)) == {"a", "b"}
