"""Models of different depths on MNIST: a 3-conv net for digits 0-4 and a 5-conv net for digits 5-9, zipped
over their common prefix (the first three Conv-BN-ReLU layers), before and after label-free distillation.

    python benchmarks/depths_mnist.py [--pairs 3] [--epochs 3] [--retrain_steps 1000]

Base models are cached (tflite_examples/models.py's cache directory); the page goes to docs/depths_mnist.md.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402
from experiments import error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import cache_dir, calibration_sample  # noqa: E402

PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs (1, 2), (3, 4), ...")
EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Calibration images per task.")
RETRAIN = flags.DEFINE_integer("retrain_steps", 1000, "Label-free distillation steps after zipping.")
OUT = flags.DEFINE_string("out", "docs", "Where to write the page.")

# (filters, strides) of each Conv-BN-ReLU layer; the deeper net starts with the shallower one's layers.
LAYERS = {3: [(16, 1), (32, 2), (32, 1)], 5: [(16, 1), (32, 2), (32, 1), (48, 2), (48, 1)]}


def conv_net(convs: int, name: str, classes: int = 5) -> keras.Model:
    x = keras.Input((784,), name="image")
    h = keras.layers.Reshape((28, 28, 1), name="grid")(x)
    for k, (filters, strides) in enumerate(LAYERS[convs]):
        h = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"conv{k + 1}")(h)
        h = keras.layers.ReLU(name=f"relu{k + 1}")(keras.layers.BatchNormalization(name=f"bn{k + 1}")(h))
    h = keras.layers.Flatten(name="flatten")(h)
    return keras.Model(x, keras.layers.Dense(classes, activation="softmax", name="head")(h), name=name)


def trained(convs: int, seed: int, x, y, epochs: int) -> keras.Model:
    path = os.path.join(cache_dir(), f"depths_conv{convs}_seed{seed}_e{epochs}.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    keras.utils.set_random_seed(seed)
    model = conv_net(convs, f"conv{convs}_seed{seed}")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=0)
    model.save(path + ".tmp.keras")
    os.replace(path + ".tmp.keras", path)
    return model


def main(_):
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    data = experiment_data("E2", x_train, y_train, x_test, y_test)  # a: digits 0-4, b: digits 5-9
    rows = {name: {"a": [], "b": []} for name in ("own model", "zipped", f"zipped + {RETRAIN.value:,} steps")}
    seconds, params, prefix = [], None, None
    for pair in range(PAIRS.value):
        models = {"a": trained(3, 2 * pair + 1, *data["a"][:2], EPOCHS.value),
                  "b": trained(5, 2 * pair + 2, *data["b"][:2], EPOCHS.value)}
        calibration = {t: calibration_sample(data[t][0], CALIBRATION.value) for t in models}
        started = time.perf_counter()
        zipped = tf_mtz.zip_models(models, calibration, verbose=0)
        zip_seconds = time.perf_counter() - started
        retrain = tf_mtz.Retrain(data={t: data[t][0] for t in models}, steps_per_layer=0,
                                 final_steps=RETRAIN.value, seed=pair)
        started = time.perf_counter()
        retrained = tf_mtz.zip_models(models, calibration, retrain=retrain, verbose=0)
        seconds.append((zip_seconds, time.perf_counter() - started))
        for t, model in models.items():
            x, y = data[t][2], data[t][3]
            rows["own model"][t].append(error(model.predict(x, verbose=0), y))
            rows["zipped"][t].append(error(zipped.predict(x, verbose=0)[t], y))
            rows[f"zipped + {RETRAIN.value:,} steps"][t].append(error(retrained.predict(x, verbose=0)[t], y))
        params = (sum(m.count_params() for m in models.values()), zipped.count_params())
        prefix = zipped.zip_report.prefix
        print(f"pair {pair + 1}: " + "; ".join(f"{name} {v['a'][-1]:.2f}/{v['b'][-1]:.2f}" for name, v in rows.items()),
              flush=True)

    def cell(values):
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}"

    lines = [
        "# Models of different depths on MNIST: a 3-conv and a 5-conv net zipped over their common prefix", "",
        "Task a: digits 0-4, a net of 3 Conv-BN-ReLU layers (16, 32 stride 2, 32 filters), a Flatten and a "
        "softmax head; task b: digits 5-9, a net of 5 (the same three, then 48 stride 2 and 48). "
        f"Trained {EPOCHS.value} epochs each (Adam, batch 128), seeds (1, 2), (3, 4), ... "
        f"`zip_models(models, calibration)` with {CALIBRATION.value:,} training images per task and the default "
        "recipe: the common prefix is zipped fully, each model keeps the rest as its branch (see "
        "[api.md](api.md#models-of-different-depths)). Retraining: label-free distillation on each task's "
        f"training images, `Retrain(steps_per_layer=0, final_steps={RETRAIN.value})`, the whole model "
        "(prefix and branches) against the own models. Test error %, mean ± std over "
        f"{PAIRS.value} pair(s). No threshold: the table is the result.", "",
        f"    python benchmarks/depths_mnist.py --pairs {PAIRS.value} --epochs {EPOCHS.value} "
        f"--retrain_steps {RETRAIN.value}", "",
        f"Machine: {describe()}. Library: tf_mtz {tf_mtz.__version__}.", "",
        f"Zipped prefix: {', '.join(prefix['prefix_layers'])}; stopped because {prefix['stopped']}. "
        f"Branches: a {prefix['branches']['a']}, b {prefix['branches']['b']}.", "",
        "| | task a (3 convs) error % | task b (5 convs) error % |", "|---|---|---|"]
    lines += [f"| {name} | {cell(v['a'])} | {cell(v['b'])} |" for name, v in rows.items()]
    lines += ["", "Per pair (task a / task b error %):", "",
              "| pair | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for k in range(PAIRS.value):
        lines.append(f"| {k + 1} | " + " | ".join(f"{v['a'][k]:.2f} / {v['b'][k]:.2f}" for v in rows.values()) + " |")
    lines += ["", f"Parameters: {params[0]:,} in the two models -> {params[1]:,} zipped ({params[1] / params[0]:.3f}x; "
              "the prefix is the cheap part of these nets, the deeper layers hold most weights).", "",
              "Seconds per pair (zip; zip + retraining): " + ", ".join(f"{a:.1f}; {b:.1f}" for a, b in seconds) + "."]
    with open(os.path.join(OUT.value, "depths_mnist.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
