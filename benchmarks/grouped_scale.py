"""Grouped convolutions: what zipping ResNeXt-style networks costs and gives, side by side in one run.

Two ResNeXt-style networks (different seeds, weights random, BatchNormalization statistics random; three
bottleneck blocks with grouped 3x3 convolutions of `groups` groups, 32x32x3 inputs) zipped with every
hidden layer shared, no retraining: zip time, parameters and `.tflite` bytes zipped / separate, and
single-thread LiteRT latency of the zipped model against the two separate models. tf_mtz zips a grouped
convolution group by group; where every group ends fully shared the rebuild makes them one grouped
Conv2D again, and this measures what the zipped model then costs against the separate ones.

    python benchmarks/grouped_scale.py [--groups 8,32]   # writes docs/grouped_scale.md
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe, tflite_latency  # noqa: E402

GROUPS = flags.DEFINE_list("groups", ["8", "32"], "Groups of the grouped convolutions, one row each.")
OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"),
                          "Where grouped_scale.md is written.")


def resnext(seed: int, groups: int, width: int = 128) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for block in range(3):
        y = keras.layers.Conv2D(width, 1, use_bias=False)(x)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.Conv2D(width, 3, padding="same", groups=groups, use_bias=False, name=f"grouped{block}")(y)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.Conv2D(64, 1, use_bias=False)(y)
        x = keras.layers.ReLU()(keras.layers.Add()([x, keras.layers.BatchNormalization()(y)]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x), name=f"resnext_{seed}")
    return tf_mtz.testing.randomize_batch_norms(model, seed=seed)


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32, 32, 3)).astype("float32")
    frame = x[:1]
    rows = []
    for groups in [int(g) for g in GROUPS.value]:
        models = {"a": resnext(1, groups), "b": resnext(2, groups)}
        started = time.perf_counter()
        zipped = tf_mtz.zip_models(models, x, verbose=0)
        seconds = time.perf_counter() - started
        separate_bytes = [tf_mtz.tflite_bytes(m) for m in models.values()]
        zipped_bytes = tf_mtz.tflite_bytes(zipped)
        separate_latency = sum(tflite_latency(b, frame) for b in separate_bytes)
        zipped_latency = tflite_latency(zipped_bytes, frame)
        params = sum(m.count_params() for m in models.values())
        rows.append((groups, seconds, zipped.count_params() / params, len(zipped_bytes) / sum(map(len, separate_bytes)),
                     zipped_latency * 1e3, separate_latency * 1e3))
        print(rows[-1], flush=True)
    lines = ["# Zipping grouped convolutions (ResNeXt-style)", "",
             f"`python benchmarks/grouped_scale.py --groups {','.join(GROUPS.value)}` with tf_mtz {tf_mtz.__version__} "
             f"on a {describe()}: two networks (seeds 1 and 2; a 64-channel stem and three bottleneck blocks "
             "1x1 (128) -> grouped 3x3 (128) -> 1x1 (64) with BatchNormalization and identity shortcuts, 32x32x3 "
             "inputs), every hidden layer shared, default recipe, 64 random calibration images, no retraining. "
             "Latency: one frame, single-thread LiteRT (both tasks: the zipped model once, the separate models "
             "one after the other). Fully shared groups are rebuilt as one grouped Conv2D (partly shared ones: one Conv2D per group on a slice of its input).", "",
             "| groups | zip (s) | parameters zipped / separate | .tflite bytes zipped / separate | "
             "latency zipped / separate (ms) | latency ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for groups, seconds, params, size, zipped_ms, separate_ms in rows:
        lines.append(f"| {groups} | {seconds:.0f} | {params:.3f} | {size:.3f} | {zipped_ms:.2f} / {separate_ms:.2f} | "
                     f"{zipped_ms / separate_ms:.2f} |")
    with open(os.path.join(OUT.value, "grouped_scale.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
