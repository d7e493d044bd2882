"""Reading the Keras graphs: checks that the models line up and turns them into one zip plan.

Each model is read as a list of operations in topological order (nested models inlined,
SeparableConv2D split into its depthwise and pointwise parts, BatchNormalization folded into the layer
before it). The plan aligns these lists position by position across tasks; positions up to the last
unit layer (the head) must agree in layer type and wiring; the head and anything after it belong to one
task alone.

Units live in *unit spaces*: a Dense/Conv layer opens one; weightless and per-channel layers
(pooling, activations, DepthwiseConv2D) keep it; an element-wise merge such as a residual `Add` ties its
inputs' spaces into one *group*. All layers of a group share one unit order, so a group is paired once
and every member layer follows that pairing.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import keras
import numpy as np

from tf_mtz import keras_graph, registry
from tf_mtz.errors import ZipError

INPUT = -1  # the (first) model input: as a parent index and as a unit space


def input_ref(k: int) -> int:
    """Model input `k` as a parent index and as a unit space (INPUT for the first)."""
    return -1 - k


def is_input(space) -> bool:
    """Whether a parent index or unit space is a model input, or a Concatenate of model inputs alone: rows
    that every task has in common, never permuted."""
    if isinstance(space, tuple):
        return all(is_input(part) for part in space)
    return isinstance(space, (int, np.integer)) and space < 0


class _Reindexed(dict):
    """Old operation index -> new index; model inputs (negative indices) map to themselves."""

    def __missing__(self, key):
        if key < 0:
            return key
        raise KeyError(key)


@dataclasses.dataclass
class Op:
    """One operation of a task's graph: a layer and the indices of the operations feeding it."""

    layer: keras.layers.Layer
    parents: list


@dataclasses.dataclass
class Position:
    """One operation position of the aligned models."""

    index: int
    layers: dict  # task -> keras layer
    handler: registry.LayerHandler
    parents: list  # positions feeding this one (`input_ref(k)` for model input k)
    weights: dict | None = None  # unit and channel layers: task -> (kernel, bias), BatchNormalization folded in
    space: int = INPUT  # unit space (group) of the output

    @property
    def name(self) -> str:
        return keras_graph.qualified_name(next(iter(self.layers.values())))

    @property
    def label(self) -> str:
        """`name` as a Keras layer name allows it (no '/')."""
        return self.name.replace("/", "_")

    @property
    def is_units(self) -> bool:
        return registry.has_units(self.handler)


@dataclasses.dataclass
class Slot:
    """A position with shareable units, plus how its kernel rows relate to its input's units."""

    position: Position
    rows_per_input_unit: int  # spatial positions folded into the kernel's input axis per unit (Flatten)
    input_space: object  # unit space of the input: a group, INPUT (rows always common), or a tuple of those
    # side by side (after a Concatenate)
    group: int | None  # the unit group this layer's outputs belong to (None for the head)
    # A cross-attention's memory (its key and value input): a unit space, read by the key and value rows.
    memory_space: object = None


@dataclasses.dataclass
class Group:
    """Unit layers whose outputs are tied (by residual merges) and the layers that read or scale them."""

    members: list  # slot indices, topological order
    channel_positions: list  # body indices of per-channel weighted layers (DepthwiseConv2D) in the group
    consumers: list  # slot indices of the unit layers whose input is this group
    # body indices of per-channel layers reading a Concatenate that this group is a part of
    concatenated_channels: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Output:
    """One output of the models: the head slot producing it and, per task, the weightless layers after
    that head (softmax, reshapes)."""

    name: str
    slot: int
    suffixes: dict  # task -> list of layers after the head


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """One input of the models (all models take the same inputs, in the same order)."""

    name: str
    shape: tuple  # without the batch axis
    dtype: str


@dataclasses.dataclass
class ZipPlan:
    tasks: list
    inputs: list  # ModelInputs, in the models' input order
    body: list  # Positions from the input up to and including the heads, the heads last
    outputs: list  # Outputs, in the models' output order
    slots: list  # Slots of the unit positions in `body`, topological order; the heads last
    groups: dict  # group id -> Group
    originals: dict  # task -> list of Ops of the model as read (BatchNormalization not folded)
    # id(layer) -> the model's layer it was cut from, for unit layers cut into column blocks (a merge ties
    # their blocks to different layers' units)
    split_layers: dict = dataclasses.field(default_factory=dict)
    # id(layer) -> (the grouped convolution it computes one group of, the group's index)
    grouped: dict = dataclasses.field(default_factory=dict)

    @property
    def input_shapes(self) -> list:
        return [model_input.shape for model_input in self.inputs]

    @property
    def head_count(self) -> int:
        return len(self.outputs)

    @property
    def hidden_slots(self) -> list:
        return self.slots[:-self.head_count]

    def is_head(self, slot_index: int) -> bool:
        return slot_index >= len(self.slots) - self.head_count

    @property
    def single_output(self) -> bool:
        return self.head_count == 1

    def output_key(self, task: str, output: "Output") -> str:
        """The zipped model's key for one task's output: the task's name, or "task/output" when the
        models have several outputs."""
        return task if self.single_output else f"{task}/{output.name}"

    @functools.cached_property
    def slot_indices(self) -> dict:
        """Body index of each unit position -> its slot index."""
        return {slot.position.index: i for i, slot in enumerate(self.slots)}

    @functools.cached_property
    def children(self) -> dict:
        """Body index (or a model input's) -> the body indices of the positions reading it."""
        children = {}
        for position in self.body:
            for parent in position.parents:
                children.setdefault(parent, []).append(position.index)
        return children


def _check_model(model, task: str, nested: bool = False, several_inputs: bool = False):
    keras_graph.check_graph_model(model, f"Model '{getattr(model, 'name', model)}' (task '{task}')")
    inputs, outputs = keras_graph.model_inputs(model), model.outputs
    if nested and len(inputs) != 1 and not several_inputs:
        raise ZipError(f"Nested model '{model.name}' (task '{task}') takes {len(inputs)} inputs; nested models "
                       "must take one.")
    if nested and len(outputs) != 1:
        raise ZipError(f"Nested model '{model.name}' (task '{task}') has {len(outputs)} outputs; nested "
                       "models must have one.")
    return inputs, list(keras_graph.named_outputs(model).values()) if not nested else outputs


