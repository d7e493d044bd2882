"""Zip time against depth: two plain Conv-BN-ReLU chains zipped fully, no retraining, one run per depth.

Each chain: `depth` 3x3 Conv2D (32 channels, same padding) each followed by BatchNormalization and ReLU,
on 16x16x3 inputs, then global average pooling and a 10-way Dense head; 256 calibration images (Gaussian
noise: speed does not depend on the data). Printed per depth: zip seconds, one forward pass of the
calibration images through both models (the unit of the method's own cost: every layer's inputs once),
their ratio, and the growth exponent of zip time between successive depths (1.0 is linear in depth).
Results go to docs/depth_scaling.md.

    python benchmarks/depth_scaling.py [--depths 4,8,16,32] [--images 256] [--refit_rows_per_input 32]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402

DEPTHS = flags.DEFINE_list("depths", ["4", "8", "16", "32"], "Numbers of Conv-BN-ReLU layers.")
IMAGES = flags.DEFINE_integer("images", 256, "Calibration images per task.")
WIDTH = flags.DEFINE_integer("width", 32, "Channels of every convolution.")
ROWS = flags.DEFINE_integer("refit_rows_per_input", 0, "ZipConfig.refit_rows_per_input (0: None, every row).")
OUT = flags.DEFINE_string("out", "docs", "Where to write depth_scaling.md ('' to skip).")


def chain(depth: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((16, 16, 3), name="image")
    h = x
    for i in range(depth):
        h = keras.layers.Conv2D(WIDTH.value, 3, padding="same", name=f"conv{i + 1}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i + 1}")(h)
        h = keras.layers.ReLU(name=f"relu{i + 1}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(10, activation="softmax", name="head")(h), name=f"chain{seed}")


def forward_seconds(models, x) -> float:
    """Best of three passes of the calibration data through every model, traced like the zip's probes."""
    functions = [keras.Model(m.inputs, m.outputs) for m in models]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for model in functions:
            model.predict(x, batch_size=256, verbose=0)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv):
    del argv
    x = np.random.default_rng(0).normal(size=(IMAGES.value, 16, 16, 3)).astype("float32")
    rows = []
    for depth in [int(d) for d in DEPTHS.value]:
        models = {"a": chain(depth, 0), "b": chain(depth, 1)}
        forward = forward_seconds(list(models.values()), x)
        started = time.perf_counter()
        config = tf_mtz.ZipConfig(refit_rows_per_input=ROWS.value or None)
        tf_mtz.zip_models(models, x, sharing=1.0, config=config, verbose=0)
        seconds = time.perf_counter() - started
        exponent = (np.log(seconds / rows[-1][1]) / np.log(depth / rows[-1][0])) if rows else float("nan")
        rows.append((depth, seconds, forward, seconds / forward, exponent))
        print(f"depth {depth:3d}: zip {seconds:7.1f} s, forward {forward:6.3f} s, {seconds / forward:6.1f}x, "
              f"exponent {exponent:.2f}", flush=True)
    table = ["| depth | zip (s) | forward pass, both models (s) | zip / forward | growth exponent |",
             "|---:|---:|---:|---:|---:|"]
    table += [f"| {d} | {s:.1f} | {f:.3f} | {r:.1f} | {e:.2f} |" for d, s, f, r, e in rows]
    print("\n".join(table))
    if OUT.value:
        os.makedirs(OUT.value, exist_ok=True)
        name = "depth_scaling.md" if not ROWS.value else f"depth_scaling_rows{ROWS.value}.md"
        with open(os.path.join(OUT.value, name), "w") as f:
            f.write("# Zip time against depth (`python benchmarks/depth_scaling.py`)\n\n"
                    f"Two Conv-BN-ReLU chains ({WIDTH.value} channels, 16x16x3 inputs, {IMAGES.value} calibration "
                    f"images, full sharing, default recipe with refit_rows_per_input={ROWS.value or None}, no retraining), "
                    f"zipped on a {describe()}. The growth "
                    "exponent is log(t2/t1)/log(d2/d1) between successive depths.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    app.run(main)
