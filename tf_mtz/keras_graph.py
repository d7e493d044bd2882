"""The one module that reads Keras internals: a model's graph, its inputs and outputs, Keras's printer.

Keras 3 has no public API for walking a functional graph, so tf_mtz reads `_keras_history` and
`_inbound_nodes` here and only here (as tfmot does, in one marked place), and every other module asks
this one. A Sequential model loaded from a file has `inputs` and `outputs` but no `input`/`output`
(it was never called as a layer); the helpers below work for both kinds, built in the process or loaded.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np

from keras.src.utils import io_utils  # Keras internals
from keras.src import tree  # Keras internals

from tf_mtz.errors import ZipError


def convnext_layers() -> tuple:
    """`(LayerScale, StochasticDepth)`: the custom layers of keras.applications' ConvNeXt, which Keras does
    not export (None each where this Keras version lacks them)."""
    try:
        from keras.src.applications import convnext  # Keras internals
    except ImportError:
        return None, None
    return getattr(convnext, "LayerScale", None), getattr(convnext, "StochasticDepth", None)


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


def widest_output(model) -> int | None:
    """The most values one sample takes in any layer output of `model`, nested models' layers included;
    None where that does not bound what a layer holds: an output shape not fully known (sequences of any
    length), or an attention layer (Keras's, keras_hub's: its scores, heads x queries x keys a sample,
    outgrow every output)."""
    widest = 0
    for layer in model.layers:
        if "Attention" in type(layer).__name__:
            return None
        if isinstance(layer, keras.Model):
            inner = widest_output(layer)
            if inner is None:
                return None
            widest = max(widest, inner)
        for node in layer._inbound_nodes:
            for tensor in tree.flatten(node.outputs):
                shape = tuple(tensor.shape)[1:]
                if any(d is None for d in shape):
                    return None
                widest = max(widest, int(np.prod(shape, dtype=np.int64)))
    return widest or None


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


class OperationCall:
    """A keras.ops call written on tensors in a Functional graph (`x + 3.0`, `keras.ops.relu6(x)`, `x * g`),
    held as its operation and its arguments so that it can be replayed on other tensors like a layer.

    Keras records such a call as a node of an `Operation` that is not a Layer: it has a name but no
    layer API. This class gives it the little tf_mtz needs: `__call__` on a tensor (or a list, one per tensor
    argument, in the node's order), `get_config` to compare models, `copy` (a fresh operation, so that
    rebuilding never adds calls to the original model's operations), no weights.
    """

    def __init__(self, operation, arguments):
        self.operation, self.arguments = operation, arguments
        self.name = operation.name
        self.weights = []

    @classmethod
    def of_node(cls, operation, node_index: int) -> "OperationCall":
        return cls(operation, operation._inbound_nodes[node_index].arguments)  # Keras internals

    @property
    def operation_name(self) -> str:
        return type(self.operation).__name__

    @property
    def tensor_count(self) -> int:
        return len(self.arguments.keras_tensors)

    def tensor_shapes(self) -> list:
        return [tuple(t.shape) for t in self.arguments.keras_tensors]

    def constants(self) -> list:
        """The call's arguments that are not tensors (numbers, arrays, settings), flattened."""
        flat = tree.flatten((self.arguments.args, self.arguments.kwargs))
        return [value for value in flat if not isinstance(value, keras.KerasTensor)]

    def __call__(self, inputs, training=None):
        del training  # keras.ops take no training flag
        values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if len(values) != self.tensor_count:
            raise AssertionError(f"Internal error: operation '{self.name}' takes {self.tensor_count} tensors.")
        args, kwargs = self.arguments.fill_in({id(t): v for t, v in zip(self.arguments.keras_tensors, values)})
        return self.operation(*args, **kwargs)

    def get_config(self) -> dict:
        """What decides the call's result besides its tensors: the operation, its settings and constants
        (compared across models)."""
        return {"name": self.name, "operation": self.operation_name,
                "settings": _describe(self.operation.get_config()), "constants": _describe(self.constants())}

    def copy(self, name: str) -> "OperationCall":
        """The same call on a fresh operation named `name` (the original model's operation gets no new
        calls)."""
        fresh = type(self.operation).from_config({**self.operation.get_config(), "name": name})
        return OperationCall(fresh, self.arguments)

    def get_weights(self) -> list:
        return []


def _describe(value):
    """A comparable description of operation settings and constants (arrays by their values)."""
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items() if k != "name"}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        return ("array", array.shape, array.tolist())
    return value


def has_recurrent_layers(model) -> bool:
    """Whether a model (nested models included) runs a recurrent layer (an RNN or a Bidirectional one)."""
    for layer in model._flatten_layers(include_self=False):  # Keras internals: every nested layer
        if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
            return True
    return False


def frozen_function(concrete_function):
    """`concrete_function` with its variables folded in as constants, control flow kept as it is (what
    LiteRT's builtin WHILE reads)."""
    from tensorflow.python.framework import convert_to_constants  # TensorFlow internals: no public v2 API

    return convert_to_constants.convert_variables_to_constants_v2(concrete_function, lower_control_flow=False)


def call_arguments(layer, node_index: int) -> tuple:
    """`(input tensors, keyword arguments)` of call `node_index` of `layer`."""
    node = layer._inbound_nodes[node_index]  # Keras internals
    return list(node.input_tensors), dict(node.arguments.kwargs)


def _tensor_keywords(node) -> bool:
    """Whether a call passed tensors by keyword (a mask: Keras records the mask it hands a layer from its
    input's Keras mask, e.g. an LSTM's or a pooling's after an `Embedding(mask_zero=True)`)."""
    return any(isinstance(value, keras.KerasTensor) for value in tree.flatten(node.arguments.kwargs))


