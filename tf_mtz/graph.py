"""Reading the Keras graphs: checks that the models line up and turns them into one zip plan.

The plan is a list of positions; each position holds the corresponding layer of every task. Positions
up to the last unit layer (the head) must agree in layer type across tasks; the head and anything after
it belong to one task alone.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tf_mtz import registry
from tf_mtz.registry import ZipError


@dataclasses.dataclass
class Position:
    """One layer position of the aligned models."""

    index: int
    layers: dict  # task -> keras layer
    handler: registry.LayerHandler
    weights: dict | None = None  # unit layers: task -> (kernel, bias), any following BatchNormalization folded in

    @property
    def name(self) -> str:
        return next(iter(self.layers.values())).name

    @property
    def is_units(self) -> bool:
        return self.handler.role == "units"


@dataclasses.dataclass
class Slot:
    """A position with shareable units, plus how its kernel rows relate to the previous slot's units."""

    position: Position
    rows_per_input_unit: int  # spatial positions folded into the kernel's input axis per unit (Flatten)


@dataclasses.dataclass
class ZipPlan:
    tasks: list
    input_shape: tuple
    input_dtype: str
    input_name: str
    body: list  # Positions from the input up to and including the heads
    suffixes: dict  # task -> list of layers after that task's head
    slots: list  # Slots of the unit positions in `body`; the last is the heads
    chains: dict  # task -> the original model's layers from input to output (nested models inlined)

    @property
    def hidden_slots(self) -> list:
        return self.slots[:-1]


def _chain(model: keras.Model, task: str) -> list:
    """Returns the model's layers from input to output, refusing anything that is not a plain chain."""
    if not isinstance(model, keras.Model):
        raise ZipError(f"Task '{task}': expected a keras.Model, got {type(model).__name__}.")
    if not isinstance(model, (keras.Sequential,)) and not _is_functional(model):
        raise ZipError(
            f"Model '{model.name}' (task '{task}') is a subclassed keras.Model; tf_mtz reads the layer "
            "graph, so rebuild it as a Functional or Sequential model with the same layers and weights.")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ZipError(
            f"Model '{model.name}' (task '{task}') is not built: give it a keras.Input or call "
            "model.build(input_shape) before zipping.")
    if len(inputs) != 1 or len(outputs) != 1:
        raise ZipError(
            f"Model '{model.name}' (task '{task}') has {len(inputs)} inputs and {len(outputs)} outputs; "
            "tf_mtz zips single-input, single-output models.")
    layers = []
    tensor = outputs[0]
    while True:
        op, node_index, _ = tensor._keras_history
        if isinstance(op, keras.layers.InputLayer):
            break
        node = op._inbound_nodes[node_index]
        parents = node.input_tensors
        if len(parents) != 1:
            raise ZipError(
                f"Layer '{op.name}' of model '{model.name}' (task '{task}') takes {len(parents)} inputs; "
                "branching graphs (Add, Concatenate) are not supported yet.")
        if isinstance(op, keras.Model):
            # A nested model is read as its own chain of layers, spliced in place.
            layers.extend(reversed(_chain(op, task)))
        else:
            layers.append(op)
        tensor = parents[0]
    if tensor is not inputs[0] and tensor._keras_history[0] is not inputs[0]._keras_history[0]:
        raise ZipError(f"Model '{model.name}' (task '{task}') does not lead from its input to its output.")
    return layers[::-1]


