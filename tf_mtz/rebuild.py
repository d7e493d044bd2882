"""Rebuilding: the zip state (per-task weights in shared-first order) as a plain Keras functional model.

At a layer that shares `s` units, every task's units are ordered [shared, task-specific] and every task's
input is split the same way: [x_shared, x_specific]. The zipped layer is built from standard layers:

* one layer for the shared units reading x_shared (weights and bias common to all tasks);
* per task, a bias-free layer adding the contribution of x_specific to the shared units (only when the
  previous layer was not fully shared), joined by `Add`;
* per task, a layer for its specific units reading [x_shared, x_specific].

Where every task's input is the very same tensor the shared layer is called once: the fully shared prefix
is one trunk computed once, and partially shared layers share weights across task branches.
"""

from __future__ import annotations

import dataclasses
import gc

import keras
import numpy as np

from tf_mtz import graph, keras_graph, registry
from tf_mtz import state as state_lib
from tf_mtz.graph import ZipPlan, input_ref, is_input
from tf_mtz.state import ChannelState, SlotState, ZipState


@dataclasses.dataclass
class Binding:
    """Where a built layer's weights live in the state, for reading them back after training."""

    layer: keras.layers.Layer
    target: object  # the SlotState or ChannelState holding the weights
    targets: list  # (task, kernel index, bias index or None)
    handler: object = None  # a unit layer's handler: its kernel back in tf_mtz's layout
    columns: slice = None  # the layer's output units that are this target's (a fused layer's part)

    def state_weights(self) -> tuple:
        """The layer's `(kernel, bias, inner weights)` in the state's layout, this target's columns; the bias
        None for a layer built without one (an Embedding), the inner weights None but for a recurrent
        layer (its recurrent kernel) or an attention layer (its query, key and value projections)."""
        if self.handler is None:  # a per-channel layer: its weights are the state's
            weights = self.layer.get_weights()
            return weights[0], (weights[1] if len(weights) > 1 else None), None
        kernel, bias, recurrent = self.handler.trained_weights(self.layer)
        if self.columns is not None:
            kernel, bias = kernel[..., self.columns], (None if bias is None else bias[self.columns])
        return kernel, bias, recurrent


@dataclasses.dataclass
class BuiltModel:
    model: keras.Model
    taps: list  # per unit layer: task -> shared part of that layer's input (None where nothing is shared)
    parts: list  # per unit layer: task -> (shared part, task-specific part) of that layer's input
    logits: dict  # output key ("task" or "task/output") -> pre-activation of its head
    bindings: list


class _Names:
    def __init__(self):
        self.used = set()

    def __call__(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.used:
            candidate, i = f"{name}_{i}", i + 1
        self.used.add(candidate)
        return candidate


def build_model(plan: ZipPlan, state: ZipState, name: str = "zipped") -> BuiltModel:
    """Builds the zipped Keras model for the current state (layers not yet zipped stay per task)."""
    # Keras models are reference cycles: with few Python objects but gigabytes of weights (VGG-16) the
    # cyclic collector would not run before several earlier probe models pile up.
    gc.collect()
    builder = _Builder(plan, state)
    inputs = [keras.Input(shape=i.shape, dtype=i.dtype, name=builder.names(i.name)) for i in plan.inputs]
    features = builder.features
    features.update({input_ref(k): {t: (x, None) for t in plan.tasks} for k, x in enumerate(inputs)})
    for position in plan.body:
        parents = [features[p] for p in position.parents]
        if is_input(position.space) and not position.is_units:
            features[position.index] = builder.replay(position, parents)
        else:
            features[position.index] = position.handler.visit(builder, position, parents)

    outputs = {}
    for t in plan.tasks:
        for output in plan.outputs:
            out = features[plan.slots[output.slot].position.index][t][0]
            for layer in output.suffixes[t]:
                out = registry.copy_layer(layer, builder.names(f"{t}_{layer.name}"))(out)
            outputs[plan.output_key(t, output)] = out
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=name)
    return BuiltModel(model, builder.taps, builder.parts, builder.logits, builder.bindings)


