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
TRANSPOSED = [  # decoders: the stride-1 convolution of the dilated input with the flipped kernel
    (lambda: keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same"), (2, 5, 6, 3)),
    (lambda: keras.layers.Conv2DTranspose(4, 2, strides=2, padding="valid"), (2, 4, 5, 3)),
    (lambda: keras.layers.Conv2DTranspose(3, (3, 4), strides=(1, 2), padding="same"), (2, 6, 5, 2)),
    (lambda: keras.layers.Conv2DTranspose(3, 5, strides=3, padding="valid"), (1, 3, 4, 2)),
    (lambda: keras.layers.Conv2DTranspose(3, 4, strides=2, padding="same"), (2, 5, 5, 2)),
]
LAYERS += TRANSPOSED


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


STRUCTURED = [
    (lambda: keras.layers.Conv2D(4, 3, padding="same"), (3, 9, 8, 5)),
    (lambda: keras.layers.Conv2D(4, 3, padding="valid"), (2, 11, 10, 3)),
    (lambda: keras.layers.Conv2D(3, (3, 2), padding="same"), (2, 8, 9, 4)),
    (lambda: keras.layers.Conv2D(3, 5, padding="same"), (2, 16, 16, 2)),
    (lambda: keras.layers.Conv1D(4, 3, padding="same"), (3, 20, 5)),
    (lambda: keras.layers.Conv1D(4, 5, padding="valid"), (2, 23, 3)),
    (lambda: keras.layers.Conv2D(4, 1), (2, 7, 6, 5)),
    (lambda: keras.layers.Conv2D(4, 1, strides=2, padding="same"), (2, 9, 8, 5)),
    (lambda: keras.layers.Dense(4), (12, 5)),
    (lambda: keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same"), (2, 8, 8, 3)),
    (lambda: keras.layers.Conv2DTranspose(3, 3, strides=1, padding="same"), (2, 9, 8, 3)),
]


@pytest.mark.parametrize("make,shape", STRUCTURED)
def test_moments_without_patches_equal_the_moments_of_the_patches(make, shape, rng):
    """The refit's Gram and cross moments of stride-1 convolutions, summed from shifted inputs without
    forming the patches, are the patches' XᵀX and XᵀT (float64 inputs: equal to rounding)."""
    layer = make()
    layer.build(shape)
    handler = registry.handler_for(layer)
    mode = "patch" if "patch" in handler.hessian_modes else handler.hessian_modes[0]
    x = tf.constant(rng.normal(size=shape))
    patches = tf.cast(handler.hessian_samples(layer, x, mode), tf.float64)
    patches = tf.concat([patches, tf.ones_like(patches[:, :1])], axis=1)  # augmented, kept in float64
    targets = tf.constant(rng.normal(size=(int(patches.shape[0]), 3)))
    moments = handler.input_moments(layer, x, targets, mode)
    assert moments is not None
    gram, cross = moments
    np.testing.assert_allclose(gram.numpy(), (tf.transpose(patches) @ patches).numpy(), atol=1e-10)
    np.testing.assert_allclose(cross.numpy(), (tf.transpose(patches) @ targets).numpy(), atol=1e-10)


@pytest.mark.parametrize("make,shape", STRUCTURED + LAYERS)
def test_pre_activations_from_blocks_equal_the_layer(make, shape, rng):
    layer = make()
    layer.build(shape)
    handler = registry.handler_for(layer)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    kernel, bias = handler.kernel_and_bias(layer)
    bias = rng.normal(size=bias.shape).astype("float32")
    mode = "patch" if "patch" in handler.hessian_modes else handler.hessian_modes[0]
    block = tf.constant(handler.to_blocks(kernel, bias, mode)[0])
    layer.bias.assign(bias)
    expected = tf.reshape(layer(x), (-1, kernel.shape[-1]))
    np.testing.assert_allclose(handler.pre_activations(layer, x, block, mode).numpy(), expected.numpy(),
                               atol=1e-5)


def test_strided_dilated_and_small_grid_convolutions_form_their_patches(rng):
    """No shortcut for strided or dilated kxk kernels, nor where the core is under half the grid (a 3x3
    kernel without padding on 6x6: 2x2 of the 4x4 outputs)."""
    for layer, shape in ((keras.layers.Conv2D(4, 3, strides=2, padding="same"), (2, 9, 9, 3)),
                         (keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same"), (2, 9, 9, 3)),
                         (keras.layers.Conv2D(4, 3), (2, 6, 6, 3))):
        layer.build(shape)
        x = tf.constant(rng.normal(size=shape).astype("float32"))
        assert registry.handler_for(layer).input_moments(layer, x, tf.zeros((1, 4)), "patch") is None


def _same_padded_cnn(name, seed):
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12, 12, 2))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv1D(5, 3, padding="same", activation="relu")(keras.layers.Reshape((144, 8))(x))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name=name)


def test_refit_from_moments_equals_the_refit_from_patches(rng, monkeypatch):
    a, b = _same_padded_cnn("a", seed=0), _same_padded_cnn("b", seed=1)
    x = rng.normal(size=(64, 12, 12, 2)).astype("float32")
    used = []
    moments = registry._structured_moments

    def counted(*args):
        result = moments(*args)
        used.append(result is not None)
        return result

    monkeypatch.setattr(registry, "_structured_moments", counted)
    fast = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig(batch_size=32), verbose=0)
    # Two refit layers x two batches: fully shared, both tasks read one input, so their residuals go side by
    # side through one call.
    assert len(used) == 2 * 2 and all(used)
    monkeypatch.setattr(registry, "_structured_moments", lambda *args: None)
    plain = tf_mtz.zip_models({"a": a, "b": b}, x, config=tf_mtz.ZipConfig(batch_size=32), verbose=0)
    for u, v in zip(fast.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(v).max())))