def _read_ops(model, task: str, ops: list, input_indices: list | None, top_name: str, grouped: dict,
              nested: bool = False, several_inputs: bool = False) -> list:
    """Appends the operations of `model` to `ops` (its inputs being operations `input_indices`, by default
    the model inputs) and returns the indices of the operations producing its outputs, in the model's
    output order. Nested models and composite layers (`registry.CompositeHandler`) are inlined."""
    model_inputs, model_outputs = _check_model(model, task, nested, several_inputs)
    if input_indices is None:
        input_indices = [input_ref(k) for k in range(len(model_inputs))]
    index_of_input = {id(keras_graph.producer(tensor)[0]): index
                      for tensor, index in zip(model_inputs, input_indices)}
    memo, same_call = {}, {}

    def visit(tensor) -> int:
        if id(tensor) in memo:
            return memo[id(tensor)]
        op, node_index, _ = keras_graph.producer(tensor)
        if isinstance(op, keras.layers.InputLayer):
            if id(op) not in index_of_input:
                raise ZipError(f"Model '{top_name}' (task '{task}') does not lead from its inputs to its outputs.")
            memo[id(tensor)] = index_of_input[id(op)]
            return memo[id(tensor)]
        if keras_graph.takes_extra_inputs(op, node_index):  # its input, then its masks
            parents = [visit(p) for p in keras_graph.distinct_call_inputs(op, node_index)]
        else:
            parents = [visit(p) for p in keras_graph.call_inputs(op, node_index)]
        if isinstance(op, keras.Model):
            if len(parents) != 1:
                raise ZipError(f"Nested model '{op.name}' of model '{top_name}' (task '{task}') takes "
                               f"{len(parents)} inputs; nested models must take one.")
            (index,) = _read_ops(op, task, ops, parents, top_name, grouped, nested=True)
        elif isinstance(registry.handler_for(op), registry.CompositeHandler):
            handler = registry.handler_for(op)
            handler.check(op, top_name)
            expansion = keras_graph.expanded(op, node_index, lambda *a, **k: handler.expand(op, *a, **k))
            (index,) = _read_ops(expansion, task, ops, parents, top_name, grouped, nested=True, several_inputs=True)
        elif isinstance(op, keras.layers.SeparableConv2D):
            index = _split_separable(op, parents[0], ops, top_name)
        elif _is_grouped(op):
            index = _split_grouped(op, parents[0], ops, grouped)
        elif not isinstance(op, keras.layers.Layer):  # a keras.ops call written on tensors
            call = keras_graph.OperationCall.of_node(op, node_index)
            # One op per computation: Keras may write a mask twice (an Embedding's `ids != 0` once per layer
            # asking for it, more or fewer times in a clone), and models must read alike.
            config = {k: v for k, v in call.get_config().items() if k != "name"}
            key = (repr(config), tuple(parents))
            if key not in same_call:
                ops.append(Op(call, parents))
                same_call[key] = len(ops) - 1
            index = same_call[key]
        else:
            if any(o.layer is op for o in ops):
                raise ZipError(
                    f"Layer '{op.name}' of model '{top_name}' (task '{task}') is called more than once; tf_mtz "
                    "needs each layer used once (use separate layers, or zip the shared part yourself).")
            ops.append(Op(op, parents))
            index = len(ops) - 1
        memo[id(tensor)] = index
        return index

    return [visit(output) for output in model_outputs]


def _is_grouped(layer) -> bool:
    """A Conv1D/Conv2D with groups of several channels, handled by the built-in convolution handler (a
    custom subclass with a handler of its own is left to it; depthwise groups are `DepthwiseConv2D`s)."""
    if not isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)) or getattr(layer, "groups", 1) == 1:
        return False
    if registry.is_depthwise_grouped(layer):
        return False
    return type(registry.handler_for(layer)) in (registry.Conv2DHandler, registry.Conv1DHandler)


def _split_grouped(layer, parent: int, ops: list, grouped: dict) -> int:
    """A grouped convolution as what it computes: per group, a slice of the input channels and an ungrouped
    convolution with that group's filters, side by side (a Concatenate). Each group's input channels and
    filters are then unit spaces of their own, so units are paired within their group (group k of one
    model with group k of the other), and the zipped model computes every group with standard layers."""
    groups = int(layer.groups)
    weights = layer.get_weights()
    kernel = weights[0]  # (..., input channels per group, filters)
    inputs_per_group, filters_per_group = int(kernel.shape[-2]), int(kernel.shape[-1]) // groups
    cuts = tuple(k * inputs_per_group for k in range(groups + 1))
    config = {**layer.get_config(), "groups": 1, "filters": filters_per_group}
    outputs = []
    for k in range(groups):
        ops.append(Op(registry.ChannelSlice(cuts[k], cuts[k + 1], cuts, name=f"{layer.name}_group{k}_input"),
                      [parent]))
        conv = type(layer).from_config({**config, "name": f"{layer.name}_group{k}"})
        conv.build((None,) * (kernel.ndim - 1) + (inputs_per_group,))
        columns = slice(k * filters_per_group, (k + 1) * filters_per_group)
        conv.set_weights([kernel[..., columns]] + [w[columns] for w in weights[1:]])
        grouped[id(conv)] = (layer, k)
        ops.append(Op(conv, [len(ops) - 1]))
        outputs.append(len(ops) - 1)
    ops.append(Op(keras.layers.Concatenate(axis=-1, name=f"{layer.name}_groups"), outputs))
    return len(ops) - 1


