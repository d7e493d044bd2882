"""Checking that tf_mtz reads a model right: a copy of it with every hidden unit group randomly permuted.

A model zipped with a unit-permuted copy of itself must reproduce its outputs: the pairing has to find
the permutation, and every layer has to follow it. `permuted_copy` draws the permutation from the unit
groups tf_mtz itself finds (units tied by residual merges permuted alike, per-channel layers and
normalisations following their units, Flatten and Concatenate re-indexing the next layer), so the check
works on any architecture tf_mtz reads, not only on ones whose groups are written down by hand.
"""

from __future__ import annotations

import keras
import numpy as np

from tf_mtz import graph, registry
from tf_mtz import state as state_lib
from tf_mtz.errors import ZipError


def permuted_copy(model: keras.Model, seed: int = 0) -> keras.Model:
    """A copy of `model` computing the same function with the units of every hidden layer permuted.

    Args:
        model: a built Functional or Sequential model that `tf_mtz.zip_models` accepts.
        seed: seed of the permutations.

    Returns:
        A new model of the same architecture (`keras.models.clone_model`) whose weights are `model`'s with
        one random permutation per unit group; the output layer's units keep their order.

    Raises:
        ValueError (`tf_mtz.ZipError`): `model` cannot be zipped, or holds a weighted layer whose units
            this function cannot permute (the message names it).

    Example:

    ```python
    copy = tf_mtz.testing.permuted_copy(model)
    zipped = tf_mtz.zip_models({"a": model, "b": copy}, x)
    np.testing.assert_allclose(zipped.predict(x)["b"], model.predict(x), atol=1e-4)
    ```
    """
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    plan = graph.read_models({"original": model, "copy": clone})
    rng = np.random.default_rng(seed)
    permutations = {group: _group_permutation(plan, group, rng) for group in plan.groups
                    if plan.groups[group].members}
    ops = plan.originals["copy"]
    position_of = {id(position.layers["copy"]): position for position in plan.body}
    heads = {id(plan.slots[output.slot].position.layers["copy"]) for output in plan.outputs}
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

    def order(space) -> np.ndarray | None:
        """The permutation of a unit space's units (None: the model input's, never permuted)."""
        if graph.is_input(space):
            return None
        if isinstance(space, tuple):
            parts, offset = [], 0
            for part in space:
                width = graph.space_width(plan, part, "copy")
                parts.append(offset + (np.arange(width) if graph.is_input(part) else permutations[part]))
                offset += width
            return np.concatenate(parts)
        return permutations[space]

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
        owner.set_weights(_permuted_groups(owner.get_weights(), groups))
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


def randomize_batch_norms(model: keras.Model, seed: int = 0) -> keras.Model:
    """Gives every BatchNormalization of `model` (in place) random, non-trivial statistics and affine
    weights, so that a `permuted_copy` check exercises their folding and merging (fresh layers hold
    mean 0, variance 1, γ 1, β 0, which hide mistakes).

    Args:
        model: a Keras model; its BatchNormalization layers are changed, nothing else.
        seed: seeds the draws (γ and variance uniform in [0.5, 1.5], β and mean normal with sd 0.1).

    Returns:
        `model`.

    Example:

    ```python
    model = tf_mtz.testing.randomize_batch_norms(keras.applications.ResNet50V2(weights=None))
    ```
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            draws = {"gamma": rng.uniform(0.5, 1.5, n), "beta": rng.normal(0, 0.1, n),
                     "moving_mean": rng.normal(0, 0.1, n), "moving_variance": rng.uniform(0.5, 1.5, n)}
            # scale=False or center=False layers (InceptionV3) lack gamma or beta.
            layer.set_weights([draws[w.path.split("/")[-1]] for w in layer.weights])
    return model


def _group_permutation(plan, group, rng) -> np.ndarray:
    """A random order of a unit group's units that keeps apart the runs a member holds apart (a
    Bidirectional layer's directions)."""
    sizes = [graph.group_width(plan, group, "copy")]
    for m in plan.groups[group].members:
        position = plan.slots[m].position
        if isinstance(position.handler, registry.RecurrentHandler):
            sizes = position.handler.unit_blocks(position.layers["copy"])
    starts = np.cumsum([0] + sizes[:-1])
    return np.concatenate([start + rng.permutation(size) for start, size in zip(starts, sizes)])


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
    with their groups, and its heads, and the query/key and value dims within each head, permuted at random
    (the same function)."""
    kernel, bias = handler.kernel_and_bias(layer)
    attention = handler.attention_weights(layer)
    for names, order in ((("query",), inputs), (("key", "value"), memory)):
        if order is not None:
            attention.update({name: attention[name][order] for name in names})
    if outputs is not None:
        kernel, bias = kernel[:, outputs], bias[outputs]
    heads, key_dim = attention["query_bias"].shape
    value_dim = attention["value_bias"].shape[1]
    order = rng.permutation(heads)
    key_dims = np.stack([rng.permutation(key_dim) for _ in range(heads)])
    value_dims = np.stack([rng.permutation(value_dim) for _ in range(heads)])
    state = state_lib.ZipState([state_lib.SlotState({"copy": kernel}, {"copy": bias}, 0, 0, 1,
                                                    attention={"copy": attention})], {})
    state_lib.permute_heads(state, 0, "copy", order, key_dims, value_dims)
    slot = state.slots[0]
    handler.assign(layer, slot.kernels["copy"], slot.biases["copy"], slot.attention["copy"])


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


def _permuted_groups(weights: list, groups: dict) -> list:
    """A grouped convolution's weights with each group's input channels and filters permuted by
    `groups[k] = (input order within group k, filter order within group k)` (None: unchanged)."""
    kernel, rest = weights[0], list(weights[1:])
    per_group = kernel.shape[-1] // len(groups)
    filters = np.arange(kernel.shape[-1])
    kernel = kernel.copy()
    for k, (inputs, outputs) in groups.items():
        columns = slice(k * per_group, (k + 1) * per_group)
        block = kernel[..., columns]
        if inputs is not None:
            block = block[..., inputs, :]
        if outputs is not None:
            block = block[..., outputs]
            filters[columns] = k * per_group + outputs
        kernel[..., columns] = block
    return [kernel] + [w[filters] for w in rest]


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
