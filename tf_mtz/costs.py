"""Merge costs and merged weights as TF matrix products (on the GPU when TensorFlow sees one).

For neurons a (task A) and b (task B) with incoming weights (bias last) and layer Hessians H_A, H_B:

    ΔE(a, b) = ½ dᵀ H_A (H_A + H_B)⁻¹ H_B d,  d = a − b
    merged   = (H_A + H_B)⁻¹ (H_A a + H_B b)

With S = H_A + H_B = L Lᵀ, P_A = H_A A and U = L⁻¹ P_A (likewise P_B, V), and the identities
H_A S⁻¹ H_B = H_A − H_A S⁻¹ H_A = H_B − H_B S⁻¹ H_B, the whole cost matrix is

    ΔE = ½ (q_A[:, None] + q_B[None, :] − 2 Uᵀ V),  q_A = colsum(A ⊙ P_A) − colsum(U ⊙ U)

one Cholesky factorisation, two Hessian products, two triangular solves and one product for all pairs.
Weights come as `(blocks, features + 1, units)`: each block shares the same Hessians and the costs of the
blocks add up (the per-offset conv approximation uses several blocks; everything else one).

Low-rank Hessians (`statistics.LowRankHessian`, UᵀU + λI from fewer samples than features) never become
matrices: in an orthonormal basis Q of the factors' row space every Hessian is block-diagonal (its
r×r block on Q, λI on the rest), so H_A S⁻¹ H_B = αI + Q (M_r − αI) Qᵀ with α = λ_Aλ_B/(λ_A+λ_B) and
M_r = H_A,r S_r⁻¹ H_B,r; costs and merged weights then take O(n²·d + r²·d) instead of O(d³).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import tensorflow as tf

from tf_mtz.statistics import LowRankHessian


def _on_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _cholesky(matrix: np.ndarray) -> tf.Tensor:
    """Lower Cholesky factor, adding jitter when rounding made the (damped) matrix numerically singular.

    Only the lower triangle of the result is meaningful: every consumer (the blocked solve below and
    `tf.linalg.cholesky_solve`) reads just that, so the upper one is not cleared. On a CPU, LAPACK's
    potrf is about 2.5 times as fast as TensorFlow's factorisation.
    """
    matrix = np.ascontiguousarray(matrix)
    diagonal = np.diagonal(matrix)
    scale = float(np.mean(diagonal))
    jitter = 0.0
    for attempt in range(8):
        shifted = matrix
        if jitter:
            shifted = matrix.copy()
            np.fill_diagonal(shifted, diagonal + jitter)
        factor = _factorise(shifted)
        if factor is not None and bool(tf.reduce_all(tf.math.is_finite(tf.linalg.diag_part(factor)))):
            return factor
        jitter = scale * 10.0 ** (attempt - (7 if matrix.dtype == np.float64 else 5))
    raise FloatingPointError("The summed layer Hessian could not be factorised even with jitter.")


def _factorise(matrix: np.ndarray):
    if _on_gpu():
        try:
            return tf.linalg.cholesky(matrix)
        except tf.errors.InvalidArgumentError:
            return None
    potrf = scipy.linalg.lapack.dpotrf if matrix.dtype == np.float64 else scipy.linalg.lapack.spotrf
    # A C-ordered symmetric matrix is its own Fortran-ordered transpose: factorising the upper triangle of
    # `matrix.T` in place of a copy gives Uᵀ = L back as a C-ordered array, with no transposes or copies.
    upper, info = potrf(matrix.T, lower=0, overwrite_a=0)
    return tf.constant(upper.T) if info == 0 else None


def _lower_solve(factor: tf.Tensor, rhs: tf.Tensor, leaf: int = 512) -> tf.Tensor:
    """L⁻¹ rhs by recursive blocks, so almost all of the work is matrix products (fast on any device).

    Leaves multiply by the inverse of their small diagonal block: one more product instead of a
    triangular solve, which TensorFlow runs several times slower per flop than a matmul.
    """
    d = factor.shape[0]
    if d <= leaf:
        inverse = tf.linalg.triangular_solve(factor, tf.eye(d, dtype=factor.dtype), lower=True)
        return tf.matmul(inverse, rhs)
    h = d // 2
    top = _lower_solve(factor[:h, :h], rhs[:h], leaf)
    bottom = _lower_solve(factor[h:, h:], rhs[h:] - tf.matmul(factor[h:, :h], top), leaf)
    return tf.concat([top, bottom], axis=0)


def _flatten_blocks(blocks: tf.Tensor) -> tf.Tensor:
    """(K, D, n) -> (D, K*n) so one product handles every block."""
    k, d, n = blocks.shape
    if k == 1:
        return blocks[0]  # no transpose copy for the common single-block case
    return tf.reshape(tf.transpose(blocks, (1, 0, 2)), (d, k * n))


def cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b, dtype=tf.float32) -> np.ndarray:
    """Returns the `(units_a, units_b)` matrix of merge costs ΔE.

    Args:
        blocks_a: `(K, D, n_a)` incoming weights of task A's units, bias last.
        blocks_b: `(K, D, n_b)` same for task B.
        hessian_a, hessian_b: `(D, D)` damped layer Hessians.
        dtype: compute precision; float32 is plenty for ranking pairs.

    Returns:
        numpy array of non-negative costs, in `dtype`.
    """
    if isinstance(hessian_a, LowRankHessian) and isinstance(hessian_b, LowRankHessian):
        return _low_rank_cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b, dtype)
    hessian_a, hessian_b = _dense(hessian_a), _dense(hessian_b)
    np_dtype = dtype.as_numpy_dtype
    a = tf.convert_to_tensor(np.asarray(blocks_a, np_dtype))
    b = tf.convert_to_tensor(np.asarray(blocks_b, np_dtype))
    k, d, n_a = a.shape
    n_b = b.shape[2]
    hessian_a, hessian_b = np.asarray(hessian_a, np_dtype), np.asarray(hessian_b, np_dtype)
    factor = _cholesky(hessian_a + hessian_b)
    flat_a, flat_b = _flatten_blocks(a), _flatten_blocks(b)
    p_a = tf.matmul(hessian_a, flat_a)
    p_b = tf.matmul(hessian_b, flat_b)
    solved = _lower_solve(factor, tf.concat([p_a, p_b], axis=1))
    u, v = solved[:, :k * n_a], solved[:, k * n_a:]
    half_q_a = _half_quadratic(flat_a, p_a, u)
    half_q_b = _half_quadratic(flat_b, p_b, v)
    if k > 1:
        half_q_a = tf.reduce_sum(tf.reshape(half_q_a, (k, n_a)), axis=0)
        half_q_b = tf.reduce_sum(tf.reshape(half_q_b, (k, n_b)), axis=0)
        # Uᵀ V summed over blocks: stack each block's rows so one product does it.
        u = tf.reshape(tf.transpose(tf.reshape(u, (d, k, n_a)), (1, 0, 2)), (k * d, n_a))
        v = tf.reshape(tf.transpose(tf.reshape(v, (d, k, n_b)), (1, 0, 2)), (k * d, n_b))
    costs = tf.matmul(u, v, transpose_a=True).numpy()
    # ½q_a[i] + ½q_b[j] − (UᵀV)[i, j], in place: three passes over the result and no temporaries.
    np.subtract(half_q_a.numpy()[:, None], costs, out=costs)
    costs += half_q_b.numpy()[None, :]
    # Rounding can push a zero cost slightly negative; a cost is ½‖·‖² of something, so clip at 0.
    return np.maximum(costs, 0.0, out=costs)


@tf.function(jit_compile=True, reduce_retracing=True)
def _fused_half_quadratic(weights, products, solved):
    return 0.5 * tf.reduce_sum(weights * products - solved * solved, axis=0)


def _half_quadratic(weights, products, solved):
    """½ (colsum(W ⊙ HW) − colsum(U ⊙ U)): the diagonal terms aᵀ H_A S⁻¹ H_B a of every unit.

    For wide layers XLA fuses the three elementwise passes into one, which saves more than its one-off
    compile time; small layers skip the compile.
    """
    if weights.shape.num_elements() >= 1 << 22:
        return _fused_half_quadratic(weights, products, solved)
    return 0.5 * (tf.reduce_sum(weights * products, axis=0) - tf.reduce_sum(tf.square(solved), axis=0))


def _dense(hessian):
    return hessian.dense() if isinstance(hessian, LowRankHessian) else hessian


def _row_space(hessian_a: LowRankHessian, hessian_b: LowRankHessian):
    """Orthonormal basis Q `(d, r)` of both factors' rows and each Hessian's r×r block QᵀHQ."""
    q, _ = np.linalg.qr(np.concatenate([hessian_a.factor, hessian_b.factor]).T)
    blocks = []
    for h in (hessian_a, hessian_b):
        projected = h.factor @ q
        blocks.append(projected.T @ projected + h.damping * np.eye(q.shape[1]))
    return q, blocks[0], blocks[1]


def _low_rank_cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b, dtype):
    a = np.asarray(blocks_a, np.float64)
    b = np.asarray(blocks_b, np.float64)
    q, h_a, h_b = _row_space(hessian_a, hessian_b)
    lam_a, lam_b = hessian_a.damping, hessian_b.damping
    alpha = lam_a * lam_b / (lam_a + lam_b)
    reduced = h_a @ np.linalg.solve(h_a + h_b, h_b)
    correction = 0.5 * (reduced + reduced.T) - alpha * np.eye(q.shape[1])
    # Everything in Q's span goes through the r×r correction; the rest is α times plain inner products.
    a_r = np.einsum("dr,kdn->krn", q, a)
    b_r = np.einsum("dr,kdn->krn", q, b)
    corrected_b = np.einsum("rs,ksn->krn", correction, b_r)
    half_q_a = 0.5 * (alpha * np.sum(a * a, axis=(0, 1)) + np.einsum("krn,rs,ksn->n", a_r, correction, a_r))
    half_q_b = 0.5 * (alpha * np.sum(b * b, axis=(0, 1)) + np.sum(b_r * corrected_b, axis=(0, 1)))
    np_dtype = dtype.as_numpy_dtype
    k, d, n_a = a.shape
    left = np.concatenate([alpha * a.reshape(k * d, n_a), a_r.reshape(-1, n_a)]).astype(np_dtype)
    right = np.concatenate([b.reshape(k * d, -1), corrected_b.reshape(-1, b.shape[2])]).astype(np_dtype)
    costs = tf.matmul(left, right, transpose_a=True).numpy()
    np.subtract(half_q_a.astype(np_dtype)[:, None], costs, out=costs)
    costs += half_q_b.astype(np_dtype)[None, :]
    return np.maximum(costs, 0.0, out=costs)


def _low_rank_merged_weights(blocks_a, blocks_b, hessian_a, hessian_b) -> np.ndarray:
    a = np.asarray(blocks_a, np.float64)
    b = np.asarray(blocks_b, np.float64)
    q, h_a, h_b = _row_space(hessian_a, hessian_b)
    total = hessian_a.damping + hessian_b.damping
    rhs = np.stack([hessian_a.matmul(a[i]) + hessian_b.matmul(b[i]) for i in range(a.shape[0])])
    rhs_r = np.einsum("dr,kdn->krn", q, rhs)
    # S⁻¹ = Q S_r⁻¹ Qᵀ on the row space and 1/(λ_A+λ_B) on the rest.
    solved_r = np.einsum("rs,ksn->krn", np.linalg.inv(h_a + h_b), rhs_r)
    return (rhs - np.einsum("dr,krn->kdn", q, rhs_r)) / total + np.einsum("dr,krn->kdn", q, solved_r)


def merged_weights(blocks_a, blocks_b, hessian_a, hessian_b) -> np.ndarray:
    """Returns `(H_A + H_B)⁻¹ (H_A a + H_B b)` for matched columns of `blocks_a` and `blocks_b`, in float64."""
    if isinstance(hessian_a, LowRankHessian) and isinstance(hessian_b, LowRankHessian):
        return _low_rank_merged_weights(blocks_a, blocks_b, hessian_a, hessian_b)
    hessian_a, hessian_b = _dense(hessian_a), _dense(hessian_b)
    a = tf.convert_to_tensor(blocks_a, tf.float64)
    b = tf.convert_to_tensor(blocks_b, tf.float64)
    k, d, n = a.shape
    hessian_a = np.asarray(hessian_a, np.float64)
    hessian_b = np.asarray(hessian_b, np.float64)
    factor = _cholesky(hessian_a + hessian_b)
    rhs = tf.matmul(hessian_a, _flatten_blocks(a)) + tf.matmul(hessian_b, _flatten_blocks(b))
    solved = tf.linalg.cholesky_solve(factor, rhs)
    return tf.transpose(tf.reshape(solved, (d, k, n)), (1, 0, 2)).numpy()


PAIRINGS = ("hessian", "euclidean", "weights", "correlation", "random")
MERGES = ("hessian", "average", "first")


def pairing_costs(pairing: str, blocks_a, blocks_b, hessian_a, hessian_b, pooled=None, seed: int = 0):
    """Cost of pairing every unit of A with every unit of B under a pairing strategy (lower pairs first).

    Args:
        pairing: "hessian" (ΔE, the paper), "euclidean" (‖a − b‖² of the incoming weights), "weights"
            (−aᵀb: weight matching as in Git Re-Basin), "correlation" (1 − correlation of the two units'
            pre-activations on the pooled calibration data, as ZipIt! pairs features), or "random".
        blocks_a, blocks_b: `(K, D, n)` incoming weights, bias last.
        hessian_a, hessian_b: damped `(D, D)` Hessians (used by "hessian").
        pooled: undamped `(D, D)` second-moment matrix of the pooled calibration inputs (for "correlation").
        seed: seed of "random".

    Returns:
        `(n_a, n_b)` numpy array.
    """
    if pairing == "hessian":
        return cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b)
    a = np.asarray(blocks_a, np.float64)
    b = np.asarray(blocks_b, np.float64)
    n_a, n_b = a.shape[2], b.shape[2]
    if pairing == "random":
        return np.random.default_rng(seed).random((n_a, n_b))
    cross = np.einsum("kdi,kdj->ij", a, b)
    if pairing == "weights":
        return -cross
    if pairing == "euclidean":
        return np.maximum(np.sum(a * a, axis=(0, 1))[:, None] + np.sum(b * b, axis=(0, 1))[None, :] - 2 * cross, 0)
    if pairing == "correlation":
        pooled_b = np.stack([_times(pooled, b[i]) for i in range(b.shape[0])])
        pooled_a = np.stack([_times(pooled, a[i]) for i in range(a.shape[0])])
        mean = _times(pooled, np.eye(a.shape[1])[:, -1:])[:, 0]  # E[x̃]: the bias coordinate is constantly 1
        second_ab = np.einsum("kdi,kdj->ij", a, pooled_b)
        mean_a, mean_b = np.einsum("kdi,d->i", a, mean), np.einsum("kdj,d->j", b, mean)
        var_a = np.sum(a * pooled_a, axis=(0, 1)) - mean_a ** 2
        var_b = np.sum(b * pooled_b, axis=(0, 1)) - mean_b ** 2
        covariance = second_ab - np.outer(mean_a, mean_b)
        return 1.0 - covariance / np.sqrt(np.outer(np.maximum(var_a, 1e-12), np.maximum(var_b, 1e-12)))
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}.")


def merge_units(merge: str, blocks_a, blocks_b, hessian_a, hessian_b, tasks_in_a: int = 1) -> np.ndarray:
    """Merged incoming weights of matched columns: "hessian" (the paper's update), "average" (all tasks
    merged so far weigh the same; `tasks_in_a` counts those already in A), or "first" (keep A's)."""
    if merge == "hessian":
        return merged_weights(blocks_a, blocks_b, hessian_a, hessian_b)
    a = np.asarray(blocks_a, np.float64)
    if merge == "first":
        return a
    if merge == "average":
        return (tasks_in_a * a + np.asarray(blocks_b, np.float64)) / (tasks_in_a + 1)
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}.")


def _times(hessian, w: np.ndarray) -> np.ndarray:
    """H @ w for a dense or low-rank Hessian."""
    if isinstance(hessian, LowRankHessian):
        return hessian.matmul(w)
    return np.asarray(hessian, np.float64) @ w


def merge_error(merged, blocks, hessian) -> np.ndarray:
    """Per unit ½ δᵀ H δ, δ = merged − original: the pre-activation error a merge causes for one task."""
    delta = np.asarray(merged, np.float64) - np.asarray(blocks, np.float64)
    return 0.5 * sum(np.sum(delta[i] * _times(hessian, delta[i]), axis=0) for i in range(delta.shape[0]))