def _split_separable(layer, parent: int, ops: list, model_name: str) -> int:
    """A SeparableConv2D as the standard DepthwiseConv2D and 1x1 Conv2D it computes."""
    if layer.depth_multiplier != 1:
        raise ZipError(f"SeparableConv2D '{layer.name}' of model '{model_name}' has depth_multiplier="
                       f"{layer.depth_multiplier}; tf_mtz supports depth_multiplier=1.")
    if layer.data_format != "channels_last":
        raise ZipError(f"Layer '{layer.name}' of model '{model_name}' uses data_format='{layer.data_format}'; "
                       "tf_mtz supports channels_last convolutions only.")
    weights = layer.get_weights()
    depthwise = keras.layers.DepthwiseConv2D(
        layer.kernel_size, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate,
        use_bias=False, name=f"{layer.name}_depthwise", dtype=layer.dtype_policy)
    depthwise.build(tuple(layer.input.shape))
    depthwise.set_weights([weights[0]])
    pointwise = keras.layers.Conv2D(layer.filters, 1, use_bias=layer.use_bias, activation=layer.activation,
                                    name=f"{layer.name}_pointwise", dtype=layer.dtype_policy)
    pointwise.build(tuple(depthwise.compute_output_shape(tuple(layer.input.shape))))
    pointwise.set_weights(weights[1:])
    ops.append(Op(depthwise, [parent]))
    ops.append(Op(pointwise, [len(ops) - 1]))
    _SPLIT_FROM[depthwise] = _SPLIT_FROM[pointwise] = layer
    return len(ops) - 1


_SPLIT_FROM = weakref.WeakKeyDictionary()  # a SeparableConv2D's depthwise and pointwise parts -> that layer


def split_from(layer):
    """The model's layer that `layer` is a part of (a SeparableConv2D's pointwise part), else None: `sharing`
    may name the model's layer."""
    return _SPLIT_FROM.get(layer) if isinstance(layer, keras.layers.Layer) else None


def _fold_batch_norms(ops: list, model_name: str, output_ops: list) -> tuple[list, dict, list]:
    """Folds each BatchNormalization into the Dense/Conv/DepthwiseConv2D feeding it (inference statistics)
    where it is that layer's only consumer and the layer has no activation; the others stay operations of
    their own (a per-unit affine map, `registry.BatchNormalizationHandler`).

    Returns the operations without the folded ones (parents re-indexed),
    `{id(layer): (kernel, bias)}` with the folded weights: kernel·γ/√(σ²+ε) and (bias − μ)·γ/√(σ²+ε) + β,
    and the new indices of the output operations `output_ops`.
    """
    consumers = {}
    for i, op in enumerate(ops):
        for p in op.parents:
            consumers.setdefault(p, []).append(i)
    folded, keep, new_index = {}, [], _Reindexed()
    for i, op in enumerate(ops):
        layer = op.layer
        if not isinstance(layer, keras.layers.BatchNormalization):
            new_index[i] = len(keep)
            keep.append(Op(layer, [new_index[p] for p in op.parents]))
            continue
        parent = op.parents[0]
        members = _fold_targets(ops, parent, consumers, layer)
        if members is None:
            # Not foldable (pre-activation, after a merge or a pooling): kept as a per-unit affine map.
            new_index[i] = len(keep)
            keep.append(Op(layer, [new_index[p] for p in op.parents]))
            continue
        scale, shift = registry.batch_norm_affine(layer)
        start = 0
        for member in members:  # each folds its run of the normalisation's channels
            kernel, bias = registry.handler_for(member).kernel_and_bias(member)
            run = slice(start, start + int(bias.shape[0]))
            # A depthwise kernel is (..., C, 1): its units are on the axis before the last.
            kernel_scale = scale[run] if kernel.shape[-1] == bias.shape[0] else scale[run, None]
            folded[id(member)] = ((kernel * kernel_scale).astype(np.float32),
                                  (bias * scale[run] + shift[run]).astype(np.float32))
            start = run.stop
        new_index[i] = new_index[parent]
    return keep, folded, [new_index[i] for i in output_ops]


def _fold_targets(ops: list, index: int, consumers: dict, batch_norm) -> list | None:
    """The layers a BatchNormalization reading op `index` folds into, in channel order: that op's layer
    when it is a linear Dense/Conv/DepthwiseConv2D read by the normalisation alone, or every input of a
    channel Concatenate read by it alone when each is such a layer read by the Concatenate alone (a
    grouped convolution's groups). None where it does not fold."""
    if is_input(index) or not registry.normalises_last_axis(batch_norm):
        return None

    def linear_with_one_reader(i, kinds):
        layer = ops[i].layer if not is_input(i) else None
        handler = registry.handler_for(layer) if layer is not None else None
        # Recurrent and attention layers are not linear maps of their inputs, whatever their activation.
        return (isinstance(handler, kinds) and not getattr(handler, "all_or_none", False)
                and handler.activation(layer) == "linear" and len(consumers.get(i, [])) == 1)

    if linear_with_one_reader(index, (registry.UnitLayerHandler, registry.DepthwiseHandler)):
        return [ops[index].layer]
    joined = ops[index]
    if (not isinstance(joined.layer, keras.layers.Concatenate) or joined.layer.axis != -1
            or len(consumers.get(index, [])) != 1):
        return None
    if not all(linear_with_one_reader(p, registry.UnitLayerHandler) for p in joined.parents):
        return None
    return [ops[p].layer for p in joined.parents]


def _handler(layer, model_name: str) -> registry.LayerHandler:
    handler = registry.handler_for(layer)
    if handler is None:
        raise ZipError(
            f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}' is not supported. "
            f"Supported layers: {', '.join(registry.supported_layer_names())}. A custom layer can be "
            "supported by registering a handler with tf_mtz.register_layer_handler().")
    if (isinstance(handler, registry.PassThroughHandler) and not isinstance(handler, registry.InputOnlyHandler)
            and layer.weights):
        raise ZipError(
            f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}' has weights but is registered "
            "with a pass-through handler, which rebuilds layers from their configuration alone; register a "
            "UnitLayerHandler or a tf_mtz.registry.ChannelUnitsHandler for it.")
    handler.check(layer, model_name)
    return handler


