"""The probe: every task's layer inputs in the partly zipped network and in its original model, carried
forward from layer step to layer step so that each layer's inputs are computed once per zip.

In the zipped network a task's computation is its own model with its current weights from the zip state:
shared units are shared only in that every task holds the same weights for them. So the probe runs each
task's network position by position (a Keras layer with that task's full width and weights; small ones are
kept and given new weights when their position runs again), in the *natural* layout: channels in the
state's current column order, a Flatten's rows position-major over all channels. A unit layer's kernel rows are in the state's layout (shared input
units first, see `state.row_order`), so its input is gathered into that layout first (`input_rows`).

Values are kept per task as lists of calibration batches. The zipper advances a *frontier*, the body
index of the layer it is zipping: everything before it is final (its weights change no more), so values
there are computed once and kept while a position at or beyond the frontier still reads them. Values past
the frontier (a tied layer's input, needed early to pair a group) are computed on demand and not kept.
The original models are run the same way over their own operations (BatchNormalization unfolded).

Tasks whose zipped networks compute the same thing share its values: where two tasks read the same
calibration batches and a position's inputs are one value for both, the position is computed once if the
two tasks' weights and layer settings there are equal (fully shared layers after their merge). With full
sharing and one calibration set the whole trunk is computed once, not once per task, and consumers can
tell (`input_groups`) that its statistics are the same for those tasks.

Memory is bounded: every value the probe computes is a `Batches` sequence whose batches stay in memory
while the probe's budget (`ZipConfig.activation_memory_gib`) allows and are written to a temporary
directory beyond it, then read back one batch at a time. Consumers iterate batch by batch, so at most the
budget plus a few batches are held at once however much calibration data there is.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
import shutil
import tempfile
import weakref

import keras
import numpy as np
import tensorflow as tf

from tf_mtz import graph, keras_graph, registry, state as state_lib, tracing
from tf_mtz.graph import is_input


class _OnDisk:
    __slots__ = ("path", "nbytes")

    def __init__(self, path: str, nbytes: int):
        self.path, self.nbytes = path, nbytes


class _Spill:
    """The probe's memory budget for computed values, and the directory batches beyond it go to."""

    def __init__(self, budget_bytes: int):
        self.budget, self.held, self.written = int(budget_bytes), 0, 0
        self.directory = None
        self._count = 0

    def store(self, tensor: tf.Tensor):
        size = int(tensor.shape.num_elements()) * tensor.dtype.size
        if self.held + size <= self.budget:
            self.held += size
            return tensor
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="tf_mtz_probe_")
            self._remove_directory = weakref.finalize(self, shutil.rmtree, self.directory, True)
        path = os.path.join(self.directory, f"{self._count}.npy")
        self._count += 1
        np.save(path, tensor.numpy())
        self.written += size
        return _OnDisk(path, size)

    def close(self) -> None:
        """Removes the spill directory and everything in it."""
        if self.directory is not None:
            self._remove_directory()

    @staticmethod
    def load(item) -> tf.Tensor:
        return tf.constant(np.load(item.path)) if isinstance(item, _OnDisk) else item

    def release(self, items: list) -> None:
        for item in items:
            if isinstance(item, _OnDisk):
                with contextlib.suppress(OSError):
                    os.remove(item.path)
            else:
                self.held -= int(item.shape.num_elements()) * item.dtype.size
        items.clear()


class _Mapped(collections.abc.Sequence):
    """A sequence of batches with `function` applied to each when it is read (nothing is stored)."""

    def __init__(self, batches, function):
        self._batches, self._function = batches, function

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._function(batch) for batch in self._batches[index]]
        return self._function(self._batches[index])


class Batches(_Mapped):
    """One probe value (a layer's output or input) as a sequence of calibration batches, each in memory or
    spilled to disk by the probe's budget; memory and files are given back when the value is dropped."""

    def __init__(self, spill: _Spill, tensors):
        items = [spill.store(tensor) for tensor in tensors]
        super().__init__(items, _Spill.load)
        weakref.finalize(self, spill.release, items)


