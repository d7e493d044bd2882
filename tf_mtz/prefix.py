"""Models of different depths: the aligned prefix is zipped, each model's remaining layers stay its own branch.

Two models of one family at different depths (a 3-conv and a 5-conv net, ResNet-20 and ResNet-32) agree
layer by layer from the input up to where one of them goes on differently. That common prefix is zipped as
any two models are; the rest of each model (its *branch*) is copied unchanged and reads the zipped prefix.

The zipped prefix holds each task's units in a shared-first order, merged, so a branch cannot read it as it
is. Each tensor a branch reads (a *cut*) therefore gets a per-task linear layer on top of the prefix, a
`Dense` with the identity as its weights: zipped like a head (never shared), it is re-indexed by the pairing
and refit to give the branch back its own model's features, as closely as a linear map of the zipped
features can. Where the branch reads the cut with Dense or unpadded convolutions only, the map is folded
into them and costs nothing; otherwise (a residual `Add`, a "same"-padded convolution) it stays a C×C
layer per task and cut (C the cut's width).

This module finds the prefix and its cuts (`split`) and joins the zipped prefix with the branches
(`assemble`); `tf_mtz.zip_models` calls both.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tf_mtz import graph, keras_graph, registry
from tf_mtz.errors import ZipError

CUT_SUFFIX = "_branch_input"  # the per-task linear layer a branch reads a cut through
_RESHAPING = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute)


@dataclasses.dataclass
class Split:
    """The common prefix of the task models and what their branches read from it."""

    tasks: list
    ops: dict  # task -> graph.Op list of the model as read (BatchNormalization not folded)
    outputs: dict  # task -> indices of the ops producing the model's outputs, in output order
    output_names: dict  # task -> the model's output names, in order
    length: int  # ops in the common prefix (the same indices in every task)
    cuts: list  # prefix op indices a branch reads (through a linear layer), ascending
    replayed: list  # prefix op indices a branch reads that depend on the inputs alone (recomputed there)
    reason: str  # where and why the alignment stopped, for the log and the report
    prefixes: dict = dataclasses.field(default_factory=dict)  # task -> prefix keras.Model, outputs one per cut

    def cut_name(self, index: int) -> str:
        return f"{keras_graph.clean_name(self.ops[self.tasks[0]][index].layer.name)}{CUT_SUFFIX}"

    def branch_layers(self, task: str) -> list:
        return [op.layer.name for op in self.ops[task][self.length:]]

    def describe(self) -> dict:
        """The report's account of the split: the zipped prefix's last layer, why it stops, the branches."""
        first = self.ops[self.tasks[0]]
        return {"prefix_layers": [op.layer.name for op in first[:self.length]], "stopped": self.reason,
                "cuts": [first[i].layer.name for i in self.cuts],
                "branches": {t: self.branch_layers(t) for t in self.tasks}}


def split(models: dict, alignment=None) -> Split | None:
    """The common prefix of `models`, or None where they line up up to their output layers (zipped whole).

    Args:
        models: `{task: keras.Model}`.
        alignment: None (the longest prefix matched by order, type and configuration), or where the zipped
            prefix ends: `{layer of the first model: layer of the second}` for two models, or
            `{task: {layer of the first model: layer of that task's model}}`; names or layers.

    Raises:
        ZipError: no unit layer lines up, or the alignment names layers that do not sit at the same place.
    """
    tasks = list(models)
    names = {t: models[t].name for t in tasks}
    ops, outputs, output_names = {}, {}, {}
    for t in tasks:
        ops[t], outputs[t] = graph.read_ops(models[t], t)
        output_names[t] = list(keras_graph.named_outputs(models[t]))
    graph.check_inputs(models, names)
    for t in tasks:
        graph.check_supported(ops[t], names[t])
    tails = {t: graph.output_tails(ops[t], outputs[t]) for t in tasks}
    if alignment is None and _lines_up(tasks, ops, tails):
        return None
    length, reason = _common_length(tasks, names, ops, tails)
    if alignment is not None:
        length, reason = _aligned_length(alignment, tasks, names, ops, length, reason)
    first = ops[tasks[0]]
    while length and isinstance(first[length - 1].layer, _RESHAPING):
        length -= 1  # a branch reads the narrower tensor before a reshape (its linear layer is width²)
    if not any(_has_units(op.layer) for op in first[:length]):
        raise ZipError(f"No layer with units lines up at the start of the models ({reason}); tf_mtz zips models "
                       "whose first Dense/Conv layers match in order, type and configuration.")
    read = sorted({p for t in tasks for op in ops[t][length:] for p in op.parents if 0 <= p < length})
    depends = _unit_ancestry(first[:length])
    result = Split(tasks, ops, outputs, output_names, length, [i for i in read if depends[i]],
                   [i for i in read if not depends[i]], reason)
    for t in tasks:
        result.prefixes[t] = _prefix_model(result, t, models[t])
    return result


def _has_units(layer) -> bool:
    handler = registry.handler_for(layer)
    return handler is not None and registry.has_units(handler)


def _same_op(a, b) -> bool:
    if type(a.layer) is not type(b.layer) or a.parents != b.parents:
        return False
    return graph.comparable_config(a.layer) == graph.comparable_config(b.layer)


def _lines_up(tasks, ops, tails) -> bool:
    """Whether the models have the same graph up to their output layers (zipped whole: the output layers
    may differ in width, and the weightless layers after them in kind and number)."""
    bodies = {t: _without_suffixes(ops[t], tails[t]) for t in tasks}
    first, first_heads = bodies[tasks[0]]
    for t in tasks[1:]:
        body, heads = bodies[t]
        if len(body) != len(first) or heads != first_heads:
            return False
        for i, (a, b) in enumerate(zip(first, body)):
            if not (_same_op(a, b) or (i in heads and _same_head(a, b))):
                return False
    return True


def _same_head(a, b) -> bool:
    """Output layers line up where they differ at most in width and activation (a kernel of another size
    reads other rows: such heads are kept apart as branches)."""
    if type(a.layer) is not type(b.layer) or a.parents != b.parents:
        return False
    config_a, config_b = graph.comparable_config(a.layer), graph.comparable_config(b.layer)
    config_a.pop("activation", None)
    config_b.pop("activation", None)
    return config_a == config_b


def _without_suffixes(ops, tails) -> tuple[list, set]:
    """The ops without the weightless layers after the output layers (parents re-indexed), and the indices
    of the output layers among them."""
    suffix = {i for i in tails if not _has_units(ops[i].layer)}
    new_index = {old: new for new, old in enumerate(i for i in range(len(ops)) if i not in suffix)}
    body = [graph.Op(op.layer, [new_index.get(p, p) for p in op.parents])
            for i, op in enumerate(ops) if i not in suffix]
    return body, {new_index[i] for i in tails if i not in suffix}


def _common_length(tasks, names, ops, tails) -> tuple[int, str]:
    """How many ops, from the first, every model has alike (none of them an output layer or after one), and
    the first difference in words."""
    first = tasks[0]
    for i in range(max(len(ops[t]) for t in tasks)):
        for t in tasks:
            if i >= len(ops[t]) or i in tails[t]:
                return i, f"the output layers of model '{names[t]}' (task '{t}') start at layer {i + 1}"
        for t in tasks[1:]:
            if not _same_op(ops[first][i], ops[t][i]):
                a, b = ops[first][i].layer, ops[t][i].layer
                if type(a) is not type(b):
                    how = "another type"
                elif ops[first][i].parents != ops[t][i].parents:
                    how = "wired to other layers"
                else:
                    how = "configured differently: " + _config_difference(a, b)
                return i, (f"layer {i + 1} is '{a.name}' ({type(a).__name__}) in model '{names[first]}' but "
                           f"'{b.name}' ({type(b).__name__}) in model '{names[t]}', {how}")
    return len(ops[first]), "the models end"


def _config_difference(a, b) -> str:
    """The settings in which two layers' configurations differ, as `key a vs b`."""
    config_a, config_b = graph.comparable_config(a), graph.comparable_config(b)
    keys = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k) != config_b.get(k))
    return ", ".join(f"{k} {config_a.get(k)!r} vs {config_b.get(k)!r}" for k in keys)


