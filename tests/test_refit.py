"""The refit's statistics on a subset of convolution patches, and the probe that feeds it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mtz
from tf_mtz import registry
from conftest import mlp, permuted_copy, small_cnn

LAYERS = [
    (lambda: keras.layers.Conv2D(4, 3, padding="same"), (3, 9, 8, 5)),
    (lambda: keras.layers.Conv2D(4, (3, 2), strides=2, padding="same"), (2, 9, 7, 3)),
    (lambda: keras.layers.Conv2D(4, 3, strides=(2, 1), padding="valid"), (2, 10, 9, 3)),
    (lambda: keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same"), (2, 11, 9, 3)),
    (lambda: keras.layers.Conv1D(4, 3, strides=2, padding="same"), (2, 13, 3)),
    (lambda: keras.layers.Conv1D(4, 5, dilation_rate=2, padding="valid"), (2, 17, 3)),
    (lambda: keras.layers.Dense(4), (6, 5)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_rows_of_patches_equal_the_same_rows_of_all_patches(make, shape, rng):
    layer = make()
    layer.build(shape)
    handler = registry.handler_for(layer)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    for mode in handler.hessian_modes:
        every = handler.hessian_samples(layer, x, mode).numpy()
        assert handler.sample_count(layer, x, mode) == every.shape[0]
        rows = np.sort(rng.choice(every.shape[0], min(7, every.shape[0]), replace=False))
        np.testing.assert_array_equal(handler.hessian_rows(layer, x, mode, rows).numpy(), every[rows])


def test_subsampled_refit_keeps_a_permuted_copy_exact_and_stays_close_to_the_full_refit(rng):
    model = small_cnn("m", filters=(6, 8), seed=0)
    x = rng.normal(size=(400, 12, 12, 1)).astype("float32")
    copy, _ = permuted_copy(model, seed=2)
    # 400 images x 16 positions of conv2's 3x3x6 patches: 6,400 rows for 55 inputs; 4 per input keeps 3%,
    # 32 per input 27%.
    few = tf_mtz.ZipConfig(refit_rows_per_input=4)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, config=few, verbose=0)
    np.testing.assert_allclose(zipped.predict(x, verbose=0)["b"], model.predict(x, verbose=0), atol=1e-5)

    other = small_cnn("o", filters=(6, 8), seed=5)
    mismatch = {}
    for rows in (None, 4, 32):
        config = tf_mtz.ZipConfig(refit_rows_per_input=rows)
        report = tf_mtz.zip_models({"a": model, "b": other}, x, config=config, verbose=0).zip_report
        mismatch[rows] = report.layers[1].mismatch  # conv2, refit after conv1 was merged
    assert 0 < mismatch[None] < 1.0
    # Measured on the rows used: a few rows per unknown overfit (less left over than with every row);
    # with 32 per input the fit is within a few percent of the full one.
    assert mismatch[4] < mismatch[None]
    np.testing.assert_allclose(mismatch[32], mismatch[None], rtol=0.1)


def test_dense_layers_use_every_row_below_the_bound(rng):
    """One row per sample: 300 samples for 21 inputs stay below 32 rows per input, so the bound leaves a
    Dense refit exact; the default (None) is every row."""
    assert tf_mtz.ZipConfig().refit_rows_per_input is None
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(300, 20)).astype("float32")
    every = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    default = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig(refit_rows_per_input=32), verbose=0)
    for u, v in zip(every.get_weights(), default.get_weights()):
        np.testing.assert_array_equal(u, v)
