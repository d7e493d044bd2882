"""Merge costs and merged weights as TF matrix products (on the GPU when TensorFlow sees one).

For neurons a (task A) and b (task B) with incoming weights (bias last) and layer Hessians H_A, H_B:

    ΔE(a, b) = ½ dᵀ H_A (H_A + H_B)⁻¹ H_B d,  d = a − b
    merged   = (H_A + H_B)⁻¹ (H_A a + H_B b)

Every pair shares the middle matrix M = H_A S⁻¹ H_B (S = H_A + H_B = L Lᵀ), which is symmetric positive
definite and equals H_A − H_A S⁻¹ H_A = H_B − H_B S⁻¹ H_B. Two ways to get all pairs at once:

- factored (wide layers: both tasks' units together at least 1.6 times the inputs): M is the Schur
  complement H − ZᵀZ, Z = L⁻¹ H (H the Hessian of smaller trace, where the subtraction cancels least), and
  with its Cholesky factor M = F Fᵀ, U = Fᵀ A and V = Fᵀ B,
      ΔE = ½ (‖U_i‖² + ‖V_j‖² − 2 Uᵀ V):
  two factorisations, a d×d triangular solve and the Schur complement, two triangular products and one
  product for all pairs: 3.3 times the flops of a d³ matmul for n = d units per task.
- solved (fewer units, where the d×d work above would dominate): with P_A = H_A A and U = L⁻¹ P_A
  (likewise P_B, V),
      ΔE = ½ (q_A[:, None] + q_B[None, :] − 2 Uᵀ V),  q_A = colsum(A ⊙ P_A) − colsum(U ⊙ U):
  one factorisation, two Hessian products, a triangular solve for the units' columns and one product.

TensorFlow's own Cholesky and triangular kernels run several times slower per flop than its matmul, so the
factorisations, solves and triangular products are recursive 2×2 block algorithms whose work is almost all
matrix products; a factor stays a tree of its blocks (`_Blocks`) rather than being assembled into a matrix.
A factorisation of H − ZᵀZ forms only the blocks of that matrix it needs, which halves the Schur
complement's work (a symmetric product, the way LAPACK's syrk does it).

Weights come as `(blocks, features + 1, units)`: each block shares the same Hessians and the costs of the
blocks add up (the per-offset conv approximation uses several blocks; everything else one).

Low-rank Hessians (`statistics.LowRankHessian`, UᵀU + λI from fewer samples than features) never become
matrices: in an orthonormal basis Q of the factors' row space every Hessian is block-diagonal (its
r×r block on Q, λI on the rest), so H_A S⁻¹ H_B = αI + Q (M_r − αI) Qᵀ with α = λ_Aλ_B/(λ_A+λ_B) and
M_r = H_A,r S_r⁻¹ H_B,r; costs and merged weights then take O(n²·d + r²·d) instead of O(d³).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg
import tensorflow as tf

from tf_mtz import tracing
from tf_mtz.statistics import LowRankHessian, TokenHessian

# Hessians kept in a structured form, with `dense`, `matmul` and `quadratic`.
_STRUCTURED = (LowRankHessian, TokenHessian)

# Side of the diagonal blocks the recursion stops at: TensorFlow's own factorisation and triangular inverse
# are quick at this size, and the zeros its full-block products carry are few. 128-256 measured alike.
_LEAF = 192
# The factored form once both tasks' units (times weight blocks) reach this multiple of the inputs. Its
# flops, 8/3·d³ + 2·d²·n + 2·n²·d against the solved form's d³/3 + 6·d²·n + 2·n²·d (n units per task), say
# 1.2; measured on 2 CPU cores at d = 1,025 to 4,097 the two forms take the same time at 1.5-1.6.
_FACTORED_FROM = 1.6
# From this many inputs on, the block recursion runs as a graph traced once per shape: TensorFlow then
# reuses the buffers of its many intermediate blocks, which pays for the trace.
_TRACE_FROM = 1024


def _on_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _cholesky(matrix: np.ndarray) -> tf.Tensor:
    """Lower Cholesky factor as a matrix (for `merged_weights`), adding jitter when rounding made the
    (damped) matrix numerically singular.

    Only the lower triangle of the result is meaningful: `tf.linalg.cholesky_solve` reads just that, so the
    upper one is not cleared. On a CPU, LAPACK's potrf is about 2.5 times as fast as TensorFlow's.
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
        jitter = _jitter(scale, attempt, matrix.dtype)
    raise FloatingPointError("The summed layer Hessian could not be factorised even with jitter.")