def _index_of(ops, layer, task, names) -> int:
    for i, op in enumerate(ops):
        if op.layer is layer or op.layer.name == layer:
            return i
    raise ZipError(f"The alignment names layer {getattr(layer, 'name', layer)!r}, which model '{names[task]}' "
                   f"(task '{task}') does not have.")


def _aligned_length(alignment, tasks, names, ops, common, reason) -> tuple[int, str]:
    """The prefix length an explicit alignment asks for, checked against the layers that line up."""
    if not isinstance(alignment, dict) or not alignment:
        raise ZipError("alignment must be a non-empty dict {layer of the first model: layer of the second}, or "
                       "{task: {layer of the first model: layer of that task's model}}.")
    if set(alignment) <= set(tasks[1:]):
        pairs = {t: alignment[t] for t in alignment}
    elif len(tasks) == 2:
        pairs = {tasks[1]: alignment}
    else:
        raise ZipError(f"With {len(tasks)} models give the alignment per task: {{task: {{layer of the first model: "
                       "layer of that task's model}}}.")
    length = 0
    for t, mapping in pairs.items():
        for a, b in mapping.items():
            i, j = _index_of(ops[tasks[0]], a, tasks[0], names), _index_of(ops[t], b, t, names)
            if i != j or i >= common:
                raise ZipError(
                    f"The alignment pairs layer '{ops[tasks[0]][i].layer.name}' of model '{names[tasks[0]]}' with "
                    f"'{ops[t][j].layer.name}' of model '{names[t]}', but "
                    + (f"they sit at different places (layers {i + 1} and {j + 1})" if i != j else
                       f"the models differ before it ({reason})")
                    + "; tf_mtz zips a common prefix: layers that match in order, type and configuration.")
            length = max(length, i + 1)
    return length, f"the alignment ends the zipped part at layer {length}"


