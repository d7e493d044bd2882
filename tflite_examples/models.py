"""The paper's MNIST networks, trained once and cached."""

from __future__ import annotations

import os

import keras
import numpy as np

import tf_mtz
from mnist_data import cache_dir


def lenet_300_100(name: str, classes: int = 10) -> keras.Model:
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Dense(300, activation="relu", name="fc1")(inputs)
    h = keras.layers.Dense(100, activation="relu", name="fc2")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def lenet_5(name: str, classes: int = 10) -> keras.Model:
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28, 1))(inputs)
    h = keras.layers.Conv2D(20, 5, activation="relu", name="conv1")(h)
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(50, 5, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(500, activation="relu", name="fc1")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def lenet_5_bn(name: str, classes: int = 10) -> keras.Model:
    """`lenet_5` with a BatchNormalization after each convolution and the hidden Dense layer, before the ReLU
    (those layers then have no bias of their own). Momentum 0.9, as in `residual_cnn`: with a few hundred
    steps per epoch the default 0.99 leaves stale moving statistics (see `mobilenet_v2`)."""
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28, 1))(inputs)

    def normalized(h, layer, label):
        h = layer(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"{label}_bn")(h)
        return keras.layers.ReLU(name=f"{label}_relu")(h)

    h = normalized(h, keras.layers.Conv2D(20, 5, use_bias=False, name="conv1"), "conv1")
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = normalized(h, keras.layers.Conv2D(50, 5, use_bias=False, name="conv2"), "conv2")
    h = keras.layers.MaxPooling2D(name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = normalized(h, keras.layers.Dense(500, use_bias=False, name="fc1"), "fc1")
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def conv_bn(h, filters: int, strides: int, label: str, relu: bool = True, kernel: int = 3, groups: int = 1):
    """A bias-free convolution (`label`), BatchNormalization (`label_bn`) and, with `relu`, a ReLU."""
    h = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, groups=groups,
                            name=label)(h)
    # momentum 0.9: with a few hundred steps per epoch the default 0.99 leaves stale statistics.
    h = keras.layers.BatchNormalization(momentum=0.9, name=f"{label}_bn")(h)
    return keras.layers.ReLU(name=f"{label}_relu")(h) if relu else h


def residual_block(h, label: str, convs: tuple = ("conv1", "conv2")):
    """Two 3x3 `conv_bn` of the input's width (`label_<convs[i]>`) added to the input, then a ReLU."""
    y = conv_bn(h, h.shape[-1], 1, f"{label}_{convs[0]}")
    y = conv_bn(y, h.shape[-1], 1, f"{label}_{convs[1]}", relu=False)
    return keras.layers.ReLU(name=f"{label}_out")(keras.layers.Add(name=f"{label}_add")([h, y]))


def residual_cnn(name: str, classes: int = 10) -> keras.Model:
    """A small ResNet for MNIST: BatchNormalization after every convolution, two residual blocks (one
    per resolution), global average pooling."""
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28, 1))(inputs)
    h = residual_block(conv_bn(h, 16, 1, "stem"), "block1")
    h = residual_block(conv_bn(h, 32, 2, "down"), "block2")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def resnext_cnn(name: str, classes: int = 10) -> keras.Model:
    """A small ResNeXt for MNIST: a stem, then two bottleneck blocks whose 3x3 convolutions have 8 groups
    (1x1 -> grouped 3x3 -> 1x1, BatchNormalization after each, projection shortcut at the stride)."""
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28, 1))(inputs)

    def block(h, width, out, strides, label):
        y = conv_bn(h, width, 1, f"{label}_reduce", kernel=1)
        y = conv_bn(y, width, strides, f"{label}_grouped", groups=8)
        y = conv_bn(y, out, 1, f"{label}_expand", relu=False, kernel=1)
        shortcut = conv_bn(h, out, strides, f"{label}_shortcut", relu=False, kernel=1)
        return keras.layers.ReLU(name=f"{label}_out")(keras.layers.Add(name=f"{label}_add")([shortcut, y]))

    h = conv_bn(h, 16, 1, "stem")
    h = block(h, 32, 32, 2, "block1")
    h = block(h, 64, 64, 2, "block2")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def mobilenet_v2(name: str, classes: int = 10) -> keras.Model:
    """keras.applications.MobileNetV2 (alpha 0.35, weights=None) for 32x32x3 frames (`rgb_frames`).

    Its BatchNormalization momentum of 0.999 suits ImageNet-length training: after the few hundred steps
    of an MNIST epoch the moving statistics are still far from the data's, and the model predicts one
    class at inference. Momentum 0.9 lets them follow."""
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=classes,
                                           classifier_activation="softmax", name=name)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def sequence_lstm(name: str, classes: int = 10) -> keras.Model:
    """MNIST read as a sequence of 28 rows of 28 pixels: an LSTM of 64 units, a Dense layer, the head."""
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28), name="rows")(inputs)
    h = keras.layers.LSTM(64, name="lstm")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="tflite_examples")