class _Values:
    """Values of one task's graph (zipped or original) at its operations, each a list of batches.

    `advance(frontier)` computes the *boundary* (the operations before the frontier that an operation at
    or past it reads) from what was kept, keeps exactly those, and drops the rest: each operation before
    the frontier is computed once. `get` of anything else computes it from the boundary without keeping
    it."""

    def __init__(self, parents: list, children: dict, inputs: dict, compute):
        self.parents = parents  # operation index -> parent indices (negative: the model inputs)
        self.children = children
        self.inputs = inputs  # input_ref(k) -> model input k's batches
        self.kept = dict(inputs)
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
        for i in [i for i in self.kept if not is_input(i) and i not in boundary]:
            del self.kept[i]

    def forget(self) -> None:
        """Drops every computed value (after retraining changed the weights); `advance` recomputes them."""
        self.kept = dict(self.inputs)


class Probe:
    """Per task, the inputs of any unit layer in the zipped network (from the zip state) and in the
    original model, on the calibration batches."""

    def __init__(self, plan: graph.ZipPlan, state: state_lib.ZipState, calibration: dict, strategy=None,
                 memory_budget_bytes: int = 4 * 2 ** 30):
        self.plan, self.state = plan, state
        self.spill = _Spill(memory_budget_bytes)
        self.strategy = strategy  # a tf.distribute.Strategy for the statistics, or None
        self.batches = _shared_batches(plan.tasks, calibration)
        self._recent = {}  # (body index, ids of its input values) -> [(task, inputs, value)], while advancing
        self._agreement = _Agreement(plan, state)
        children = plan.children
        body_parents = [position.parents for position in plan.body]
        # Layer graphs traced for this zip only: a traced call keeps its first layer (and its weights) alive.
        self.calls = tracing.LayerCalls()
        self._runner = _TaskRunner(plan, state, self.spill, self.calls)
        inputs = {t: _per_input(self.batches[t]) for t in plan.tasks}
        self.zipped = {t: _Values(body_parents, children, inputs[t],
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
            for block, owner in plan.split_layers.items():  # a block of a cut layer reads what that layer reads
                if id(owner) in self._original_index[t]:
                    self._original_index[t][block] = self._original_index[t][id(owner)]
            self.original[t] = _Values([op.parents for op in ops], op_children, inputs[t],
                                       lambda i, values, ops=ops: _call_each(self.spill, self.calls, ops[i].layer,
                                                                                    values))

    def close(self) -> None:
        """Drops every computed value and removes the files of spilled ones."""
        for values in list(self.zipped.values()) + list(self.original.values()):
            values.forget()
        self.spill.close()

    def samples(self, task: str) -> int:
        return int(sum(int(x.shape[0]) for x in _per_input(self.batches[task])[graph.INPUT]))

    def advance(self, slot_index: int) -> None:
        """Slots before `slot_index` are final; their values are kept only while later layers read them."""
        position = self.plan.slots[slot_index].position
        try:
            for t in self.plan.tasks:
                self.zipped[t].advance(position.index)
                layer = position.layers[t]
                self.original[t].advance(self._original_index[t][id(layer)])
        finally:
            self._recent.clear()

    def sample_count(self, task: str) -> int:
        """How many calibration samples the task's statistics read."""
        return int(sum(int(tf.nest.flatten(batch)[0].shape[0]) for batch in self.batches[task]))

    def zipped_outputs(self, task: str, output_index: int = 0) -> np.ndarray:
        """The zipped network's output `output_index` for `task` (the head and the weightless layers after
        it) on every batch, as one array; nothing past the current frontier is kept."""
        output = self.plan.outputs[output_index]
        batches = []
        for value in self.zipped[task].get(self.plan.slots[output.slot].position.index):
            for layer in output.suffixes[task]:
                value = layer(value, training=False)
            batches.append(np.asarray(value))
        return np.concatenate(batches)

    def checkpoint(self) -> tuple:
        """What `restore` needs to bring the probe back to this point (after a trial zip of a layer)."""
        return tuple({t: (dict(v.kept), set(v.boundary)) for t, v in values.items()}
                     for values in (self.zipped, self.original))

    def restore(self, checkpoint: tuple) -> None:
        """Back to `checkpoint` (the zip state must be back to that point too)."""
        for values, saved in zip((self.zipped, self.original), checkpoint):
            for t, (kept, boundary) in saved.items():
                values[t].kept, values[t].boundary = dict(kept), set(boundary)
        self._recent.clear()

    def weights_changed(self) -> None:
        """Retraining moved every weight: values of the zipped network are computed afresh (from the input,
        once, at the next `advance`)."""
        for values in self.zipped.values():
            values.forget()

    def input_groups(self, slot_index: int) -> list:
        """The tasks grouped by the zipped input of a unit layer: tasks in one group read the same values
        (one `Batches` and the same row layout), so statistics of that input are the same for all of them."""
        position = self.plan.slots[slot_index].position
        parent = position.parents[0]  # its input; masks, where it takes any, follow
        groups = []
        for t in self.plan.tasks:
            natural, rows = self.zipped[t].get(parent), input_rows(self.plan, self.state, slot_index, t)
            for group in groups:
                if group[1] is natural and _equal_or_none(group[2], rows):
                    group[0].append(t)
                    break
            else:
                groups.append(([t], natural, rows))
        return [tasks for tasks, _, _ in groups]

    def zipped_inputs(self, slot_index: int, task: str) -> list:
        """The full input of a unit layer in the zipped network, rows in the state's layout (shared first)."""
        position = self.plan.slots[slot_index].position
        parent = position.parents[0]  # its input; masks, where it takes any, follow
        natural = self.zipped[task].get(parent)
        rows = input_rows(self.plan, self.state, slot_index, task)
        if rows is None:
            return natural
        return _Mapped(natural, lambda x: tf.gather(x, rows, axis=-1))

    def shared_inputs(self, slot_index: int, task: str) -> list:
        """The part of a unit layer's input that every task shares (what its Hessian is measured on)."""
        width = self.state.slots[slot_index].shared_rows
        return _Mapped(self.zipped_inputs(slot_index, task), lambda x: x[..., :width])

    def original_inputs(self, slot_index: int, task: str) -> list:
        """The input of a unit layer in the task's original model."""
        layer = self.plan.slots[slot_index].position.layers[task]
        op = self.plan.originals[task][self._original_index[task][id(layer)]]
        parent = op.parents[0]
        return self.original[task].get(parent)

    def _zipped_position(self, task: str, index: int, values: list) -> list:
        position = self.plan.body[index]
        recent = self._recent.setdefault((index, tuple(id(v) for v in values)), [])
        for other, _, value in recent:
            if position.handler.visit(self._agreement, position, other, task):
                return value
        value = position.handler.visit(self._runner, task, position, values)
        recent.append((task, values, value))  # holding `values` keeps their ids from being reused
        return value


def _shared_batches(tasks: list, calibration: dict) -> dict:
    """Each task's calibration batches as float32 tensors (a tuple of them per batch for several model
    inputs); tasks given equal data get the same list, which lets the probe compute their shared trunk once."""
    batches = {}
    for t in tasks:
        own = [tf.nest.map_structure(lambda x: tf.cast(x, tf.float32), x) for x in calibration[t]]  # read once
        same = next((s for s in batches if _same_batches(batches[s], own)), None)
        batches[t] = batches[same] if same is not None else own
    return batches


def _per_input(batches: list) -> dict:
    """`{input_ref(k): model input k's batches}` from batches of one tensor or of a tuple per input."""
    if batches and isinstance(batches[0], tuple):
        return {graph.input_ref(k): [batch[k] for batch in batches] for k in range(len(batches[0]))}
    return {graph.INPUT: batches}


def _same_batches(first: list, second: list) -> bool:
    if len(first) != len(second):
        return False
    flat_first, flat_second = tf.nest.flatten(first), tf.nest.flatten(second)
    return len(flat_first) == len(flat_second) and all(
        a is b or (a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b)))
        for a, b in zip(flat_first, flat_second))


