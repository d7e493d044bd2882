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

from tf_mtz import tracing
from tf_mtz.errors import ZipError


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

    def quadratic(self, w: np.ndarray) -> np.ndarray:
        """wᵀHw per column of a `(dim, n)` matrix, as ‖Uw‖² + λ‖w‖²: no `(dim, n)` temporaries."""
        projected = self.factor @ w
        return np.einsum("rn,rn->n", projected, projected) + self.damping * np.einsum("dn,dn->n", w, w)

    def __add__(self, other):
        if isinstance(other, LowRankHessian):
            return LowRankHessian(np.concatenate([self.factor, other.factor]), self.damping + other.damping)
        return self.dense() + other

    __radd__ = __add__


class TokenHessian:
    """The Hessian of a layer whose inputs are token ids (an Embedding): its input is the one-hot e_v of
    token v, so H = E[e_v e_vᵀ] = diag(f), the tokens' frequencies, kept as f and a damping λ (H + λI). An
    Embedding has no bias: its bias coordinate (last, as for every layer) is a dummy with curvature 1,
    decoupled, so that merges keep it at 0. Diagonal, so the pair costs and the merge are per token."""

    def __init__(self, frequencies: np.ndarray, samples: int, damping: float = 0.0, bias_curvature: float = 1.0):
        self.frequencies = np.asarray(frequencies, np.float64)
        self.samples, self.damping, self.bias_curvature = int(samples), float(damping), float(bias_curvature)
        self.factor = None  # not a low-rank LayerHessian

    @property
    def dim(self) -> int:
        return len(self.frequencies) + 1

    @property
    def shape(self) -> tuple:
        return (self.dim, self.dim)

    @property
    def rank_deficient(self) -> bool:
        return False  # an unseen token has no curvature, and its embedding does not matter on this data

    def diagonal(self) -> np.ndarray:
        return np.append(self.frequencies, self.bias_curvature) + self.damping

    def dense(self) -> np.ndarray:
        return np.diag(self.diagonal())

    def damped(self, damping: float) -> "TokenHessian":
        """H + λI with λ = damping · trace(H)/dim, as `damped` does for a matrix."""
        scale = max(float(self.frequencies.sum() + self.bias_curvature) / self.dim, 1e-12)
        return TokenHessian(self.frequencies, self.samples, self.damping + damping * scale + 1e-12 * scale,
                            self.bias_curvature)

    def quadratic(self, w: np.ndarray) -> np.ndarray:
        """wᵀHw per column of a `(dim, n)` matrix."""
        w = np.asarray(w, np.float64)
        return self.diagonal() @ (w * w)

    def matmul(self, w: np.ndarray) -> np.ndarray:
        """H @ w for a `(dim, n)` matrix."""
        return self.diagonal()[:, None] * np.asarray(w, np.float64)

    def __add__(self, other):
        if isinstance(other, TokenHessian):
            return TokenHessian(self.frequencies + other.frequencies, self.samples + other.samples,
                                self.damping + other.damping, self.bias_curvature + other.bias_curvature)
        return self.dense() + other

    __radd__ = __add__


def token_hessian(batches: list, vocabulary: int, *, task: str, layer_name: str) -> TokenHessian:
    """The `TokenHessian` of an Embedding's token ids, already computed as a list of batches.

    Raises:
        ZipError: ids outside [0, vocabulary) or not whole numbers, empty data.
    """
    counts = np.zeros(vocabulary, np.float64)
    for batch in batches:
        ids = np.asarray(batch).reshape(-1)
        if ids.size and (not np.all(np.equal(np.mod(ids, 1), 0)) or ids.min() < 0 or ids.max() >= vocabulary):
            raise ZipError(f"Calibration data for task '{task}' holds token ids outside 0..{vocabulary - 1} (or not "
                           f"whole numbers) for layer '{layer_name}', which embeds {vocabulary} tokens.")
        counts += np.bincount(ids.astype(np.int64), minlength=vocabulary)
    total = counts.sum()
    if total == 0:
        raise ZipError(f"Calibration data for task '{task}' is empty.")
    return TokenHessian(counts / total, int(total))