def _implicit_masks(layer, node) -> list:
    """`[(keyword, mask tensor)]`: the Keras masks a MultiHeadAttention reads off its query, value and key
    itself when it runs (never recorded in its call's arguments), where it is not given them explicitly."""
    if not isinstance(layer, keras.layers.MultiHeadAttention):
        return []
    args, kwargs = node.arguments.args, node.arguments.kwargs
    tensors = {"query": args[0] if args else kwargs.get("query"),
               "value": args[1] if len(args) > 1 else kwargs.get("value"),
               "key": args[2] if len(args) > 2 else kwargs.get("key")}
    masks = []
    for name, tensor in tensors.items():
        mask = getattr(tensor, "_keras_mask", None)  # Keras internals: a symbolic tensor's mask
        if mask is not None and kwargs.get(f"{name}_mask") is None:
            masks.append((f"{name}_mask", mask))
    return masks


def takes_extra_inputs(layer, node_index: int = 0) -> bool:
    """Whether the layer's call takes tensors besides its input (masks, a self-attention's one tensor as
    query and value), laid out by `call_arguments_for`."""
    nodes = getattr(layer, "_inbound_nodes", None)  # Keras internals
    if not nodes or not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        return False
    return isinstance(layer, keras.layers.MultiHeadAttention) or _tensor_keywords(nodes[node_index])


def distinct_call_inputs(layer, node_index: int) -> list:
    """The distinct input tensors of call `node_index` of `layer`, in the order they first appear (self-
    attention's query and value are one tensor; masks follow, the Keras masks an attention layer reads
    itself last)."""
    distinct = {}
    for tensor in call_inputs(layer, node_index):
        distinct.setdefault(id(tensor), tensor)
    for _, mask in _implicit_masks(layer, layer._inbound_nodes[node_index]):  # Keras internals
        distinct.setdefault(id(mask), mask)
    return list(distinct.values())


# A rebuilt layer -> the model layer whose (only) call it repeats: how its inputs map onto the arguments.
_CALLED_LIKE = weakref.WeakKeyDictionary()


def call_like(layer, template) -> None:
    """Makes `call_arguments_for(layer, ...)` lay out inputs as `template`'s call in its model does (an
    attention layer's query, value and masks; a pooling's mask)."""
    _CALLED_LIKE[layer] = _CALLED_LIKE.get(template, template)


def call_arguments_for(layer, inputs) -> tuple:
    """`(args, kwargs)` that call `layer` on `inputs` (a tensor, or a list of one per distinct input of its
    call) with the arguments of its model call: self-attention reads one tensor as its query and its value,
    its masks and flags (`attention_mask`, `use_causal_mask`, the Keras masks of its inputs) as the model
    passed them; a layer handed a Keras mask (`mask=`) gets it. Layers called with their inputs alone (most)
    take `inputs` as they are."""
    template = _CALLED_LIKE.get(layer, layer)
    if not takes_extra_inputs(template):
        if isinstance(layer, keras.layers.MultiHeadAttention) and not isinstance(inputs, (list, tuple)):
            return (inputs, inputs), {}
        return (inputs,), {}
    node = template._inbound_nodes[0]  # Keras internals
    values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    originals = distinct_call_inputs(template, 0)
    if len(originals) != len(values):
        raise AssertionError(f"Internal error: '{template.name}' called on {len(values)} of {len(originals)} inputs.")
    mapping = {id(t): v for t, v in zip(originals, values)}
    args, kwargs = node.arguments.fill_in(mapping)
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    kwargs.update({keyword: mapping[id(mask)] for keyword, mask in _implicit_masks(template, node)})
    return tuple(args), kwargs


_EXPANSIONS = weakref.WeakKeyDictionary()  # a composite layer -> the Functional model of its sublayers


def expanded(layer, node_index: int, expand):
    """A Functional model computing call `node_index` of `layer` with the layers it is made of: `expand(*args,
    **kwargs)` on fresh inputs laid out as that call (one per distinct input tensor, in order). Built once
    per layer, so that its sublayers are called once however often the graph is read."""
    if layer not in _EXPANSIONS:
        node = layer._inbound_nodes[node_index]  # Keras internals
        originals = distinct_call_inputs(layer, node_index)
        inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=f"{layer.name}_input{k}")
                  for k, t in enumerate(originals)]
        args, kwargs = node.arguments.fill_in({id(t): v for t, v in zip(originals, inputs)})
        kwargs = {k: v for k, v in kwargs.items() if k != "training"}
        _EXPANSIONS[layer] = keras.Model(inputs, expand(*args, **kwargs), name=f"{layer.name}_expanded")
        for sublayer in _EXPANSIONS[layer].layers:
            _COMPOSITE_OF.setdefault(sublayer, layer)
    return _EXPANSIONS[layer]


_COMPOSITE_OF = weakref.WeakKeyDictionary()  # a sublayer of an expanded composite layer -> that layer


def qualified_name(layer) -> str:
    """A layer's name, prefixed with the composite layers it belongs to (`encoder0/self_attention_layer`):
    keras-hub's blocks name their sublayers alike."""
    owner = _COMPOSITE_OF.get(layer) if isinstance(layer, keras.layers.Layer) else None
    return layer.name if owner is None else f"{qualified_name(owner)}/{layer.name}"


def call_signature(layer) -> str:
    """What `call_arguments_for` adds to `layer`'s inputs, as text (inputs by position): layers whose calls
    differ in it (causal or not) must not share a traced graph."""
    template = _CALLED_LIKE.get(layer, layer)
    if not takes_extra_inputs(template):
        return ""
    originals = distinct_call_inputs(template, 0)
    args, kwargs = call_arguments_for(template, [f"<input {k}>" for k in range(len(originals))])
    return repr((args, sorted(kwargs.items())))