def comparable_config(layer) -> dict:
    """A layer's configuration without what may differ between zipped models (widths, names, initialisers)."""
    return _comparable(dict(layer.get_config()))


_comparable_config = comparable_config


def read_ops(model, task: str) -> tuple[list, list]:
    """`(ops, output indices)`: the model's operations as read (nested models inlined, BatchNormalization not
    folded) and those producing its outputs, in output order."""
    ops = []
    outputs = _read_ops(model, task, ops, None, model.name, {})
    return ops, outputs


def output_tails(ops: list, outputs: list) -> set:
    """Indices of every output's layer (the unit layer it comes from) and of the weightless layers after it."""
    tails = set()
    for i in outputs:
        while i >= 0:
            tails.add(i)
            handler = registry.handler_for(ops[i].layer)
            if (handler is not None and registry.has_units(handler)) or len(ops[i].parents) != 1:
                break
            i = ops[i].parents[0]
    return tails


def _comparable(config: dict) -> dict:
    """A layer configuration without what may differ between zipped models (widths, names, initialisers),
    nested layers' (a Bidirectional's) alike."""
    for key in ("name", "units", "filters", "output_dim", "embeddings_initializer", "embeddings_regularizer",
                "embeddings_constraint", "trainable", "dtype", "kernel_initializer", "bias_initializer",
                "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
                "bias_constraint", "seed", "rate", "depthwise_initializer", "depthwise_regularizer",
                "depthwise_constraint", "recurrent_initializer", "recurrent_regularizer", "recurrent_constraint",
                "build_config"):
        config.pop(key, None)
    for key in ("layer", "backward_layer"):
        nested = config.get(key)
        if isinstance(nested, dict) and isinstance(nested.get("config"), dict):
            config[key] = {**nested, "config": _comparable(dict(nested["config"]))}
            config[key].pop("build_config", None)
    return config


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The earlier layer names the group.
            self.parent[max(ra, rb)] = min(ra, rb)


class _BodyReader(registry.PositionVisitor):
    """Reads the aligned positions up to the heads, in order: each position's unit space (its handler's
    kind decides how the space follows from its inputs' spaces) and, for weighted layers, every task's
    weights (BatchNormalization folded in)."""

    def __init__(self, tasks: list, names: dict, folded: dict):
        self.tasks, self.names, self.folded = tasks, names, folded
        self.spaces = _UnionFind()
        self.space_of = _Reindexed()  # a model input is its own unit space
        self.unit_layers = {}  # body index of each unit layer read so far -> {task: layer}
        self.unit_widths = {}  # the same index -> {task: units}

    def read(self, index: int, layers: dict, handler, parents: list, handlers: dict, is_head: bool) -> Position:
        ref = layers[self.tasks[0]]
        if not is_head:
            for task in self.tasks[1:]:
                if _comparable_config(layers[task]) != _comparable_config(ref):
                    raise ZipError(
                        f"Layer '{layers[task].name}' of model '{self.names[task]}' (task '{task}') is configured "
                        f"differently from '{ref.name}' of model '{self.names[self.tasks[0]]}': "
                        f"{_comparable_config(layers[task])} vs {_comparable_config(ref)}.")
        parent_spaces = [_find(self.spaces, self.space_of[p]) for p in parents]
        masks = parent_spaces[2:] if _reads_memory(ref) else parent_spaces[1:]
        if keras_graph.takes_extra_inputs(ref) and any(not is_input(space) for space in masks):
            raise ZipError(f"Layer '{ref.name}' ({type(ref).__name__}) of model '{self._first_name}' takes a mask "
                           "computed from a layer with weights; tf_mtz zips masks computed from the model inputs "
                           "alone (a padding mask from the token ids, an Embedding's mask_zero, a mask input).")
        space, weighted = handler.visit(self, index, ref, parent_spaces)
        if not is_input(space) and not registry.has_units(handler):
            for task in self.tasks:
                handlers[task].check_between_units(layers[task], self.names[task])
            if not is_head and registry.mixes_units(ref):
                raise ZipError(
                    f"Layer '{ref.name}' of model '{self._first_name}' applies softmax before the output "
                    "layer; softmax mixes units and can only follow a task's output layer.")
        self.space_of[index] = space
        weights = None
        if weighted:
            weights = {t: self.folded[t].get(id(layers[t])) or handlers[t].kernel_and_bias(layers[t])
                       for t in self.tasks}
        if space == index:
            self.unit_layers[index] = dict(layers)
            self.unit_widths[index] = {t: int(weights[t][0].shape[-1]) for t in self.tasks}
        return Position(index, layers, handler, list(parents), weights, space)

    @property
    def _first_name(self) -> str:
        return self.names[self.tasks[0]]

    def units(self, index, ref, parent_spaces):
        return index, True  # a unit layer opens a space of its own


    def channel_units(self, index, ref, parent_spaces):
        if not registry.handler_for(ref).partial_sharing:  # it mixes units: one group's all or none
            self._refuse_after_concatenate(ref, parent_spaces)
        if is_input(parent_spaces[0]):
            raise ZipError(f"Layer '{ref.name}' ({type(ref).__name__}) of model '{self._first_name}' acts on the "
                           "model input with per-task weights; put a Dense/Conv layer before it.")
        return parent_spaces[0], True

    def merge(self, index, ref, parent_spaces):
        parts = [sp if isinstance(sp, tuple) else (sp,) for sp in parent_spaces]
        if any(is_input(part) for p in parts for part in p) and not all(is_input(p) for p in parts):
            raise ZipError(
                f"Layer '{ref.name}' of model '{self._first_name}' merges the model input with the output of "
                "a Dense/Conv layer; such residual connections from the raw input cannot be zipped.")
        if all(is_input(p) for p in parts):
            return (parts[0] if len(parts[0]) > 1 else parts[0][0]), False
        # Element-wise: unit k of every input is one unit. Inputs that are Concatenates must be cut alike, the
        # i-th block of one tied to the i-th block of the others.
        offsets = [self._offsets(p) for p in parts]
        if any(o != offsets[0] for o in offsets[1:]):
            if any(o[t] != o[self.tasks[0]] for o in offsets for t in self.tasks):
                raise ZipError(
                    f"Layer '{ref.name}' of model '{self._first_name}' adds Concatenates whose parts have different "
                    f"widths in different models ({[dict(o) for o in offsets]}); cutting them alike needs the models "
                    "to agree there.")
            cuts = [set(o[self.tasks[0]]) for o in offsets]
            every_cut = sorted(set().union(*cuts))
            for p, p_cuts in zip(parts, cuts):
                if sorted(p_cuts) != every_cut:
                    self._cut_space(ref, p, p_cuts, every_cut)
        for other in parts[1:]:
            for a, b in zip(parts[0], other):
                self.spaces.union(a, b)
        merged = tuple(self.spaces.find(part) for part in parts[0])
        return (merged if len(merged) > 1 else merged[0]), False

    def _width(self, part) -> dict:
        """Units of a unit space per task (the width of its unit layers)."""
        return next(w for i, w in self.unit_widths.items() if self.spaces.find(i) == self.spaces.find(part))

    def _offsets(self, parts: tuple) -> dict:
        """Per task, the unit offsets at which a space's blocks end."""
        widths = [self._width(part) for part in parts]
        return {t: np.cumsum([w[t] for w in widths]).tolist() for t in self.tasks}

    def _cut_space(self, ref, parts: tuple, cuts: set, every_cut: list):
        """Raises `_CutNeeded` for the first block of `parts` that the other inputs of merge `ref` cut."""
        start = 0
        for part, end in zip(parts, sorted(cuts)):
            inside = [c - start for c in every_cut if start < c < end]
            if inside:
                members = [i for i in self.unit_layers if self.spaces.find(i) == self.spaces.find(part)]
                widths = [b - a for a, b in zip([0] + inside, inside + [end - start])]
                raise _CutNeeded({t: [self.unit_layers[i][t] for i in members] for t in self.tasks}, widths,
                                 ref.name)
            start = end

    def concatenate(self, index, ref, parent_spaces):
        # A composite space: the inputs' spaces side by side (nested concatenations flattened).
        return tuple(part for sp in parent_spaces for part in (sp if isinstance(sp, tuple) else (sp,))), False

    def passthrough(self, index, ref, parent_spaces):
        return parent_spaces[0], False

    def select(self, index, ref, parent_spaces):
        (space,) = parent_spaces
        if is_input(space):
            return space, False  # a slice of the raw input is common to every task, like the input
        parts = space if isinstance(space, tuple) else (space,)
        ends = self._offsets(parts)
        if any(ends[t] != ends[self.tasks[0]] for t in self.tasks):
            raise ZipError(
                f"Layer '{ref.name}' of model '{self._first_name}' reads channels {ref.start}-{ref.stop} of "
                f"inputs made of parts with different widths in different models ({dict(ends)}); the models "
                "must agree there.")
        bounds = [0] + ends[self.tasks[0]]
        if ref.start in bounds and ref.stop in bounds:
            chosen = parts[bounds.index(ref.start):bounds.index(ref.stop)]
            return (chosen if len(chosen) > 1 else chosen[0]), False
        # The slice runs through a unit space: cut its layers at every group's boundary at once.
        every_cut = sorted(set(bounds[1:]) | {c for c in ref.cuts if 0 < c < bounds[-1]})
        self._cut_space(ref, parts, set(bounds[1:]), every_cut)
        raise AssertionError(f"Internal error: the input of '{ref.name}' needs no cut.")

    def _refuse_after_concatenate(self, ref, parent_spaces):
        if any(isinstance(sp, tuple) for sp in parent_spaces):
            raise ZipError(
                f"Layer '{ref.name}' ({type(ref).__name__}) of model '{self._first_name}' reads the output of a "
                "Concatenate; tf_mtz supports only Dense/Conv and weightless layers after a Concatenate.")


