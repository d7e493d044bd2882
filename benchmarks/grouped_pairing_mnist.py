"""Grouped convolutions on real MNIST: groups lined up as blocks (the default) against group k with group k.

Two small ResNeXt networks (tflite_examples/models.py: resnext_cnn, 8 groups per grouped layer) trained on
digits 0-4 (task a, seeds 1, 3, 5) and digits 5-9 (task b, seeds 2, 4, 6), zipped with every hidden layer
shared. Each task's test error for its own model, then for both group pairings right after zipping and
after label-free retraining (distillation from the originals), from the same calibration data.

    python benchmarks/grouped_pairing_mnist.py [--pairs 3] [--final_steps 300] [--epochs 2]

Base models are cached (see tflite_examples/mnist_data.py); the table goes to docs/grouped_pairing_mnist.md.
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
from tf_mtz.experimental import ExperimentalConfig  # noqa: E402
from machine import describe  # noqa: E402
from experiments import error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import calibration_sample, trained_model  # noqa: E402

FINAL = flags.DEFINE_integer("final_steps", 300, "Label-free retraining steps after zipping.")
EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 1000, "Calibration images per task.")
PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs (1, 2), (3, 4), ...")
OUT = flags.DEFINE_string("out", "docs", "Where to write the result table.")

PAIRINGS = {"group k with group k": "in_order", "groups lined up as blocks (default)": "blocks"}


def main(_):
    started = time.perf_counter()
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    data = experiment_data("E2", x_train, y_train, x_test, y_test)
    rows, moved, seconds = {}, [], {}
    for pair in range(PAIRS.value):
        models = {"a": trained_model("resnext", 2 * pair + 1, data["a"][0], data["a"][1], EPOCHS.value, tag="E2a"),
                  "b": trained_model("resnext", 2 * pair + 2, data["b"][0], data["b"][1], EPOCHS.value, tag="E2b")}
        calibration = {t: calibration_sample(data[t][0], CALIBRATION.value) for t in models}

        def errors(predict):
            return [error(predict(t, data[t][2]), data[t][3]) for t in models]

        rows.setdefault("own model", []).append(errors(lambda t, x: models[t].predict(x, verbose=0, batch_size=1000)))
        for label, pairing in PAIRINGS.items():
            config = ExperimentalConfig(group_matching=pairing)
            begun = time.perf_counter()
            zipped = tf_mtz.zip_models(models, calibration, config=config, verbose=0)
            seconds.setdefault(label, []).append(time.perf_counter() - begun)
            rows.setdefault(f"{label}, no retraining", []).append(
                errors(lambda t, x: zipped.predict(x, verbose=0, batch_size=1000)[t]))
            if pairing == "blocks":
                orders = zipped.zip_report.settings["group_orders"].get("b", {})
                moved.append(sum(int(np.sum(np.asarray(o) != np.arange(len(o)))) for o in orders.values()))
            retrain = tf_mtz.Retrain(data={t: data[t][0] for t in models}, steps_per_layer=0,
                                     final_steps=FINAL.value, seed=pair)
            retrained = tf_mtz.zip_models(models, calibration, retrain=retrain, config=config, verbose=0)
            rows.setdefault(f"{label}, {FINAL.value} label-free steps", []).append(
                errors(lambda t, x: retrained.predict(x, verbose=0, batch_size=1000)[t]))

    def cell(values):
        values = np.asarray(values)
        return f"{values.mean():.2f} ± {values.std():.2f}"

    lines = ["# Grouped convolutions on MNIST: groups lined up as blocks against group k with group k", "",
             f"Measured on a {describe()}; {PAIRS.value} seed pairs, digits 0-4 (a) / 5-9 (b), small ResNeXt "
             f"networks (8 groups per grouped layer, {EPOCHS.value} epochs each), every hidden layer shared, "
             f"{CALIBRATION.value} calibration images per task. Test error in %, mean ± std over the pairs.", "",
             f"`python benchmarks/grouped_pairing_mnist.py --pairs {PAIRS.value} --final_steps {FINAL.value} "
             f"--epochs {EPOCHS.value}`", "",
             "| | task a | task b |", "|---|---|---|"]
    for label, values in rows.items():
        values = np.asarray(values)
        lines.append(f"| {label} | {cell(values[:, 0])} | {cell(values[:, 1])} |")
    lines += ["", f"Groups of task b that the block pairing moved, summed over its two grouped layers (16 groups): "
              f"{', '.join(str(m) for m in moved)} per pair.",
              "Zip time without retraining (s): " + "; ".join(f"{label} {cell(v)}" for label, v in seconds.items()) + ".",
              "", f"Total run time {(time.perf_counter() - started) / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "grouped_pairing_mnist.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
