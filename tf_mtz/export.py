"""Export: TFLite/LiteRT flatbuffers and SavedModels for TF Serving, outputs keyed by task name.

Both carry a `serving_default` signature that returns every task's output and one signature per task
(named after the task) that computes only what that task needs (in TFLite, the all-tasks graph where that
would skip under 5% of the work: `flatbuffer.alias_task_signatures`). All signatures read the same weights.
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

from tf_mtz import flatbuffer, keras_graph
from tf_mtz.errors import ZipError

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


def input_names(model: keras.Model) -> list:
    """The signature input names: each model input's name, cleaned to letters, digits and '_'."""
    names = [keras_graph.clean_name(tensor.name) for tensor in keras_graph.model_inputs(model)]
    if len(set(names)) != len(names):
        raise ZipError(f"Model '{model.name}' has inputs with the same name {names}; name its keras.Input "
                       "layers apart to export it.")
    return names


def task_outputs(model: keras.Model) -> dict:
    """`{task: output tensor}` of a zipped model; any other model's outputs by name (a single output is
    `{"output": ...}`, a list takes its output layers' names)."""
    return keras_graph.named_outputs(model)


def _exportable(model) -> None:
    """Raises `ZipError` for what cannot be exported: not a built Functional or Sequential model."""
    keras_graph.check_graph_model(model, f"Model '{getattr(model, 'name', model)}'")


def _signatures(model: keras.Model, batch_size: int | None = None) -> dict:
    """`{signature name: tf.function}`: all tasks, plus one per task computing only that task's path (with
    every output of that task when the models had several: keys "task/output"), for batches of
    `batch_size` (None: any)."""
    inputs = keras_graph.model_inputs(model)
    signature = [tf.TensorSpec((batch_size,) + tuple(x.shape[1:]), x.dtype, name=name)
                 for x, name in zip(inputs, input_names(model))]
    outputs = task_outputs(model)
    for task in outputs:
        if task == DEFAULT_SIGNATURE and len(outputs) > 1:
            raise ZipError(f"Task name '{task}' clashes with the default signature name.")

    def make(named):
        # A functional model over the same layers and variables, returning a dict, whatever the kind
        # (Sequential, list outputs) and however it was built or loaded.
        submodel = keras.Model(inputs, named)

        @tf.function(input_signature=signature)
        def serve(*xs):
            values = submodel(list(xs) if len(xs) > 1 else xs[0], training=False)
            return {name: tf.identity(values[name], name=keras_graph.clean_name(name)) for name in named}

        return serve

    functions = {DEFAULT_SIGNATURE: make(outputs)}
    # Zipped multi-output models key their outputs "task/output": a task's signature holds all of them.
    by_task = {}
    for key, tensor in outputs.items():
        by_task.setdefault(key.split("/")[0], {})[key] = tensor
    if len(by_task) > 1:
        for task, named in by_task.items():
            functions[task] = make(named)  # the task's own path only
    return functions


def _float32(model: keras.Model) -> keras.Model:
    """`model`, or where layers compute in float16/bfloat16 (mixed precision) a copy computing in float32:
    LiteRT's builtin kernels take no float16 MatMul or Conv2D. The copy is exact: mixed-precision
    variables are float32 already; `quantization="float16"` stores the weights in half precision instead."""
    def layers(parent):
        for layer in getattr(parent, "layers", []):  # nested models' layers too
            yield layer
            yield from layers(layer)

    if all(getattr(layer, "compute_dtype", "float32") in ("float32", "int32", "int64", "bool")
           for layer in layers(model)):
        return model

    def in_float32(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return type(layer).from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=in_float32)
        copy.set_weights(model.get_weights())
    except Exception as error:
        raise ZipError(f"Model '{model.name}' computes in mixed precision and could not be copied to float32 for "
                       f"TFLite ({error}); set its dtype policy to float32 before exporting.") from error
    return copy


def export_saved_model(model: keras.Model, path: str, overwrite: bool = False) -> str:
    """Writes a SavedModel with a `serving_default` signature returning `{task: output}` and one
    signature per task.

    Args:
        model: a zipped model, or any built Functional or Sequential model (as for `export_tflite`).
        path: output directory; for TF Serving use `<base>/<model_name>/<version>`.
        overwrite: replace an existing directory.

    Returns:
        `path`.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError (`tf_mtz.ZipError`): a subclassed or unbuilt model.

    Example:

    ```python
    tf_mtz.export_saved_model(zipped, "serving/zipped/1")
    loaded = tf.saved_model.load("serving/zipped/1")
    both = loaded.signatures["serving_default"](image=x)     # {"a": ..., "b": ...}
    only_a = loaded.signatures["a"](image=x)                  # {"a": ...}
    ```
    """
    _exportable(model)
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


def _frozen_saved_model(model: keras.Model, path: str) -> str:
    """A SavedModel of the export signatures for one sample per call, with the weights as constants.

    For models with recurrent layers: Keras runs them as a `while` loop that reads the weights inside its
    body, and LiteRT's builtin WHILE runs it only with a static batch and frozen weights (with a free batch
    the converter needs TensorFlow's own list ops, Select TF ops; with variables the loop body reads
    resource variables LiteRT never initialises)."""
    signatures = {name: _frozen(function) for name, function in _signatures(model, batch_size=1).items()}
    tf.saved_model.save(tf.Module(), path, signatures=signatures)
    return path


def _frozen(function):
    """A signature function with its weights as constants, returning the same dict."""
    concrete = function.get_concrete_function()
    frozen = keras_graph.frozen_function(concrete)
    names = sorted(concrete.structured_outputs)  # a frozen function returns them flat, keys sorted

    @tf.function(input_signature=concrete.structured_input_signature[0])
    def serve(*xs):
        return dict(zip(names, frozen(*xs)))

    return serve