class ClassToken(keras.layers.Layer):
    """[c; x]: a learnt vector `token` of shape (1, 1, units) put before a (batch, positions, units) sequence."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="token")

    def call(self, x):
        token = keras.ops.broadcast_to(self.token, (keras.ops.shape(x)[0], 1, x.shape[-1]))
        return keras.ops.concatenate([keras.ops.cast(token, x.dtype), x], axis=1)


@keras.saving.register_keras_serializable(package="tflite_examples")
class PositionEmbedding(keras.layers.Layer):
    """y = x + P: one learnt vector per position, the table P of shape (positions, units)."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]),
                                     initializer=keras.initializers.RandomNormal(stddev=0.02), name="table")

    def call(self, x):
        return x + keras.ops.cast(self.table, x.dtype)


# The zipped model computes both with standard layers (tf_mtz's position tables), so it needs neither class.
tf_mtz.register_layer_handler(ClassToken, tf_mtz.ClassTokenHandler("token"))
tf_mtz.register_layer_handler(PositionEmbedding, tf_mtz.PositionEmbeddingHandler("table"))

VIT_WIDTH, VIT_HEADS, VIT_MLP, VIT_BLOCKS = 64, 4, 128, 2


def sequence_vit(name: str, classes: int = 10) -> keras.Model:
    """A small ViT: 16 patches of 7x7 pixels (a strided Conv2D), a class token, a learnt position embedding, two
    pre-LN encoder blocks (4-head self-attention and a GELU MLP, each in a residual Add), a final LayerNorm;
    the class token's final state feeds the head."""
    width = VIT_WIDTH
    inputs = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28, 1), name="pixels")(inputs)
    h = keras.layers.Conv2D(width, 7, strides=7, name="patches")(h)
    h = keras.layers.Reshape((16, width), name="patch_sequence")(h)
    h = ClassToken(name="class_token")(h)
    h = PositionEmbedding(name="positions")(h)
    for block in range(VIT_BLOCKS):
        label = f"block{block + 1}"
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{label}_ln1")(h)
        y = keras.layers.MultiHeadAttention(VIT_HEADS, width // VIT_HEADS, name=f"{label}_mha")(y, y)
        h = keras.layers.Add(name=f"{label}_add1")([h, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{label}_ln2")(h)
        y = keras.layers.Dense(VIT_MLP, activation="gelu", name=f"{label}_mlp1")(y)
        y = keras.layers.Dense(width, name=f"{label}_mlp2")(y)
        h = keras.layers.Add(name=f"{label}_add2")([h, y])
    h = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="logits")(h[:, 0])
    return keras.Model(inputs, outputs, name=name)


ARCHITECTURES = {"lenet300": lenet_300_100, "lenet5": lenet_5, "lenet5_bn": lenet_5_bn, "resnet": residual_cnn,
                 "resnext": resnext_cnn,
                 "mobilenetv2": mobilenet_v2, "sequence_lstm": sequence_lstm, "sequence_vit": sequence_vit}


def trained_model(arch: str, seed: int, x: np.ndarray, y: np.ndarray, epochs: int, tag: str = "all",
                  verbose: int = 0) -> keras.Model:
    """Trains (or loads from the cache) one base model with Adam; `tag` names the training subset."""
    path = os.path.join(cache_dir(), f"{arch}_{tag}_seed{seed}_e{epochs}.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    keras.utils.set_random_seed(seed)
    model = ARCHITECTURES[arch](f"{arch}_{tag}_seed{seed}", classes=int(y.max()) + 1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=verbose, shuffle=True)
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)
    return model


def calibration_sample(x: np.ndarray, count: int = 10000) -> np.ndarray:
    """A fixed random subset of the training inputs for the layer statistics."""
    return x[np.random.default_rng(0).permutation(len(x))[:count]]


def zipped_pair(arch: str, x_train, y_train, epochs: int, steps_per_layer: int, verbose: int = 1):
    """Two cached base models (seeds 1 and 2) zipped fully with label-free retraining.

    Returns `(models, calibration, zipped)`.
    """
    import tf_mtz

    models = {"a": trained_model(arch, 1, x_train, y_train, epochs),
              "b": trained_model(arch, 2, x_train, y_train, epochs)}
    calibration = calibration_sample(x_train)
    zipped = tf_mtz.zip_models(models, calibration, verbose=verbose,
                               retrain=tf_mtz.Retrain(data=x_train, steps_per_layer=steps_per_layer))
    return models, calibration, zipped


def error_percent(predict, x: np.ndarray, y: np.ndarray) -> float:
    """Test error in percent of `predict(x) -> probabilities`."""
    return float(np.mean(np.argmax(predict(x), axis=-1) != y) * 100.0)
