"""Rewriting a model's weights so that it computes the same function with its units in another order.

The unit spaces are the ones the graph reader finds (units tied by residual merges reordered alike,
per-channel layers and normalisations following their units, Flatten and Concatenate re-indexing the
next layer). Two kinds of reordering compose:

- a permutation of the units of a space (`permutations`), as `tf_mtz.testing.permuted_copy` draws them;
- a reordering of the groups of a grouped convolution as blocks (`block_orders`): its input channels,
  its groups and its output channels move a whole group at a time, together with every layer writing or
  reading those channels. `group_pairing` uses it to line up one model's groups with another's before
  zipping, which pairs group k with group k.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tf_mtz import graph, registry
from tf_mtz import state as state_lib
from tf_mtz.errors import ZipError


@dataclasses.dataclass
class BlockFamily:
    """Unit spaces that move as blocks together: the input channel blocks of one or more grouped
    convolutions and their output blocks, one space per group, in group order (`spaces[i]` is a tuple of
    the g block spaces). All share one block order."""

    spaces: list  # tuples of block spaces
    owners: list  # the grouped convolutions (layers of the copy) whose groups follow the order
    # op indices of the copy, per owner: the ops whose input is the grouped layer's whole input (the
    # first group's channel slice), where the reference's activations are read
    input_ops: list


@dataclasses.dataclass
class Layout:
    """What a rewrite of `clone` reads: the plan of (reference, clone), the clone's ops and each op's unit
    space, and the block families it may reorder."""

    plan: graph.ZipPlan
    clone: keras.Model
    spaces: dict  # op index of the clone -> its output's unit space (a tuple for a concatenation)
    families: list  # BlockFamily


def read_layout(reference: keras.Model, clone: keras.Model) -> Layout:
    """Reads `clone` (a model of the same architecture as `reference`) as the task "copy" of a plan with
    `reference` as the task "reference".

    Raises:
        ValueError (`tf_mtz.ZipError`): the models cannot be zipped together.
    """
    plan = graph.read_models({"reference": reference, "copy": clone})
    ops = plan.originals["copy"]
    position_of = {id(position.layers["copy"]): position for position in plan.body}
    blocks_of = {}  # a layer tf_mtz cut into column blocks -> their unit spaces, in column order
    for position in plan.body:
        owner = plan.split_layers.get(id(position.layers["copy"]))
        if owner is not None:
            space = position.space
            blocks_of.setdefault(id(owner), []).extend(space if isinstance(space, tuple) else (space,))
    spaces = {graph.input_ref(k): graph.input_ref(k) for k in range(len(plan.inputs))}
    for index, op in enumerate(ops):
        position = position_of.get(id(op.layer))
        if id(op.layer) in blocks_of:
            spaces[index] = tuple(blocks_of[id(op.layer)])
        else:
            # A folded BatchNormalization (and anything after the head) keeps the units of what feeds it.
            spaces[index] = position.space if position is not None else spaces[op.parents[0]]
    return Layout(plan, clone, spaces, _block_families(plan, ops, spaces))


def _block_families(plan, ops, spaces) -> list:
    """The grouped convolutions whose groups can move as blocks, as families sharing one block order.

    A grouped layer qualifies where each group reads a unit space of its own and writes one, and every
    other operation sees those spaces only inside a concatenation holding all of them, in group order
    (then moving the blocks is a permutation of that concatenation). A grouped layer whose groups read
    parts of a finer cut, or whose blocks something reads one by one, keeps its groups in order."""
    heads = {id(plan.slots[output.slot].position.layers["copy"]) for output in plan.outputs}
    by_owner = {}
    for index, op in enumerate(ops):
        if id(op.layer) in plan.grouped:
            owner, k = plan.grouped[id(op.layer)]
            by_owner.setdefault(id(owner), (owner, {}))[1][k] = index
    candidates = []  # (owner, input blocks, output blocks, the ops allowed to hold one block alone)
    for owner, convs in by_owner.values():
        order = [convs[k] for k in sorted(convs)]
        slices = [ops[c].parents[0] for c in order]
        inputs, outputs = tuple(spaces[s] for s in slices), tuple(spaces[c] for c in order)
        singles = [b for b in inputs + outputs if isinstance(b, tuple) or graph.is_input(b)]
        if singles or len(set(inputs)) < len(inputs) or len(set(outputs)) < len(outputs) or any(
                id(ops[c].layer) in heads for c in order):
            continue
        candidates.append((owner, inputs, outputs, set(slices) | set(order), slices[0]))
    alone = {}  # a block space -> the op indices holding it alone
    for index, space in spaces.items():
        if not isinstance(space, tuple) and not graph.is_input(space):
            alone.setdefault(space, set()).add(index)
    concatenations = {space for space in spaces.values() if isinstance(space, tuple)}

    def movable(blocks: tuple, allowed: set) -> bool:
        if any(alone.get(b, set()) - allowed for b in blocks):
            return False
        for whole in concatenations:
            found = [i for i, part in enumerate(whole) if part in blocks]
            if found and (len(found) != len(blocks) or whole[found[0]:found[0] + len(blocks)] != blocks):
                return False
        return True

    # Families joined where one grouped layer's outputs are another's inputs, or two read the same blocks.
    families = []
    for owner, inputs, outputs, held, first_slice in candidates:
        joined = [f for f in families if inputs in f.spaces or outputs in f.spaces]
        family = BlockFamily([inputs, outputs], [owner], [first_slice])
        for other in joined:
            families.remove(other)
            family.spaces += other.spaces
            family.owners += other.owners
            family.input_ops += other.input_ops
        family.spaces = list(dict.fromkeys(family.spaces))
        families.append(family)
    allowed = {}
    for owner, inputs, outputs, held, _ in candidates:
        for blocks in (inputs, outputs):
            allowed.setdefault(blocks, set()).update(held)
    every_block = [b for family in families for blocks in family.spaces for b in blocks]
    shared_blocks = {b for b in every_block if every_block.count(b) > 1}
    return [family for family in families
            if all(movable(blocks, allowed[blocks]) and not shared_blocks & set(blocks) for blocks in family.spaces)]


def rewrite(layout: Layout, permutations: dict | None = None, block_orders: dict | None = None,
            rng: np.random.Generator | None = None) -> keras.Model:
    """Sets the weights of `layout.clone` (holding the weights it was read with) so that it computes the
    same function with its units reordered.

    Args:
        layout: from `read_layout`.
        permutations: unit space -> the order of its units (new unit j is old unit `order[j]`); spaces
            left out keep their order.
        block_orders: index into `layout.families` -> the order of that family's blocks (new block k is old
            block `order[k]`, with its units in the order `permutations` gives them).
        rng: where given, every attention layer's heads (and the dims within them) are permuted at random
            too.

    Returns:
        `layout.clone`.

    Raises:
        ValueError (`tf_mtz.ZipError`): a weighted layer whose units this cannot reorder (the message names
            it).
    """
    plan, clone, spaces = layout.plan, layout.clone, layout.spaces
    permutations, block_orders = permutations or {}, block_orders or {}
    moved = {blocks: np.asarray(block_orders[i]) for i, family in enumerate(layout.families) if i in block_orders
             for blocks in family.spaces}
    group_orders = {id(owner): np.asarray(block_orders[i]) for i, family in enumerate(layout.families)
                    if i in block_orders for owner in family.owners}
    ops = plan.originals["copy"]
    heads = {id(plan.slots[output.slot].position.layers["copy"]) for output in plan.outputs}

    def units(space) -> np.ndarray:
        width = graph.space_width(plan, space, "copy")
        return np.arange(width) if graph.is_input(space) else permutations.get(space, np.arange(width))

    def order(space) -> np.ndarray | None:
        """The new order of a unit space's units (None: the model input's, never reordered)."""
        if graph.is_input(space):
            return None
        if not isinstance(space, tuple):
            return units(space)
        segments, offset = [], 0
        for part in space:
            segments.append(offset + units(part))
            offset += graph.space_width(plan, part, "copy")
        for blocks, block_order in moved.items():
            if blocks[0] in space:
                start = space.index(blocks[0])
                run = segments[start:start + len(blocks)]
                segments[start:start + len(blocks)] = [run[k] for k in block_order]
        return np.concatenate(segments)

    separable, grouped = {}, {}
    for index, op in enumerate(ops):
        layer, weights = op.layer, op.layer.get_weights()
        if not weights:
            continue
        inputs = order(spaces[op.parents[0]])
        outputs = None if id(layer) in heads else order(spaces[index])
        owner = _separable_owner(clone, layer)
        if owner is not None:
            separable.setdefault(owner.name, {})[layer.name] = (inputs, outputs)
            continue
        if id(layer) in plan.grouped:  # one group of a grouped convolution of the clone
            owner, group = plan.grouped[id(layer)]
            grouped.setdefault(id(owner), (owner, {}))[1][group] = (inputs, outputs)
            continue
        handler = registry.handler_for(layer)
        if isinstance(handler, registry.RecurrentHandler):
            _permute_recurrent(handler, layer, inputs, outputs)
            continue
        if isinstance(handler, registry.AttentionHandler):
            memory = order(spaces[op.parents[1]]) if handler.reads_memory(layer) else inputs
            _permute_attention(handler, layer, inputs, memory, outputs, rng)
            continue
        layer.set_weights(_permuted_weights(layer, weights, inputs, outputs, spaces[index]))
    for owner, groups in grouped.values():
        owner.set_weights(_permuted_groups(owner.get_weights(), groups, group_orders.get(id(owner))))
    for name, parts in separable.items():
        owner = clone.get_layer(name)
        (inputs, _), (_, outputs) = parts[f"{name}_depthwise"], parts[f"{name}_pointwise"]
        depthwise, pointwise, *bias = owner.get_weights()
        if inputs is not None:
            depthwise, pointwise = depthwise[..., inputs, :], pointwise[..., inputs, :]
        if outputs is not None:
            pointwise, bias = pointwise[..., outputs], [b[outputs] for b in bias]
        owner.set_weights([depthwise, pointwise, *bias])
    return clone


def _permute_recurrent(handler, layer, inputs, outputs) -> None:
    kernel, bias = handler.kernel_and_bias(layer)
    recurrent = handler.recurrent_weights(layer)
    if inputs is not None:
        kernel = kernel[..., inputs, :]
    if outputs is not None:
        kernel, bias = kernel[..., outputs], bias[outputs]
        recurrent = state_lib.permuted_recurrent(recurrent, outputs)
    handler.assign(layer, kernel, bias, recurrent)


def _permute_attention(handler, layer, inputs, memory, outputs, rng) -> None:
    """An attention layer's inputs (its query's `inputs`, its key's and value's `memory`) and outputs permuted
    with their groups, and, with `rng`, its heads and the query/key and value dims within each head permuted
    at random (the same function)."""
    kernel, bias = handler.kernel_and_bias(layer)
    attention = handler.attention_weights(layer)
    for names, order in ((("query",), inputs), (("key", "value"), memory)):
        if order is not None:
            attention.update({name: attention[name][order] for name in names})
    if outputs is not None:
        kernel, bias = kernel[:, outputs], bias[outputs]
    if rng is not None:
        heads, key_dim = attention["query_bias"].shape
        value_dim = attention["value_bias"].shape[1]
        order = rng.permutation(heads)
        key_dims = np.stack([rng.permutation(key_dim) for _ in range(heads)])
        value_dims = np.stack([rng.permutation(value_dim) for _ in range(heads)])
        state = state_lib.ZipState([state_lib.SlotState({"copy": kernel}, {"copy": bias}, 0, 0, 1,
                                                        attention={"copy": attention})], {})
        state_lib.permute_heads(state, 0, "copy", order, key_dims, value_dims)
        slot = state.slots[0]
        kernel, bias, attention = slot.kernels["copy"], slot.biases["copy"], slot.attention["copy"]
    handler.assign(layer, kernel, bias, attention)


def _permuted_weights(layer, weights: list, inputs, outputs, space) -> list:
    handler = registry.handler_for(layer)
    if registry.has_units(handler):
        kernel, rest = handler.layout_kernel(weights[0]), weights[1:]
        if inputs is not None:
            per_unit = kernel.shape[-2] // inputs.size  # spatial positions a Flatten folded in
            rows = (np.arange(per_unit)[:, None] * inputs.size + inputs[None, :]).reshape(-1)
            kernel = kernel[..., rows, :]
        if outputs is not None:
            kernel, rest = kernel[..., outputs], [w[outputs] for w in rest]
        return handler.layer_weights(kernel, *rest)
    if graph.is_input(space):
        return weights  # preprocessing before the first unit layer: the same for every task
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [weights[0][..., outputs, :], *[w[outputs] for w in weights[1:]]]
    if registry.is_depthwise_grouped(layer):  # Conv2D(groups=C): kernel (kh, kw, 1, C)
        return [weights[0][..., outputs], *[w[outputs] for w in weights[1:]]]
    if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
        return [w[outputs] for w in weights]
    permuted = (handler.permuted_weights(layer, weights, outputs) if isinstance(handler, registry.ChannelUnitsHandler)
                else None)  # a custom per-channel layer (LayerScale, a position table)
    if permuted is not None:
        return permuted
    raise ZipError(f"permuted_copy cannot permute the weights of layer '{layer.name}' "
                   f"({type(layer).__name__}): their layout is unknown; a handler of its own can say it "
                   "(ChannelUnitsHandler.permuted_weights).")


def _permuted_groups(weights: list, groups: dict, group_order=None) -> list:
    """A grouped convolution's weights with each group's input channels and filters permuted by
    `groups[k] = (input order within group k, filter order within group k)` (None: unchanged), and with
    `group_order` its groups reordered as blocks (new group k is old group `group_order[k]`)."""
    kernel, rest = weights[0], list(weights[1:])
    count = len(groups)
    per_group = kernel.shape[-1] // count
    group_order = np.arange(count) if group_order is None else group_order
    filters = np.arange(kernel.shape[-1])
    permuted = kernel.copy()
    for k, old in enumerate(group_order):
        inputs, outputs = groups[old]
        block = kernel[..., old * per_group:(old + 1) * per_group]
        within = np.arange(per_group) if outputs is None else outputs
        if inputs is not None:
            block = block[..., inputs, :]
        permuted[..., k * per_group:(k + 1) * per_group] = block[..., within]
        filters[k * per_group:(k + 1) * per_group] = old * per_group + within
    return [permuted] + [w[filters] for w in rest]


def _separable_owner(clone, layer):
    """The SeparableConv2D of `clone` that tf_mtz split into `layer` (its depthwise or pointwise part)."""
    for suffix in ("_depthwise", "_pointwise"):
        if layer.name.endswith(suffix):
            try:
                owner = clone.get_layer(layer.name[:-len(suffix)])
            except ValueError:
                continue
            if isinstance(owner, keras.layers.SeparableConv2D):
                return owner
    return None