def _representative_arrays(model: keras.Model, data) -> list:
    """One array per model input, in its dtype (token ids stay integers), from `representative_data`: an
    array (or `(x, y)`) for a single-input model; a list or a dict keyed by input name, one array per
    input, for several inputs."""
    names = input_names(model)
    if len(names) == 1:
        arrays = [data[0] if isinstance(data, (tuple, list)) else data]
    elif isinstance(data, dict):
        missing = [n for n in names if n not in data]
        if missing:
            raise ZipError(f"representative_data has no array for input(s) {missing} of model '{model.name}'.")
        arrays = [data[n] for n in names]
    elif isinstance(data, (tuple, list)) and len(data) == len(names):
        arrays = list(data)
    else:
        raise ZipError(f"Model '{model.name}' takes {len(names)} inputs {names}; give representative_data as a "
                       "list or a dict of one array per input.")
    tensors = keras_graph.model_inputs(model)
    arrays = [np.asarray(x).astype(tensor.dtype, copy=False) for x, tensor in zip(arrays, tensors)]
    for x, tensor, name in zip(arrays, tensors, names):
        if x.ndim == 0 or len(x) == 0:
            raise ZipError("representative_data for int8 quantization is empty.")
        expected = tuple(tensor.shape[1:])
        if tuple(x.shape[1:]) != expected:
            raise ZipError(f"representative_data has samples of shape {tuple(x.shape[1:])}; the model's input "
                           f"'{name}' takes {expected}.")
    if len({len(x) for x in arrays}) != 1:
        raise ZipError(f"representative_data has different sample counts per input: {[len(x) for x in arrays]}.")
    return arrays


def _representative(model: keras.Model, signature_keys, data, samples: int):
    arrays = _representative_arrays(model, data)
    names = input_names(model)
    chosen = np.random.default_rng(0).permutation(len(arrays[0]))[:samples]

    def generator():
        for key in signature_keys:
            for i in chosen:
                yield key, {name: x[i][None] for name, x in zip(names, arrays)}

    return generator


def tflite_bytes(model: keras.Model, quantization: str | None = None, representative_data=None,
                 representative_samples: int = 200, *, task_signatures: bool = True) -> bytes:
    """Converts `model` to a TFLite flatbuffer and returns its bytes.

    Args, Raises: as for `export_tflite`; `representative_samples` is how many of the representative
    inputs calibrate int8 ranges.

    Returns:
        The flatbuffer's bytes.

    Example:

    ```python
    size = len(tf_mtz.tflite_bytes(model, quantization="dynamic"))
    ```
    """
    _exportable(model)
    if quantization not in QUANTIZATIONS:
        raise ZipError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    if quantization == "int8" and keras_graph.has_recurrent_layers(model):
        # TensorFlow's int8 calibration of the frozen recurrent loop crashes the process (TF 2.20, measured).
        raise ZipError(f"Model '{model.name}' has recurrent layers, whose int8 conversion TensorFlow does not "
                       "support; use quantization='dynamic' (int8 weights) or 'float16'.")
    if quantization == "int8" and representative_data is None:
        raise ZipError("quantization='int8' needs representative_data (e.g. the calibration inputs).")
    model = _float32(model)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        if keras_graph.has_recurrent_layers(model):
            saved = _frozen_saved_model(model, os.path.join(tmp, "frozen"))
        else:
            saved = export_saved_model(model, os.path.join(tmp, "saved"))
        # Each signature becomes a subgraph of its own: the weights are shared, the operator tables are not.
        keys = list(_signatures(model)) if task_signatures else [DEFAULT_SIGNATURE]
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=keys)
        if quantization is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = _representative(model, keys, representative_data,
                                                                representative_samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        content = converter.convert()
    if task_signatures and len(keys) > 1:
        content, aliased = flatbuffer.alias_task_signatures(content, DEFAULT_SIGNATURE)
        if aliased:
            logging.info("tf_mtz: the signatures %s run the all-tasks graph: their own paths would skip less "
                         "than %d%% of its work.", aliased, round(100 * flatbuffer.OWN_SUBGRAPH_MIN_SAVING))
    return content


def export_tflite(model: keras.Model, path: str, quantization: str | None = None, representative_data=None,
                  overwrite: bool = False, *, task_signatures: bool = True) -> int:
    """Writes a TFLite/LiteRT model with a `serving_default` signature returning `{task: output}` and
    one signature per task that runs only that task's path; all signatures share the weight buffers.

    Args:
        model: a zipped model, or any built Functional or Sequential model (built in the process or
            loaded from `.keras`/`.h5`; one or several inputs and outputs).
        path: the `.tflite` file to write (atomically: a temporary file, then a rename).
        quantization: None (float32), "dynamic" (int8 weights, float activations), "float16" (float16
            weights) or "int8" (int8 weights and activations; inputs and outputs stay float32).
        representative_data: inputs for int8 activation ranges, e.g. the calibration data (a list or a
            dict by input name of one array per input for a model with several inputs).
        overwrite: replace an existing file.
        task_signatures: also write the per-task signatures. Each is a subgraph of its own, with its own
            operator and tensor tables, where it skips at least 5% of the all-tasks work; otherwise
            (every hidden layer shared) it reads the all-tasks subgraph and returns the task's outputs.
            False writes `serving_default` alone, for an app that runs every task on every frame.

    Returns:
        The file size in bytes.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError (`tf_mtz.ZipError`): unknown quantization, int8 without (or with mis-shaped)
            representative data, a subclassed or unbuilt model.

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
    content = tflite_bytes(model, quantization, representative_data, task_signatures=task_signatures)
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