class _Builder(registry.PositionVisitor):
    """Builds each position of the zipped model from its inputs' features, by the kind of its handler.

    A feature is `{task: (shared part, task-specific part)}`, either part None where it has no units."""

    def __init__(self, plan: ZipPlan, state: ZipState):
        self.plan, self.state, self.tasks = plan, state, plan.tasks
        self.names = _Names()
        self.taps, self.parts = [None] * len(plan.slots), [None] * len(plan.slots)
        self.logits, self.bindings = {}, []
        self.features = {}  # position index -> feature, filled in graph order by `build_model`
        # id(tensor) -> (the tensor it is a channel slice of, start, stop): the slices this builder made,
        # so that a Concatenate of consecutive slices is their source again.
        self.slices = {}
        self.slice_calls = {}  # (id(source), start, stop) -> the slice: one per distinct run
        self.parts_of = _parts_of_layers(plan)
        self.fused = {}  # slot index -> its output, where its layer's parts were built as one layer

    def replay(self, position, parents):
        """Before any unit layer the input is not split: the layer is replayed exactly, once."""
        ref = position.layers[self.tasks[0]]
        copy = registry.copy_layer(ref, self.names(ref.name))
        args = [feature[self.tasks[0]][0] for feature in parents]
        out = copy(args[0] if len(args) == 1 else args)
        if ref.get_weights():  # e.g. Normalization's adapted mean and variance
            registry.give_weights(copy, ref.get_weights())
        return {t: (out, None) for t in self.tasks}

    def units(self, position, parents):
        index = self.plan.slot_indices[position.index]
        slot = self.state.slots[index]
        (feature,) = parents
        self.taps[index] = {t: feature[t][0] if slot.shared_inputs else None for t in self.tasks}
        self.parts[index] = dict(feature)
        if index not in self.fused and index in self.parts_of:
            self._fuse(*self.parts_of[index])
        if index in self.fused:
            return self.fused[index]
        if self.plan.is_head(index):
            output = next(o for o in self.plan.outputs if o.slot == index)
            logits = {}
            heads = _heads(position, slot, feature, self.tasks, self.names, self.bindings, logits)
            self.logits.update({self.plan.output_key(t, output): logits[t] for t in self.tasks})
            return heads
        return _zipped_layer(position, slot, feature, self.tasks, self.names, self.bindings)

    def whole_units(self, position, parents):
        """A layer whose units are shared all or none (recurrent, attention), built whole: one layer for
        every task where its units are shared (they read the fully shared input), else one per task with
        its own weights."""
        index = self.plan.slot_indices[position.index]
        slot = self.state.slots[index]
        feature = parents[0]  # self-attention reads one tensor as query and value; its masks follow
        memory = parents[1] if self.plan.slots[index].memory_space is not None else None  # cross-attention's
        masks = [mask[self.tasks[0]][0] for mask in parents[1 + (memory is not None):]]  # from the inputs
        self.taps[index] = {t: feature[t][0] if slot.shared_inputs else None for t in self.tasks}
        self.parts[index] = dict(feature)
        handler, tasks = position.handler, self.tasks

        def call(layer, x, t):
            extra = ([_join(memory[t], self.names(f"{t}_{position.label}_memory"))] if memory is not None else [])
            extra += masks
            args, kwargs = keras_graph.call_arguments_for(layer, [x, *extra] if extra else x)
            return layer(*args, **kwargs)

        if slot.shared and slot.merged:
            if any(feature[t][1] is not None for t in tasks):
                raise AssertionError(f"Internal error: shared layer '{position.name}' reads task units.")
            template = position.layers[tasks[0]]
            layer = handler.build_layer(template, slot.units(tasks[0]), use_bias=True, activation=None,
                                        name=self.names(f"{position.label}_shared"))
            keras_graph.call_like(layer, template)  # with the template's masks and flags
            calls = {}
            for t in tasks:  # one call per distinct input tensor, all with the common weights
                if memory is not None and memory[t][1] is not None:
                    raise AssertionError(f"Internal error: shared layer '{position.name}' attends to task units.")
                key = (id(feature[t][0]), id(memory[t][0]) if memory is not None else None)
                if key not in calls:
                    calls[key] = call(layer, feature[t][0], t)
            t0 = tasks[0]
            handler.assign(layer, slot.kernels[t0], slot.biases[t0], state_lib.inner_weights(slot, t0))
            self.bindings.append(Binding(layer, slot, [(t, (...,), (...,)) for t in tasks], handler))
            return {t: (calls[(id(feature[t][0]), id(memory[t][0]) if memory is not None else None)], None)
                    for t in tasks}
        out = {}
        for t in tasks:
            template = position.layers[t]
            layer = handler.build_layer(template, slot.units(t), use_bias=True, activation=None,
                                        name=self.names(f"{t}_{template.name}"))
            keras_graph.call_like(layer, template)
            y = call(layer, _join(feature[t], self.names(f"{t}_{template.name}_input")), t)
            handler.assign(layer, slot.kernels[t], slot.biases[t], state_lib.inner_weights(slot, t))
            self.bindings.append(Binding(layer, slot, [(t, (...,), (...,))], handler))
            # Paired but not merged yet (tied to a layer zipped earlier): the paired units come first.
            out[t] = (y, None) if slot.shared else (None, y)
        return out

    recurrent_units = attention_units = whole_units

    def channel_units(self, position, parents):
        return _channel_layer(position, self.state.channels[position.index], parents[0], self.tasks, self.names,
                              self.bindings)

    def merge(self, position, parents):
        return _combine(position, parents, self.tasks, self.names, concatenates=False, slices=self.slices)

    def concatenate(self, position, parents):
        return _combine(position, parents, self.tasks, self.names, concatenates=True, slices=self.slices)

    def select(self, position, parents):
        """A run of whole unit spaces of the input: its shared units from the input's shared part and its
        specific units from the specific part (a Concatenate lays out each part's shared units side by
        side, then each part's specific units)."""
        (feature,) = parents
        parent_space = self.plan.body[position.parents[0]].space
        parts = parent_space if isinstance(parent_space, tuple) else (parent_space,)
        chosen = position.space if isinstance(position.space, tuple) else (position.space,)
        first = next(i for i in range(len(parts)) if parts[i:i + len(chosen)] == chosen)
        out = {}
        for t in self.tasks:
            widths = [graph.space_width(self.plan, part, t) for part in parts]
            shared = [self.state.slots[self.plan.groups[part].members[0]].shared for part in parts]
            specific = [w - s for w, s in zip(widths, shared)]
            picked = []
            for x, counts in ((feature[t][0], shared), (feature[t][1], specific)):
                start, stop = sum(counts[:first]), sum(counts[:first + len(chosen)])
                if x is None or start == stop:
                    picked.append(None)
                elif stop - start == int(x.shape[-1]):
                    picked.append(x)
                else:
                    picked.append(self._slice(x, start, stop))
            out[t] = tuple(picked)
        return out

    def _slice(self, x, start: int, stop: int):
        """`x[..., start:stop]`, one slice per distinct run (tasks reading one tensor share it)."""
        key = (id(x), start, stop)
        if key not in self.slice_calls:
            self.slice_calls[key] = registry.channel_slice(x, start, stop)
            self.slices[id(self.slice_calls[key])] = (x, start, stop)
        return self.slice_calls[key]

    def _fuse(self, kind: str, members: list, layer_name: str) -> None:
        """Builds the parts of one layer of the models, `layer_name` (a grouped convolution's groups, `kind`
        "groups"; a layer's column blocks, "blocks"), each slot `members[k]`, as one layer where every part is fully
        shared and reads the trunk alone: one `Conv2D(groups=g)` on the tensor the groups slice, or one
        layer on the blocks' common input. Each part's output is then a slice of it (a Concatenate of them
        all is the fused output again). Leaves `self.fused` unset where the parts do not qualify."""
        plan, state, tasks = self.plan, self.state, self.tasks
        inputs = []
        for m in members:
            slot, position = state.slots[m], plan.slots[m].position
            feature = self._feature_of(position.parents[0])
            if (feature is None or plan.is_head(m) or not slot.merged or slot.shared == 0
                    or any(slot.units(t) != slot.shared for t in tasks)
                    or slot.shared_rows != slot.kernels[tasks[0]].shape[-2]
                    or any(feature[t][1] is not None or feature[t][0] is not feature[tasks[0]][0] for t in tasks)):
                return
            inputs.append(feature[tasks[0]][0])
        handler = plan.slots[members[0]].position.handler
        template = plan.slots[members[0]].position.layers[tasks[0]]
        activation = handler.activation(template)
        widths = [state.slots[m].shared for m in members]
        name = self.names(f"{layer_name}_shared")
        if kind == "groups":
            runs = [self.slices.get(id(x)) for x in inputs]
            if None in runs or len({id(r[0]) for r in runs}) != 1 or len(set(widths)) != 1:
                return
            source = runs[0][0]
            step = runs[0][2] - runs[0][1]
            if [r[1:] for r in runs] != [(k * step, (k + 1) * step) for k in range(len(runs))] \
                    or len(runs) * step != int(source.shape[-1]):
                return
            layer = handler.build_grouped(template, sum(widths), len(members), activation=activation, name=name)
            if layer is None:
                return
            x = source
        else:
            if len({id(x) for x in inputs}) != 1:
                return
            layer = handler.build_layer(template, sum(widths), use_bias=True, activation=activation, name=name)
            x = inputs[0]
        out = layer(x)
        weights = [handler.layer_weights(state.slots[m].kernels[tasks[0]], state.slots[m].biases[tasks[0]])
                   for m in members]
        # Each weight (kernel, and bias where the layer has one) side by side along the output units.
        layer.set_weights([np.concatenate(parts, axis=-1) for parts in zip(*weights)])
        start = 0
        for m, width in zip(members, widths):
            columns = slice(start, start + width)
            part = out if width == int(out.shape[-1]) else self._slice(out, start, start + width)
            self.fused[m] = {t: (part, None) for t in tasks}
            rows = state.slots[m].shared_rows
            self.bindings.append(Binding(layer, state.slots[m],
                                         [(t, (..., slice(0, rows), slice(0, width)), slice(0, width))
                                          for t in tasks], handler, columns))
            start += width

    def _feature_of(self, index):
        """The feature of position `index`, building a not yet visited channel slice early (a fused
        grouped layer needs every group's input at its first group); None where it is not built yet."""
        if index in self.features:
            return self.features[index]
        position = self.plan.body[index]
        if not isinstance(position.handler, registry.SliceHandler) \
                or any(p not in self.features for p in position.parents):
            return None
        return self.select(position, [self.features[p] for p in position.parents])

    def passthrough(self, position, parents):
        cache = {}
        masks = [mask[self.tasks[0]][0] for mask in parents[1:]]  # from the model inputs: the same for all

        def apply(layer, x, label):
            if x is None:
                return None
            if id(x) not in cache:  # tasks reading one tensor share one call
                cache[id(x)] = (position.handler.apply_to_part(layer, x, self.names(label)) if not masks
                                else _masked_call(layer, x, masks, self.names(label)))
            return cache[id(x)]

        return {t: (apply(position.layers[t], parents[0][t][0], f"{position.label}_shared"),
                    apply(position.layers[t], parents[0][t][1], f"{t}_{position.layers[t].name}"))
                for t in self.tasks}