def _jitter(scale: float, attempt: int, dtype) -> float:
    return scale * 10.0 ** (attempt - (7 if dtype == np.float64 else 5))


def solve_positive_definite(matrix: np.ndarray, right: np.ndarray) -> np.ndarray:
    """`matrix⁻¹ right` in float64 for a damped Gram matrix: by Cholesky (half the work of LU), by LU where
    rounding left the matrix not quite positive definite. LAPACK on the CPU (4x faster than TensorFlow's
    Cholesky for a 4,609² matrix on two cores), TensorFlow on a GPU."""
    if _on_gpu():
        matrix, right = tf.constant(matrix, tf.float64), tf.constant(right, tf.float64)
        try:
            return tf.linalg.cholesky_solve(tf.linalg.cholesky(matrix), right).numpy()
        except tf.errors.InvalidArgumentError:
            return tf.linalg.solve(matrix, right).numpy()
    matrix, right = np.asarray(matrix, np.float64), np.asarray(right, np.float64)
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(matrix, check_finite=False), right,
                                      check_finite=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.solve(matrix, right, check_finite=False)


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


@dataclasses.dataclass
class _Leaf:
    """A small lower-triangular diagonal block and its inverse (solves multiply by it)."""

    factor: tf.Tensor
    inverse: tf.Tensor


@dataclasses.dataclass
class _Blocks:
    """The lower-triangular [[L11, 0], [L21, L22]], keeping L21ᵀ (what the solves and products use)."""

    top: "_Leaf | _Blocks"
    lower_left_t: tf.Tensor
    bottom: "_Leaf | _Blocks"


def _size(tree) -> int:
    return tree.factor.shape[0] if isinstance(tree, _Leaf) else _size(tree.top) + _size(tree.bottom)