class _CutNeeded(Exception):
    """Unit layers (per task) whose units a merge ties, in blocks of `widths`, to different layers' units."""

    def __init__(self, layers: dict, widths: list, merge_name: str):
        super().__init__(merge_name)
        self.layers, self.widths = layers, widths


def _cut_unit_layers(ops: list, output_ops: list, folded: dict, layers: list, widths: list,
                     split_layers: dict) -> tuple[list, list]:
    """Replaces each of `layers` in `ops` by unit layers computing its column blocks of `widths` and a
    Concatenate of them (the same function; standard layers). Folded weights are cut alike.

    Returns the new operations and the new indices of the output operations."""
    targets = {id(layer) for layer in layers}
    result, new_index = [], _Reindexed()
    for i, op in enumerate(ops):
        parents = [new_index[p] for p in op.parents]
        if id(op.layer) not in targets:
            new_index[i] = len(result)
            result.append(Op(op.layer, parents))
            continue
        layer, handler = op.layer, registry.handler_for(op.layer)
        if handler.all_or_none:
            raise ZipError(f"A merge ties some of the units of layer '{layer.name}' ({type(layer).__name__}) to "
                           "other layers' units; tf_mtz would have to cut it into blocks of units, which a "
                           "recurrent or attention layer does not allow.")
        kernel, bias = handler.kernel_and_bias(layer)
        cut_folded = folded.get(id(layer))
        owner = split_layers.get(id(layer), layer)
        block_indices, start = [], 0
        for k, width in enumerate(widths):
            block = handler.build_layer(layer, width, use_bias=True, activation=handler.activation(layer),
                                        name=f"{layer.name}_block{k}")
            # From the kernel, not `layer.input`: a SeparableConv2D's pointwise part was never called.
            block.build((None,) * (kernel.ndim - 1) + (int(kernel.shape[-2]),))
            block.set_weights(handler.layer_weights(kernel[..., start:start + width], bias[start:start + width]))
            if cut_folded is not None:
                folded[id(block)] = (cut_folded[0][..., start:start + width], cut_folded[1][start:start + width])
            split_layers[id(block)] = owner
            block_indices.append(len(result))
            result.append(Op(block, parents))
            start += width
        new_index[i] = len(result)
        result.append(Op(keras.layers.Concatenate(axis=-1, name=f"{layer.name}_blocks"), block_indices))
    return result, [new_index[i] for i in output_ops]