def test_tasks_reading_one_input_share_the_refit_and_get_what_separate_refits_give(rng, monkeypatch):
    """With full sharing both tasks' zipped inputs are one value: one Gram and one factorisation serve both
    tasks, and the weights equal those of refitting each task on its own."""
    from tf_mtz import probe as probe_lib

    a, b = _same_padded_cnn("a", seed=0), _same_padded_cnn("b", seed=1)
    x = rng.normal(size=(64, 12, 12, 2)).astype("float32")
    groups = []
    grouped = probe_lib.Probe.input_groups

    def recorded(self, slot_index):
        groups.append(grouped(self, slot_index))
        return groups[-1]

    monkeypatch.setattr(probe_lib.Probe, "input_groups", recorded)
    together = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    assert groups and all(g == [["a", "b"]] for g in groups)
    monkeypatch.setattr(probe_lib.Probe, "input_groups", lambda self, slot_index: [[t] for t in self.plan.tasks])
    apart = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    # Equal up to rounding: the trunk to float32 ulps; the heads' refit (5 pooled inputs) amplifies those
    # ulps about 50 times.
    for u, v in zip(together.get_weights(), apart.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=5e-5 * max(1.0, float(np.abs(v).max())))


def test_half_shared_tasks_are_refit_apart(rng, monkeypatch):
    from tf_mtz import probe as probe_lib

    a, b = _same_padded_cnn("a", seed=0), _same_padded_cnn("b", seed=1)
    x = rng.normal(size=(64, 12, 12, 2)).astype("float32")
    groups = {}
    grouped = probe_lib.Probe.input_groups
    monkeypatch.setattr(probe_lib.Probe, "input_groups",
                        lambda self, i: groups.setdefault(i, grouped(self, i)))
    tf_mtz.zip_models({"a": a, "b": b}, x, sharing=0.5, verbose=0)
    assert groups.pop(0) == [["a", "b"]]  # the first layer reads the model input, common to all tasks
    assert groups and all(g == [["a"], ["b"]] for g in groups.values())


@pytest.mark.parametrize("sharing", [1.0, 0.6])
def test_merge_takes_the_hessian_from_the_refit_gram_where_they_are_one_matrix(rng, monkeypatch, sharing):
    """A Dense layer's Hessian is the Gram matrix its refit already summed: the merge reads it from there,
    and its merge costs equal those of the Hessian measured anew."""
    from tf_mtz import statistics

    models = {"a": mlp("a", widths=(24, 16, 12), seed=1), "b": mlp("b", widths=(24, 16, 12), seed=2)}
    x = rng.normal(size=(300, 20)).astype("float32")
    measured = []
    original = statistics.hessian_of_inputs
    monkeypatch.setattr(statistics, "hessian_of_inputs",
                        lambda *args, **kwargs: measured.append(kwargs["layer_name"]) or original(*args, **kwargs))
    reused = tf_mtz.zip_models(models, x, sharing=sharing, verbose=0).zip_report
    assert measured == ["fc1"]  # the first layer reads the input, which no refit summed
    measured.clear()
    monkeypatch.setattr(registry.DenseHandler, "hessian_is_refit_gram", lambda self, template, mode: False)
    anew = tf_mtz.zip_models(models, x, sharing=sharing, verbose=0).zip_report
    assert sorted(set(measured)) == ["fc1", "fc2", "fc3"]  # once per distinct input: twice where partly shared
    for first, second in zip(reused.layers, anew.layers):
        assert first.cost_sum == pytest.approx(second.cost_sum, rel=1e-5) and (first.head or first.cost_sum > 0)
        assert first.calibration_samples == second.calibration_samples


def test_pointwise_convolutions_take_their_hessian_from_the_refit_gram_and_strided_ones_do_not(rng, monkeypatch):
    from tf_mtz import statistics

    def model(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((8, 8, 3), name="image")
        h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="stem")(x)
        h = keras.layers.Conv2D(8, 1, activation="relu", name="point")(h)
        h = keras.layers.Conv2D(8, 1, strides=2, activation="relu", name="strided")(h)
        h = keras.layers.Conv2D(5, 3, activation="relu", name="wide")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(x, keras.layers.Dense(3, name="head")(h))

    models = {"a": model(1), "b": model(2)}
    x = rng.normal(size=(40, 8, 8, 3)).astype("float32")
    measured = []
    original = statistics.hessian_of_inputs
    monkeypatch.setattr(statistics, "hessian_of_inputs",
                        lambda *args, **kwargs: measured.append(kwargs["layer_name"]) or original(*args, **kwargs))
    reused = tf_mtz.zip_models(models, x, verbose=0).zip_report
    assert measured == ["stem", "strided", "wide"]
    monkeypatch.setattr(registry.Conv2DHandler, "hessian_is_refit_gram", lambda self, template, mode: False)
    anew = tf_mtz.zip_models(models, x, verbose=0).zip_report
    for first, second in zip(reused.layers, anew.layers):
        assert first.cost_sum == pytest.approx(second.cost_sum, rel=1e-5)
