"""Speed of a whole zip with the default recipe, stage by stage, against one 4096³ float32 matmul timed
side by side in the same run.

Two 784-4096-4096-10 MLPs (random weights: speed does not depend on them), 1,024 calibration samples,
every hidden unit shared, no retraining. Printed: the zip's seconds and their multiple of the matmul, the
seconds per stage summed over layers (inputs: the probe's forward computation; pair: statistics, pair
costs and matching; merge: the merge and its statistics; refit: the next layer's refit), and the rest
(reading the models, building the zipped one).

    python benchmarks/speed_zip.py [--width 4096] [--samples 1024] [--repeats 3]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402

WIDTH = flags.DEFINE_integer("width", 4096, "Units of both hidden layers (and side of the matmul).")
SAMPLES = flags.DEFINE_integer("samples", 1024, "Calibration samples.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Zips timed (each after a matmul timing); the best counts.")


def mlp(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((784,), name="pixels")
    h = keras.layers.Dense(WIDTH.value, activation="relu", name="fc1")(x)
    h = keras.layers.Dense(WIDTH.value, activation="relu", name="fc2")(h)
    return keras.Model(x, keras.layers.Dense(10, activation="softmax", name="head")(h), name=f"mlp{seed}")


def matmul_seconds(repeats: int = 3) -> float:
    a = tf.random.normal((WIDTH.value, WIDTH.value))
    b = tf.random.normal((WIDTH.value, WIDTH.value))
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv):
    del argv
    models = {"a": mlp(0), "b": mlp(1)}
    x = np.random.default_rng(0).normal(size=(SAMPLES.value, 784)).astype("float32")
    tf_mtz.zip_models(models, x[:64], verbose=0)  # warm-up: kernels and allocations
    runs = []
    for _ in range(REPEATS.value):
        matmul = matmul_seconds()
        started = time.perf_counter()
        report = tf_mtz.zip_models(models, x, verbose=0).zip_report
        runs.append((time.perf_counter() - started, matmul, report))
    seconds, matmul, report = min(runs, key=lambda run: run[0] / run[1])
    stages = {}
    for layer in report.layers:
        for stage, spent in layer.stage_seconds.items():
            stages[stage] = stages.get(stage, 0.0) + spent
    print(f"On a {describe()}: two 784-{WIDTH.value}-{WIDTH.value}-10 MLPs, {SAMPLES.value} samples, default recipe")
    print(f"one {WIDTH.value}³ float32 matmul: {matmul:.3f} s")
    print(f"whole zip: {seconds:.2f} s = {seconds / matmul:.1f}x the matmul (best of {REPEATS.value}; "
          f"all runs: {', '.join(f'{s / m:.1f}x' for s, m, _ in runs)})")
    for stage, spent in stages.items():
        print(f"  {stage:7s} {spent:6.2f} s  {spent / matmul:5.1f}x")
    rest = seconds - sum(stages.values())
    print(f"  {'rest':7s} {rest:6.2f} s  {rest / matmul:5.1f}x")


if __name__ == "__main__":
    app.run(main)
