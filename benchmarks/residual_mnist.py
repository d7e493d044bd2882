"""Residual CNNs with BatchNormalization on real MNIST, zipped with 90% of every hidden layer shared.

Two small ResNets (tflite_examples/models.py: residual_cnn) trained on different tasks: digits 0-4 (task a,
seed 1) and digits 5-9 (task b, seed 2). Each task's test error for its own model, the zipped model right
after zipping, and after light label-free retraining (distillation from the originals).

    python benchmarks/residual_mnist.py [--sharing 0.9] [--steps_per_layer 200] [--final_steps 800]

Base models are cached (see tflite_examples/mnist_data.py); the table goes to docs/residual_mnist.md.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

from absl import app, flags  # noqa: E402

import tf_mtz  # noqa: E402
from experiments import error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import calibration_sample, trained_model  # noqa: E402

SHARING = flags.DEFINE_float("sharing", 0.9, "Share of every hidden layer's units.")
STEPS = flags.DEFINE_integer("steps_per_layer", 200, "Joint retraining steps after each zipped layer.")
FINAL = flags.DEFINE_integer("final_steps", 800, "Joint retraining steps after the last zipped layer.")
EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Calibration images per task.")
OUT = flags.DEFINE_string("out", "docs", "Where to write the result table.")


def main(_):
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    data = experiment_data("E2", x_train, y_train, x_test, y_test)
    models = {"a": trained_model("resnet", 1, data["a"][0], data["a"][1], EPOCHS.value, tag="E2a"),
              "b": trained_model("resnet", 2, data["b"][0], data["b"][1], EPOCHS.value, tag="E2b")}
    calibration = {t: calibration_sample(data[t][0], CALIBRATION.value) for t in models}

    def errors(predict):
        return {t: error(predict(t, data[t][2]), data[t][3]) for t in models}

    rows = {"own model": errors(lambda t, x: models[t].predict(x, verbose=0, batch_size=1000))}
    started = time.perf_counter()
    zipped0 = tf_mtz.zip_models(models, calibration, sharing=SHARING.value, verbose=0)
    seconds0 = time.perf_counter() - started
    rows["zipped, no retraining"] = errors(lambda t, x: zipped0.predict(x, verbose=0, batch_size=1000)[t])
    hidden = sum(not layer.head for layer in zipped0.zip_report.layers)
    total = STEPS.value * hidden + FINAL.value
    retrain = tf_mtz.Retrain(data={t: data[t][0] for t in models}, steps_per_layer=STEPS.value,
                             final_steps=FINAL.value)
    started = time.perf_counter()
    zipped = tf_mtz.zip_models(models, calibration, sharing=SHARING.value, retrain=retrain, verbose=1)
    seconds = time.perf_counter() - started
    rows[f"zipped, {total} retraining steps"] = errors(lambda t, x: zipped.predict(x, verbose=0, batch_size=1000)[t])

    report = zipped.zip_report
    lines = [f"# Residual CNNs with BatchNormalization on MNIST, {SHARING.value:.0%} of every hidden layer shared",
             "",
             "Task a: digits 0-4 (seed 1); task b: digits 5-9 (seed 2); `tflite_examples/models.py: residual_cnn` "
             f"(stem, two residual blocks, BN after every conv), {EPOCHS.value} epochs each. Calibration: "
             f"{CALIBRATION.value} training images per task. Retraining: label-free distillation, "
             f"{STEPS.value} joint steps after each of the {hidden} zipped layers + {FINAL.value} final = {total} "
             "steps in total.", "",
             "| | task a error % | task b error % |", "|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['a']:.2f} | {row['b']:.2f} |")
    own = rows["own model"]
    final = rows[f"zipped, {total} retraining steps"]
    lines += ["", f"Change after retraining: a {final['a'] - own['a']:+.2f}, b {final['b'] - own['b']:+.2f} "
              "percentage points (target: within +0.5).",
              f"Parameters: {report.params_original:,} in the two models -> {report.params_zipped:,} zipped "
              f"({report.params_zipped / report.params_original:.3f}x); zipping took {seconds0:.0f} s without "
              f"and {seconds:.0f} s with retraining on this machine.", "", "Per layer:", "",
              report.to_markdown() if hasattr(report, "to_markdown") else report.to_table()]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "residual_mnist.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