def _masked_call(layer, x, masks: list, name: str):
    """A weightless layer that takes a mask (pooling after a masked Embedding), on a part of its input's
    units with the model's mask, which covers positions, not units."""
    copy = registry.copy_layer(layer, name)
    keras_graph.call_like(copy, layer)
    args, kwargs = keras_graph.call_arguments_for(copy, [x, *masks])
    return copy(*args, **kwargs)


def _heads(position, slot, feature, tasks, names, bindings, logits):
    out_features = {}
    for t in tasks:
        layer = position.layers[t]
        x = _join(feature[t], names(f"{t}_{layer.name}_input"))
        act = position.handler.activation(layer)
        dense = position.handler.build_layer(layer, slot.units(t), use_bias=True, activation=None,
                                             name=names(f"{t}_{layer.name}"))
        out = dense(x)
        dense.set_weights(position.handler.layer_weights(slot.kernels[t], slot.biases[t]))
        bindings.append(Binding(dense, slot, [(t, (...,), (...,))], position.handler))
        logits[t] = out
        if act != "linear":
            out = keras.layers.Activation(act, name=names(f"{t}_{layer.name}_{act}"))(out)
        out_features[t] = (out, None)
    return out_features


def _combine(position, parents, tasks, names, concatenates: bool, slices: dict):
    """A multi-input layer applied to its inputs' shared parts and, separately, to their specific parts.

    An element-wise merge needs every input split alike (tied inputs share the same number of units); a
    Concatenate joins whichever parts exist.
    """
    cache = {}
    ref = position.layers[tasks[0]]

    def combine(xs, label):
        present = [x for x in xs if x is not None]
        if not present:
            return None
        if not concatenates and len(present) != len(xs):
            raise AssertionError(f"Internal error: the inputs of '{ref.name}' are split differently.")
        key = tuple(id(x) for x in present)
        if key not in cache:
            whole = _whole_source(present, slices) if concatenates else None
            cache[key] = whole if whole is not None else position.handler.apply_to_parts(ref, present, names(label))
        return cache[key]

    return {t: (combine([p[t][0] for p in parents], f"{position.label}_shared"),
                combine([p[t][1] for p in parents], f"{t}_{position.layers[t].name}")) for t in tasks}