def _split(d: int):
    """Where to halve a d×d block (a multiple of the leaf side), or None for a leaf."""
    return max(_LEAF, d // 2 // _LEAF * _LEAF) if d >= 2 * _LEAF else None


def _factor_tree(matrix: tf.Tensor, minus_gram_of: tf.Tensor | None = None, jitter=0.0):
    """Lower Cholesky factor of `matrix − zᵀz + jitter·I` (z = `minus_gram_of`, k×d, or none) as a block tree.

    Only the lower blocks of `matrix − zᵀz` are ever formed, each when the recursion reaches it. A matrix
    that is not numerically positive definite leaves NaNs in some leaf (see `_factored`).
    """
    d = matrix.shape[0]
    half = _split(d)
    z = minus_gram_of
    if half is None:
        block = matrix if z is None else matrix - tf.matmul(z, z, transpose_a=True)
        factor = tf.linalg.cholesky(block + jitter * tf.eye(d, dtype=block.dtype))
        return _Leaf(factor, tf.linalg.triangular_solve(factor, tf.eye(d, dtype=factor.dtype), lower=True))
    z_top, z_bottom = (None, None) if z is None else (z[:, :half], z[:, half:])
    top = _factor_tree(matrix[:half, :half], z_top, jitter)
    off_diagonal = matrix[:half, half:]
    if z is not None:
        off_diagonal -= tf.matmul(z_top, z_bottom, transpose_a=True)
    lower_left_t = _lower_solve(top, off_diagonal)
    rest = lower_left_t if z is None else tf.concat([z_bottom, lower_left_t], axis=0)
    return _Blocks(top, lower_left_t, _factor_tree(matrix[half:, half:], rest, jitter))


def _factored(tree) -> tf.Tensor:
    """True when every diagonal entry of the factor is finite (the factorisation succeeded)."""
    if isinstance(tree, _Leaf):
        return tf.reduce_all(tf.math.is_finite(tf.linalg.diag_part(tree.factor)))
    return tf.logical_and(_factored(tree.top), _factored(tree.bottom))


def _lower_solve(tree, rhs: tf.Tensor) -> tf.Tensor:
    """L⁻¹ rhs."""
    if isinstance(tree, _Leaf):
        return tf.matmul(tree.inverse, rhs)
    half = _size(tree.top)
    top = _lower_solve(tree.top, rhs[:half])
    bottom = _lower_solve(tree.bottom, rhs[half:] - tf.matmul(tree.lower_left_t, top, transpose_a=True))
    return tf.concat([top, bottom], axis=0)


def _upper_times(tree, x: tf.Tensor) -> tf.Tensor:
    """Lᵀ x."""
    if isinstance(tree, _Leaf):
        return tf.matmul(tree.factor, x, transpose_a=True)
    half = _size(tree.top)
    top = _upper_times(tree.top, x[:half]) + tf.matmul(tree.lower_left_t, x[half:])
    return tf.concat([top, _upper_times(tree.bottom, x[half:])], axis=0)


def _factored_costs(hessian_schur, hessian_other, flat_a, flat_b, jitter, blocks):
    """(UᵀV, ½‖U_i‖², ½‖V_j‖², S factorised, M factorised) with [U V] = Fᵀ [A B], M = F Fᵀ."""
    total = _factor_tree(hessian_schur + hessian_other, jitter=jitter)
    root = _factor_tree(hessian_schur, _lower_solve(total, hessian_schur))
    u, v = _upper_times(root, flat_a), _upper_times(root, flat_b)
    half_q_a, half_q_b = 0.5 * tf.reduce_sum(u * u, axis=0), 0.5 * tf.reduce_sum(v * v, axis=0)
    return (_cross(u, v, blocks), _sum_blocks(half_q_a, blocks), _sum_blocks(half_q_b, blocks),
            _factored(total), _factored(root))


def _solved_costs(hessian_a, hessian_b, flat_a, flat_b, jitter, blocks):
    """(UᵀV, ½q_A, ½q_B, S factorised, True) with U = L⁻¹ H_A A, V = L⁻¹ H_B B."""
    total = _factor_tree(hessian_a + hessian_b, jitter=jitter)
    p_a, p_b = tf.matmul(hessian_a, flat_a), tf.matmul(hessian_b, flat_b)
    solved = _lower_solve(total, tf.concat([p_a, p_b], axis=1))
    u, v = solved[:, :flat_a.shape[1]], solved[:, flat_a.shape[1]:]
    # ½ (colsum(W ⊙ HW) − colsum(U ⊙ U)): the diagonal terms aᵀ H_A S⁻¹ H_B a of every unit.
    half_q_a = 0.5 * tf.reduce_sum(flat_a * p_a - u * u, axis=0)
    half_q_b = 0.5 * tf.reduce_sum(flat_b * p_b - v * v, axis=0)
    return (_cross(u, v, blocks), _sum_blocks(half_q_a, blocks), _sum_blocks(half_q_b, blocks),
            _factored(total), tf.constant(True))


def _sum_blocks(per_column: tf.Tensor, blocks: int) -> tf.Tensor:
    return per_column if blocks == 1 else tf.reduce_sum(tf.reshape(per_column, (blocks, -1)), axis=0)


def _cross(u: tf.Tensor, v: tf.Tensor, blocks: int) -> tf.Tensor:
    """Uᵀ V summed over the weight blocks: stacking each block's rows lets one product do it."""
    if blocks > 1:
        d = u.shape[0]
        u = tf.reshape(tf.transpose(tf.reshape(u, (d, blocks, -1)), (1, 0, 2)), (blocks * d, -1))
        v = tf.reshape(tf.transpose(tf.reshape(v, (d, blocks, -1)), (1, 0, 2)), (blocks * d, -1))
    return tf.matmul(u, v, transpose_a=True)


_traced = tracing.PerGeometry()


def _run(function, *tensors, **static):
    """Runs `function` eagerly for small layers and as a graph traced once per shape for wide ones."""
    if tensors[0].shape[0] < _TRACE_FROM:
        return function(*tensors, **static)
    key = (function.__name__, tuple(tuple(t.shape) for t in tensors), tensors[0].dtype, tuple(static.items()))
    return _traced.run(key, lambda: lambda *args: function(*args, **static), *tensors)


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

    Raises:
        FloatingPointError: if the summed Hessian cannot be factorised even with jitter.
    """
    if isinstance(hessian_a, LowRankHessian) and isinstance(hessian_b, LowRankHessian):
        return _low_rank_cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b, dtype)
    if isinstance(hessian_a, TokenHessian) and isinstance(hessian_b, TokenHessian):
        return _diagonal_cost_matrix(blocks_a, blocks_b, hessian_a.diagonal(), hessian_b.diagonal(), dtype)
    np_dtype = dtype.as_numpy_dtype
    hessian_a = np.asarray(_dense(hessian_a), np_dtype)
    hessian_b = np.asarray(_dense(hessian_b), np_dtype)
    a = tf.convert_to_tensor(np.asarray(blocks_a, np_dtype))
    b = tf.convert_to_tensor(np.asarray(blocks_b, np_dtype))
    k, d, n_a = a.shape
    flat_a, flat_b = _flatten_blocks(a), _flatten_blocks(b)
    tensor_a, tensor_b = tf.constant(hessian_a), tf.constant(hessian_b)
    form, first, second = _solved_costs, tensor_a, tensor_b
    if k * (n_a + b.shape[2]) >= _FACTORED_FROM * d:
        form = _factored_costs
        if np.trace(hessian_b) < np.trace(hessian_a):
            first, second = tensor_b, tensor_a
    # Jitter relative to the Hessians' scale; an all-zero pair (undamped) gets an absolute one.
    scale = float(np.mean(np.diagonal(hessian_a)) + np.mean(np.diagonal(hessian_b))) or 1.0
    jitter = 0.0
    for attempt in range(8):
        try:
            cross, half_q_a, half_q_b, total_ok, root_ok = _run(
                form, first, second, flat_a, flat_b, tf.constant(jitter, dtype), blocks=k)
            total_ok, root_ok = bool(total_ok), bool(root_ok)
        except tf.errors.InvalidArgumentError:
            # A GPU factorisation raises where the CPU one returns NaNs, and which one failed is unknown:
            # the factored form first falls back to the solved form, which factorises S alone.
            total_ok, root_ok = form is _factored_costs, False
        if total_ok and root_ok:
            break
        if total_ok:
            # Rounding made the Schur complement M indefinite: the solved form needs no factor of M.
            form, first, second = _solved_costs, tensor_a, tensor_b
            continue
        jitter = _jitter(scale, attempt, np_dtype)
    else:
        raise FloatingPointError("The summed layer Hessian could not be factorised even with jitter.")
    costs = cross.numpy()
    # ½q_a[i] + ½q_b[j] − (UᵀV)[i, j], in place: three passes over the result and no temporaries.
    np.subtract(half_q_a.numpy()[:, None], costs, out=costs)
    costs += half_q_b.numpy()[None, :]
    # Rounding can push a zero cost slightly negative; a cost is ½‖·‖² of something, so clip at 0.
    return np.maximum(costs, 0.0, out=costs)


def _diagonal_cost_matrix(blocks_a, blocks_b, diagonal_a, diagonal_b, dtype) -> np.ndarray:
    """ΔE for diagonal Hessians a, b: H_A (H_A+H_B)⁻¹ H_B is diagonal, c = ab/(a+b), so the cost of a pair is
    ½ Σ c (w_A − w_B)², a weighted squared distance: three matrix products, for any number of tokens."""
    weight = tf.constant((diagonal_a * diagonal_b / (diagonal_a + diagonal_b))[None, :, None], dtype)
    a, b = tf.constant(blocks_a, dtype), tf.constant(blocks_b, dtype)

    def rows(x):  # (K, D, n) -> (K·D, n): a unit's weights in every block, one column per unit
        return tf.reshape(x, (-1, x.shape[-1]))

    weighted_a, flat_a, flat_b = rows(weight * a), rows(a), rows(b)
    squared_a = tf.reduce_sum(weighted_a * flat_a, axis=0)
    squared_b = tf.reduce_sum(rows(weight * b) * flat_b, axis=0)
    cross = tf.matmul(weighted_a, flat_b, transpose_a=True)
    costs = 0.5 * (squared_a[:, None] + squared_b[None, :] - 2.0 * cross)
    return np.maximum(costs.numpy(), 0.0)


def _dense(hessian):
    return hessian.dense() if isinstance(hessian, _STRUCTURED) else hessian


def _row_space(hessian_a: LowRankHessian, hessian_b: LowRankHessian):
    """Orthonormal basis Q `(d, r)` of both factors' rows and each Hessian's r×r block QᵀHQ."""
    q, _ = np.linalg.qr(np.concatenate([hessian_a.factor, hessian_b.factor]).T)
    blocks = []
    for h in (hessian_a, hessian_b):
        projected = h.factor @ q
        blocks.append(projected.T @ projected + h.damping * np.eye(q.shape[1]))
    return q, blocks[0], blocks[1]


def _low_rank_cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b, dtype):
    q, h_a, h_b = _row_space(hessian_a, hessian_b)
    lam_a, lam_b = hessian_a.damping, hessian_b.damping
    alpha = lam_a * lam_b / (lam_a + lam_b)
    reduced = h_a @ np.linalg.solve(h_a + h_b, h_b)
    correction = 0.5 * (reduced + reduced.T) - alpha * np.eye(q.shape[1])
    np_dtype = dtype.as_numpy_dtype
    # Everything in Q's span goes through the r×r correction; the rest is α times plain inner products.
    # One side at a time, without temporaries of the blocks' size: VGG-16's fc6 blocks are 0.8 GB each in
    # float64.
    a = np.asarray(blocks_a, np.float64)
    # Projections as batched matmuls (BLAS): numpy's einsum runs these without it, 20x slower on fc6.
    a_r = q.T @ a
    half_q_a = 0.5 * (alpha * np.einsum("kdn,kdn->n", a, a) + np.einsum("krn,rs,ksn->n", a_r, correction, a_r))
    left = _stacked(a, a_r, alpha, np_dtype)
    del a
    b = np.asarray(blocks_b, np.float64)
    b_r = q.T @ b
    corrected_b = correction @ b_r
    half_q_b = 0.5 * (alpha * np.einsum("kdn,kdn->n", b, b) + np.einsum("krn,krn->n", b_r, corrected_b))
    right = _stacked(b, corrected_b, 1.0, np_dtype)
    del b
    costs = tf.matmul(left, right, transpose_a=True).numpy()
    np.subtract(half_q_a.astype(np_dtype)[:, None], costs, out=costs)
    costs += half_q_b.astype(np_dtype)[None, :]
    return np.maximum(costs, 0.0, out=costs)


def _stacked(blocks: np.ndarray, reduced: np.ndarray, scale: float, dtype) -> np.ndarray:
    """`[scale · blocks; reduced]` as one `(k·d + k·r, n)` matrix of `dtype`, written in place."""
    k, d, n = blocks.shape
    out = np.empty((k * d + reduced.shape[0] * reduced.shape[1], n), dtype)
    np.multiply(blocks.reshape(k * d, n), scale, out=out[:k * d], casting="same_kind")
    out[k * d:] = reduced.reshape(-1, n)
    return out


def _low_rank_merged_weights(blocks_a, blocks_b, hessian_a, hessian_b) -> np.ndarray:
    a = np.asarray(blocks_a, np.float64)
    b = np.asarray(blocks_b, np.float64)
    q, h_a, h_b = _row_space(hessian_a, hessian_b)
    total = hessian_a.damping + hessian_b.damping
    rhs = np.stack([hessian_a.matmul(a[i]) + hessian_b.matmul(b[i]) for i in range(a.shape[0])])
    rhs_r = q.T @ rhs
    # S⁻¹ = Q S_r⁻¹ Qᵀ on the row space and 1/(λ_A+λ_B) on the rest.
    solved_r = np.linalg.inv(h_a + h_b) @ rhs_r
    return (rhs - q @ rhs_r) / total + q @ solved_r


def merged_weights(blocks_a, blocks_b, hessian_a, hessian_b) -> np.ndarray:
    """Returns `(H_A + H_B)⁻¹ (H_A a + H_B b)` for matched columns of `blocks_a` and `blocks_b`, in float64."""
    if isinstance(hessian_a, LowRankHessian) and isinstance(hessian_b, LowRankHessian):
        return _low_rank_merged_weights(blocks_a, blocks_b, hessian_a, hessian_b)
    if isinstance(hessian_a, TokenHessian) and isinstance(hessian_b, TokenHessian):
        a, b = hessian_a.diagonal()[None, :, None], hessian_b.diagonal()[None, :, None]
        return (a * np.asarray(blocks_a, np.float64) + b * np.asarray(blocks_b, np.float64)) / (a + b)
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
    n_a, n_b = np.shape(blocks_a)[2], np.shape(blocks_b)[2]
    if pairing == "random":
        return np.random.default_rng(seed).random((n_a, n_b))
    if pairing in ("weights", "euclidean"):
        # One matrix product of the flattened weights, in float32 on TensorFlow's device (a GPU when there
        # is one): 4096 units from 4096 inputs take one 4096³ matmul, where numpy's float64 einsum took 40x.
        flat_a, flat_b = (tf.reshape(tf.constant(w, tf.float32), (-1, np.shape(w)[2])) for w in (blocks_a, blocks_b))
        cross = tf.matmul(flat_a, flat_b, transpose_a=True)
        if pairing == "weights":
            return (-cross).numpy()
        squared = (tf.reduce_sum(tf.square(flat_a), axis=0)[:, None] + tf.reduce_sum(tf.square(flat_b), axis=0)[None, :]
                   - 2.0 * cross)
        return tf.maximum(squared, 0.0).numpy()
    a = np.asarray(blocks_a, np.float64)
    b = np.asarray(blocks_b, np.float64)
    if pairing == "correlation":
        pooled_b = np.stack([_times(pooled, b[i]) for i in range(b.shape[0])])
        pooled_a = np.stack([_times(pooled, a[i]) for i in range(a.shape[0])])
        mean = _times(pooled, np.eye(a.shape[1])[:, -1:])[:, 0]  # E[x̃]: the bias coordinate is constantly 1
        second_ab = np.tensordot(a, pooled_b, axes=([0, 1], [0, 1]))
        mean_a = np.tensordot(a, mean, axes=([1], [0])).sum(axis=0)
        mean_b = np.tensordot(b, mean, axes=([1], [0])).sum(axis=0)
        var_a = np.sum(a * pooled_a, axis=(0, 1)) - mean_a ** 2
        var_b = np.sum(b * pooled_b, axis=(0, 1)) - mean_b ** 2
        covariance = second_ab - np.outer(mean_a, mean_b)
        return 1.0 - covariance / np.sqrt(np.outer(np.maximum(var_a, 1e-12), np.maximum(var_b, 1e-12)))
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}.")


def recurrent_matching_costs(recurrent_a, recurrent_b, partner) -> np.ndarray:
    """Weight-matching costs (−aᵀb) of a recurrent layer's recurrent weights for every unit pair of A and B,
    given a pairing of all units (`partner[i]`: the unit of B paired with unit i of A), under which the
    recurrent kernels' rows (the same units) line up.

    A unit's incoming recurrent weights are its column (every unit's previous state into its gates, and the
    recurrent bias); its outgoing ones its row (its previous state into every unit's gates). Both count.

    Args:
        recurrent_a, recurrent_b: `(G, units + 1, units)` recurrent kernels, the recurrent bias last.
        partner: `(units,)` indices into B's units.

    Returns:
        `(units, units)` numpy array, to add to the input weights' costs.
    """
    a = tf.constant(recurrent_a, tf.float32)
    b = tf.constant(recurrent_b, tf.float32)
    rows = np.concatenate([partner, [int(recurrent_b.shape[1]) - 1]])
    width = int(a.shape[-1])
    incoming_a = tf.reshape(a, (-1, width))  # (G·(units + 1), units): a column per unit
    incoming_b = tf.reshape(tf.gather(b, rows, axis=1), (-1, tf.shape(b)[-1]))
    # Outgoing: (units, G·units), a row per unit, the columns in A's unit order.
    outgoing_a = tf.reshape(tf.transpose(a[:, :-1], (1, 0, 2)), (width, -1))
    outgoing_b = tf.reshape(tf.transpose(tf.gather(b[:, :-1], partner, axis=2), (1, 0, 2)), (int(b.shape[1]) - 1, -1))
    return -(tf.matmul(incoming_a, incoming_b, transpose_a=True)
             + tf.matmul(outgoing_a, outgoing_b, transpose_b=True)).numpy().astype(np.float64)


def merge_units(merge: str, blocks_a, blocks_b, hessian_a, hessian_b, tasks_in_a: int = 1) -> np.ndarray:
    """Merged incoming weights of matched columns: "hessian" (the paper's update), "average" (all tasks
    merged so far weigh the same; `tasks_in_a` counts those already in A), or "first" (keep A's)."""
    if merge == "hessian":
        return merged_weights(blocks_a, blocks_b, hessian_a, hessian_b)
    if merge == "first":
        return np.asarray(blocks_a, np.float64)
    if merge == "average":
        # In place (fc6 of VGG-16: 0.8 GB per float64 copy); the same sums as (n·a + b) / (n + 1).
        merged = np.array(blocks_b, np.float64)
        merged += blocks_a if tasks_in_a == 1 else tasks_in_a * np.asarray(blocks_a, np.float64)
        merged /= tasks_in_a + 1
        return merged
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}.")


def _times(hessian, w: np.ndarray) -> np.ndarray:
    """H @ w for a dense or structured Hessian."""
    if isinstance(hessian, _STRUCTURED):
        return hessian.matmul(w)
    return np.asarray(hessian, np.float64) @ w


def merge_error(merged, blocks, hessian, dtype=tf.float32) -> np.ndarray:
    """Per unit ½ δᵀ H δ, δ = merged − original: the pre-activation error a merge causes for one task.

    A dense Hessian is applied as one TensorFlow product over every block, in float32 by default (the
    report's number: float32 is the weights' own precision), a low-rank one through its factor.
    """
    delta = np.asarray(merged, np.float64) - blocks
    if isinstance(hessian, _STRUCTURED):
        return 0.5 * sum(hessian.quadratic(delta[i]) for i in range(delta.shape[0]))
    k, d, n = delta.shape
    flat = tf.reshape(tf.transpose(tf.constant(delta, dtype), (1, 0, 2)), (d, k * n))
    product = tf.matmul(tf.constant(hessian, dtype), flat)
    return 0.5 * tf.reduce_sum(tf.reshape(flat * product, (d, k, n)), axis=(0, 1)).numpy().astype(np.float64)
