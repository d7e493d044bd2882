"""Export: TFLite/LiteRT flatbuffers and SavedModels for TF Serving, outputs keyed by task name.

Both carry a `serving_default` signature that returns every task's output and one signature per task
(named after the task) that computes only what that task needs. All signatures read the same weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_mtz.registry import ZipError

QUANTIZATIONS = (None, "dynamic", "float16", "int8")
DEFAULT_SIGNATURE = "serving_default"


@contextlib.contextmanager
def _quiet():
    """SavedModel writing and TFLite conversion log pages of INFO lines; users want the result."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # int8 calibration runs TF's own (deprecated) interpreter internally; nothing for users to do.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
            yield
    finally:
        logging.set_verbosity(verbosity)


def input_name(model: keras.Model) -> str:
    """The signature input name: the model input's name, cleaned to letters, digits and '_'."""
    name = model.inputs[0].name.split(":")[0]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "input"


def task_outputs(model: keras.Model) -> dict:
    """`{task: output tensor}` of a zipped model (a single-output model gives `{"output": ...}`)."""
    outputs = model.output
    return dict(outputs) if isinstance(outputs, dict) else {"output": outputs}


def _signatures(model: keras.Model) -> dict:
    """`{signature name: tf.function}`: all tasks, plus one per task computing only that task's path."""
    spec = model.inputs[0]
    signature = [tf.TensorSpec((None,) + tuple(spec.shape[1:]), spec.dtype, name=input_name(model))]
    outputs = task_outputs(model)

    def make(submodel, names):
        @tf.function(input_signature=signature)
        def serve(x):
            values = submodel(x, training=False)
            if not isinstance(values, dict):
                values = {names[0]: values}
            return {name: tf.identity(values[name], name=name) for name in names}

        return serve

    functions = {DEFAULT_SIGNATURE: make(model, list(outputs))}
    if len(outputs) > 1:
        for task, tensor in outputs.items():
            if task == DEFAULT_SIGNATURE:
                raise ZipError(f"Task name '{task}' clashes with the default signature name.")
            # A submodel over the same layers: the task's own path only, the same variables.
            functions[task] = make(keras.Model(model.inputs, {task: tensor}), [task])
    return functions


def export_saved_model(model: keras.Model, path: str, overwrite: bool = False) -> str:
    """Writes a SavedModel with a `serving_default` signature returning `{task: output}` and one
    signature per task.

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
    loaded = tf.saved_model.load("serving/zipped/1")
    both = loaded.signatures["serving_default"](image=x)     # {"a": ..., "b": ...}
    only_a = loaded.signatures["a"](image=x)                  # {"a": ...}
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
            for name, function in _signatures(model).items():
                archive.add_endpoint(name, function)
            archive.write_out(staging, verbose=False)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _representative(model: keras.Model, signature_keys, data, samples: int):
    x = np.asarray(data[0] if isinstance(data, (tuple, list)) else data, np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ZipError("representative_data for int8 quantization is empty.")
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(x.shape[1:]) != expected:
        raise ZipError(f"representative_data has samples of shape {tuple(x.shape[1:])}; the model takes {expected}.")
    name = input_name(model)
    chosen = x[np.random.default_rng(0).permutation(len(x))[:samples]]

    def generator():
        for key in signature_keys:
            for sample in chosen:
                yield key, {name: sample[None]}

    return generator


def tflite_bytes(model: keras.Model, quantization: str | None = None, representative_data=None,
                 representative_samples: int = 200) -> bytes:
    """Converts `model` to a TFLite flatbuffer (see `export_tflite`) and returns its bytes."""
    if quantization not in QUANTIZATIONS:
        raise ZipError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    if quantization == "int8" and representative_data is None:
        raise ZipError("quantization='int8' needs representative_data (e.g. the calibration inputs).")
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        saved = export_saved_model(model, os.path.join(tmp, "saved"))
        keys = list(_signatures(model))
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=keys)
        if quantization is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = _representative(model, keys, representative_data,
                                                                representative_samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()


def export_tflite(model: keras.Model, path: str, quantization: str | None = None, representative_data=None,
                  overwrite: bool = False) -> int:
    """Writes a TFLite/LiteRT model with a `serving_default` signature returning `{task: output}` and
    one signature per task that runs only that task's path; all signatures share the weight buffers.

    Args:
        model: a zipped model.
        path: the `.tflite` file to write (atomically: a temporary file, then a rename).
        quantization: None (float32), "dynamic" (int8 weights, float activations), "float16" (float16
            weights) or "int8" (int8 weights and activations; inputs and outputs stay float32).
        representative_data: inputs for int8 activation ranges, e.g. the calibration data.
        overwrite: replace an existing file.

    Returns:
        The file size in bytes.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError: unknown quantization, or int8 without representative data.

    Example:

    ```python
    size = tf_mtz.export_tflite(zipped, "zipped.tflite")
    interpreter = ai_edge_litert.interpreter.Interpreter("zipped.tflite")
    both = interpreter.get_signature_runner("serving_default")(image=x[:1])   # {"a": ..., "b": ...}
    only_a = interpreter.get_signature_runner("a")(image=x[:1])                # {"a": ...}
    ```
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    content = tflite_bytes(model, quantization, representative_data)
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
