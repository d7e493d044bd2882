"""The one module that reads Keras internals: a model's graph, its inputs and outputs, Keras's printer.

Keras 3 has no public API for walking a functional graph, so tf_mtz reads `_keras_history` and
`_inbound_nodes` here and only here (as tfmot does, in one marked place), and every other module asks
this one. A Sequential model loaded from a file has `inputs` and `outputs` but no `input`/`output`
(it was never called as a layer); the helpers below work for both kinds, built in the process or loaded.
"""

from __future__ import annotations

import keras

from keras.src.utils import io_utils  # Keras internals

from tf_mtz.errors import ZipError


def print_message(text: str) -> None:
    """Prints a progress line the way Keras does (absl logging when interactive logging is off)."""
    io_utils.print_msg(text)


def is_functional(model) -> bool:
    """True for a Functional model (what `keras.Model(inputs, outputs)` builds), not a subclass."""
    return type(model).__name__ == "Functional" or "Functional" in [c.__name__ for c in type(model).__mro__]


def check_graph_model(model, label: str) -> None:
    """Raises `ZipError` unless `model` is a built Functional or Sequential Keras model.

    `label` says which model it is in the message, e.g. "Model 'a' (task 'digits')".
    """
    if not isinstance(model, keras.Model):
        raise ZipError(f"{label}: expected a keras.Model, got {type(model).__name__}.")
    if not isinstance(model, keras.Sequential) and not is_functional(model):
        raise ZipError(
            f"{label} is a subclassed keras.Model; tf_mtz reads the layer graph, so rebuild it as a "
            "Functional or Sequential model with the same layers and weights.")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ZipError(f"{label} is not built: give it a keras.Input or call model.build(input_shape) first.")


def model_inputs(model) -> list:
    """The model's input tensors, in order."""
    return list(model.inputs)


def output_structure(model):
    """The model's outputs as it returns them: one tensor, a list, or a dict.

    A Sequential model has exactly one output; `model.output` is undefined for one loaded from a file.
    """
    if isinstance(model, keras.Sequential):
        return model.outputs[0]
    return model.output


def named_outputs(model) -> dict:
    """`{name: output tensor}`: a dict's keys, a list's output layer names, or `{"output": tensor}`."""
    structure = output_structure(model)
    if isinstance(structure, dict):
        return dict(structure)
    if not isinstance(structure, (list, tuple)):
        return {"output": structure}
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(structure) or len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(structure))]
    return dict(zip(names, structure))


def clean_name(name: str) -> str:
    """A tensor or layer name as a signature key: letters, digits and '_' ("input" if nothing is left)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name.split(":")[0]) or "input"


def producer(tensor):
    """`(layer, node index, tensor index)` of the call that produced a symbolic tensor."""
    return tensor._keras_history  # Keras internals


def call_inputs(layer, node_index: int) -> list:
    """The input tensors of call `node_index` of `layer`."""
    return list(layer._inbound_nodes[node_index].input_tensors)  # Keras internals
