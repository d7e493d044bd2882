"""Calibration data as a stream: a generator or an endless tf.data dataset, read up to
ZipConfig(max_samples=...), and the report says how many samples each task's statistics used."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import tf_mtz
from conftest import mlp


def _models():
    return {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}


def test_a_generator_is_read_up_to_max_samples_and_zips_like_its_array(rng):
    x = rng.normal(size=(500, 20)).astype("float32")
    drawn = []

    def samples():  # endless, one sample at a time
        for i in itertools.count():
            drawn.append(i)
            yield x[i % 500]

    config = tf_mtz.ZipConfig(max_samples=300)
    streamed = tf_mtz.zip_models(_models(), samples(), sharing=0.5, config=config, verbose=0)
    assert len(drawn) == 300  # nothing read past the bound
    assert streamed.zip_report.settings["calibration_samples"] == {"a": 300, "b": 300}
    from_array = tf_mtz.zip_models(_models(), x[:300], sharing=0.5, verbose=0)
    for a, b in zip(streamed.get_weights(), from_array.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_batches_from_a_generator_and_an_endless_dataset(rng):
    x = rng.normal(size=(256, 20)).astype("float32")

    def batches():
        while True:
            yield x[:64]

    zipped = tf_mtz.zip_models(_models(), {"a": batches(), "b": batches()}, verbose=0,
                               config=tf_mtz.ZipConfig(max_samples=200))
    assert zipped.zip_report.settings["calibration_samples"] == {"a": 200, "b": 200}
    endless = tf.data.Dataset.from_tensor_slices(x).repeat()
    zipped = tf_mtz.zip_models(_models(), endless, verbose=0, config=tf_mtz.ZipConfig(max_samples=100))
    assert zipped.zip_report.settings["calibration_samples"] == {"a": 100, "b": 100}
    with pytest.raises(tf_mtz.ZipError, match="endless stream; set ZipConfig\\(max_samples"):
        tf_mtz.zip_models(_models(), endless, verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="yields inputs of shape \\(7,\\)"):
        tf_mtz.zip_models(_models(), iter([np.zeros(7)]), verbose=0)
    with pytest.raises(tf_mtz.ZipError, match="max_samples"):
        tf_mtz.ZipConfig(max_samples=0)
