"""Pairing the groups of grouped convolutions as blocks, before the units within them are paired.

A grouped convolution (`Conv2D(groups=g)`: ResNeXt, RegNet) is zipped group by group: group k of one model
shares with group k of the other, because a unit may only pair with a unit that reads the same input
channels. Two independently trained models have no reason to hold matching groups at the same index, so
before zipping, each further task's model is rewritten (a copy: the same function, `permute.rewrite`) with
its groups reordered as blocks to line up with the first task's: block m of the copy goes to index k where
the best one-to-one pairing of units between the first model's block k and the copy's block m is the
most correlated, on the grouped layer's input over the calibration data (as ZipIt! and Git Re-Basin pair
features). A grouped layer whose groups cannot move as blocks (`permute.read_layout`) keeps its order.
"""

from __future__ import annotations

import keras
import numpy as np
from absl import logging

from tf_mtz import graph, matching, permute

MAX_ROWS = 16384  # activation rows (pixels of the calibration images) kept per grouped layer


def align_groups(models: dict, plan: graph.ZipPlan, x) -> tuple[dict, dict]:
    """Each task's model after the first with the groups of its grouped convolutions reordered to line up
    with the first task's.

    Args:
        models: task -> Keras model, as given to `zip_models` (never changed).
        plan: `graph.read_models(models)`.
        x: calibration inputs (a batch, or one per model input) on which every model's grouped layers'
            inputs are compared.

    Returns:
        `(models, orders)`: the models, with a rewritten copy in place of each model whose groups moved,
        and `{task: {grouped layer name: block order}}` for those (new group k is the model's group
        `order[k]`).

    A model that cannot be copied or rewritten (a custom layer whose weights' layout no handler states)
    keeps its groups in order, with a logged warning.

    Example:

    ```python
    plan = graph.read_models(models)
    models, orders = align_groups(models, plan, x[:64])
    ```
    """
    if not plan.grouped:
        return models, {}
    first, aligned, orders = plan.tasks[0], dict(models), {}
    for task in plan.tasks[1:]:
        try:
            clone = keras.models.clone_model(models[task])
            clone.set_weights(models[task].get_weights())
            layout = permute.read_layout(models[first], clone)
            block_orders = _block_orders(layout, x)
            moved = {i: order for i, order in block_orders.items() if np.any(order != np.arange(order.size))}
            if moved:
                aligned[task] = permute.rewrite(layout, {}, moved)
        except (ValueError, TypeError, NotImplementedError) as error:
            # A model Keras cannot clone, or a custom layer whose weights' layout no handler states: its groups
            # stay in order, which zips as before.
            logging.warning("tf_mtz: the groups of task '%s' stay in their order (group k with group k): %s", task,
                            error)
            continue
        if not moved:
            continue
        orders[task] = {owner.name: moved[i].tolist() for i, family in enumerate(layout.families) if i in moved
                        for owner in family.owners}
        for name, order in orders[task].items():
            logging.info("tf_mtz: the groups of '%s' in task '%s' line up with task '%s' in the order %s.", name,
                         task, first, order)
    return aligned, orders


def _block_orders(layout: permute.Layout, x) -> dict:
    """`{family index: order}`: per family of `layout`, the order of the copy's blocks that lines them up
    with the reference's, by the optimal assignment of blocks on their units' best pairing summed over the
    family's grouped layers. Each model runs once over `x`, keeping a sample of every grouped layer's input."""
    if not layout.families:
        return {}
    plan, ops = layout.plan, layout.plan.originals["copy"]
    reference_of = {id(position.layers["copy"]): position.layers["reference"] for position in plan.body}
    copy_layers = [ops[index].layer for family in layout.families for index in family.input_ops]
    reference_inputs = graph.run_prefixes(plan, "reference", [reference_of[id(layer)] for layer in copy_layers], x,
                                          reduce=_rows)
    copy_inputs = iter(zip(reference_inputs, graph.run_prefixes(plan, "copy", copy_layers, x, reduce=_rows)))
    orders = {}
    for i, family in enumerate(layout.families):
        blocks = len(family.spaces[0])
        costs = np.zeros((blocks, blocks))
        for _ in family.input_ops:
            a, b = next(copy_inputs)
            costs += block_costs(a, b, blocks)
        rows, cols = matching.match(costs, blocks, "optimal")
        orders[i] = np.empty(blocks, np.int64)
        orders[i][rows] = cols
    return orders


def block_costs(a: np.ndarray, b: np.ndarray, blocks: int) -> np.ndarray:
    """`costs[k, m]`: minus the summed correlation of the best one-to-one pairing between the units of block
    k of `a` and block m of `b` (`(rows, channels)` activations of the same inputs, channels in `blocks`
    equal blocks).

    Example:

    >>> a = np.random.default_rng(0).normal(size=(100, 4))
    >>> np.argmin(block_costs(a, a[:, [2, 3, 0, 1]], 2), axis=1).tolist()
    [1, 0]
    """
    correlation = _standardized(a).T @ _standardized(b) / a.shape[0]
    width = a.shape[1] // blocks
    costs = np.empty((blocks, blocks))
    for k in range(blocks):
        for m in range(blocks):
            block = -correlation[k * width:(k + 1) * width, m * width:(m + 1) * width]
            rows, cols = matching.match(block, width, "optimal")
            costs[k, m] = float(np.sum(block[rows, cols]))
    return costs


def _rows(x) -> np.ndarray:
    """Activations `(..., channels)` as rows of float64: all, or a fixed random `MAX_ROWS` of them, the same
    ones for both models' activations of the same inputs (evenly spaced ones could fall on one column of
    every image)."""
    x = np.asarray(keras.ops.convert_to_numpy(x))
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > MAX_ROWS:
        x = x[np.sort(np.random.default_rng(0).choice(x.shape[0], MAX_ROWS, replace=False))]
    return x.astype(np.float64)


def _standardized(x: np.ndarray) -> np.ndarray:
    """Columns with mean 0 and variance 1 (a constant column stays 0: it correlates with nothing)."""
    centred = x - x.mean(axis=0)
    return centred / np.maximum(centred.std(axis=0), 1e-12)
