"""Export: TFLite/LiteRT flatbuffers and SavedModels for TF Serving, outputs keyed by task name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import keras
import tensorflow as tf
from absl import logging

from tf_mtz.registry import ZipError

QUANTIZATIONS = (None, "dynamic")


@contextlib.contextmanager
def _quiet():
    """SavedModel writing and TFLite conversion log pages of INFO lines; users want the result."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _serving_fn(model: keras.Model):
    spec = model.inputs[0]
    signature = [tf.TensorSpec((None,) + tuple(spec.shape[1:]), spec.dtype, name=_input_name(model))]

    @tf.function(input_signature=signature)
    def serve(x):
        outputs = model(x, training=False)
        if not isinstance(outputs, dict):
            outputs = {"output": outputs}
        return {name: tf.identity(value, name=name) for name, value in outputs.items()}

    return serve


def _input_name(model) -> str:
    name = model.inputs[0].name.split(":")[0]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "input"


def export_saved_model(model: keras.Model, path: str, overwrite: bool = False) -> str:
    """Writes a SavedModel whose `serving_default` signature returns `{task: output}`.

    Args:
        model: a zipped model (or any single-input Keras model).
        path: output directory; for TF Serving use `<base>/<model_name>/<version>`.
        overwrite: replace an existing directory.

    Returns:
        `path`.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.

    Example:

    ```python
    tf_mtz.export_saved_model(zipped, "serving/zipped/1")
    outputs = tf.saved_model.load("serving/zipped/1").signatures["serving_default"](input=x)
    ```
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".tf_mtz_export_")
    try:
        with _quiet():
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serving_default", _serving_fn(model))
            archive.write_out(staging, verbose=False)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return path


def tflite_bytes(model: keras.Model, quantization: str | None = None) -> bytes:
    """Converts `model` to a TFLite flatbuffer (see `export_tflite`) and returns its bytes."""
    if quantization not in QUANTIZATIONS:
        raise ZipError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        saved = export_saved_model(model, os.path.join(tmp, "saved"))
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serving_default"])
        if quantization == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()


def export_tflite(model: keras.Model, path: str, quantization: str | None = None,
                  overwrite: bool = False) -> int:
    """Writes a TFLite/LiteRT model whose `serving_default` signature returns `{task: output}`.

    Args:
        model: a zipped model.
        path: the `.tflite` file to write (atomically: a temporary file, then a rename).
        quantization: None (float32) or "dynamic" (int8 weights, float activations).
        overwrite: replace an existing file.

    Returns:
        The file size in bytes.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError: unknown quantization.

    Example:

    ```python
    size = tf_mtz.export_tflite(zipped, "zipped.tflite")
    runner = ai_edge_litert.interpreter.Interpreter("zipped.tflite").get_signature_runner()
    outputs = runner(input=x[:1])   # {"a": ..., "b": ...}
    ```
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    content = tflite_bytes(model, quantization)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tf_mtz_", suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(content)
