"""Main demo: zip two LeNet-300-100 trained on real MNIST with different seeds (the paper's first
experiment), retrain briefly, export TFLite, run it with the LiteRT interpreter and print the report.

    python tflite_examples/mnist_demo.py [--steps_per_layer 500] [--out out/demo]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tf_mtz  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import calibration_sample, error_percent, trained_model  # noqa: E402

STEPS = flags.DEFINE_integer("steps_per_layer", 500, "Joint retraining steps after each zipped layer.")
ARCH = flags.DEFINE_enum("arch", "lenet300", ["lenet300", "lenet5"], "Base architecture.")
EPOCHS = flags.DEFINE_integer("epochs", 10, "Training epochs of each base model (cached).")
CALIBRATION = flags.DEFINE_integer("calibration", 10000, "Calibration images per task.")
OUT = flags.DEFINE_string("out", "out/demo", "Where to write the zipped .keras, .tflite and report.")


def tflite_predict(path: str):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=1)
    runner = interpreter.get_signature_runner("serving_default")
    input_name = next(iter(runner.get_input_details()))

    def predict(x, task):
        outputs = [runner(**{input_name: x[i:i + 500]})[task] for i in range(0, len(x), 500)]
        return np.concatenate(outputs)

    return predict


def main(_):
    logging.set_verbosity(logging.WARNING)  # TF logs every SavedModel write at INFO
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    started = time.perf_counter()
    model_a = trained_model(ARCH.value, 1, x_train, y_train, EPOCHS.value)
    model_b = trained_model(ARCH.value, 2, x_train, y_train, EPOCHS.value)
    print(f"base models ready in {time.perf_counter() - started:.1f} s (cached after the first run)")

    calibration = calibration_sample(x_train, CALIBRATION.value)
    retrain = tf_mtz.Retrain(data=x_train, steps_per_layer=STEPS.value, loss="distill")
    started = time.perf_counter()
    zipped_raw = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration_data=calibration, verbose=0)
    zipped = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration_data=calibration, retrain=retrain,
                               evaluation_data=(x_test, y_test))
    print(f"zipped (with retraining) in {time.perf_counter() - started:.1f} s")

    os.makedirs(OUT.value, exist_ok=True)
    keras_path = os.path.join(OUT.value, "zipped.keras")
    zipped.save(keras_path)
    tflite_path = os.path.join(OUT.value, "zipped.tflite")
    zipped_bytes = tf_mtz.export_tflite(zipped, tflite_path, overwrite=True)
    separate_bytes = sum(len(tf_mtz.tflite_bytes(m)) for m in (model_a, model_b))
    zipped.zip_report.tflite_bytes = {"separate": separate_bytes, "zipped": zipped_bytes}
    with open(os.path.join(OUT.value, "report.json"), "w") as f:
        f.write(zipped.zip_report.to_json())
    with open(os.path.join(OUT.value, "report.md"), "w") as f:
        f.write(zipped.zip_report.to_markdown() + "\n")
    plot_path = zipped.zip_report.plot(os.path.join(OUT.value, "report.png"))

    lite = tflite_predict(tflite_path)
    rows = [
        ("model A", error_percent(lambda x: model_a.predict(x, verbose=0, batch_size=1000), x_test, y_test),
         None),
        ("model B", None,
         error_percent(lambda x: model_b.predict(x, verbose=0, batch_size=1000), x_test, y_test)),
    ]
    for label, model in (("zipped, before retraining", zipped_raw), ("zipped, after retraining", zipped)):
        out = model.predict(x_test, verbose=0, batch_size=1000)
        rows.append((label, error_percent(lambda _: out["a"], x_test, y_test),
                     error_percent(lambda _: out["b"], x_test, y_test)))
    rows.append(("zipped .tflite (LiteRT)", error_percent(lambda x: lite(x, "a"), x_test, y_test),
                 error_percent(lambda x: lite(x, "b"), x_test, y_test)))

    report = zipped.zip_report
    print()
    print(report)
    total_steps = STEPS.value * sum(1 for layer in report.layers if layer.shared)
    print(f"\nMNIST test error (%), {ARCH.value}, both hidden layers 100% shared, {total_steps} joint "
          "distillation steps in total")
    print(f"{'model':<28}{'task A':>8}{'task B':>8}")
    for label, a, b in rows:
        fmt = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
        print(f"{label:<28}{fmt(a)}{fmt(b)}")
    params_separate = model_a.count_params() + model_b.count_params()
    print(f"\nparameters: separate {params_separate:,}  zipped {zipped.count_params():,} "
          f"({zipped.count_params() / params_separate:.2f}x)")
    print(f".tflite bytes: separate {separate_bytes:,}  zipped {zipped_bytes:,} "
          f"({zipped_bytes / separate_bytes:.2f}x)")
    print(f"written: {keras_path}, {tflite_path}, {os.path.join(OUT.value, 'report.json')}, report.md, "
          f"{plot_path}")


if __name__ == "__main__":
    app.run(main)