def check_models_dict(models) -> None:
    """Raises ZipError unless `models` is `{task name: model}` with two or more distinct models."""
    if not isinstance(models, dict) or len(models) < 2:
        raise ZipError("zip_models needs a dict of at least two task name -> keras.Model entries.")
    for task in models:
        if not isinstance(task, str) or not task.isidentifier():
            raise ZipError(f"Task name {task!r} is not a valid identifier; use names like 'digits'.")
    if len({id(m) for m in models.values()}) != len(models):
        raise ZipError("The same model object is given for two tasks; pass separate models (a clone is fine).")


def read_models(models: dict) -> ZipPlan:
    """Checks that the task models line up and returns their zip plan.

    Raises:
        ZipError: mismatched depths, layer types, wiring or input shapes, unsupported layers, unbuilt or
            subclassed models.
    """
    check_models_dict(models)
    tasks = list(models)
    names = {task: models[task].name for task in tasks}
    originals, ops, folded, output_ops, grouped = {}, {}, {}, {}, {}
    for task, model in models.items():
        originals[task] = []
        read = _read_ops(model, task, originals[task], None, names[task], grouped)
        ops[task], folded[task], output_ops[task] = _fold_batch_norms(originals[task], names[task], read)
    first = tasks[0]
    output_names = list(keras_graph.named_outputs(models[first]))
    for task in tasks[1:]:
        if len(output_ops[task]) != len(output_ops[first]):
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') has {len(output_ops[task])} outputs but model "
                f"'{names[first]}' (task '{first}') has {len(output_ops[first])}; the models must have the same "
                "outputs.")

    inputs = check_inputs(models, names)

    # A merge of unit spaces cut differently (a layer's units added to a Concatenate of two layers' units)
    # cuts the layers of the coarser space into column blocks and reads the models again.
    split_layers = {}
    for _ in range(len(ops[first]) + 1):
        try:
            return _plan_from_ops(tasks, names, ops, folded, output_ops, output_names, originals, split_layers,
                                  inputs, grouped)
        except _CutNeeded as cut:
            for task in tasks:
                ops[task], output_ops[task] = _cut_unit_layers(ops[task], output_ops[task], folded[task],
                                                               cut.layers[task], cut.widths, split_layers)
    raise AssertionError("Internal error: cutting unit layers did not converge.")


def check_supported(ops: list, model_name: str) -> None:
    """Raises ZipError naming the first layer that no handler supports (or supports wrongly)."""
    for op in ops:
        _handler(op.layer, model_name)


def check_inputs(models: dict, names: dict) -> list:
    """The models' inputs (the first model's names), checked to agree in number, order, shape and dtype."""
    tasks = list(models)
    first = tasks[0]
    specs = {t: [(tuple(x.shape[1:]), str(x.dtype)) for x in keras_graph.model_inputs(models[t])] for t in tasks}
    model_inputs = inputs_of(models[first])
    first_names = [i.name for i in model_inputs]
    for task in tasks[1:]:
        names_here = [i.name for i in inputs_of(models[task])]
        # Inputs are matched by position; the same names in another order would pair the wrong ones.
        if names_here != first_names and sorted(names_here) == sorted(first_names):
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') takes its inputs in the order {names_here} but model "
                f"'{names[first]}' (task '{first}') in the order {first_names}; inputs are matched by position, "
                "so give every model the same input order.")
    for task in tasks[1:]:
        if len(specs[task]) != len(specs[first]):
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') takes {len(specs[task])} inputs but model '{names[first]}' "
                f"(task '{first}') takes {len(specs[first])}; all models must take the same inputs.")
        for k, (spec, first_spec) in enumerate(zip(specs[task], specs[first])):
            if spec != first_spec:
                which = "input" if len(specs[first]) == 1 else f"input {k}"
                raise ZipError(
                    f"Model '{names[task]}' (task '{task}') takes {which} {spec[0]} {spec[1]} but model "
                    f"'{names[first]}' (task '{first}') takes {first_spec[0]} {first_spec[1]}; all models must "
                    "take the same inputs.")
    if len({i.name for i in model_inputs}) != len(model_inputs):
        raise ZipError(f"Model '{names[first]}' (task '{first}') has inputs with the same name "
                       f"{[i.name for i in model_inputs]}; name its keras.Input layers apart.")
    return model_inputs


def inputs_of(model) -> list:
    """A built model's inputs as ModelInputs (names cleaned to letters, digits and '_')."""
    tensors = keras_graph.model_inputs(model)
    return [ModelInput(keras_graph.clean_name(x.name or ("input" if len(tensors) == 1 else f"input_{k}")),
                       tuple(x.shape[1:]), str(x.dtype)) for k, x in enumerate(tensors)]