def _whole_source(parts: list, slices: dict):
    """The tensor that `parts`, in order, slice from its first channel to its last, or None."""
    runs = [slices.get(id(x)) for x in parts]
    if None in runs or len({id(r[0]) for r in runs}) != 1:
        return None
    ends = [0] + [r[2] for r in runs]
    if any(r[1] != end for r, end in zip(runs, ends)) or ends[-1] != int(runs[0][0].shape[-1]):
        return None
    return runs[0][0]


def _parts_of_layers(plan: ZipPlan) -> dict:
    """slot index -> ("groups" | "blocks", the slots computing parts of the same layer in order, that
    layer's name), for the slots of grouped convolutions read group by group (all groups present) and of
    layers cut into column blocks."""
    first = plan.tasks[0]
    groups, blocks = {}, {}
    for index, slot in enumerate(plan.slots):
        layer = slot.position.layers[first]
        if id(layer) in plan.grouped:
            owner, k = plan.grouped[id(layer)]
            groups.setdefault(id(owner), (owner, {}))[1][k] = index
        elif id(layer) in plan.split_layers:
            owner = plan.split_layers[id(layer)]
            blocks.setdefault(id(owner), (owner, []))[1].append(index)
    result = {}
    for owner, members in groups.values():
        if sorted(members) == list(range(int(owner.groups))):
            ordered = [members[k] for k in range(len(members))]
            result.update({m: ("groups", ordered, owner.name) for m in ordered})
    for owner, members in blocks.values():
        if len(members) > 1:
            result.update({m: ("blocks", members, owner.name) for m in members})
    return result


