"""Scale: two keras.applications.ResNet50 (weights=None) zipped fully with the default recipe, no retraining;
wall time, peak memory and the slowest layers printed from one run.

224x224x3 inputs, 10-class heads, 128 calibration images per task: real MNIST digits resized and repeated
over the three channels (a stand-in for camera frames: the speed does not depend on the content). Every
BatchNormalization is folded into its convolution; the residual `Add`s tie each stage's units into one
group that is paired once.

    python benchmarks/resnet50_scale.py [--size 224] [--images 128] [--batch_size 32]
"""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe, stage_summary  # noqa: E402
from mnist_data import load_mnist, rgb_frames  # noqa: E402

SIZE = flags.DEFINE_integer("size", 224, "Input height and width.")
IMAGES = flags.DEFINE_integer("images", 128, "Calibration images per task.")
BATCH = flags.DEFINE_integer("batch_size", 32, "Calibration batch size.")
MEMORY = flags.DEFINE_float("activation_memory_gib", 4.0, "ZipConfig.activation_memory_gib: probe values held in "
                            "memory before spilling to disk.")
OUT = flags.DEFINE_string("out", "docs", "Where to write resnet50_scale.md ('' to skip).")


def resnet50(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.applications.ResNet50(weights=None, input_shape=(SIZE.value, SIZE.value, 3), classes=10,
                                       name=f"resnet50_seed{seed}")


def images(x: np.ndarray, start: int) -> np.ndarray:
    return rgb_frames(x[start:start + IMAGES.value], SIZE.value)


def main(_):
    (x_train, _), _, _ = load_mnist()
    models = {"a": resnet50(1), "b": resnet50(2)}
    calibration = {"a": images(x_train, 0), "b": images(x_train, IMAGES.value)}
    started = time.perf_counter()
    zipped = tf_mtz.zip_models(models, calibration, sharing=1.0,
                               config=tf_mtz.ZipConfig(batch_size=BATCH.value,
                                                       activation_memory_gib=MEMORY.value), verbose=0)
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    report = zipped.zip_report
    finite = all(np.isfinite(v).all() for v in zipped.predict(calibration["a"][:4], verbose=0).values())
    slowest = sorted(report.layers, key=lambda layer: -layer.seconds)[:8]
    lines = [f"# Two ResNet50 ({SIZE.value}x{SIZE.value}x3, 10-class heads) zipped fully", "",
             f"`python benchmarks/resnet50_scale.py --size {SIZE.value} --images {IMAGES.value} --batch_size "
             f"{BATCH.value} --activation_memory_gib {MEMORY.value:g}`: keras.applications.ResNet50(weights=None), {IMAGES.value} calibration images per "
             "task, every hidden layer 100% shared, default recipe (weight matching, averaging, refit), no "
             f"retraining; measured on a {describe()}.", "",
             f"- wall time: {seconds / 60:.1f} min (target < 5)",
             f"- peak resident memory of the process: {peak_gib:.1f} GiB (target < 12)",
             f"- unit layers: {len(report.layers)}; parameters: {report.params_original:,} -> "
             f"{report.params_zipped:,} ({report.params_zipped / report.params_original:.3f}x); outputs finite: "
             f"{finite}", f"- time by stage, summed over the layers: {stage_summary(report)}", "", "Slowest layers:", "", "| layer | units | seconds |", "|---|---|---|"]
    lines += [f"| {layer.name} | {layer.units['a']} | {layer.seconds:.1f} |" for layer in slowest]
    text = "\n".join(lines) + "\n"
    print(text)
    if OUT.value:
        os.makedirs(OUT.value, exist_ok=True)
        with open(os.path.join(OUT.value, "resnet50_scale.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
