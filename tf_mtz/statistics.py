"""Layer statistics: the layer-wise Hessian H = E[x̃ x̃ᵀ] of each task, streamed over calibration batches.

Memory is O(d²) per task and layer: each batch's Gram matrix is added to a float64 accumulator and the
activations are dropped. Samples are the layer's input vectors with a constant 1 appended for the bias
(for convolutions: im2col patches or channel vectors, see `Conv2DHandler`).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_mtz.registry import ZipError


@dataclasses.dataclass
class LayerHessian:
    """The (features + 1)² Hessian of one task at one layer, bias last, and how many samples built it."""

    matrix: np.ndarray
    samples: int

    @property
    def rank_deficient(self) -> bool:
        return self.samples < self.matrix.shape[0]


def layer_hessian(probe: keras.Model, dataset: tf.data.Dataset, sample_fn, *, task: str,
                  layer_name: str, is_first_layer: bool, strategy=None) -> LayerHessian:
    """Streams `dataset` through `probe` (input -> this layer's shared input) and returns the Hessian.

    Args:
        probe: model mapping the zipped network's input to the part of the layer's input that is shared.
        dataset: batches of that task's calibration inputs.
        sample_fn: maps a batch of probe outputs to a `(samples, features)` matrix.
        strategy: optional `tf.distribute.Strategy`: each batch is split across its replicas and their
            Gram matrices are summed, so the result equals the single-device one up to rounding.

    Raises:
        ZipError: when the data is empty or produces NaN/Inf.
    """

    def replica_gram(x):
        samples = sample_fn(probe(x, training=False))
        samples = tf.cast(samples, tf.float32)
        ones = tf.ones_like(samples[:, :1])
        augmented = tf.concat([samples, ones], axis=1)
        return tf.matmul(augmented, augmented, transpose_a=True), tf.shape(samples)[0]

    if strategy is None:
        batch_gram = tf.function(replica_gram, reduce_retracing=True)
    else:
        dataset = strategy.experimental_distribute_dataset(dataset)

        @tf.function(reduce_retracing=True)
        def batch_gram(x):
            grams, counts = strategy.run(replica_gram, args=(x,))
            total = tf.distribute.ReduceOp.SUM
            return strategy.reduce(total, grams, axis=None), strategy.reduce(total, counts, axis=None)

    gram = None
    count = 0
    for batch in dataset:
        g, n = batch_gram(batch)
        g = g.numpy().astype(np.float64)
        gram = g if gram is None else gram + g
        count += int(n)
    if gram is None or count == 0:
        raise ZipError(f"Calibration data for task '{task}' is empty.")
    if not np.isfinite(gram).all():
        if is_first_layer:
            raise ZipError(f"Calibration data for task '{task}' contains NaN or Inf values.")
        raise ZipError(f"The input of layer '{layer_name}' became NaN or Inf for task '{task}'; check the "
                       "model's weights and the calibration data's scale.")
    return LayerHessian(gram / count, count)


def damped(hessian: np.ndarray, damping: float) -> np.ndarray:
    """Adds λI with λ = damping · trace(H)/dim, floored so an all-zero Hessian stays invertible."""
    dim = hessian.shape[0]
    scale = max(float(np.trace(hessian)) / dim, 1e-12)
    return hessian + (damping * scale + 1e-12 * scale) * np.eye(dim)