def _channel_layer(position, channel: ChannelState, feature, tasks, names, bindings):
    """Per-channel weighted layer: one layer with the merged weights for the shared channels (called once
    per distinct input), one per task for its specific channels."""
    s = channel.shared
    handler = position.handler
    ref = position.layers[tasks[0]]
    shared_layer, calls, out = None, {}, {}
    for t in tasks:
        x_shared, x_specific = feature[t]
        shared_out = specific_out = None
        if x_shared is not None:
            if shared_layer is None:
                shared_layer = handler.build_layer(ref, name=names(f"{position.label}_shared"))
            if id(x_shared) not in calls:
                calls[id(x_shared)] = shared_layer(x_shared)
            shared_out = calls[id(x_shared)]
        if x_specific is not None:
            layer = handler.build_layer(position.layers[t], name=names(f"{t}_{position.layers[t].name}"))
            specific_out = layer(x_specific)
            specific = handler.channel_index(slice(s, None))
            layer.set_weights(handler.layer_weights(position.layers[t], channel.kernels[t][specific],
                                                    channel.biases[t][s:]))
            bindings.append(Binding(layer, channel, [(t, specific, slice(s, None))]))
        out[t] = (shared_out, specific_out)
    if shared_layer is not None:
        t0 = tasks[0]
        shared = handler.channel_index(slice(0, s))
        shared_layer.set_weights(handler.layer_weights(ref, channel.kernels[t0][shared], channel.biases[t0][:s]))
        bindings.append(Binding(shared_layer, channel, [(t, shared, slice(0, s)) for t in tasks]))
    return out