def _equal_or_none(first, second) -> bool:
    if first is None or second is None:
        return first is None and second is None
    return first.shape == second.shape and np.array_equal(first, second)


def _same_settings(first, second) -> bool:
    """Whether two layers compute the same function of their inputs: equal configurations (names aside)
    and equal weights."""
    if not _same_config(first, second):
        return False
    weights_a, weights_b = first.get_weights(), second.get_weights()
    return len(weights_a) == len(weights_b) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights_a, weights_b))


class _Agreement(registry.PositionVisitor):
    """Whether two tasks' zipped networks compute the same thing at one position, given the same inputs:
    the same weights in the zip state and the same layer settings."""

    def __init__(self, plan: graph.ZipPlan, state: state_lib.ZipState):
        self.plan, self.state = plan, state

    def units(self, position, first, second):
        slot_index = self.plan.slot_indices[position.index]
        slot = self.state.slots[slot_index]
        return (_equal_or_none(slot.kernels[first], slot.kernels[second])
                and _equal_or_none(slot.biases[first], slot.biases[second])
                and (slot.recurrent is None or _equal_or_none(slot.recurrent[first], slot.recurrent[second]))
                and (slot.attention is None or all(_equal_or_none(slot.attention[first][k], slot.attention[second][k])
                                                   for k in slot.attention[first]))
                and _equal_or_none(input_rows(self.plan, self.state, slot_index, first),
                                   input_rows(self.plan, self.state, slot_index, second))
                and _same_config(position.layers[first], position.layers[second]))

    def channel_units(self, position, first, second):
        weights = [_natural_channel_weights(self.plan, self.state, position, t) for t in (first, second)]
        return (all(_equal_or_none(a, b) for a, b in zip(*weights))
                and _same_config(position.layers[first], position.layers[second]))

    def passthrough(self, position, first, second):
        return _same_settings(position.layers[first], position.layers[second])