def _plan_from_ops(tasks, names, ops, folded, output_ops, output_names, originals, split_layers,
                   inputs, grouped) -> "ZipPlan":
    """The zip plan from every task's operations (BatchNormalization folded): checks that they line up,
    reads the unit spaces and groups. Raises `_CutNeeded` where a merge needs a unit layer cut."""
    first = tasks[0]
    ops = {t: list(ops[t]) for t in tasks}
    handlers = {t: [_handler(op.layer, names[t]) for op in ops[t]] for t in tasks}
    unit_counts = {t: sum(registry.has_units(h) for h in handlers[t]) for t in tasks}
    for task in tasks:
        if unit_counts[task] == 0:
            raise ZipError(f"Model '{names[task]}' (task '{task}') has no Dense or Conv layer to zip.")
    for task in tasks[1:]:
        if unit_counts[task] != unit_counts[first]:
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') has {unit_counts[task]} layers with units but model "
                f"'{names[first]}' (task '{first}') has {unit_counts[first]}; zipped models must have the "
                "same depth.")

    suffixes, heads = {}, {}
    for task in tasks:
        ops[task], handlers[task], heads[task], suffixes[task] = _split_heads(
            ops[task], handlers[task], output_ops[task], names[task], task)
    for task in tasks[1:]:
        for ref, other in zip(ops[first], ops[task]):
            if type(other.layer) is not type(ref.layer):
                raise ZipError(
                    f"Layer '{other.layer.name}' ({type(other.layer).__name__}) of model '{names[task]}' (task "
                    f"'{task}') sits where model '{names[first]}' (task '{first}') has '{ref.layer.name}' "
                    f"({type(ref.layer).__name__}); the models must have the same layer types in the same order.")
            if other.parents != ref.parents:
                raise ZipError(
                    f"Layer '{other.layer.name}' of model '{names[task]}' (task '{task}') is wired to different "
                    f"inputs than '{ref.layer.name}' of model '{names[first]}' (task '{first}'); the models must "
                    "have the same graph.")
        if len(ops[task]) != len(ops[first]):
            raise ZipError(
                f"Model '{names[task]}' (task '{task}') has {len(ops[task])} layers up to its output layers but "
                f"model '{names[first]}' (task '{first}') has {len(ops[first])}; the models must have the same "
                "layers in the same order.")
        if heads[task] != heads[first]:
            raise ZipError(f"The outputs of model '{names[task]}' (task '{task}') come from other layers than "
                           f"those of model '{names[first]}' (task '{first}'); the models must have the same graph.")

    reader = _BodyReader(tasks, names, folded)
    head_positions = set(heads[first])
    body = [reader.read(i, {t: ops[t][i].layer for t in tasks}, handlers[first][i], ops[first][i].parents,
                        {t: handlers[t][i] for t in tasks}, is_head=i in head_positions)
            for i in range(len(ops[first]))]
    for position in body:
        position.space = _find(reader.spaces, position.space)

    slots, groups = _slots_and_groups(body, names[first], head_positions)
    slot_of = {slot.position.index: i for i, slot in enumerate(slots)}
    outputs = [Output(output_names[k], slot_of[heads[first][k]], {t: suffixes[t][k] for t in tasks})
               for k in range(len(output_names))]
    plan = ZipPlan(tasks=tasks, inputs=inputs, body=body, outputs=outputs, slots=slots,
                   groups=groups, originals=originals, split_layers=dict(split_layers), grouped=dict(grouped))
    for output in outputs:
        head = slots[output.slot].position
        if head.handler.all_or_none:
            raise ZipError(f"Output '{output.name}' of model '{names[first]}' comes from layer '{head.name}' "
                           f"({type(head.layers[first]).__name__}); tf_mtz keeps each task's output layer apart and "
                           "needs it to be a Dense/Conv layer: add one after the recurrent or attention layer.")
    for slot in slots:
        if hasattr(slot.position.handler, "attention_weights") and slot.group != slot.input_space:
            raise ZipError(f"Layer '{slot.position.name}' (MultiHeadAttention) of model '{names[first]}' is not inside a "
                           "residual block: tf_mtz zips attention whose output is added to the stream it reads "
                           "(x + mha(x, x), before or after a LayerNormalization), as in transformer blocks.")
        if slot.position.handler.token_vocabulary(slot.position.layers[first]) is not None \
                and not is_input(slot.input_space):
            raise ZipError(f"Layer '{slot.position.name}' of model '{names[first]}' reads token ids from another "
                           "layer's output; tf_mtz zips token layers (Embedding) that read a model input.")
        if not is_input(slot.input_space) and not hasattr(slot.position.handler, "attention_weights"):
            # (an attention layer's kernel is its output projection: its rows are heads, not input units)
            slot.rows_per_input_unit = _rows_per_unit(plan, slot, names)
    return plan


def _split_heads(ops: list, handlers: list, output_ops: list, model_name: str, task: str) -> tuple:
    """Separates each output's head (the Dense/Conv layer it comes from) and the weightless layers after it
    (its suffix) from the body, and moves the heads to the end (nothing in the body reads a head, so the
    order stays topological).

    Returns `(body ops, their handlers, body index of each output's head, each output's suffix layers)`.
    """
    consumers = {}
    for i, op in enumerate(ops):
        for p in op.parents:
            consumers.setdefault(p, []).append(i)
    heads, suffixes, removed = [], [], set()
    for output in output_ops:
        chain, i = [], output
        while not is_input(i) and not registry.has_units(handlers[i]):
            chain.append(i)
            i = ops[i].parents[0] if len(ops[i].parents) == 1 else INPUT
        # The head and the layers after it feed only the next of them, and the output feeds nothing.
        feeding_one = [i] + chain[1:] if chain else []
        problem = (is_input(i) or any(len(ops[c].parents) != 1 or ops[c].layer.weights
                                     or not isinstance(handlers[c], registry.PassThroughHandler) for c in chain)
                   or any(len(consumers.get(j, [])) != 1 for j in feeding_one) or consumers.get(output))
        if problem:
            head = ops[i].layer.name if not is_input(i) else "the input"
            raise ZipError(
                f"Output '{ops[output].layer.name}' of model '{model_name}' (task '{task}') does not come from "
                f"its own output layer ('{head}') through weightless layers: the model's output must come from "
                "one Dense/Conv layer through weightless layers that nothing else reads.")
        heads.append(i)
        suffixes.append([ops[c].layer for c in reversed(chain)])
        removed.update(chain)
    order = [i for i in range(len(ops)) if i not in removed and i not in heads] + heads
    new_index = _Reindexed({old: new for new, old in enumerate(order)})
    body = [Op(ops[i].layer, [new_index[p] for p in ops[i].parents]) for i in order]
    return body, [handlers[i] for i in order], [new_index[h] for h in heads], suffixes


