"""The zip state: every task's weights in shared-first order, and the operations that keep it consistent.

At a layer that shares `s` units, every task's units are ordered [shared, task-specific] (`column_order`
maps each column back to the original unit) and every consumer's kernel rows follow the same order
(`row_order`). This module is the state's only writer: the zipper changes it only through the functions
below (permute a group, merge the shared units, rescale them, replace a task's weights, absorb trained
weights); `rebuild` and `probe` only read it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tf_mtz import graph
from tf_mtz.graph import ZipPlan, is_input


@dataclasses.dataclass
class SlotState:
    """Weights of one unit layer for every task, units ordered [shared, specific], input rows likewise."""

    kernels: dict  # task -> kernel, input axis -2, output axis -1
    biases: dict  # task -> bias
    shared: int  # output units paired across all tasks (the first `shared` columns)
    shared_inputs: int  # leading input units (of the input's group, or raw inputs) shared by all tasks
    rows_per_input_unit: int  # kernel rows per input unit (spatial positions folded in by a Flatten)
    merged: bool = True  # whether the paired units already have common weights (a tied layer pairs first)
    column_order: dict = None  # task -> original unit of each current column
    input_order: dict = None  # after a Concatenate: task -> original input unit of each current input unit
    # A recurrent layer: task -> (G, units + 1, units), rows its own units (then the recurrent bias), columns
    # its units: permuted on both axes with the layer's units.
    recurrent: dict = None
    # An attention layer: task -> {"query", "key", "value": (inputs, heads, dim), and their "<part>_bias"}, rows
    # its input's units; its kernel is the output projection (heads · value_dim rows, head-major).
    attention: dict = None

    @property
    def shared_rows(self) -> int:
        return self.shared_inputs * self.rows_per_input_unit

    def units(self, task) -> int:
        return int(self.kernels[task].shape[-1])


@dataclasses.dataclass
class ChannelState:
    """Per-channel weights (DepthwiseConv2D) of every task, channels ordered [shared, specific]."""

    kernels: dict  # task -> per-unit weights, units along the handler's channel_axis
    biases: dict
    shared: int = 0
    input_order: dict = None  # after a Concatenate: task -> original input unit of each current unit


@dataclasses.dataclass
class ZipState:
    slots: list  # SlotState per unit layer, topological order, heads last
    channels: dict  # body index -> ChannelState of per-channel weighted layers

    @classmethod
    def from_plan(cls, plan: ZipPlan) -> "ZipState":
        slots = []
        for slot in plan.slots:
            weights = slot.position.weights
            kernels = {t: k.copy() for t, (k, _) in weights.items()}
            biases = {t: b.copy() for t, (_, b) in weights.items()}
            first_kernel = next(iter(kernels.values()))
            from_input = is_input(slot.input_space)
            handler, layers = slot.position.handler, slot.position.layers
            recurrent = attention = None
            if hasattr(handler, "recurrent_weights"):
                recurrent = {t: handler.recurrent_weights(layer) for t, layer in layers.items()}
            if hasattr(handler, "attention_weights"):
                attention = {t: handler.attention_weights(layer) for t, layer in layers.items()}
            inputs = (next(iter(attention.values()))["query"].shape[0] if attention is not None
                      else first_kernel.shape[-2])
            slots.append(SlotState(kernels, biases, 0, inputs if from_input else 0,
                                   1 if from_input or attention is not None else slot.rows_per_input_unit,
                                   column_order={t: np.arange(k.shape[-1]) for t, k in kernels.items()},
                                   recurrent=recurrent, attention=attention))
        state = cls(slots, {})
        for index, slot in enumerate(plan.slots):
            if isinstance(slot.input_space, tuple):
                slots[index].input_order = {t: np.arange(graph.space_width(plan, slot.input_space, t))
                                            for t in plan.tasks}
                reorder_concatenated_rows(plan, state, index)
        for group in plan.groups.values():
            for position_index in group.channel_positions + group.concatenated_channels:
                if position_index in state.channels:
                    continue
                weights = plan.body[position_index].weights
                state.channels[position_index] = ChannelState({t: k.copy() for t, (k, _) in weights.items()},
                                                              {t: b.copy() for t, (_, b) in weights.items()})
                if position_index in group.concatenated_channels:
                    state.channels[position_index].input_order = {
                        t: np.arange(b.shape[0]) for t, (_, b) in weights.items()}
                    reorder_concatenated_channels(plan, state, position_index)
        return state


def row_order(order: np.ndarray, shared: int, rows_per_unit: int) -> np.ndarray:
    """Original kernel row of every row when the input units come in `order` and the first `shared` of them
    form the shared part: each part is laid out position-major (a Flatten of a channels-last feature puts
    unit c at position p on row p * C + c, and the shared and specific parts are flattened separately)."""
    positions = np.arange(rows_per_unit)[:, None] * order.size
    return np.concatenate([(positions + order[None, :shared]).reshape(-1),
                           (positions + order[None, shared:]).reshape(-1)])


def concatenated_order(plan: ZipPlan, state: "ZipState", space: tuple, task: str) -> tuple[np.ndarray, int]:
    """The units of a Concatenate's output in the order the zipped model holds them, as original units
    (inputs side by side): [every input's paired units, every input's other units], from the current
    pairing of each input; and how many are paired (the model input's units always are)."""
    paired, rest, offset = [], [], 0
    for part in space:
        width = graph.space_width(plan, part, task)
        if is_input(part):
            order, count = np.arange(width), width
        else:
            member = state.slots[plan.groups[part].members[0]]
            order, count = member.column_order[task], member.shared
        paired.append(offset + order[:count])
        rest.append(offset + order[count:])
        offset += width
    return np.concatenate(paired + rest), sum(len(p) for p in paired)


def reorder_concatenated_channels(plan: ZipPlan, state: "ZipState", position_index: int,
                                  keep_first: bool = False) -> None:
    """Puts a per-channel layer reading a Concatenate into the zipped model's order of its units and gives
    the paired ones the average of the tasks' weights (the first task's with `keep_first`)."""
    channel = state.channels[position_index]
    handler, space = plan.body[position_index].handler, plan.body[position_index].space
    for t in plan.tasks:
        wanted, count = concatenated_order(plan, state, space, t)
        position_of = np.empty_like(channel.input_order[t])
        position_of[channel.input_order[t]] = np.arange(position_of.size)
        channel.kernels[t] = channel.kernels[t][handler.channel_index(position_of[wanted])]
        channel.biases[t] = channel.biases[t][position_of[wanted]]
        channel.input_order[t] = wanted
    _average_paired(plan.tasks, channel, handler, count, keep_first)


def _average_paired(tasks: list, channel: "ChannelState", handler, count: int, keep_first: bool) -> None:
    paired = handler.channel_index(slice(0, count))
    kernels = [channel.kernels[t][paired] for t in tasks]
    biases = [channel.biases[t][:count] for t in tasks]
    kernel = kernels[0] if keep_first else np.mean(kernels, axis=0)
    bias = biases[0] if keep_first else np.mean(biases, axis=0)
    for t in tasks:
        channel.kernels[t][paired] = kernel
        channel.biases[t][:count] = bias
    channel.shared = count


def reorder_concatenated_rows(plan: ZipPlan, state: "ZipState", index: int) -> None:
    """Puts the rows of a layer reading a Concatenate into the order the zipped model feeds it:
    [every input's paired units, every input's other units], from the current pairing of each input."""
    slot = state.slots[index]
    rows = slot.rows_per_input_unit
    for t in plan.tasks:
        wanted, shared = concatenated_order(plan, state, plan.slots[index].input_space, t)
        current = row_order(slot.input_order[t], slot.shared_inputs, rows)
        position_of = np.empty_like(current)
        position_of[current] = np.arange(current.size)
        slot.kernels[t] = slot.kernels[t][..., position_of[row_order(wanted, shared, rows)], :]
        slot.input_order[t] = wanted
    slot.shared_inputs = shared



def count_shared_parameters(state: ZipState) -> int:
    """Parameters held once for all tasks: the shared units' weights from shared inputs, their biases, and
    the shared channels of per-channel layers."""
    total = 0
    for slot in state.slots[:-1]:
        if slot.shared and slot.merged:
            kernel = next(iter(slot.kernels.values()))
            spatial = int(np.prod(kernel.shape[:-2]))
            bias = next(iter(slot.biases.values()))
            total += spatial * slot.shared_rows * slot.shared + slot.shared * (bias.size // max(bias.shape[0], 1))
            if slot.recurrent is not None:
                total += next(iter(slot.recurrent.values()))[:, :-1].size
            if slot.attention is not None:
                total += sum(w.size for w in next(iter(slot.attention.values())).values())
    for channel in state.channels.values():
        if channel.shared:
            bias = next(iter(channel.biases.values()))
            kernel = next(iter(channel.kernels.values()))
            total += (kernel.size // bias.size + 1) * channel.shared
    return total


def permute_group(plan: ZipPlan, state: ZipState, group, permutations: dict, count: int,
                  keep_first: bool = False) -> None:
    """Puts every member, per-channel layer and consumer of a unit group into the paired order
    [paired, rest] (`permutations[t]`: original unit of each new position) with `count` paired units.

    Members stay per task until `merge_shared` reaches them; per-channel layers (DepthwiseConv2D) have no
    input of their own to weigh a merge by, so their paired units get the average (or the first task's,
    with `keep_first`) at once.
    """
    tasks = plan.tasks
    for m in plan.groups[group].members:
        slot = state.slots[m]
        for t in tasks:
            slot.kernels[t] = slot.kernels[t][..., permutations[t]]
            slot.biases[t] = slot.biases[t][permutations[t]]
            slot.column_order[t] = slot.column_order[t][permutations[t]]
            if slot.recurrent is not None:
                slot.recurrent[t] = permuted_recurrent(slot.recurrent[t], permutations[t])
        slot.shared, slot.merged = count, False
    for position_index in plan.groups[group].channel_positions:
        channel = state.channels[position_index]
        handler = plan.body[position_index].handler
        for t in tasks:
            channel.kernels[t] = channel.kernels[t][handler.channel_index(permutations[t])]
            channel.biases[t] = channel.biases[t][permutations[t]]
        _average_paired(tasks, channel, handler, count, keep_first)
    for position_index in plan.groups[group].concatenated_channels:
        reorder_concatenated_channels(plan, state, position_index, keep_first)
    for c in plan.groups[group].consumers:
        consumer = state.slots[c]
        if consumer.attention is not None:  # its projections' rows read the group's units
            reading = attention_rows_reading(plan.slots[c], group)
            for t in tasks:
                consumer.attention[t] = {name: (w[permutations[t]] if name in reading else w)
                                         for name, w in consumer.attention[t].items()}
            if "query" in reading:
                consumer.shared_inputs = count
            continue
        if isinstance(plan.slots[c].input_space, tuple):
            reorder_concatenated_rows(plan, state, c)
            continue
        for t in tasks:
            consumer.kernels[t] = consumer.kernels[t][..., row_order(permutations[t], count,
                                                                      consumer.rows_per_input_unit), :]
        consumer.shared_inputs = count


ATTENTION_INPUTS = ("query", "key", "value")  # the attention weights whose rows are the input's units


def attention_rows_reading(slot_plan: graph.Slot, group) -> tuple:
    """The projections of an attention slot whose rows are `group`'s units: its query reads its input; its key
    and value read its input too (self-attention) or its memory (cross-attention)."""
    reading = ()
    if slot_plan.input_space == group:
        reading += ("query",) if slot_plan.memory_space is not None else ATTENTION_INPUTS
    if slot_plan.memory_space is not None and slot_plan.memory_space == group:
        reading += ("key", "value")
    return reading


def inner_weights(slot: SlotState, task: str):
    """A recurrent or attention layer's weights besides its kernel and bias (its recurrent kernel, or its
    query, key and value projections) for one task; None for other layers."""
    if slot.attention is not None:
        return slot.attention[task]
    return None if slot.recurrent is None else slot.recurrent[task]


def input_width(slot: SlotState, task: str) -> int:
    """How many input rows a task's layer reads (its kernel's rows; an attention layer's projections')."""
    if slot.attention is not None:
        return int(slot.attention[task]["query"].shape[0])
    return int(slot.kernels[task].shape[-2])


def permute_heads(state: ZipState, index: int, task: str, heads: np.ndarray, key_dims: np.ndarray,
                  value_dims: np.ndarray) -> None:
    """Reorders one task's attention heads of slot `index` (`heads[h]`: the task's head at position h) and,
    within each head position, its query/key dims (`key_dims[h]`, one order for both) and value dims
    (`value_dims[h]`, with the output projection's rows): the layer computes the same function."""
    slot = state.slots[index]
    weights = slot.attention[task]
    reordered = {}
    for name in ("query", "key"):
        reordered[name] = weights[name][:, heads[:, None], key_dims]
        reordered[f"{name}_bias"] = weights[f"{name}_bias"][heads[:, None], key_dims]
    reordered["value"] = weights["value"][:, heads[:, None], value_dims]
    reordered["value_bias"] = weights["value_bias"][heads[:, None], value_dims]
    kernel = slot.kernels[task]
    output = kernel.reshape(len(heads), -1, kernel.shape[-1])[heads[:, None], value_dims]
    slot.attention[task] = {name: np.ascontiguousarray(w, np.float32) for name, w in reordered.items()}
    slot.kernels[task] = np.ascontiguousarray(output.reshape(kernel.shape), np.float32)


def merge_attention(state: ZipState, index: int, kernel: np.ndarray, bias: np.ndarray, attention: dict) -> None:
    """Gives every task the common weights of a shared attention layer (all its units are shared)."""
    slot = state.slots[index]
    for t in slot.kernels:
        slot.kernels[t] = np.array(kernel, np.float32)
        slot.biases[t] = np.array(bias, np.float32)
        slot.attention[t] = {name: np.array(w, np.float32) for name, w in attention.items()}
    slot.merged = True


def permuted_recurrent(recurrent: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Recurrent weights `(G, units + 1, units)` with the units in `order`: rows (but the bias row last) and
    columns alike."""
    rows = np.concatenate([order, [recurrent.shape[1] - 1]])
    return recurrent[:, rows][..., order]


def merge_shared(state: ZipState, index: int, kernel: np.ndarray, bias: np.ndarray,
                 recurrent: np.ndarray | None = None) -> None:
    """Gives the paired units of slot `index` (from its shared inputs) the common weights of their merge
    (and a recurrent layer, whose units are all paired, its common recurrent weights)."""
    slot = state.slots[index]
    rows, count = slot.shared_rows, slot.shared
    if (recurrent is None) != (slot.recurrent is None):
        raise AssertionError("Internal error: recurrent weights merged for a layer without them, or missing.")
    for t in slot.kernels:
        slot.kernels[t][..., :rows, :count] = kernel
        slot.biases[t][:count] = bias
        if recurrent is not None:
            slot.recurrent[t] = np.array(recurrent, np.float32)
    slot.merged = True


def rescale_shared(state: ZipState, index: int, scale: np.ndarray, shift: np.ndarray) -> None:
    """Scales and shifts the pre-activation of each shared unit of slot `index`, alike for every task."""
    slot = state.slots[index]
    count = slot.shared
    for t in slot.kernels:
        slot.kernels[t][..., :count] *= scale.astype(np.float32)
        slot.biases[t][:count] = (slot.biases[t][:count] * scale + shift).astype(np.float32)


def replace_task_weights(state: ZipState, index: int, task: str, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Replaces one task's weights of slot `index` (same shapes: its unit and row order are kept)."""
    slot = state.slots[index]
    if kernel.shape != slot.kernels[task].shape or bias.shape != slot.biases[task].shape:
        raise AssertionError(f"Internal error: new weights {kernel.shape} for a kernel of {slot.kernels[task].shape}.")
    slot.kernels[task] = np.ascontiguousarray(kernel, np.float32)
    slot.biases[task] = np.ascontiguousarray(bias, np.float32)


def absorb_trained(state: ZipState, bindings: list) -> None:
    """Copies the (retrained) weights of a built model's layers back into the state (`rebuild.Binding`s:
    each names its layer, the slot or channel state, and the task slices it holds)."""
    for binding in bindings:
        kernel, bias, inner = binding.state_weights()
        for task, kernel_index, bias_index in binding.targets:
            binding.target.kernels[task][kernel_index] = kernel
            if bias_index is not None and bias is not None:
                binding.target.biases[task][bias_index] = bias
            if isinstance(inner, dict):  # an attention layer's projections
                binding.target.attention[task] = inner
            elif inner is not None:  # a recurrent layer's recurrent kernel
                binding.target.recurrent[task] = inner
