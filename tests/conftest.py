import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tf_mtz import testing  # noqa: E402


def relative_error(out, expected) -> float:
    """Largest absolute difference over the largest absolute expected value."""
    return float(np.abs(out - expected).max() / np.abs(expected).max())


def randomize_weights(model, seed, scale=0.2):
    """Adds normal noise of sd `scale` to every weight of `model` (in place), so that fresh layers' zeros and
    ones (biases, LayerNormalization) do not hide mistakes; returns `model`."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, scale, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def unit_layers(model):
    return [l for l in model.layers if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D))]


def permuted_copy(model, seed=0):
    """A copy of `model` whose hidden units are randomly permuted: same function, different weights order.

    Returns the copy and the permutations (new position -> original unit) of each hidden layer.
    """
    rng = np.random.default_rng(seed)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layers = unit_layers(clone)
    perms, previous = [], None
    for i, layer in enumerate(layers):
        kernel, bias = layer.get_weights()
        if previous is not None:
            rows_per_unit = kernel.shape[-2] // previous.size
            order = (np.arange(rows_per_unit)[:, None] * previous.size + previous[None, :]).reshape(-1)
            kernel = kernel[..., order, :]
        if i < len(layers) - 1:
            perm = rng.permutation(kernel.shape[-1])
            kernel, bias, previous = kernel[..., perm], bias[perm], perm
            perms.append(perm)
        layer.set_weights([kernel, bias])
    return clone, perms


def mlp(name, widths=(24, 16), inputs=20, classes=5, seed=0, activation="relu"):
    keras.utils.set_random_seed(seed)
    x = keras.Input((inputs,), name="features")
    h = x
    for i, w in enumerate(widths):
        h = keras.layers.Dense(w, activation=activation, name=f"fc{i + 1}")(h)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(h)
    return keras.Model(x, out, name=name)


def small_cnn(name, filters=(6, 8), dense=20, classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((12, 12, 1), name="image")
    h = keras.layers.Conv2D(filters[0], 3, activation="relu", padding="same", name="conv1")(x)
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(filters[1], 3, activation="relu", name="conv2")(h)
    h = keras.layers.AveragePooling2D(2, name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    h = keras.layers.Dense(dense, activation="relu", name="fc")(h)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(h)
    return keras.Model(x, out, name=name)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


_SAME_SPACE = (keras.layers.BatchNormalization, keras.layers.DepthwiseConv2D, keras.layers.Activation,
               keras.layers.ReLU, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
               keras.layers.GlobalAveragePooling2D, keras.layers.ZeroPadding2D, keras.layers.Dropout,
               keras.layers.Flatten)


def _producer(tensor):
    return tensor._keras_history[0]


def permuted_graph_copy(model, seed=0):
    """Like `permuted_copy`, for flat Functional models with residual `Add`s, BatchNormalization and
    DepthwiseConv2D: units tied by an Add get one permutation. An independent reading of the graph, so it
    can check tf_mtz's."""
    rng = np.random.default_rng(seed)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    space, width = {}, {}
    units = [l for l in clone.layers if type(l) in (keras.layers.Dense, keras.layers.Conv2D)]
    head = units[-1]
    for layer in clone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            space[layer.name] = None
            continue
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        sources = [find(space[_producer(t).name]) if space[_producer(t).name] else None for t in inputs]
        if type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
            space[layer.name] = layer.name
            width[layer.name] = layer.get_weights()[0].shape[-1]
        elif isinstance(layer, keras.layers.Add):
            for other in sources[1:]:
                parent[find(other)] = find(sources[0])
            space[layer.name] = sources[0]
        elif isinstance(layer, _SAME_SPACE):
            space[layer.name] = sources[0]
        else:
            raise NotImplementedError(type(layer).__name__)
    perms = {}

    def perm_of(name):
        root = find(name)
        if root not in perms:
            perms[root] = rng.permutation(width[root])
        return perms[root]

    for layer in clone.layers:
        if isinstance(layer, keras.layers.InputLayer) or not layer.get_weights():
            continue
        weights = layer.get_weights()
        source = space[_producer(layer.input).name] if not isinstance(layer.input, list) else None
        if type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
            kernel, rest = weights[0], weights[1:]
            if source is not None:
                p = perm_of(source)
                rows = kernel.shape[-2] // p.size
                kernel = kernel[..., (np.arange(rows)[:, None] * p.size + p[None, :]).reshape(-1), :]
            if layer is not head:
                p = perm_of(layer.name)
                kernel, rest = kernel[..., p], [r[p] for r in rest]
            layer.set_weights([kernel, *rest])
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            p = perm_of(source)
            layer.set_weights([weights[0][..., p, :], *[w[p] for w in weights[1:]]])
        elif isinstance(layer, keras.layers.BatchNormalization):
            p = perm_of(source)
            layer.set_weights([w[p] for w in weights])
    return clone


def randomize_batch_norms(model, seed=0):
    """Non-trivial BatchNormalization statistics, so that folding them is tested."""
    return testing.randomize_batch_norms(model, seed)


def resnet(name, depth=20, width=16, input_shape=(32, 32, 3), classes=10, seed=0):
    """A ResNet-v1 for CIFAR-sized inputs (He et al. 2016): 3 stages of (depth - 2) / 6 basic blocks,
    BatchNormalization after every convolution, 1x1 projection shortcuts where the shape changes."""
    keras.utils.set_random_seed(seed)
    blocks = (depth - 2) // 6
    x = keras.Input(input_shape, name="image")

    def conv_bn(h, filters, kernel, strides, label, relu=True):
        h = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=label)(h)
        h = keras.layers.BatchNormalization(name=f"{label}_bn")(h)
        return keras.layers.ReLU(name=f"{label}_relu")(h) if relu else h

    h = conv_bn(x, width, 3, 1, "stem")
    for stage in range(3):
        filters = width * 2 ** stage
        for block in range(blocks):
            strides = 2 if stage and not block else 1
            label = f"s{stage + 1}b{block + 1}"
            y = conv_bn(h, filters, 3, strides, f"{label}_conv1")
            y = conv_bn(y, filters, 3, 1, f"{label}_conv2", relu=False)
            if strides != 1 or h.shape[-1] != filters:
                h = conv_bn(h, filters, 1, strides, f"{label}_shortcut", relu=False)
            h = keras.layers.ReLU(name=f"{label}_out")(keras.layers.Add(name=f"{label}_add")([h, y]))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(classes, activation="softmax", name="head")(h), name=name)
