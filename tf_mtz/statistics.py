"""Layer statistics: the layer-wise Hessian H = E[x̃ x̃ᵀ] of each task, streamed over calibration batches.

Memory is O(d²) per task and layer: each batch's Gram matrix is added to a float64 accumulator and the
activations are dropped. With fewer samples than features (64 images against VGG-16's 25,089 fc6
inputs) the samples themselves are kept instead, H = UᵀU with U = X̃/√n, which is smaller than the
matrix; everything downstream then works in U's row space (`LowRankHessian`, Woodbury identities). Samples are the layer's input vectors with a constant 1 appended for the bias
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
    """The (features + 1)² Hessian of one task at one layer, bias last, and how many samples built it.

    Either `matrix` is set, or (fewer samples than features) `factor`, with H = factorᵀ factor.
    """

    matrix: np.ndarray | None
    samples: int
    factor: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return (self.matrix if self.matrix is not None else self.factor).shape[-1]

    @property
    def rank_deficient(self) -> bool:
        return self.samples < self.dim

    def dense(self) -> np.ndarray:
        return self.matrix if self.matrix is not None else self.factor.T @ self.factor


class LowRankHessian:
    """A damped Hessian UᵀU + λI kept as its factor U `(rank, dim)` and λ, never formed."""

    def __init__(self, factor: np.ndarray, damping: float):
        self.factor = np.asarray(factor, np.float64)
        self.damping = float(damping)

    @property
    def shape(self) -> tuple:
        return (self.factor.shape[1], self.factor.shape[1])

    def dense(self) -> np.ndarray:
        return self.factor.T @ self.factor + self.damping * np.eye(self.shape[0])

    def matmul(self, w: np.ndarray) -> np.ndarray:
        """H @ w for a `(dim, n)` matrix, in O(rank·dim·n)."""
        return self.factor.T @ (self.factor @ w) + self.damping * w

    def __add__(self, other):
        if isinstance(other, LowRankHessian):
            return LowRankHessian(np.concatenate([self.factor, other.factor]), self.damping + other.damping)
        return self.dense() + other

    __radd__ = __add__


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

    def replica_samples(x):
        samples = tf.cast(sample_fn(probe(x, training=False)), tf.float32)
        return tf.concat([samples, tf.ones_like(samples[:, :1])], axis=1)

    def replica_gram(x):
        augmented = replica_samples(x)
        return tf.matmul(augmented, augmented, transpose_a=True), tf.shape(augmented)[0]

    gram, kept, count = None, [], 0
    if strategy is None:
        batch_samples = tf.function(replica_samples, reduce_retracing=True)
        for batch in dataset:
            augmented = batch_samples(batch)
            n, dim = int(augmented.shape[0]), int(augmented.shape[1])
            if gram is None and count + n < dim:
                kept.append(augmented.numpy())  # fewer samples than features so far: keep them, not XᵀX
            else:
                if gram is None:
                    gram = np.zeros((dim, dim))
                    for earlier in kept:
                        gram += (tf.matmul(earlier, earlier, transpose_a=True)).numpy()
                    kept = []
                gram += tf.matmul(augmented, augmented, transpose_a=True).numpy().astype(np.float64)
            count += n
    else:
        dataset = strategy.experimental_distribute_dataset(dataset)

        @tf.function(reduce_retracing=True)
        def batch_gram(x):
            grams, counts = strategy.run(replica_gram, args=(x,))
            total = tf.distribute.ReduceOp.SUM
            return strategy.reduce(total, grams, axis=None), strategy.reduce(total, counts, axis=None)

        for batch in dataset:
            g, n = batch_gram(batch)
            g = g.numpy().astype(np.float64)
            gram = g if gram is None else gram + g
            count += int(n)
    if count == 0:
        raise ZipError(f"Calibration data for task '{task}' is empty.")
    factor = None
    if gram is None:
        factor = np.concatenate(kept).astype(np.float64) / np.sqrt(count)
    if not np.isfinite(gram if gram is not None else factor).all():
        if is_first_layer:
            raise ZipError(f"Calibration data for task '{task}' contains NaN or Inf values.")
        raise ZipError(f"The input of layer '{layer_name}' became NaN or Inf for task '{task}'; check the "
                       "model's weights and the calibration data's scale.")
    if factor is not None:
        return LayerHessian(None, count, factor)
    return LayerHessian(gram / count, count)


def damped(hessian, damping: float):
    """Adds λI with λ = damping · trace(H)/dim, floored so an all-zero Hessian stays invertible.

    Takes a matrix or a `LayerHessian`; a low-rank one gives a `LowRankHessian` (with a floor on λ of
    1e-9 · trace/dim, since its unseen directions have no curvature at all).
    """
    if isinstance(hessian, LayerHessian):
        if hessian.factor is None:
            hessian = hessian.matrix
        else:
            factor = hessian.factor
            scale = max(float(np.sum(factor * factor)) / factor.shape[1], 1e-12)
            return LowRankHessian(factor, damping * scale + 1e-9 * scale)
    dim = hessian.shape[0]
    scale = max(float(np.trace(hessian)) / dim, 1e-12)
    return hessian + (damping * scale + 1e-12 * scale) * np.eye(dim)
