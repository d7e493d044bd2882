"""Deployment check: two LeNet-5 zipped fully, exported to float and int8 .tflite, run with the LiteRT
interpreter on the MNIST test set, and compared in bytes and single-thread latency with the two separate
models' .tflite files (ratios measured side by side in this run).

    python tflite_examples/lenet5_deploy.py [--steps_per_layer 500] [--out out/deploy]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import tf_mtz  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import zipped_pair  # noqa: E402

STEPS = flags.DEFINE_integer("steps_per_layer", 500, "Joint distillation steps after each zipped layer.")
EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of each base LeNet-5 (cached).")
FRAMES = flags.DEFINE_integer("frames", 300, "Single frames timed per model.")
OUT = flags.DEFINE_string("out", "out/deploy", "Where the .tflite files go.")


def runner(path, signature="serving_default"):
    interpreter = Interpreter(model_path=path, num_threads=1)
    return interpreter.get_signature_runner(signature)


def error(run, x, y, task):
    predictions = np.concatenate([run(image=x[i:i + 500])[task] for i in range(0, len(x), 500)])
    return float(np.mean(np.argmax(predictions, -1) != y) * 100)


def latency(runs, frames, x):
    """Median seconds to run every callable in `runs` on one frame, interleaved so both see the same load."""
    for run in runs:
        run(image=x[:1])
    times = []
    for i in range(frames):
        frame = x[i % len(x):i % len(x) + 1]
        start = time.perf_counter()
        for run in runs:
            run(image=frame)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(_):
    logging.set_verbosity(logging.WARNING)  # TF logs every SavedModel write at INFO
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    models, calibration, zipped = zipped_pair("lenet5", x_train, y_train, EPOCHS.value, STEPS.value)
    os.makedirs(OUT.value, exist_ok=True)
    paths = {name: os.path.join(OUT.value, f"{name}.tflite") for name in ("a", "b", "zipped", "zipped_int8")}
    for task, model in models.items():
        tf_mtz.export_tflite(model, paths[task], overwrite=True)
    tf_mtz.export_tflite(zipped, paths["zipped"], overwrite=True)
    tf_mtz.export_tflite(zipped, paths["zipped_int8"], quantization="int8", representative_data=calibration,
                         overwrite=True)
    size = {name: os.path.getsize(path) for name, path in paths.items()}

    keras_out = zipped.predict(x_test, verbose=0, batch_size=1000)
    rows = []
    for task in ("a", "b"):
        separate = error(runner(paths[task]), x_test, y_test, "output")
        zipped_keras = float(np.mean(np.argmax(keras_out[task], -1) != y_test) * 100)
        zipped_float = error(runner(paths["zipped"]), x_test, y_test, task)
        zipped_int8 = error(runner(paths["zipped_int8"]), x_test, y_test, task)
        rows.append((task, separate, zipped_keras, zipped_float, zipped_int8))

    separate_runs = [runner(paths["a"]), runner(paths["b"])]
    zipped_run = [runner(paths["zipped"])]
    int8_run = [runner(paths["zipped_int8"])]
    # Alternate the measurements twice so drift on a shared machine hits both sides alike.
    t_separate = min(latency(separate_runs, FRAMES.value, x_test), latency(separate_runs, FRAMES.value, x_test))
    t_zipped = min(latency(zipped_run, FRAMES.value, x_test), latency(zipped_run, FRAMES.value, x_test))
    t_int8 = latency(int8_run, FRAMES.value, x_test)

    print(zipped.zip_report)
    print("\nMNIST test error (%), LeNet-5 x2, all hidden layers shared")
    print(f"{'task':<6}{'separate':>10}{'zipped keras':>14}{'zipped float':>14}{'zipped int8':>13}")
    for task, separate, zk, zf, zi in rows:
        print(f"{task:<6}{separate:>10.2f}{zk:>14.2f}{zf:>14.2f}{zi:>13.2f}")
    both = size["a"] + size["b"]
    print(f"\n.tflite bytes: separate {both:,}  zipped float {size['zipped']:,} ({size['zipped'] / both:.3f}x)  "
          f"zipped int8 {size['zipped_int8']:,} ({size['zipped_int8'] / both:.3f}x)")
    print(f"single-thread latency per frame, all tasks: separate {t_separate * 1e3:.3f} ms  zipped float "
          f"{t_zipped * 1e3:.3f} ms ({t_zipped / t_separate:.3f}x)  zipped int8 {t_int8 * 1e3:.3f} ms "
          f"({t_int8 / t_separate:.3f}x)")


if __name__ == "__main__":
    app.run(main)
