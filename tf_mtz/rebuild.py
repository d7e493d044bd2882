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

import keras
import numpy as np

from tf_mtz import registry
from tf_mtz.graph import ZipPlan


@dataclasses.dataclass
class SlotState:
    """Weights of one unit layer for every task, units ordered [shared, specific], input rows likewise."""

    kernels: dict  # task -> kernel, input axis -2, output axis -1
    biases: dict  # task -> bias
    shared: int  # output units shared by all tasks
    shared_inputs: int  # leading input units (of the previous unit layer, or raw inputs) shared by all tasks
    rows_per_input_unit: int  # kernel rows per input unit (spatial positions folded in by a Flatten)

    @property
    def shared_rows(self) -> int:
        return self.shared_inputs * self.rows_per_input_unit

    def units(self, task) -> int:
        return int(self.kernels[task].shape[-1])


@dataclasses.dataclass
class ZipState:
    slots: list  # SlotState per unit layer, heads last

    @classmethod
    def from_plan(cls, plan: ZipPlan) -> "ZipState":
        slots = []
        for index, slot in enumerate(plan.slots):
            weights = slot.position.weights
            kernels = {t: k.copy() for t, (k, _) in weights.items()}
            biases = {t: b.copy() for t, (_, b) in weights.items()}
            first_kernel = next(iter(kernels.values()))
            shared_inputs = first_kernel.shape[-2] if index == 0 else 0
            slots.append(SlotState(kernels, biases, 0, shared_inputs,
                                   1 if index == 0 else slot.rows_per_input_unit))
        return cls(slots)


@dataclasses.dataclass
class Binding:
    """Where a built layer's weights live in the state, for reading them back after training."""

    layer: keras.layers.Layer
    slot: int
    targets: list  # (task, kernel index, bias index or None)


@dataclasses.dataclass
class BuiltModel:
    model: keras.Model
    taps: list  # per unit layer: task -> shared part of that layer's input (None where nothing is shared)
    parts: list  # per unit layer: task -> (shared part, task-specific part) of that layer's input
    logits: dict  # task -> pre-activation of the head
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
    names = _Names()
    tasks = plan.tasks
    inputs = keras.Input(shape=plan.input_shape, dtype=plan.input_dtype, name=names(plan.input_name))
    features = {t: (inputs, None) for t in tasks}
    taps, parts, logits, bindings = [], [], {}, []
    slot_index = 0
    for position in plan.body:
        if not position.is_units:
            cache = {}

            def apply(layer, x, label):
                if x is None:
                    return None
                key = id(x)
                if key not in cache:
                    cache[key] = position.handler.apply_to_part(layer, x, names(label))
                return cache[key]

            if slot_index == 0:
                # Before any unit layer the input is not split: replay the layer exactly, once.
                ref = position.layers[tasks[0]]
                copy = registry.copy_layer(ref, names(ref.name))
                out = copy(features[tasks[0]][0])
                if ref.get_weights():  # e.g. Normalization's adapted mean and variance
                    copy.set_weights(ref.get_weights())
                    if hasattr(copy, "finalize_state"):  # Normalization derives its statistics from them
                        copy.finalize_state()
                features = {t: (out, None) for t in tasks}
                continue
            ref_name = position.name
            features = {t: (apply(position.layers[t], features[t][0], f"{ref_name}_shared"),
                            apply(position.layers[t], features[t][1], f"{t}_{position.layers[t].name}"))
                        for t in tasks}
            continue

        slot = state.slots[slot_index]
        is_head = slot_index == len(state.slots) - 1
        taps.append({t: features[t][0] if slot.shared_inputs else None for t in tasks})
        parts.append({t: features[t] for t in tasks})
        if is_head:
            for t in tasks:
                layer = position.layers[t]
                x = _join(features[t], names(f"{t}_{layer.name}_input"))
                act = position.handler.activation(layer)
                dense = position.handler.build_layer(layer, slot.units(t), use_bias=True, activation=None,
                                                     name=names(f"{t}_{layer.name}"))
                out = dense(x)
                dense.set_weights([slot.kernels[t], slot.biases[t]])
                bindings.append(Binding(dense, slot_index, [(t, (...,), (...,))]))
                logits[t] = out
                if act != "linear":
                    out = keras.layers.Activation(act, name=names(f"{t}_{layer.name}_{act}"))(out)
                features[t] = (out, None)
        else:
            features = _zipped_layer(position, slot, slot_index, features, tasks, names, bindings)
        slot_index += 1

    outputs = {}
    for t in tasks:
        out = features[t][0]
        for layer in plan.suffixes[t]:
            out = registry.copy_layer(layer, names(f"{t}_{layer.name}"))(out)
        outputs[t] = out
    model = keras.Model(inputs, outputs, name=name)
    return BuiltModel(model, taps, parts, logits, bindings)


