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
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _cholesky(matrix: tf.Tensor) -> tf.Tensor:
    """Cholesky factor, adding jitter when rounding made the (damped) matrix numerically singular."""
    dim = tf.shape(matrix)[0]
    scale = tf.reduce_mean(tf.linalg.diag_part(matrix))
    jitter = tf.constant(0.0, matrix.dtype)
    for attempt in range(8):
        try:
            factor = tf.linalg.cholesky(matrix + jitter * tf.eye(dim, dtype=matrix.dtype))
            if bool(tf.reduce_all(tf.math.is_finite(factor))):
                return factor
        except tf.errors.InvalidArgumentError:
            pass
        jitter = scale * (10.0 ** (attempt - 7 if matrix.dtype == tf.float64 else attempt - 5))
    raise FloatingPointError("The summed layer Hessian could not be factorised even with jitter.")


def _flatten_blocks(blocks: tf.Tensor) -> tf.Tensor:
    """(K, D, n) -> (D, K*n) so one product handles every block."""
    k, d, n = blocks.shape
    return tf.reshape(tf.transpose(blocks, (1, 0, 2)), (d, k * n))


def cost_matrix(blocks_a, blocks_b, hessian_a, hessian_b, dtype=tf.float32) -> np.ndarray:
    """Returns the `(units_a, units_b)` matrix of merge costs ΔE.

    Args:
        blocks_a: `(K, D, n_a)` incoming weights of task A's units, bias last.
        blocks_b: `(K, D, n_b)` same for task B.
        hessian_a, hessian_b: `(D, D)` damped layer Hessians.
        dtype: compute precision; float32 is plenty for ranking pairs.

    Returns:
        numpy array of non-negative costs.
    """
    a = tf.convert_to_tensor(blocks_a, dtype)
    b = tf.convert_to_tensor(blocks_b, dtype)
    k, d, n_a = a.shape
    n_b = b.shape[2]
    h_a = tf.convert_to_tensor(hessian_a, dtype)
    h_b = tf.convert_to_tensor(hessian_b, dtype)
    factor = _cholesky(h_a + h_b)
    flat_a, flat_b = _flatten_blocks(a), _flatten_blocks(b)
    p_a = tf.matmul(h_a, flat_a)
    p_b = tf.matmul(h_b, flat_b)
    u = tf.linalg.triangular_solve(factor, p_a, lower=True)
    v = tf.linalg.triangular_solve(factor, p_b, lower=True)
    q_a = tf.reduce_sum(tf.reshape(tf.reduce_sum(flat_a * p_a - u * u, axis=0), (k, n_a)), axis=0)
    q_b = tf.reduce_sum(tf.reshape(tf.reduce_sum(flat_b * p_b - v * v, axis=0), (k, n_b)), axis=0)
    # Uᵀ V summed over blocks: stack each block's rows so one product does it.
    u_stacked = tf.reshape(tf.transpose(tf.reshape(u, (d, k, n_a)), (1, 0, 2)), (k * d, n_a))
    v_stacked = tf.reshape(tf.transpose(tf.reshape(v, (d, k, n_b)), (1, 0, 2)), (k * d, n_b))
    cross = tf.matmul(u_stacked, v_stacked, transpose_a=True)
    costs = 0.5 * (q_a[:, None] + q_b[None, :] - 2.0 * cross)
    return np.maximum(costs.numpy().astype(np.float64), 0.0)


def merged_weights(blocks_a, blocks_b, hessian_a, hessian_b) -> np.ndarray:
    """Returns `(H_A + H_B)⁻¹ (H_A a + H_B b)` for matched columns of `blocks_a` and `blocks_b`, in float64."""
    a = tf.convert_to_tensor(blocks_a, tf.float64)
    b = tf.convert_to_tensor(blocks_b, tf.float64)
    k, d, n = a.shape
    h_a = tf.convert_to_tensor(hessian_a, tf.float64)
    h_b = tf.convert_to_tensor(hessian_b, tf.float64)
    factor = _cholesky(h_a + h_b)
    rhs = tf.matmul(h_a, _flatten_blocks(a)) + tf.matmul(h_b, _flatten_blocks(b))
    solved = tf.linalg.cholesky_solve(factor, rhs)
    return tf.transpose(tf.reshape(solved, (d, k, n)), (1, 0, 2)).numpy()