class StreamedGram:
    """Σ XᵀX (and Σ XᵀT when targets come along) over batches of rows X, or, while there are fewer rows
    than columns, the rows themselves: whichever is smaller, so memory stays within one d×d matrix."""

    def __init__(self):
        self.gram = self.cross = None
        self.count = 0
        self._rows, self._targets = [], []

    @property
    def low_rank(self) -> bool:
        return self.gram is None

    def add(self, rows, targets=None) -> None:
        n, dim = int(rows.shape[0]), int(rows.shape[1])
        if self.gram is None and self.count + n < dim:
            self._rows.append(np.asarray(rows, np.float64))
            if targets is not None:
                self._targets.append(np.asarray(targets, np.float64))
        else:
            if self.gram is None:
                self.gram = np.zeros((dim, dim))
                if targets is not None:
                    self.cross = np.zeros((dim, int(targets.shape[1])))
                for kept, kept_targets in zip(self._rows, self._targets or [None] * len(self._rows)):
                    self.gram += kept.T @ kept
                    if kept_targets is not None:
                        self.cross += kept.T @ kept_targets
                self._rows, self._targets = [], []
            self.gram += tf.matmul(rows, rows, transpose_a=True).numpy().astype(np.float64)
            if targets is not None:
                self.cross += tf.matmul(rows, targets, transpose_a=True).numpy().astype(np.float64)
        self.count += n

    def add_moments(self, gram, cross, count: int) -> None:
        """Adds an already formed XᵀX and XᵀT of `count` rows (once the rows outnumber the columns)."""
        if self._rows:
            raise AssertionError("Internal error: moments added to a Gram that still keeps its rows.")
        if self.gram is None:
            self.gram, self.cross = np.array(gram, np.float64), np.array(cross, np.float64)  # writable copies
        else:  # in place: a 3x3x512 layer's Gram is 170 MB in float64
            self.gram += np.asarray(gram, np.float64)
            self.cross += np.asarray(cross, np.float64)
        self.count += count

    def add_gram(self, gram, count: int) -> None:
        """Adds an already reduced XᵀX of `count` rows (from several replicas)."""
        if self.gram is None:
            self.gram = np.array(gram, np.float64)  # a writable copy
        else:
            self.gram += np.asarray(gram, np.float64)
        self.count += count

    def rows(self) -> np.ndarray:
        return np.concatenate(self._rows)

    def targets(self) -> np.ndarray:
        return np.concatenate(self._targets)


def layer_hessian(probe: keras.Model, dataset: tf.data.Dataset, sample_fn, *, task: str,
                  layer_name: str, is_first_layer: bool, strategy=None) -> LayerHessian:
    """Streams `dataset` through `probe` (input -> this layer's shared input) and returns the Hessian.

    Args:
        probe: model (or function) mapping the network's input to the part of the layer's input that is
            shared.
        dataset: batches of that task's calibration inputs.
        sample_fn: maps a batch of probe outputs to a `(samples, features)` matrix.
        strategy: optional `tf.distribute.Strategy`: each batch is split across its replicas and their
            Gram matrices are summed, so the result equals the single-device one up to rounding.

    Raises:
        ZipError: when the data is empty or produces NaN/Inf.
    """

    def replica_samples(x):
        return augment(sample_fn(probe(x, training=False)))

    accumulated = StreamedGram()
    if strategy is None:
        batch_samples = tf.function(replica_samples, reduce_retracing=True)
        for batch in dataset:
            accumulated.add(batch_samples(batch))
    else:
        _add_distributed(accumulated, dataset, replica_samples, strategy)
    return _finish(accumulated, task, layer_name, is_first_layer)


def hessian_of_inputs(batches: list, sample_fn, *, task: str, layer_name: str, is_first_layer: bool,
                      strategy=None) -> LayerHessian:
    """The Hessian of a layer from its (shared) inputs, already computed as a list of batches.

    Args and Raises: as for `layer_hessian`, with `batches` in place of the probe and dataset.
    """
    accumulated = StreamedGram()
    if strategy is None:
        for batch in batches:
            accumulated.add(augment(sample_fn(batch)))
    else:
        # The probe's batches one at a time (they may be spilled to disk), as the dataset's batches.
        first = batches[0]
        dataset = tf.data.Dataset.from_generator(
            lambda: iter(batches), output_signature=tf.TensorSpec((None,) + tuple(first.shape[1:]), first.dtype))
        _add_distributed(accumulated, dataset, lambda x: augment(sample_fn(x)), strategy)
    return _finish(accumulated, task, layer_name, is_first_layer)


def augment(samples):
    """Samples with the constant 1 of the bias appended."""
    samples = tf.cast(samples, tf.float32)
    return tf.concat([samples, tf.ones_like(samples[:, :1])], axis=1)


def _add_distributed(accumulated: "StreamedGram", dataset, replica_samples, strategy) -> None:
    def replica_gram(x):
        augmented = replica_samples(x)
        return tf.matmul(augmented, augmented, transpose_a=True), tf.shape(augmented)[0]

    @tf.function(reduce_retracing=True)
    def batch_gram(x):
        grams, counts = strategy.run(replica_gram, args=(x,))
        total = tf.distribute.ReduceOp.SUM
        return strategy.reduce(total, grams, axis=None), strategy.reduce(total, counts, axis=None)

    for batch in strategy.experimental_distribute_dataset(dataset):
        g, n = batch_gram(batch)
        accumulated.add_gram(g.numpy(), int(n))


