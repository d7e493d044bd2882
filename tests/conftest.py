import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
