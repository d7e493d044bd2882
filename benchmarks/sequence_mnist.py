"""Recurrent networks on real MNIST read as sequences, zipped with every hidden layer shared.

Each image is a sequence of 28 rows of 28 pixels. Two LSTM models (`tflite_examples/models.py:
sequence_lstm`: LSTM(64) -> Dense(64) -> head) trained on different tasks: digits 0-4 (task a, seeds 1, 3,
5) and digits 5-9 (task b, seeds 2, 4, 6). Each pair is zipped with every hidden layer shared (one LSTM and
one Dense layer for both tasks), then retrained label-free (distillation from the originals). The table
has each task's test error for its own model, the zipped model before retraining and after it.

    python benchmarks/sequence_mnist.py [--pairs 3] [--steps_per_layer 500] [--final_steps 1000]

Base models are cached (see tflite_examples/mnist_data.py); the table goes to docs/sequence_mnist.md.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

from absl import app, flags  # noqa: E402

import numpy as np  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402
from experiments import error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import calibration_sample, trained_model  # noqa: E402

ARCH = flags.DEFINE_string("arch", "sequence_lstm", "Architecture in tflite_examples/models.py.")
STEPS = flags.DEFINE_integer("steps_per_layer", 500, "Joint retraining steps after each zipped layer.")
FINAL = flags.DEFINE_integer("final_steps", 1000, "Joint retraining steps after the last zipped layer.")
EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Calibration images per task.")
PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs (1, 2), (3, 4), ...")
OUT = flags.DEFINE_string("out", "docs", "Where to write the result table.")


def main(_):
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    data = experiment_data("E2", x_train, y_train, x_test, y_test)
    rows, seconds, zip_seconds, report, total = {}, [], [], None, 0
    for pair in range(PAIRS.value):
        models = {"a": trained_model(ARCH.value, 2 * pair + 1, data["a"][0], data["a"][1], EPOCHS.value, tag="E2a"),
                  "b": trained_model(ARCH.value, 2 * pair + 2, data["b"][0], data["b"][1], EPOCHS.value, tag="E2b")}
        calibration = {t: calibration_sample(data[t][0], CALIBRATION.value) for t in models}

        def errors(predict):
            return [error(predict(t, data[t][2]), data[t][3]) for t in models]

        rows.setdefault("own model", []).append(
            errors(lambda t, x: models[t].predict(x, verbose=0, batch_size=1000)))
        started = time.perf_counter()
        zipped0 = tf_mtz.zip_models(models, calibration, sharing=1.0, verbose=0)
        zip_seconds.append(time.perf_counter() - started)
        rows.setdefault("zipped, no retraining", []).append(
            errors(lambda t, x: zipped0.predict(x, verbose=0, batch_size=1000)[t]))
        hidden = sum(not layer.head for layer in zipped0.zip_report.layers)
        total = STEPS.value * hidden + FINAL.value
        retrain = tf_mtz.Retrain(data={t: data[t][0] for t in models}, steps_per_layer=STEPS.value,
                                 final_steps=FINAL.value, seed=pair)
        started = time.perf_counter()
        zipped = tf_mtz.zip_models(models, calibration, sharing=1.0, retrain=retrain, verbose=1)
        seconds.append(time.perf_counter() - started)
        rows.setdefault(f"zipped, {total} retraining steps", []).append(
            errors(lambda t, x: zipped.predict(x, verbose=0, batch_size=1000)[t]))
        report = report or zipped.zip_report
        print(f"pair {pair + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f}/{v[-1][1]:.2f}" for k, v in rows.items()))

    def cell(values, task):
        column = np.array(values)[:, task]
        return f"{column.mean():.2f} ± {column.std():.2f}" if len(column) > 1 else f"{column[0]:.2f}"

    own = np.array(rows["own model"])
    final = np.array(rows[f"zipped, {total} retraining steps"])
    change = final - own
    lines = [f"# Recurrent networks on MNIST read as sequences ({ARCH.value}), every hidden layer shared", "",
             "Each image is a sequence of 28 rows of 28 pixels. Task a: digits 0-4 (seeds 1, 3, ...); task b: digits "
             f"5-9 (seeds 2, 4, ...); `tflite_examples/models.py: {ARCH.value}`, {EPOCHS.value} epochs each. "
             f"Calibration: {CALIBRATION.value} training images per task. Retraining: label-free distillation, "
             f"{STEPS.value} joint steps after each of the {hidden} zipped layers + {FINAL.value} final = {total} "
             f"steps in total. Mean ± std over {PAIRS.value} seed pair(s).", "",
             "| | task a error % | task b error % |", "|---|---|---|"]
    for name, values in rows.items():
        lines.append(f"| {name} | {cell(values, 0)} | {cell(values, 1)} |")
    lines += ["", "Change after retraining, per pair (percentage points; target: each within +0.5): "
              + "; ".join(f"pair {k + 1}: a {a:+.2f}, b {b:+.2f}" for k, (a, b) in enumerate(change)) + ".",
              f"Worst: {change.max():+.2f}.", "",
              f"Parameters (first pair): {report.params_original:,} in the two models -> {report.params_zipped:,} "
              f"zipped ({report.params_zipped / report.params_original:.3f}x). Zipping took {np.mean(zip_seconds):.1f} s "
              f"per pair without retraining and {np.mean(seconds):.0f} s with it, on a {describe()}.", "",
              "Per layer (first pair):", "", report.to_markdown() if hasattr(report, "to_markdown") else report.to_table()]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, f"{'sequence_mnist' if ARCH.value == 'sequence_lstm' else ARCH.value}.md"),
              "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