def _same_config(first, second) -> bool:
    """Equal layer configurations, names aside (the zip state holds the weights)."""
    config_a, config_b = dict(first.get_config()), dict(second.get_config())
    config_a.pop("name", None), config_b.pop("name", None)
    return type(first) is type(second) and config_a == config_b


_KEPT_LAYER_WEIGHTS = 2 ** 20  # weights of a probe layer kept for reuse (4 MB in float32), at most


class _TaskRunner(registry.PositionVisitor):
    """Runs one position of a task's zipped network on its inputs' batches: weighted layers with the
    task's current weights from the zip state, every other layer as it is in the task's model."""

    def __init__(self, plan: graph.ZipPlan, state: state_lib.ZipState, spill: _Spill, calls: tracing.LayerCalls):
        self.plan, self.state, self.spill, self.calls = plan, state, spill, calls
        # (position, task, width, input shape) -> a built layer, for positions computed again and again
        # (AutoSharing's trials, the judge's outputs past the frontier): building one costs more than
        # running it on small inputs. Only small layers are kept; a large one is built each time.
        self._built = {}

    def _layer(self, key: tuple, build, weights: list):
        """A built layer with `weights`: the one kept for `key`, or a new one from `build()`."""
        layer = self._built.get(key)
        if layer is None:
            layer = build()
            if sum(int(np.prod(w.shape)) for w in weights) <= _KEPT_LAYER_WEIGHTS:
                self._built[key] = layer
        layer.set_weights(weights)
        return layer

    def units(self, task, position, values):
        slot_index = self.plan.slot_indices[position.index]
        slot = self.state.slots[slot_index]
        handler, template = position.handler, position.layers[task]
        rows = input_rows(self.plan, self.state, slot_index, task)
        inputs = values[0] if rows is None else _Mapped(values[0], lambda x: tf.gather(x, rows, axis=-1))
        shape = tuple(inputs[0].shape)

        def build():
            layer = handler.build_layer(template, slot.units(task), use_bias=True,
                                        activation=handler.activation(template), name=f"probe_{position.label}")
            layer.build(shape)
            return layer

        layer = self._layer((position.index, task, slot.units(task), shape), build,
                            handler.layer_weights(slot.kernels[task], slot.biases[task]))
        return _call_each(self.spill, self.calls, layer, [inputs])

    def whole_units(self, task, position, values):
        """A recurrent or attention layer with the task's weights: it always reads its whole input."""
        slot = self.state.slots[self.plan.slot_indices[position.index]]
        handler, template = position.handler, position.layers[task]
        layer = handler.build_layer(template, slot.units(task), use_bias=True, activation=None,
                                    name=f"probe_{position.label}")
        keras_graph.call_like(layer, template)  # with the template's masks and flags
        samples = [keras.KerasTensor(v[0].shape, v[0].dtype) for v in values]
        args, kwargs = keras_graph.call_arguments_for(layer, samples if len(samples) > 1 else samples[0])
        layer(*args, **kwargs)  # builds it
        handler.assign(layer, slot.kernels[task], slot.biases[task], state_lib.inner_weights(slot, task))
        return _call_each(self.spill, self.calls, layer, values)

    recurrent_units = attention_units = whole_units

    def channel_units(self, task, position, values):
        handler = position.handler
        kernel, bias = _natural_channel_weights(self.plan, self.state, position, task)
        shape = tuple(values[0][0].shape)

        def build():
            layer = handler.build_layer(position.layers[task], name=f"probe_{position.label}")
            layer.build(shape)
            return layer

        layer = self._layer((position.index, task, shape), build,
                            handler.layer_weights(position.layers[task], kernel, bias))
        return _call_each(self.spill, self.calls, layer, values)

    def passthrough(self, task, position, values):
        return _call_each(self.spill, self.calls, position.layers[task], values)