def _fold_batch_norms(layers: list, model_name: str) -> tuple[list, dict]:
    """Folds each BatchNormalization into the Dense/Conv2D right before it (inference statistics).

    Returns the chain without the folded layers and `{id(unit layer): (kernel, bias)}` with the folded
    weights: kernel·γ/√(σ²+ε) and (bias − μ)·γ/√(σ²+ε) + β.
    """
    out, folded = [], {}
    for layer in layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
            continue
        previous = out[-1] if out else None
        handler = registry.handler_for(previous) if previous is not None else None
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        rank = len(layer.input.shape)
        if (not isinstance(handler, registry.UnitLayerHandler) or axis not in (-1, rank - 1)
                or handler.activation(previous) != "linear" or id(previous) in folded):
            raise ZipError(
                f"BatchNormalization '{layer.name}' of model '{model_name}' can only be zipped when it directly "
                "follows a Dense or Conv2D layer without activation and normalises the last axis: it is then "
                "folded into that layer.")
        kernel, bias = handler.kernel_and_bias(previous)
        gamma = (np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float64) if layer.scale
                 else np.ones(kernel.shape[-1]))
        beta = (np.asarray(keras.ops.convert_to_numpy(layer.beta), np.float64) if layer.center
                else np.zeros(kernel.shape[-1]))
        mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
        variance = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
        scale = gamma / np.sqrt(variance + layer.epsilon)
        folded[id(previous)] = ((kernel * scale).astype(np.float32),
                                ((bias - mean) * scale + beta).astype(np.float32))
    return out, folded


def _is_functional(model) -> bool:
    return type(model).__name__ == "Functional" or "Functional" in [c.__name__ for c in type(model).__mro__]


def _handler(layer, model_name: str) -> registry.LayerHandler:
    handler = registry.handler_for(layer)
    if handler is None:
        raise ZipError(
            f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}' is not supported. "
            f"Supported layers: {', '.join(registry.supported_layer_names())}. A custom layer can be "
            "supported by registering a handler with tf_mtz.register_layer_handler().")
    handler.check(layer, model_name)
    return handler


def _comparable_config(layer) -> dict:
    config = dict(layer.get_config())
    for key in ("name", "units", "filters", "trainable", "dtype", "kernel_initializer", "bias_initializer",
                "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
                "bias_constraint", "seed", "rate"):
        config.pop(key, None)
    return config


