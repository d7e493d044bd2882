"""Property-based tests over every layer kind tf_mtz zips: random networks mixing them, 2-3 models of
different widths, random sharing. Zipping never fails unexpectedly, outputs are finite, the promised units
are shared, a permuted copy of a model (`tf_mtz.testing.permuted_copy`) reproduces its outputs, and the
zipped model's `.tflite` computes what Keras does.

Every kind is drawn by name in a parametrized test (so each is covered in every run), and mixed at random
by hypothesis: a few examples by default, 60 per property in `make test-slow`."""

import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_mtz

IMAGE_KINDS = ("conv", "conv_bn", "preactivation", "squeeze_excitation", "grouped", "transposed", "separable")
SEQUENCE_KINDS = ("dense", "lstm", "gru", "bidirectional", "attention")
WHOLE = {"lstm", "gru", "bidirectional", "attention"}  # units shared all or none
KINDS = [("image", k) for k in IMAGE_KINDS] + [("sequence", k) for k in SEQUENCE_KINDS]

QUICK = settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
ONCE = settings(max_examples=1, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _image_block(h, kind, width, i):
    name = f"u{i}"
    if kind == "conv":
        return keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=name)(h)
    if kind == "conv_bn":
        h = keras.layers.Conv2D(width, 3, padding="same", name=name)(h)
        return keras.layers.ReLU(name=f"relu{i}")(keras.layers.BatchNormalization(name=f"bn{i}")(h))
    if kind == "preactivation":  # ResNetV2: normalisation (kept, not folded) and activation, then the conv
        y = keras.layers.ReLU(name=f"relu{i}")(keras.layers.BatchNormalization(name=f"bn{i}")(h))
        y = keras.layers.Conv2D(width, 3, padding="same", name=name)(y)
        return keras.layers.Add(name=f"add{i}")([h, y])
    if kind == "squeeze_excitation":
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=name)(h)
        s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"squeeze{i}")(h)
        s = keras.layers.Conv2D(max(1, width // 2), 1, activation="relu", name=f"reduce{i}")(s)
        s = keras.layers.Conv2D(width, 1, activation="sigmoid", name=f"expand{i}")(s)
        return keras.layers.Multiply(name=f"excite{i}")([h, s])
    if kind == "grouped":
        return keras.layers.Conv2D(width, 3, padding="same", groups=2, activation="relu", name=name)(h)
    if kind == "transposed":
        return keras.layers.Conv2DTranspose(width, 3, padding="same", activation="relu", name=name)(h)
    if kind == "separable":
        return keras.layers.SeparableConv2D(width, 3, padding="same", activation="relu", name=name)(h)
    raise ValueError(kind)


def _sequence_block(h, kind, width, i):
    name = f"u{i}"
    if kind == "dense":
        return keras.layers.Dense(width, activation="tanh", name=name)(h)
    if kind == "lstm":
        return keras.layers.LSTM(width, return_sequences=True, name=name)(h)
    if kind == "gru":
        return keras.layers.GRU(width, return_sequences=True, name=name)(h)
    if kind == "bidirectional":
        return keras.layers.Bidirectional(keras.layers.GRU(width // 2, return_sequences=True), name=name)(h)
    if kind == "attention":  # a post-LN transformer block's attention: x + mha(x, x), then normalised
        y = keras.layers.MultiHeadAttention(2, 2, name=name)(h, h)
        return keras.layers.LayerNormalization(name=f"norm{i}")(keras.layers.Add(name=f"add{i}")([h, y]))
    raise ValueError(kind)


def build(family, kinds, width, heads, seed):
    """A model of `kinds` blocks (each `width` units wide; even, for grouped and bidirectional layers) with
    one Dense head per entry of `heads` (its number of outputs)."""
    keras.utils.set_random_seed(seed)
    if family == "image":
        x = keras.Input((6, 6, 2), name="image")
        h = keras.layers.Conv2D(width, 1, name="stem")(x)
        for i, kind in enumerate(kinds):
            h = _image_block(h, kind, width, i)
        h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    else:
        x = keras.Input((5,), dtype="int32", name="tokens")
        h = keras.layers.Embedding(12, width, name="embed")(x)
        for i, kind in enumerate(kinds):
            h = _sequence_block(h, kind, width, i)
        h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = {f"out{k}": keras.layers.Dense(n, name=f"head{k}")(h) for k, n in enumerate(heads)}
    model = keras.Model(x, outputs if len(heads) > 1 else outputs["out0"])
    rng = np.random.default_rng(seed)  # weights away from fresh zeros and ones, so mistakes show
    model.set_weights([w + rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def inputs(family, seed, count=48):
    rng = np.random.default_rng(seed)
    if family == "image":
        return rng.normal(size=(count, 6, 6, 2)).astype("float32")
    return rng.integers(0, 12, size=(count, 5)).astype("int32")


@st.composite
def architectures(draw, family=None, kind=None):
    family = family or draw(st.sampled_from(["image", "sequence"]))
    pool = IMAGE_KINDS if family == "image" else SEQUENCE_KINDS
    depth = draw(st.integers(1, 3))
    kinds = [draw(st.sampled_from(pool)) for _ in range(depth)]
    if kind is not None:
        kinds[draw(st.integers(0, depth - 1))] = kind
    tasks = draw(st.integers(2, 3))
    if "attention" in kinds:  # x + mha(x): the stream keeps the embedding's width in every model
        widths = [draw(st.sampled_from([4, 6])) for _ in range(tasks)]
    elif "grouped" in kinds:  # two groups of at least two filters (one filter per group is depthwise)
        widths = [draw(st.sampled_from([4, 6, 8])) for _ in range(tasks)]
    else:
        widths = [2 * draw(st.integers(1, 4)) for _ in range(tasks)]
    if (WHOLE | {"grouped"}) & set(kinds):  # shared all or none, or groups read alike: one width for all
        widths = [widths[0]] * tasks
    heads = [draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 2)))]
    fractions = [draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(depth)]
    return family, kinds, widths, heads, fractions


def sharing_map(family, kinds, fractions):
    """Fractions by layer name: the first layer (stem or embedding) shared whole, none above a layer that
    shares nothing, layers tied by residual Adds alike, whole layers all or none."""
    tied = "attention" in kinds or "preactivation" in kinds
    out, previous = {"stem" if family == "image" else "embed": 1.0}, True
    for i, (kind, fraction) in enumerate(zip(kinds, fractions)):
        fraction = fractions[0] if tied else fraction
        if family == "sequence":  # a recurrent or attention layer shares all or none, from a whole input
            fraction = 1.0 if fraction else 0.0
        fraction = 0.0 if not previous else fraction
        out[f"u{i}"] = fraction
        if kind == "squeeze_excitation":  # the gate's expanding conv is tied to the channels it scales, and
            # reads the reducing conv, which must share some units where it does
            out[f"expand{i}"], out[f"reduce{i}"] = fraction, (1.0 if fraction else 0.0)
        previous = fraction > 0
    if tied:  # the first layer is in the residual stream too
        out["stem" if family == "image" else "embed"] = out["u0"]
    return out


def check_random_networks_zip(architecture, seed):
    family, kinds, widths, heads, fractions = architecture
    models = {f"t{k}": build(family, kinds, w, heads, seed + k) for k, w in enumerate(widths)}
    sharing = sharing_map(family, kinds, fractions)
    x = inputs(family, seed)
    zipped = tf_mtz.zip_models(models, x, sharing=sharing, verbose=0)
    out = zipped.predict(x, verbose=0)
    assert len(out) == len(models) * len(heads)
    assert all(np.isfinite(v).all() for v in out.values())
    for layer in zipped.zip_report.layers:
        if layer.name in sharing and not layer.head:
            assert layer.shared == round(sharing[layer.name] * min(layer.units.values())), (layer.name, sharing)
    assert zipped.zip_report.params_zipped == zipped.count_params()


def check_permuted_copy_reproduces_outputs(architecture, seed, with_tflite=False):
    family, kinds, widths, heads, fractions = architecture
    model = build(family, kinds, widths[0], heads, seed)
    copy = tf_mtz.testing.permuted_copy(model, seed=seed + 1)
    x = inputs(family, seed)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x, sharing=sharing_map(family, kinds, fractions),
                               verbose=0)
    out = zipped.predict(x, verbose=0)
    expected = model.predict(x, verbose=0)
    expected = expected if isinstance(expected, dict) else {"out0": expected}
    scale = max(float(np.abs(v).max()) for v in expected.values())
    for task in ("a", "b"):
        for name, value in expected.items():
            got = out[task] if len(expected) == 1 else out[f"{task}/{name}"]
            assert np.abs(got - value).max() <= 1e-4 * scale, (task, name, kinds)
    if with_tflite:
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_content=tf_mtz.tflite_bytes(zipped)).get_signature_runner("serving_default")
        input_name = zipped.inputs[0].name
        lite = {}
        for row in range(4):  # recurrent layers convert for one sample per call
            for key, value in runner(**{input_name: x[row:row + 1]}).items():
                lite.setdefault(key, []).append(value)
        for key, values in lite.items():
            np.testing.assert_allclose(np.concatenate(values), out[key][:4], atol=1e-4 * max(scale, 1.0))


def check_permuted_copy_and_tflite(architecture, seed):
    check_permuted_copy_reproduces_outputs(architecture, seed, with_tflite=True)


@pytest.mark.parametrize("family,kind", KINDS)
def test_every_layer_kind_zips_in_random_networks(family, kind):
    QUICK(given(architectures(family, kind), st.integers(0, 3))(check_random_networks_zip))()


@pytest.mark.parametrize("family,kind", KINDS)
def test_every_layer_kind_reproduces_a_permuted_copy_and_converts(family, kind):
    ONCE(given(architectures(family, kind), st.integers(0, 3))(check_permuted_copy_and_tflite))()


test_mixed_kinds_zip_long = pytest.mark.slow(LONG(given(architectures(), st.integers(0, 100))(
    check_random_networks_zip)))
test_mixed_kinds_permuted_copy_long = pytest.mark.slow(LONG(given(architectures(), st.integers(0, 100))(
    check_permuted_copy_and_tflite)))
