"""The probe: every task's layer inputs in the partly zipped network and in its original model, carried
forward from layer step to layer step so that each layer's inputs are computed once per zip.

In the zipped network a task's computation is its own model with its current weights from the zip state:
shared units are shared only in that every task holds the same weights for them. So the probe runs each
task's network position by position (one Keras layer built for the call, with that task's full width and
weights, then dropped), in the *natural* layout: channels in the state's current column order, a Flatten's
rows position-major over all channels. A unit layer's kernel rows are in the state's layout (shared input
units first, see `state.row_order`), so its input is gathered into that layout first (`input_rows`).

Values are kept per task as lists of calibration batches. The zipper advances a *frontier*, the body
index of the layer it is zipping: everything before it is final (its weights change no more), so values
there are computed once and kept while a position at or beyond the frontier still reads them. Values past
the frontier (a tied layer's input, needed early to pair a group) are computed on demand and not kept.
The original models are run the same way over their own operations (BatchNormalization unfolded).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_mtz import graph, state as state_lib
from tf_mtz.graph import INPUT


class _Values:
    """Values of one task's graph (zipped or original) at its operations, each a list of batches.

    `advance(frontier)` computes the *boundary* (the operations before the frontier that an operation at
    or past it reads) from what was kept, keeps exactly those, and drops the rest: each operation before
    the frontier is computed once. `get` of anything else computes it from the boundary without keeping
    it."""

    def __init__(self, parents: list, children: dict, inputs: list, compute):
        self.parents = parents  # operation index -> parent indices (INPUT for the model input)
        self.children = children
        self.inputs = inputs
        self.kept = {INPUT: inputs}
        self.boundary = set()
        self.compute = compute  # (index, [parent values]) -> value

    def get(self, index: int) -> list:
        if index in self.kept:
            return self.kept[index]
        order, stack, seen = [], [index], set()
        while stack:  # the missing ancestors, evaluated in index (topological) order
            i = stack.pop()
            if i in seen or i in self.kept:
                continue
            seen.add(i)
            order.append(i)
            stack.extend(self.parents[i])
        computed = {}
        for i in sorted(order):
            values = [computed[p] if p in computed else self.kept[p] for p in self.parents[i]]
            computed[i] = self.compute(i, values)
            if i in self.boundary:
                self.kept[i] = computed[i]
        return computed[index]

    def advance(self, frontier: int) -> None:
        """Everything before `frontier` is final: keeps what operations at or past it read, drops the rest."""
        boundary = {i for i in range(min(frontier, len(self.parents)))
                    if any(c >= frontier for c in self.children.get(i, []))}
        self.boundary = boundary | set(self.boundary)  # the old boundary may still feed the new one
        for i in sorted(boundary):
            self.get(i)
        self.boundary = boundary
        for i in [i for i in self.kept if i != INPUT and i not in boundary]:
            del self.kept[i]

    def forget(self) -> None:
        """Drops every computed value (after retraining changed the weights); `advance` recomputes them."""
        self.kept = {INPUT: self.inputs}


class Probe:
    """Per task, the inputs of any unit layer in the zipped network (from the zip state) and in the
    original model, on the calibration batches."""

    def __init__(self, plan: graph.ZipPlan, state: state_lib.ZipState, calibration: dict, strategy=None):
        self.plan, self.state = plan, state
        self.strategy = strategy  # a tf.distribute.Strategy for the statistics, or None
        self.batches = {t: [tf.cast(x, tf.float32) for x in calibration[t]] for t in plan.tasks}
        children = plan.children
        body_parents = [position.parents for position in plan.body]
        self.zipped = {t: _Values(body_parents, children, self.batches[t],
                                  lambda i, values, t=t: self._zipped_position(t, i, values)) for t in plan.tasks}
        self.original = {}
        self._original_index = {}
        for t in plan.tasks:
            ops = plan.originals[t]
            op_children = {}
            for i, op in enumerate(ops):
                for p in op.parents:
                    op_children.setdefault(p, []).append(i)
            self._original_index[t] = {id(op.layer): i for i, op in enumerate(ops)}
            self.original[t] = _Values([op.parents for op in ops], op_children, self.batches[t],
                                       lambda i, values, ops=ops: _call_each(ops[i].layer, values))

    def samples(self, task: str) -> int:
        return int(sum(int(x.shape[0]) for x in self.batches[task]))

    def advance(self, slot_index: int) -> None:
        """Slots before `slot_index` are final; their values are kept only while later layers read them."""
        position = self.plan.slots[slot_index].position
        for t in self.plan.tasks:
            self.zipped[t].advance(position.index)
            layer = position.layers[t]
            self.original[t].advance(self._original_index[t][id(layer)])

    def weights_changed(self) -> None:
        """Retraining moved every weight: values of the zipped network are computed afresh (from the input,
        once, at the next `advance`)."""
        for values in self.zipped.values():
            values.forget()

    def zipped_inputs(self, slot_index: int, task: str) -> list:
        """The full input of a unit layer in the zipped network, rows in the state's layout (shared first)."""
        position = self.plan.slots[slot_index].position
        (parent,) = position.parents
        natural = self.zipped[task].get(parent)
        rows = input_rows(self.plan, self.state, slot_index, task)
        if rows is None:
            return natural
        return [tf.gather(x, rows, axis=-1) for x in natural]

    def shared_inputs(self, slot_index: int, task: str) -> list:
        """The part of a unit layer's input that every task shares (what its Hessian is measured on)."""
        width = self.state.slots[slot_index].shared_rows
        return [x[..., :width] for x in self.zipped_inputs(slot_index, task)]

    def original_inputs(self, slot_index: int, task: str) -> list:
        """The input of a unit layer in the task's original model."""
        layer = self.plan.slots[slot_index].position.layers[task]
        op = self.plan.originals[task][self._original_index[task][id(layer)]]
        (parent,) = op.parents
        return self.original[task].get(parent)

    def _zipped_position(self, task: str, index: int, values: list) -> list:
        plan, state = self.plan, self.state
        position = plan.body[index]
        layer = None
        if position.role == "units":
            slot_index = plan.slot_indices[index]
            slot = state.slots[slot_index]
            layer = position.handler.build_layer(position.layers[task], slot.units(task), use_bias=True,
                                                 activation=position.handler.activation(position.layers[task]),
                                                 name=f"probe_{position.name}")
            rows = input_rows(plan, state, slot_index, task)
            inputs = values[0] if rows is None else [tf.gather(x, rows, axis=-1) for x in values[0]]
            layer.build(tuple(inputs[0].shape))
            layer.set_weights([slot.kernels[task], slot.biases[task]])
            return _call_each(layer, [inputs])
        if position.role == "channel_units" and position.space != INPUT:
            channel = state.channels[index]
            layer = position.handler.build_layer(position.layers[task], name=f"probe_{position.name}")
            layer.build(tuple(values[0][0].shape))
            layer.set_weights([channel.kernels[task], channel.biases[task]])
            return _call_each(layer, values)
        return _call_each(position.layers[task], values)