def _slots_and_groups(body: list, first_name: str, head_positions: set) -> tuple[list, dict]:
    """The unit positions as slots (the heads last) and the unit groups: each group's member slots, the
    per-channel layers that follow its units, and the slots reading it."""
    slots, groups = [], {}
    for position in body:
        if not position.is_units:
            if position.weights is not None and isinstance(position.space, tuple):
                # A per-channel layer after a Concatenate follows every concatenated group's order.
                for part in sorted(part for part in set(position.space) if not is_input(part)):
                    groups.setdefault(part, Group([], [], [])).concatenated_channels.append(position.index)
            elif position.weights is not None:  # a per-channel layer: its units follow the group's order
                groups.setdefault(position.space, Group([], [], [])).channel_positions.append(position.index)
            continue
        parent = position.parents[0]
        # Rows from model inputs alone are common to every task: one marker for all of them.
        input_space = INPUT if is_input(parent) or is_input(body[parent].space) else body[parent].space
        is_head = position.index in head_positions
        group = None if is_head else position.space
        slot_index = len(slots)
        if group is not None:
            groups.setdefault(group, Group([], [], [])).members.append(slot_index)
        memory = None
        if _reads_memory(next(iter(position.layers.values()))):
            source = position.parents[1]
            memory = INPUT if is_input(source) or is_input(body[source].space) else body[source].space
            if isinstance(memory, tuple):
                raise ZipError(f"Layer '{position.name}' (MultiHeadAttention) of model '{first_name}' attends to a "
                               "Concatenate of features; tf_mtz zips cross-attention to one feature's units.")
        read = set(input_space if isinstance(input_space, tuple) else (input_space,)) | {memory}
        for part in sorted(p for p in read if p is not None and not is_input(p)):
            groups.setdefault(part, Group([], [], [])).consumers.append(slot_index)
        slots.append(Slot(position, 1, input_space, group, memory))
    for slot in slots[len(slots) - len(head_positions):]:
        head_space = slot.position.space
        if head_space in groups and not is_input(head_space) and (groups[head_space].members
                                                              or groups[head_space].channel_positions):
            raise ZipError(f"The output layer '{slot.position.name}' of model '{first_name}' is tied to "
                           "other layers by a merge; output layers are never shared.")
    return slots, groups


def _reads_memory(layer) -> bool:
    """Whether a layer is cross-attention (its key and value read a second tensor: the layer's second
    parent, before any mask)."""
    handler = registry.handler_for(layer)
    return isinstance(handler, registry.AttentionHandler) and handler.reads_memory(layer)


def _find(spaces: "_UnionFind", space):
    if isinstance(space, (int, np.integer)) and is_input(space):
        return space
    if isinstance(space, tuple):
        return tuple(_find(spaces, part) for part in space)
    return spaces.find(space)


def space_width(plan: ZipPlan, space, task: str) -> int:
    """Units of a unit space in one task: a group's width, an input's channels, or a concatenation's sum."""
    if isinstance(space, tuple):
        return sum(space_width(plan, part, task) for part in space)
    if is_input(space):
        return int(plan.inputs[-1 - space].shape[-1])
    return group_width(plan, space, task)


def group_width(plan: ZipPlan, group: int, task: str) -> int:
    """Units of a group in one task (every member has the same number)."""
    member = plan.slots[plan.groups[group].members[0]].position
    return int(member.weights[task][0].shape[-1])


def run_prefix(plan: ZipPlan, task: str, layer, x):
    """The input that `layer` receives in the original model of `task`, computed eagerly from `x` (a tensor,
    or one per model input; calling the original layers on concrete tensors adds nothing to their graphs)."""
    return run_prefixes(plan, task, [layer], x)[0]


def run_prefixes(plan: ZipPlan, task: str, layers: list, x, reduce=None) -> list:
    """The inputs that each of `layers` receives in the original model of `task`, from one eager pass over
    `x` that stops at the last of them (see `run_prefix`), each passed through `reduce` as soon as it is
    reached where given (so that only what is kept of it stays in memory)."""
    ops = plan.originals[task]
    values = input_values(x)
    wanted = {id(layer): i for i, layer in enumerate(layers)}
    last_use = {p: i for i, op in enumerate(ops) for p in op.parents}
    found = {}
    for i, op in enumerate(ops):
        args = [values[p] for p in op.parents]
        if id(op.layer) in wanted:
            value = args[0] if len(args) == 1 else args
            found[wanted[id(op.layer)]] = value if reduce is None else reduce(value)
            if len(found) == len(layers):
                return [found[k] for k in range(len(layers))]
        call_args, call_kwargs = keras_graph.call_arguments_for(op.layer, args[0] if len(args) == 1 else args)
        values[i] = op.layer(*call_args, training=False, **call_kwargs)
        for p in op.parents:  # a deep model's activations are not all kept
            if last_use[p] == i:
                values.pop(p, None)
    missing = next(layer for layer in layers if id(layer) not in {id(op.layer) for op in ops})
    raise KeyError(f"Layer '{missing.name}' is not in the model of task '{task}'.")


def input_values(x) -> dict:
    """`{input_ref(k): value}` from one value (a single-input model) or a list/tuple of one per input."""
    values = list(x) if isinstance(x, (tuple, list)) else [x]
    return {input_ref(k): value for k, value in enumerate(values)}


def _rows_per_unit(plan: ZipPlan, slot: Slot, names: dict) -> int:
    """How many kernel rows of `slot` each unit of its input feeds (H*W after a Flatten)."""
    per_task = set()
    position = slot.position
    for task, layer in position.layers.items():
        units_in = position.weights[task][0].shape[-2]
        units_prev = space_width(plan, slot.input_space, task)
        if units_in % units_prev:
            raise ZipError(
                f"Layer '{layer.name}' of model '{names[task]}' has {units_in} inputs, not a multiple of the "
                f"{units_prev} units feeding it; the layers between them mix units.")
        per_task.add(units_in // units_prev)
    if len(per_task) != 1:
        raise ZipError(f"Layer '{position.name}' sees different spatial sizes in different models: {per_task}.")
    return per_task.pop()