def read_models(models: dict) -> ZipPlan:
    """Checks that the task models line up and returns their zip plan.

    Raises:
        ZipError: mismatched depths, layer types or input shapes, unsupported layers, unbuilt,
            subclassed or branching models.
    """
    if not isinstance(models, dict) or len(models) < 2:
        raise ZipError("zip_models needs a dict of at least two task name -> keras.Model entries.")
    for task in models:
        if not isinstance(task, str) or not task.isidentifier():
            raise ZipError(f"Task name {task!r} is not a valid identifier; use names like 'digits'.")
    if len({id(m) for m in models.values()}) != len(models):
        raise ZipError("The same model object is given for two tasks; pass separate models (a clone is fine).")
    tasks = list(models)
    names = {task: models[task].name for task in tasks}
    originals, chains, folded = {}, {}, {}
    for task, model in models.items():
        originals[task] = _chain(model, task)
        chains[task], folded[task] = _fold_batch_norms(originals[task], names[task])
    first = tasks[0]

    shapes = {t: tuple(models[t].inputs[0].shape[1:]) for t in tasks}
    dtypes = {t: str(models[t].inputs[0].dtype) for t in tasks}
    for task in tasks[1:]:
        if shapes[task] != shapes[first] or dtypes[task] != dtypes[first]:
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') takes input {shapes[task]} {dtypes[task]} but model "
                f"'{names[first]}' (task '{first}') takes {shapes[first]} {dtypes[first]}; all models must "
                "take the same input.")

    handlers = {t: [_handler(layer, names[t]) for layer in chains[t]] for t in tasks}
    unit_counts = {t: sum(h.role == "units" for h in handlers[t]) for t in tasks}
    for task in tasks:
        if unit_counts[task] == 0:
            raise ZipError(f"Model '{names[task]}' (task '{task}') has no Dense or Conv2D layer to zip.")
    for task in tasks[1:]:
        if unit_counts[task] != unit_counts[first]:
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') has {unit_counts[task]} layers with units but model "
                f"'{names[first]}' (task '{first}') has {unit_counts[first]}; zipped models must have the "
                "same depth.")

    head_index = {t: max(i for i, h in enumerate(handlers[t]) if h.role == "units") for t in tasks}
    for task in tasks[1:]:
        for i in range(min(head_index[task], head_index[first]) + 1):
            ref, other = chains[first][i], chains[task][i]
            if type(other) is not type(ref):
                raise ZipError(
                    f"Layer '{other.name}' ({type(other).__name__}) of model '{names[task]}' (task '{task}') "
                    f"sits where model '{names[first]}' (task '{first}') has '{ref.name}' "
                    f"({type(ref).__name__}); the models must have the same layer types in the same order.")
        if head_index[task] != head_index[first]:
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') has {head_index[task] + 1} layers up to its output "
                f"layer but model '{names[first]}' (task '{first}') has {head_index[first] + 1}; the models "
                "must have the same layers in the same order.")
    body = []
    for i in range(head_index[first] + 1):
        layers = {t: chains[t][i] for t in tasks}
        ref = layers[first]
        is_head = i == head_index[first]
        for task in tasks[1:]:
            other = layers[task]
            if not is_head and _comparable_config(other) != _comparable_config(ref):
                raise ZipError(
                    f"Layer '{other.name}' of model '{names[task]}' (task '{task}') is configured differently "
                    f"from '{ref.name}' of model '{names[first]}': {_comparable_config(other)} vs "
                    f"{_comparable_config(ref)}.")
        first_units = min(j for j, h in enumerate(handlers[first]) if h.role == "units")
        if first_units < i < head_index[first] and not handlers[first][i].role == "units":
            for task in tasks:
                handlers[task][i].check_between_units(layers[task], names[task])
        if not is_head and i > first_units and registry.mixes_units(ref):
            raise ZipError(
                f"Layer '{ref.name}' of model '{names[first]}' applies softmax before the output layer; "
                "softmax mixes units and can only follow a task's output layer.")
        weights = None
        if handlers[first][i].role == "units":
            weights = {t: folded[t].get(id(layers[t])) or handlers[t][i].kernel_and_bias(layers[t]) for t in tasks}
        body.append(Position(i, layers, handlers[first][i], weights))
    suffixes = {t: chains[t][head_index[t] + 1:] for t in tasks}

    slots = []
    previous = None
    for position in body:
        if not position.is_units:
            continue
        if previous is None:
            rows = 1
        else:
            rows = _rows_per_unit(previous, position, names)
        slots.append(Slot(position, rows))
        previous = position

    input_name = models[first].inputs[0].name or "input"
    return ZipPlan(tasks=tasks, input_shape=shapes[first], input_dtype=dtypes[first],
                   input_name=_clean_name(input_name), body=body, suffixes=suffixes, slots=slots,
                   chains=originals)


def run_prefix(plan: ZipPlan, task: str, layer, x):
    """The input that `layer` receives in the original model of `task`, computed eagerly from `x` (calling
    the original layers on concrete tensors adds nothing to their graphs)."""
    chain = plan.chains[task]
    for earlier in chain[:next(i for i, l in enumerate(chain) if l is layer)]:
        x = earlier(x, training=False)
    return x


def _rows_per_unit(previous: Position, position: Position, names: dict) -> int:
    """How many kernel rows of `position` each output unit of `previous` feeds (H*W after a Flatten)."""
    per_task = set()
    for task, layer in position.layers.items():
        units_in = position.weights[task][0].shape[-2]
        units_prev = previous.handler.units(previous.layers[task])
        if units_in % units_prev:
            raise ZipError(
                f"Layer '{layer.name}' of model '{names[task]}' has {units_in} inputs, not a multiple of the "
                f"{units_prev} units of '{previous.layers[task].name}'; the layers between them mix units.")
        per_task.add(units_in // units_prev)
    if len(per_task) != 1:
        raise ZipError(f"Layer '{position.name}' sees different spatial sizes in different models: {per_task}.")
    return per_task.pop()


def _clean_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name.split(":")[0])
    return cleaned or "input"