def _unit_ancestry(ops) -> list:
    """Per op, whether a unit layer lies on its way from the inputs (else it depends on the inputs alone)."""
    depends = []
    for op in ops:
        depends.append(_has_units(op.layer) or any(p >= 0 and depends[p] for p in op.parents))
    return depends


def _copy(layer, name: str, inputs, weights=None):
    """`layer` copied under `name`, called on `inputs`, with its weights (or `weights`, a kernel and a bias
    for a unit layer that may have had none)."""
    if weights is not None:
        copy = type(layer).from_config({**layer.get_config(), "name": name, "use_bias": True})
    else:
        copy = registry.copy_layer(layer, name)
    call_args, call_kwargs = keras_graph.call_arguments_for(layer, inputs)
    keras_graph.call_like(copy, layer)
    out = copy(*call_args, **call_kwargs)
    if weights is not None or layer.get_weights():
        registry.give_weights(copy, weights if weights is not None else layer.get_weights())
    return out


def replay(ops, values: dict, indices, name_prefix: str = "", weights=None) -> dict:
    """Calls copies of `ops[i]` (weights included, or `weights[i]` where given) for `i` in `indices`, in
    order, on `values` (op index or model input ref -> tensor), which it extends."""
    weights = weights or {}
    for i in indices:
        args = [values[p] for p in ops[i].parents]
        values[i] = _copy(ops[i].layer, f"{name_prefix}{ops[i].layer.name}", args[0] if len(args) == 1 else args,
                          weights.get(i))
    return values


def _prefix_model(result: Split, task: str, model) -> keras.Model:
    """The task's prefix as a model: its layers (copies, same names), then per cut an identity `Dense`."""
    inputs = [keras.Input(shape=i.shape, dtype=i.dtype, name=i.name) for i in graph.inputs_of(model)]
    values = replay(result.ops[task], graph.input_values(inputs if len(inputs) > 1 else inputs[0]),
                    range(result.length))
    outputs = {}
    for i in result.cuts:
        width = int(values[i].shape[-1])
        head = keras.layers.Dense(width, name=result.cut_name(i))
        outputs[result.cut_name(i)] = head(values[i])
        head.set_weights([np.eye(width, dtype=np.float32), np.zeros(width, np.float32)])
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=f"{model.name}_prefix")