def _join(feature, name):
    shared, specific = feature
    if shared is None:
        return specific
    if specific is None:
        return shared
    return keras.layers.Concatenate(axis=-1, name=name)([shared, specific])


def _zipped_layer(position, slot: SlotState, features, tasks, names, bindings):
    handler = position.handler
    s, rows = slot.shared, slot.shared_rows
    ref_layer = position.layers[tasks[0]]
    act = handler.activation(ref_layer)
    if s > 0 and not slot.merged:
        # Paired but not merged yet (a residual merge tied this layer to one zipped earlier): the paired
        # units keep per-task weights until the zipper reaches this layer.
        out = {}
        for t in tasks:
            layer = position.layers[t]
            x = _join(features[t], names(f"{t}_{layer.name}_input"))
            paired = handler.build_layer(layer, s, use_bias=True, activation=act, name=names(f"{t}_{layer.name}_paired"))
            paired_out = paired(x)
            paired.set_weights(handler.layer_weights(slot.kernels[t][..., :s], slot.biases[t][:s]))
            bindings.append(Binding(paired, slot, [(t, (..., slice(0, s)), slice(0, s))], handler))
            out[t] = (paired_out, _specific(position, slot, t, features, names, bindings, act))
        return out
    has_inter = any(features[t][1] is not None for t in tasks) and s > 0
    shared_layer = None
    if s > 0:
        shared_layer = handler.build_layer(ref_layer, s, use_bias=True,
                                           activation=None if has_inter else act,
                                           name=names(f"{position.label}_shared"))
        shared_binding = Binding(shared_layer, slot,
                                 [(t, (..., slice(0, rows), slice(0, s)), slice(0, s)) for t in tasks], handler)
    shared_calls = {}
    out = {}
    for t in tasks:
        layer = position.layers[t]
        x_shared, x_specific = features[t]
        shared_out = None
        if s > 0:
            if x_shared is None:
                raise AssertionError(f"Internal error: layer '{layer.name}' shares units but no inputs.")
            key = id(x_shared)
            if key not in shared_calls:
                shared_calls[key] = shared_layer(x_shared)
            shared_out = shared_calls[key]
            if x_specific is not None:
                inter = handler.build_layer(layer, s, use_bias=False, activation=None,
                                            name=names(f"{t}_{layer.name}_into_shared"))
                contribution = inter(x_specific)
                inter.set_weights(handler.layer_weights(slot.kernels[t][..., rows:, :s]))
                bindings.append(Binding(inter, slot, [(t, (..., slice(rows, None), slice(0, s)), None)], handler))
                shared_out = keras.layers.Add(name=names(f"{t}_{layer.name}_shared_sum"))([shared_out,
                                                                                           contribution])
            if has_inter and act != "linear":
                if id(shared_out) not in shared_calls:
                    activated = keras.layers.Activation(act, name=names(f"{t}_{layer.name}_{act}"))(shared_out)
                    shared_calls[id(shared_out)] = activated
                shared_out = shared_calls[id(shared_out)]
        out[t] = (shared_out, _specific(position, slot, t, features, names, bindings, act))
    if shared_layer is not None:
        t0 = tasks[0]
        shared_layer.set_weights(handler.layer_weights(slot.kernels[t0][..., :rows, :s], slot.biases[t0][:s]))
        bindings.append(shared_binding)
    return out


def _specific(position, slot, t, features, names, bindings, act):
    """The task-specific units of one task, reading its whole input."""
    s = slot.shared
    if slot.units(t) <= s:
        return None
    layer = position.layers[t]
    specific = position.handler.build_layer(layer, slot.units(t) - s, use_bias=True, activation=act,
                                            name=names(f"{t}_{layer.name}"))
    specific_out = specific(_join(features[t], names(f"{t}_{layer.name}_input")))
    specific.set_weights(position.handler.layer_weights(slot.kernels[t][..., s:], slot.biases[t][s:]))
    bindings.append(Binding(specific, slot, [(t, (..., slice(s, None)), slice(s, None))], position.handler))
    return specific_out