def _join(feature, name):
    shared, specific = feature
    if shared is None:
        return specific
    if specific is None:
        return shared
    return keras.layers.Concatenate(axis=-1, name=name)([shared, specific])


def _zipped_layer(position, slot: SlotState, slot_index, features, tasks, names, bindings):
    handler = position.handler
    s, rows = slot.shared, slot.shared_rows
    ref_layer = position.layers[tasks[0]]
    act = handler.activation(ref_layer)
    has_inter = any(features[t][1] is not None for t in tasks) and s > 0
    shared_layer = None
    if s > 0:
        shared_layer = handler.build_layer(ref_layer, s, use_bias=True,
                                           activation=None if has_inter else act,
                                           name=names(f"{ref_layer.name}_shared"))
        shared_binding = Binding(shared_layer, slot_index,
                                 [(t, (..., slice(0, rows), slice(0, s)), slice(0, s)) for t in tasks])
    shared_calls = {}
    out = {}
    for t in tasks:
        layer = position.layers[t]
        x_shared, x_specific = features[t]
        shared_out = None
        if s > 0:
            key = id(x_shared)
            if key not in shared_calls:
                shared_calls[key] = shared_layer(x_shared)
            shared_out = shared_calls[key]
            if x_specific is not None:
                inter = handler.build_layer(layer, s, use_bias=False, activation=None,
                                            name=names(f"{t}_{layer.name}_into_shared"))
                contribution = inter(x_specific)
                inter.set_weights([slot.kernels[t][..., rows:, :s]])
                bindings.append(Binding(inter, slot_index, [(t, (..., slice(rows, None), slice(0, s)), None)]))
                shared_out = keras.layers.Add(name=names(f"{t}_{layer.name}_shared_sum"))([shared_out,
                                                                                           contribution])
            if has_inter and act != "linear":
                if id(shared_out) not in shared_calls:
                    activated = keras.layers.Activation(act, name=names(f"{t}_{layer.name}_{act}"))(shared_out)
                    shared_calls[id(shared_out)] = activated
                shared_out = shared_calls[id(shared_out)]
        specific_out = None
        if slot.units(t) > s:
            specific = handler.build_layer(layer, slot.units(t) - s, use_bias=True, activation=act,
                                           name=names(f"{t}_{layer.name}"))
            specific_out = specific(_join(features[t], names(f"{t}_{layer.name}_input")))
            specific.set_weights([slot.kernels[t][..., s:], slot.biases[t][s:]])
            bindings.append(Binding(specific, slot_index, [(t, (..., slice(s, None)), slice(s, None))]))
        out[t] = (shared_out, specific_out)
    if shared_layer is not None:
        t0 = tasks[0]
        shared_layer.set_weights([slot.kernels[t0][..., :rows, :s], slot.biases[t0][:s]])
        bindings.append(shared_binding)
    return out


def read_back(state: ZipState, built: BuiltModel) -> None:
    """Copies the (retrained) weights of a built model back into `state`, in place."""
    for binding in built.bindings:
        weights = binding.layer.get_weights()
        for task, kernel_index, bias_index in binding.targets:
            slot = state.slots[binding.slot]
            slot.kernels[task][kernel_index] = weights[0]
            if bias_index is not None:
                slot.biases[task][bias_index] = weights[1]


def count_shared_parameters(state: ZipState) -> int:
    """Parameters held once for all tasks: the shared units' weights from shared inputs, and their biases."""
    total = 0
    for slot in state.slots[:-1]:
        if slot.shared:
            kernel = next(iter(slot.kernels.values()))
            spatial = int(np.prod(kernel.shape[:-2]))
            total += spatial * slot.shared_rows * slot.shared + slot.shared
    return total