def branch_model(result: Split, task: str, model) -> keras.Model:
    """The task's branch as a model of copies of its layers: inputs the model's inputs (for what the branch
    recomputes from them) then one per cut, named as the cut; outputs the model's, in order. AutoSharing
    judges a zipped prefix through it."""
    inputs = [keras.Input(shape=i.shape, dtype=i.dtype, name=i.name) for i in graph.inputs_of(model)]
    ops = result.ops[task]
    values = graph.input_values(inputs if len(inputs) > 1 else inputs[0])
    replay(ops, values, result.replayed, name_prefix=f"{task}_")
    prefix_outputs = keras_graph.output_structure(result.prefixes[task])
    cuts = []
    for i in result.cuts:
        name = result.cut_name(i)
        values[i] = keras.Input(shape=tuple(prefix_outputs[name].shape[1:]), dtype=prefix_outputs[name].dtype,
                                name=name)
        cuts.append(values[i])
    replay(ops, values, range(result.length, len(ops)), name_prefix=f"{task}_")
    return keras.Model(inputs + cuts, [values[j] for j in result.outputs[task]], name=f"{model.name}_branch")


def assemble(result: Split, zipped_prefix: keras.Model, name: str = "zipped") -> keras.Model:
    """The zipped prefix joined with copies of every task's branch; outputs `{task: tensor}`, or
    `{"task/output": tensor}` where a model has several outputs.

    Where a cut is read only by Dense or Conv layers whose every tap sees real inputs (1×1 or "valid"
    convolutions), its linear layer is folded into them (exact: a linear map after a linear map), so it
    costs nothing; otherwise (a residual `Add`, a "same"-padded convolution) it stays a layer.
    """
    prefix_outputs = keras_graph.output_structure(zipped_prefix)
    inputs = zipped_prefix.inputs
    single_cut = len(result.cuts) == 1
    several = any(len(result.outputs[t]) > 1 for t in result.tasks)
    outputs = {}
    for t in result.tasks:
        ops = result.ops[t]
        values = graph.input_values(inputs if len(inputs) > 1 else inputs[0])
        replay(ops, values, result.replayed, name_prefix=f"{t}_")
        folded = {}
        for i in result.cuts:
            head = zipped_prefix.get_layer(f"{t}_{result.cut_name(i)}")
            readers = [j for j in range(result.length, len(ops)) if i in ops[j].parents]
            if all(_folds_into(ops[j]) for j in readers):
                values[i] = head.input
                folded.update({j: _folded(head, ops[j].layer) for j in readers})
            else:
                values[i] = prefix_outputs[t if single_cut else f"{t}/{result.cut_name(i)}"]
        replay(ops, values, range(result.length, len(ops)), name_prefix=f"{t}_", weights=folded)
        for k, index in enumerate(result.outputs[t]):
            outputs[f"{t}/{result.output_names[t][k]}" if several else t] = values[index]
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=name)


def _folds_into(op) -> bool:
    """Whether a linear map of a unit layer's input folds exactly into its kernel: a Dense, or a convolution
    without zero padding (padding would feed zeros where the map's bias should be)."""
    layer = op.layer
    if len(op.parents) != 1:
        return False
    if type(layer) is keras.layers.Dense:
        return True
    if type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D) and layer.groups == 1:
        return layer.padding == "valid" or all(k == 1 for k in layer.kernel_size)
    return False


def _folded(head, reader) -> list:
    """`reader`'s kernel and bias with the linear layer `head` in front folded in."""
    head_kernel, head_bias = head.get_weights()
    kernel = reader.get_weights()[0]
    bias = reader.get_weights()[1] if reader.use_bias else np.zeros(kernel.shape[-1], kernel.dtype)
    # The kernel's second-to-last axis reads the input's units: put the head's map in front of it.
    folded_kernel = np.einsum("ij,...jo->...io", head_kernel, kernel)
    folded_bias = bias + (kernel * head_bias[:, None]).reshape(-1, kernel.shape[-1]).sum(axis=0)
    return [folded_kernel.astype(kernel.dtype), folded_bias.astype(kernel.dtype)]