def _natural_channel_weights(plan: graph.ZipPlan, state: state_lib.ZipState, position, task: str) -> tuple:
    """A per-channel layer's `(kernel, bias)` for the task in the natural layout of its input."""
    channel = state.channels[position.index]
    kernel, bias = channel.kernels[task], channel.biases[task]
    if channel.input_order is not None:  # after a Concatenate: from the state's order to the natural one
        natural = _natural_of_original(plan, state, position.space, task)[channel.input_order[task]]
        state_of_natural = np.argsort(natural)
        kernel, bias = kernel[position.handler.channel_index(state_of_natural)], bias[state_of_natural]
    return kernel, bias


def _call_each(spill: _Spill, calls: tracing.LayerCalls, layer, values: list) -> Batches:
    """`layer` applied batch by batch to its inputs' values (one sequence of batches per input)."""
    with tracing.quiet_retracing():
        return Batches(spill, (calls(layer, batch[0] if len(batch) == 1 else list(batch)) for batch in zip(*values)))


def input_rows(plan: graph.ZipPlan, state: state_lib.ZipState, slot_index: int, task: str):
    """Indices that gather a unit layer's kernel rows from its input in the natural layout, or None where
    the two agree (the model input, a convolution reading a group)."""
    slot_plan, slot = plan.slots[slot_index], state.slots[slot_index]
    space, per_unit = slot_plan.input_space, slot.rows_per_input_unit
    if is_input(space):
        return None
    if not isinstance(space, tuple):
        width = graph.space_width(plan, space, task)
        if per_unit == 1:
            return None
        return state_lib.row_order(np.arange(width), slot.shared_inputs, per_unit)
    natural_of_original = _natural_of_original(plan, state, space, task)
    rows = state_lib.row_order(slot.input_order[task], slot.shared_inputs, per_unit)
    position, unit = np.divmod(rows, natural_of_original.size)
    return position * natural_of_original.size + natural_of_original[unit]


def _natural_of_original(plan: graph.ZipPlan, state: state_lib.ZipState, space: tuple, task: str) -> np.ndarray:
    """Where each original unit of a Concatenate's output (inputs side by side) sits in the natural layout,
    which has each input's units in its current column order. The state orders the units of layers after a
    Concatenate by original units (`input_order`)."""
    natural_of_original, offset = [], 0
    for part in space:
        width = graph.space_width(plan, part, task)
        order = np.arange(width) if is_input(part) else state.slots[plan.groups[part].members[0]].column_order[task]
        inverse = np.empty(width, np.int64)
        inverse[order] = np.arange(width)
        natural_of_original.append(offset + inverse)
        offset += width
    return np.concatenate(natural_of_original)
