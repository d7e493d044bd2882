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

from tf_mtz import graph, permute, registry


def permuted_copy(model: keras.Model, seed: int = 0) -> keras.Model:
    """A copy of `model` computing the same function with the units of every hidden layer permuted.

    Args:
        model: a built Functional or Sequential model that `tf_mtz.zip_models` accepts.
        seed: seed of the permutations.

    Returns:
        A new model of the same architecture (`keras.models.clone_model`) whose weights are `model`'s with
        one random permutation per unit group, and the groups of each grouped convolution in a random
        order (moved as blocks with the channels they read and write); the output layer's units keep their
        order.

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
    layout = permute.read_layout(model, clone)
    plan = layout.plan
    rng = np.random.default_rng(seed)
    permutations = {group: _group_permutation(plan, group, rng) for group in plan.groups
                    if plan.groups[group].members}
    block_orders = {i: rng.permutation(len(family.spaces[0])) for i, family in enumerate(layout.families)}
    return permute.rewrite(layout, permutations, block_orders, rng)


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
