"""Property-based tests: random small Dense/Conv2D networks, with or without BatchNormalization and
residual connections, 2-4 models of different widths, random sharing maps. Zipping never fails unexpectedly, outputs are finite, the promised units are shared, and a
permuted copy of a model reproduces its outputs.

The default run draws a few examples per property; `make test-slow` runs the same properties with many
more (also `HYPOTHESIS_PROFILE=long` for the default ones)."""

import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_mtz
from conftest import permuted_graph_copy, randomize_batch_norms

settings.register_profile("default_run", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default_run"))


@st.composite
def architectures(draw):
    conv = draw(st.booleans())
    depth = draw(st.integers(1, 4))
    tasks = draw(st.integers(2, 4))
    batch_norm = draw(st.booleans())
    residual = depth > 1 and draw(st.booleans())
    widths = [[draw(st.integers(2, 7)) for _ in range(depth)] for _ in range(tasks)]
    if residual:  # every block adds its input to its output: one width per model
        widths = [[w[0]] * depth for w in widths]
    heads = [draw(st.integers(1, 4)) for _ in range(tasks)]
    sharing = [draw(st.sampled_from([0.0, 0.5, 1.0, 1, 2])) for _ in range(depth)]
    if residual:  # the Adds tie every layer to the first: one value for all
        sharing = [sharing[0]] * depth
    return conv, widths, heads, sharing, batch_norm, residual


def build(conv, widths, head, seed, batch_norm=False, residual=False):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 2) if conv else (5,), name="inputs")
    h = x
    for i, w in enumerate(widths):
        activation = "relu" if conv else "tanh"
        unit = (keras.layers.Conv2D(w, 3, padding="same", name=f"u{i}") if conv
                else keras.layers.Dense(w, name=f"u{i}"))
        y = unit(h)
        if batch_norm:
            y = keras.layers.BatchNormalization(name=f"bn{i}")(y)
        if residual and i > 0:
            y = keras.layers.Add(name=f"add{i}")([h, y])
        h = keras.layers.Activation(activation, name=f"act{i}")(y)
    if conv:
        h = keras.layers.Flatten()(h)
    model = keras.Model(x, keras.layers.Dense(head, name="head")(h))
    return randomize_batch_norms(model, seed) if batch_norm else model


def legal_sharing(sharing, widths):
    """Turns drawn values into a sharing map zip_models accepts: counts within the narrowest width, and no
    shared units above a layer that shares none."""
    out, previous = {}, True
    for i, value in enumerate(sharing):
        narrowest = min(w[i] for w in widths)
        value = min(value, narrowest) if isinstance(value, int) else value
        count = value if isinstance(value, int) else round(value * narrowest)
        if not previous:
            value, count = 0, 0
        out[f"u{i}"] = value
        previous = count > 0
    return out


def check_random_networks_zip(architecture, seed):
    conv, widths, heads, sharing, batch_norm, residual = architecture
    models = {f"t{i}": build(conv, w, h, seed + i, batch_norm, residual) for i, (w, h) in enumerate(zip(widths, heads))}
    sharing_map = legal_sharing(sharing, widths)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64,) + tuple(models["t0"].inputs[0].shape[1:])).astype("float32")
    zipped = tf_mtz.zip_models(models, x, sharing=sharing_map, verbose=0)
    out = zipped.predict(x, verbose=0)
    assert set(out) == set(models)
    assert all(np.isfinite(v).all() and v.shape == (64, heads[i]) for i, v in enumerate(out.values()))
    report = zipped.zip_report
    for i, layer in enumerate(report.layers[:-1]):
        value = sharing_map[f"u{i}"]
        narrowest = min(w[i] for w in widths)
        assert layer.shared == (value if isinstance(value, int) else round(value * narrowest))
    assert report.params_zipped == zipped.count_params()


def check_permuted_copy_reproduces_outputs(architecture, seed):
    conv, widths, heads, sharing, batch_norm, residual = architecture
    model = build(conv, widths[0], heads[0], seed, batch_norm, residual)
    copy = permuted_graph_copy(model, seed=seed + 1)
    x = np.random.default_rng(seed).normal(size=(64,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=legal_sharing(sharing, widths[:1]),
                               verbose=0)
    out = zipped.predict(x, verbose=0)
    expected = model.predict(x, verbose=0)
    for task in ("a", "b"):
        np.testing.assert_allclose(out[task], expected, atol=1e-4)


test_random_networks_zip = given(architectures(), st.integers(0, 3))(check_random_networks_zip)
test_random_network_with_permuted_copy_reproduces_outputs = given(architectures(), st.integers(0, 3))(
    check_permuted_copy_reproduces_outputs)
test_random_networks_zip_long = pytest.mark.slow(settings(max_examples=60)(
    given(architectures(), st.integers(0, 100))(check_random_networks_zip)))
test_permuted_copy_long = pytest.mark.slow(settings(max_examples=60)(
    given(architectures(), st.integers(0, 100))(check_permuted_copy_reproduces_outputs)))
