"""Zip → quantization-aware training (tfmot) → int8 .tflite, against post-training int8 quantization.

Two LeNet-5 (MNIST, different seeds) are zipped fully, then the zipped model is rebuilt as a tf_keras model
(`tf_mtz.to_tf_keras`, since tfmot 0.8.1 accepts only tf_keras), wrapped by
`tfmot.quantization.keras.quantize_model`, trained a few hundred steps to match the float zipped model's
outputs (no labels needed), and converted to an int8 .tflite. Prints the test error of PTQ int8 and QAT int8.

    python tflite_examples/qat_int8.py [--qat_steps 300]
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import tf_mtz  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import zipped_pair  # noqa: E402

STEPS = flags.DEFINE_integer("steps_per_layer", 500, "Joint distillation steps after each zipped layer.")
QAT_STEPS = flags.DEFINE_integer("qat_steps", 300, "Quantization-aware training steps.")
EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of each base LeNet-5 (cached).")
OUT = flags.DEFINE_string("out", "out/qat", "Where the .tflite files go.")


def tflite_error(path, x, y, task):
    run = Interpreter(model_path=path).get_signature_runner("serving_default")
    out = np.concatenate([run(image=x[i:i + 500])[task] for i in range(0, len(x), 500)])
    return float(np.mean(np.argmax(out, -1) != y) * 100)


def qat_tflite(zipped, x_train, steps, path):
    import tensorflow_model_optimization as tfmot
    import tf_keras

    tasks = list(zipped.output)
    legacy = tf_mtz.to_tf_keras(zipped)
    qat = tfmot.quantization.keras.quantize_model(legacy)
    qat.compile(optimizer=tf_keras.optimizers.Adam(1e-4),
                loss={t: tf_keras.losses.KLDivergence() for t in tasks})
    rng = np.random.default_rng(0)
    x = x_train[rng.permutation(len(x_train))[:steps * 64]]
    targets = zipped.predict(x, verbose=0, batch_size=1000)  # the float zipped model teaches its int8 self
    qat.fit(x, {t: targets[t] for t in tasks}, batch_size=64, epochs=1, verbose=2)

    spec = tf.TensorSpec((None,) + tuple(zipped.inputs[0].shape[1:]), tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(image):
        return {t: tf.identity(v, name=t) for t, v in qat(image, training=False).items()}

    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(qat, tmp, signatures={"serving_default": serve})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        content = converter.convert()
    with open(path, "wb") as f:
        f.write(content)
    return len(content)


def main(_):
    logging.set_verbosity(logging.WARNING)  # TF logs every SavedModel write at INFO
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    _, calibration, zipped = zipped_pair("lenet5", x_train, y_train, EPOCHS.value, STEPS.value, verbose=0)
    os.makedirs(OUT.value, exist_ok=True)
    ptq_path = os.path.join(OUT.value, "zipped_ptq_int8.tflite")
    qat_path = os.path.join(OUT.value, "zipped_qat_int8.tflite")
    ptq_bytes = tf_mtz.export_tflite(zipped, ptq_path, quantization="int8", representative_data=calibration,
                                     overwrite=True)
    qat_bytes = qat_tflite(zipped, x_train, QAT_STEPS.value, qat_path)

    float_out = zipped.predict(x_test, verbose=0, batch_size=1000)
    print(f"\nMNIST test error (%), two LeNet-5 zipped fully; QAT {QAT_STEPS.value} steps")
    print(f"{'task':<6}{'float':>8}{'PTQ int8':>10}{'QAT int8':>10}")
    for task in ("a", "b"):
        float_error = float(np.mean(np.argmax(float_out[task], -1) != y_test) * 100)
        print(f"{task:<6}{float_error:>8.2f}{tflite_error(ptq_path, x_test, y_test, task):>10.2f}"
              f"{tflite_error(qat_path, x_test, y_test, task):>10.2f}")
    print(f"bytes: PTQ int8 {ptq_bytes:,}  QAT int8 {qat_bytes:,}")


if __name__ == "__main__":
    app.run(main)