def _call_each(layer, values: list) -> list:
    """`layer` applied batch by batch to its inputs' values (one list of batches per input)."""
    return [layer(batch[0] if len(batch) == 1 else list(batch), training=False) for batch in zip(*values)]


def input_rows(plan: graph.ZipPlan, state: state_lib.ZipState, slot_index: int, task: str):
    """Indices that gather a unit layer's kernel rows from its input in the natural layout, or None where
    the two agree (the model input, a convolution reading a group)."""
    slot_plan, slot = plan.slots[slot_index], state.slots[slot_index]
    space, per_unit = slot_plan.input_space, slot.rows_per_input_unit
    if space == INPUT:
        return None
    if not isinstance(space, tuple):
        width = graph.space_width(plan, space, task)
        if per_unit == 1:
            return None
        return state_lib.row_order(np.arange(width), slot.shared_inputs, per_unit)
    # After a Concatenate the state orders rows by the original units of the concatenated inputs; the
    # natural layout has each input's units in its current column order.
    natural_of_original, offset = [], 0
    for part in space:
        width = graph.space_width(plan, part, task)
        order = np.arange(width) if part == INPUT else state.slots[plan.groups[part].members[0]].column_order[task]
        inverse = np.empty(width, np.int64)
        inverse[order] = np.arange(width)
        natural_of_original.append(offset + inverse)
        offset += width
    natural_of_original = np.concatenate(natural_of_original)
    rows = state_lib.row_order(slot.input_order[task], slot.shared_inputs, per_unit)
    position, unit = np.divmod(rows, offset)
    return position * offset + natural_of_original[unit]
