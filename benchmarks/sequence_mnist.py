"""Sequence models on real MNIST, zipped with every hidden layer shared.

Two models of one architecture (`--arch`, from `tflite_examples/models.py`) trained on different tasks:
digits 0-4 (task a, seeds 1, 3, 5) and digits 5-9 (task b, seeds 2, 4, 6). Each pair is zipped with every
hidden layer shared, then retrained label-free (distillation from the originals). The table has each task's
test error for its own model, the zipped model before retraining and after it.

Architectures:

* `sequence_lstm` (default): each image a sequence of 28 rows of 28 pixels; LSTM(64) -> Dense(64) -> head.
* `sequence_vit`: each image a sequence of 16 patches of 7x7 pixels, a class token and a learnt position
  embedding, two pre-LN encoder blocks (4-head self-attention, GELU MLP), the class token's final state
  -> head. Every Dense, Conv2D and attention layer is zipped.

The retraining budget is `--total_steps` (default 2,000): half of it spread over the zipped hidden layers
(`total_steps // (2 * layers)` steps after each), the rest after the last one; `--steps_per_layer` and
`--final_steps` set either part explicitly. For the LSTM's two zipped layers that is 500 + 500 + 1,000.

    python benchmarks/sequence_mnist.py [--arch sequence_lstm] [--pairs 3] [--total_steps 2000]
        [--steps_per_layer N] [--final_steps N] [--epochs 4]

Base models are cached (see tflite_examples/mnist_data.py); the table goes to docs/sequence_mnist.md
(sequence_lstm) or docs/<arch>.md.
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
TOTAL = flags.DEFINE_integer("total_steps", 2000, "Retraining budget: half spread over the zipped hidden layers, "
                              "the rest after the last one (unless --steps_per_layer / --final_steps say otherwise).")
STEPS = flags.DEFINE_integer("steps_per_layer", None, "Joint retraining steps after each zipped layer "
                             "(default: total_steps // (2 * zipped hidden layers)).")
FINAL = flags.DEFINE_integer("final_steps", None, "Joint retraining steps after the last zipped layer "
                             "(default: what is left of total_steps).")
EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Calibration images per task.")
PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs (1, 2), (3, 4), ...")
OUT = flags.DEFINE_string("out", "docs", "Where to write the result table.")


DESCRIPTIONS = {
    "sequence_lstm": ("Recurrent networks on MNIST read as sequences",
                      "Each image is a sequence of 28 rows of 28 pixels."),
    "sequence_vit": ("Vision transformers on MNIST read as sequences of patches",
                     "Each image is a sequence of 16 patches of 7x7 pixels (a strided Conv2D), with a class token and "
                     "a learnt position embedding, two pre-LN encoder blocks (4-head self-attention, GELU MLP) and the "
                     "class token's final state read out. Every Dense, Conv2D and attention layer is zipped."),
}


def retraining_steps(hidden: int) -> tuple[int, int]:
    """(steps after each of the `hidden` zipped layers, final steps) within the --total_steps budget."""
    steps = STEPS.value if STEPS.value is not None else TOTAL.value // (2 * max(hidden, 1))
    final_steps = FINAL.value if FINAL.value is not None else max(TOTAL.value - steps * hidden, 0)
    return steps, final_steps


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
        steps, final_steps = retraining_steps(hidden)
        total = steps * hidden + final_steps
        retrain = tf_mtz.Retrain(data={t: data[t][0] for t in models}, steps_per_layer=steps,
                                 final_steps=final_steps, seed=pair)
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
    title, description = DESCRIPTIONS.get(ARCH.value, ("Sequence models on MNIST", ""))
    steps, final_steps = retraining_steps(hidden)
    lines = [f"# {title} ({ARCH.value}), every hidden layer shared", "",
             (f"{description} " if description else "") + "Task a: digits 0-4 (seeds 1, 3, ...); task b: digits "
             f"5-9 (seeds 2, 4, ...); `tflite_examples/models.py: {ARCH.value}`, {EPOCHS.value} epochs each. "
             f"Calibration: {CALIBRATION.value} training images per task. Retraining: label-free distillation, "
             f"{steps} joint steps after each of the {hidden} zipped layers + {final_steps} final = {total} "
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