def _finish(accumulated: "StreamedGram", task: str, layer_name: str, is_first_layer: bool) -> LayerHessian:
    count, gram = accumulated.count, accumulated.gram
    if count == 0:
        raise ZipError(f"Calibration data for task '{task}' is empty.")
    factor = accumulated.rows() / np.sqrt(count) if accumulated.low_rank else None
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
    if isinstance(hessian, TokenHessian):
        return hessian.damped(damping)
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


def vector_moments(samples: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(X̃ᵀX̃, X̃ᵀT)` (float64) of samples X `(n, d)` augmented with a constant 1 (bias last), without
    forming X̃: [[XᵀX, Xᵀ1], [1ᵀX, n]] and [[XᵀT], [1ᵀT]], products in the samples' precision, sums in
    float64. One traced function per shape (`tracing.PerGeometry`): TensorFlow then fuses the casts and
    sums that run eagerly as passes of their own."""
    key = (tuple(int(v) for v in samples.shape), tuple(int(v) for v in targets.shape), samples.dtype, targets.dtype)
    return _VECTOR_FUNCTIONS.run(key, lambda: _vector_moments, samples, targets)


def _vector_moments(samples, targets):
    targets = tf.cast(targets, samples.dtype)
    sums = _sum64(samples, axis=0)
    count = tf.cast(tf.shape(samples)[0], tf.float64)
    gram = tf.concat([tf.concat([_to64(tf.matmul(samples, samples, transpose_a=True)), sums[:, None]], axis=1),
                      tf.concat([sums, count[None]], axis=0)[None]], axis=0)
    cross = tf.concat([_to64(tf.matmul(samples, targets, transpose_a=True)), _sum64(targets, axis=0)[None]], axis=0)
    return gram, cross


def _to64(x):
    return tf.cast(x, tf.float64)


_SUM_BLOCK = 1024


def _sum64(x, axis):
    """A sum over axis 0 in float64 precision: TensorFlow's float32 reduction of 10⁵–10⁶ values drifts by
    1e-4 relative, which moves the bias row of a Gram matrix and, through it, the refit (measured on the
    residual MNIST pair). Blocks of 1,024 rows are summed in float32 (relative error ~1e-7) and the block
    sums in float64: no float64 copy of the whole tensor, which cost as much as the products at 224x224."""
    if axis != 0:
        raise AssertionError("Internal error: _sum64 sums over axis 0.")
    rows = int(x.shape[0])
    if rows <= _SUM_BLOCK:
        return tf.cast(tf.reduce_sum(x, axis=0), tf.float64)
    whole = rows - rows % _SUM_BLOCK
    blocks = tf.reshape(x[:whole], (whole // _SUM_BLOCK, _SUM_BLOCK) + tuple(x.shape[1:]))
    total = tf.reduce_sum(tf.cast(tf.reduce_sum(blocks, axis=1), tf.float64), axis=0)
    if whole < rows:
        total += tf.cast(tf.reduce_sum(x[whole:], axis=0), tf.float64)
    return total


def structured_patches_pay(grid: tuple, kernel: tuple) -> bool:
    """Whether `patch_gram` beats the plain im2col Gram for a stride-1 convolution with this output grid and
    kernel: the rows whose patches all lie inside (the *core*) must be most of them."""
    (out_h, out_w), (kh, kw) = grid, kernel
    if kh * kw == 1:
        return False  # a 1x1 kernel's patches are the input vectors: nothing to gain
    core = max(out_h - kh + 1, 0) * max(out_w - kw + 1, 0)
    return core >= 0.5 * out_h * out_w


def patch_moments(padded: tf.Tensor, kernel: tuple, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(X̃ᵀX̃, X̃ᵀT)` of the augmented im2col patches X̃ (kernel row, kernel column, channel; bias last) of a
    stride-1, undilated convolution, from its zero-padded input `padded` (N, H, W, C) and targets T
    (N, out_h, out_w, U), without forming the patches.

    Two patches' entries at kernel offsets o1 and o2 multiply input pixels q and q + (o2 - o1). Over the
    *core* (the pixels the grid shifted by every offset reaches) the sum depends on the difference only, so
    one C×C product per difference serves all pairs of offsets with it (2k² - 2k + 1 products for the
    blocks on and above the diagonal, against k⁴ blocks' worth from the patches); the rows whose pixels
    fall outside the core (the grid's frame) are added from their own patches. X̃ᵀT is the kernel gradient
    of a convolution of the input with output gradient T. Exact: the same matrices as from the patches, summed in a different order
    (products in the input's precision, the bias row and column's sums in float64; float64 results).
    One traced function per input geometry (`tracing.PerGeometry`).
    """
    kernel = tuple(int(k) for k in kernel)
    key = (kernel, tuple(int(s) for s in padded.shape), tuple(int(s) for s in targets.shape), padded.dtype)

    def make():
        frame = _frame(kernel, key[1])
        return lambda padded, targets: (_patch_gram(padded, kernel, frame), _patch_cross(padded, kernel, targets))

    return _MOMENT_FUNCTIONS.run(key, make, padded, targets)


_MOMENT_FUNCTIONS = tracing.PerGeometry()  # a few per layer shape: full and last batch
_VECTOR_FUNCTIONS = tracing.PerGeometry()


def _frame(kernel: tuple, shape: tuple) -> list:
    """For an input of `shape` (N, H, W, C) padded for a stride-1 convolution, per kernel offset o1: the
    flat pixel indices (all k² patch entries, images major) of the output positions p whose pixel p + o1
    lies outside the core, which the core sums miss. Only the grid's frame (outside the interior, whose
    patches lie in the core) has such positions, about half of it per offset."""
    (kh, kw), (n, height, width, _) = kernel, shape
    out_h, out_w = height - kh + 1, width - kw + 1
    rows, columns = np.meshgrid(np.arange(out_h), np.arange(out_w), indexing="ij")
    rows, columns = rows.reshape(-1), columns.reshape(-1)
    images = np.repeat(np.arange(n), rows.size)
    rows, columns = np.tile(rows, n), np.tile(columns, n)
    origin = images * height * width + rows * width + columns
    missed = []
    for i in range(kh):
        for j in range(kw):
            outside = ~((rows + i >= kh - 1) & (rows + i < out_h) & (columns + j >= kw - 1) & (columns + j < out_w))
            missed.append(np.stack([origin[outside] + a * width + b for a in range(kh) for b in range(kw)], axis=1))
    return missed


def _patch_gram(padded, kernel: tuple, frame: list):
    kh, kw = kernel
    n, height, width, channels = (int(s) for s in padded.shape)
    out_h, out_w = height - kh + 1, width - kw + 1
    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    by_difference = {}
    has_core = out_h - kh + 1 > 0 and out_w - kw + 1 > 0
    core = tf.reshape(padded[:, kh - 1:out_h, kw - 1:out_w], (-1, channels)) if has_core else None
    for dy in range(0, kh):
        for dx in range(-(kw - 1), kw):
            if dy == 0 and dx < 0:
                continue  # below the diagonal: the transpose of a block above it
            if core is None:
                by_difference[dy, dx] = tf.zeros((channels, channels), padded.dtype)
                continue
            shifted = padded[:, kh - 1 + dy:out_h + dy, kw - 1 + dx:out_w + dx]
            by_difference[dy, dx] = tf.matmul(core, tf.reshape(shifted, (-1, channels)), transpose_a=True)

    flat = tf.reshape(padded, (-1, channels))
    blocks = {}
    for first, (i, j) in enumerate(offsets):
        # The rows whose pixel p + o1 lies outside the core, with their patch entries from o1 on.
        pixels = frame[first][:, first:]
        patches = tf.reshape(tf.gather(flat, pixels.reshape(-1)), (pixels.shape[0], pixels.shape[1] * channels))
        correction = tf.matmul(patches[:, :channels], patches, transpose_a=True)
        for second in range(first, len(offsets)):
            k, l = offsets[second]
            blocks[first, second] = (by_difference[k - i, l - j]
                                     + correction[:, (second - first) * channels:(second - first + 1) * channels])
    # Each offset's input sums are window sums of one per-pixel sum over the images (one float64 cast of
    # the batch, not one per offset).
    pixel_sums = _sum64(padded, axis=0)
    sums = [tf.reduce_sum(pixel_sums[i:i + out_h, j:j + out_w], axis=(0, 1)) for i, j in offsets]
    rows = []
    for first in range(len(offsets)):
        row = [blocks[first, second] if second >= first else tf.transpose(blocks[second, first])
               for second in range(len(offsets))]
        rows.append(tf.concat([_to64(tf.concat(row, axis=1)), sums[first][:, None]], axis=1))
    last = tf.concat(sums + [tf.constant([float(n * out_h * out_w)], tf.float64)], axis=0)
    return tf.concat(rows + [last[None]], axis=0)


def _patch_cross(padded, kernel: tuple, targets):
    kh, kw = kernel
    channels, units = int(padded.shape[-1]), int(targets.shape[-1])
    # Σ_p x[p + o] t[p]ᵀ for every offset o is a convolution's kernel gradient: one optimised op rather
    # than k² products of shifted copies (1.5x faster on 16x16x32 inputs).
    blocks = tf.compat.v1.nn.conv2d_backprop_filter(padded, [kh, kw, channels, units], targets, [1, 1, 1, 1], "VALID")
    flat_targets = tf.reshape(targets, (-1, units))
    return tf.concat([_to64(tf.reshape(blocks, (kh * kw * channels, units))), _sum64(flat_targets, axis=0)[None]],
                     axis=0)
