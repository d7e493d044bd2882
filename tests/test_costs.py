"""Exact identities of the merge-cost math."""

import numpy as np
import pytest
import tensorflow as tf

from tf_mtz import costs, matching, statistics
from tf_mtz.registry import Conv2DHandler


def random_hessian(rng, dim, samples=400):
    x = np.concatenate([rng.normal(size=(samples, dim - 1)), np.ones((samples, 1))], axis=1)
    return x.T @ x / samples


def brute_force(a, b, h_a, h_b):
    """½ Σ_blocks dᵀ H_A (H_A+H_B)⁻¹ H_B d for one pair, straight from the definition."""
    middle = h_a @ np.linalg.solve(h_a + h_b, h_b)
    return sum(0.5 * (a[k] - b[k]) @ middle @ (a[k] - b[k]) for k in range(a.shape[0]))


@pytest.mark.parametrize("blocks", [1, 9])
def test_cost_matrix_equals_per_pair_brute_force(rng, blocks):
    dim, n_a, n_b = 7, 5, 6
    a, b = rng.normal(size=(blocks, dim, n_a)), rng.normal(size=(blocks, dim, n_b))
    h_a, h_b = random_hessian(rng, dim), random_hessian(rng, dim)
    fast = costs.cost_matrix(a, b, h_a, h_b, dtype=tf.float64)
    slow = np.array([[brute_force(a[:, :, i], b[:, :, j], h_a, h_b) for j in range(n_b)] for i in range(n_a)])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
    fast32 = costs.cost_matrix(a, b, h_a, h_b)
    np.testing.assert_allclose(fast32, slow, rtol=1e-3, atol=1e-4 * slow.max())


def test_three_forms_of_cost_and_merged_weight_agree(rng):
    dim = 6
    h_a, h_b = random_hessian(rng, dim), random_hessian(rng, dim)
    a, b = rng.normal(size=dim), rng.normal(size=dim)
    d = a - b
    inv_a, inv_b = np.linalg.inv(h_a), np.linalg.inv(h_b)
    form_harmonic = 0.5 * d @ np.linalg.inv(inv_a + inv_b) @ d
    form_ab = 0.5 * d @ h_a @ np.linalg.solve(h_a + h_b, h_b) @ d
    form_ba = 0.5 * d @ h_b @ np.linalg.solve(h_a + h_b, h_a) @ d
    ours = costs.cost_matrix(a[None, :, None], b[None, :, None], h_a, h_b, dtype=tf.float64)[0, 0]
    np.testing.assert_allclose([form_ab, form_ba, ours], form_harmonic, rtol=1e-10)

    merged = costs.merged_weights(a[None, :, None], b[None, :, None], h_a, h_b)[0, :, 0]
    merged_from_a = a - inv_a @ np.linalg.inv(inv_a + inv_b) @ d
    merged_from_b = b + inv_b @ np.linalg.inv(inv_a + inv_b) @ d
    np.testing.assert_allclose(merged, merged_from_a, rtol=1e-9)
    np.testing.assert_allclose(merged, merged_from_b, rtol=1e-9)
    # The cost is exactly the error the merged weight causes: ½δ_AᵀH_Aδ_A + ½δ_BᵀH_Bδ_B.
    spent = 0.5 * (merged - a) @ h_a @ (merged - a) + 0.5 * (merged - b) @ h_b @ (merged - b)
    np.testing.assert_allclose(spent, form_harmonic, rtol=1e-9)


def test_chosen_costs_equal_measured_preactivation_error_undamped(rng):
    """For a Dense layer, Σ chosen ΔE is the increase of the mean squared pre-activation error."""
    inputs, units = 8, 10
    x_a = rng.normal(size=(3000, inputs))
    x_b = rng.normal(loc=0.5, size=(3000, inputs)) * 1.5
    w_a, w_b = rng.normal(size=(inputs + 1, units)), rng.normal(size=(inputs + 1, units))
    aug = lambda x: np.concatenate([x, np.ones((len(x), 1))], axis=1)  # noqa: E731
    h_a = aug(x_a).T @ aug(x_a) / len(x_a)
    h_b = aug(x_b).T @ aug(x_b) / len(x_b)
    h_a, h_b = statistics.damped(h_a, 0.0), statistics.damped(h_b, 0.0)
    cost = costs.cost_matrix(w_a[None], w_b[None], h_a, h_b, dtype=tf.float64)
    rows, cols = matching.match(cost, 7, "greedy")
    merged = costs.merged_weights(w_a[None][:, :, rows], w_b[None][:, :, cols], h_a, h_b)[0]
    err_a = np.mean(np.sum((aug(x_a) @ merged - aug(x_a) @ w_a[:, rows]) ** 2, axis=1))
    err_b = np.mean(np.sum((aug(x_b) @ merged - aug(x_b) @ w_b[:, cols]) ** 2, axis=1))
    np.testing.assert_allclose(0.5 * (err_a + err_b), cost[rows, cols].sum(), rtol=1e-6)


def test_permuted_units_cost_zero_and_matching_recovers_permutation(rng):
    dim, units = 9, 12
    w = rng.normal(size=(1, dim, units))
    perm = rng.permutation(units)
    h_a, h_b = random_hessian(rng, dim), random_hessian(rng, dim)
    cost = costs.cost_matrix(w, w[:, :, perm], h_a, h_b)
    for method in ("greedy", "optimal"):
        rows, cols = matching.match(cost, units, method)
        np.testing.assert_array_equal(perm[cols], rows)
        assert cost[rows, cols].max() < 1e-5 * np.median(cost)


def test_singular_hessians_give_finite_costs_and_weights(rng):
    dim = 6
    x = np.zeros((50, dim))
    x[:, 0] = rng.normal(size=50)  # rank 1 plus zeros: always-zero border pixels
    singular = x.T @ x / 50
    zero = np.zeros((dim, dim))
    a, b = rng.normal(size=(1, dim, 4)), rng.normal(size=(1, dim, 4))
    for h_a, h_b in ((singular, singular), (zero, zero), (singular, zero)):
        for damping in (0.0, 1e-2):
            da, db = statistics.damped(h_a, damping), statistics.damped(h_b, damping)
            assert np.isfinite(costs.cost_matrix(a, b, da, db)).all()
            assert np.isfinite(costs.merged_weights(a, b, da, db)).all()


def test_conv_patch_samples_reproduce_convolution(rng):
    """The im2col patches times the flattened kernel give the convolution itself."""
    import keras

    layer = keras.layers.Conv2D(4, 3, strides=2, padding="same", dilation_rate=1)
    x = rng.normal(size=(2, 9, 9, 3)).astype("float32")
    y = layer(x).numpy()
    kernel, bias = Conv2DHandler().kernel_and_bias(layer)
    patches = Conv2DHandler().hessian_samples(layer, tf.constant(x), "patch").numpy()
    blocks = Conv2DHandler().to_blocks(kernel, bias, "patch")[0]
    np.testing.assert_allclose(patches @ blocks[:-1] + blocks[-1], y.reshape(-1, 4), atol=1e-5)
    back_kernel, back_bias = Conv2DHandler().from_blocks(blocks[None], kernel.shape, "patch")
    np.testing.assert_array_equal(back_kernel, kernel)
    channel_blocks = Conv2DHandler().to_blocks(kernel, bias, "channel")
    assert channel_blocks.shape == (9, 4, 4)
    back_kernel, back_bias = Conv2DHandler().from_blocks(channel_blocks, kernel.shape, "channel")
    np.testing.assert_array_equal(back_kernel, kernel)
    np.testing.assert_allclose(back_bias, bias)


def test_low_rank_hessians_give_the_dense_costs_merges_and_errors(rng):

    d, n, samples = 40, 12, 9  # fewer samples than features: rank-deficient Hessians
    a = rng.normal(size=(2, d, n))
    b = rng.normal(size=(2, d, n))
    low = [statistics.LowRankHessian(rng.normal(size=(samples, d)) / 3, lam) for lam in (0.05, 0.2)]
    dense = [h.dense() for h in low]
    np.testing.assert_allclose(costs.cost_matrix(a, b, *low, dtype=tf.float64),
                               costs.cost_matrix(a, b, *dense, dtype=tf.float64), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(costs.merged_weights(a, b, *low), costs.merged_weights(a, b, *dense), atol=1e-9)
    np.testing.assert_allclose(costs.merge_error(a, b, low[0]), costs.merge_error(a, b, dense[0], tf.float64),
                               rtol=1e-10)
    summed = low[0] + low[1]
    np.testing.assert_allclose(summed.dense(), dense[0] + dense[1], atol=1e-12)
    np.testing.assert_allclose(costs.pairing_costs("correlation", a, b, None, None, pooled=low[0]),
                               costs.pairing_costs("correlation", a, b, None, None, pooled=dense[0]), atol=1e-9)


def test_few_samples_keep_the_hessian_as_its_samples(rng):
    import keras

    x = rng.normal(size=(10, 30)).astype("float32")
    probe = keras.Sequential([keras.Input((30,)), keras.layers.Identity()])
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4)
    kwargs = dict(task="a", layer_name="fc", is_first_layer=True)
    low = statistics.layer_hessian(probe, dataset, lambda v: v, **kwargs)
    assert low.matrix is None and low.factor.shape == (10, 31) and low.rank_deficient
    augmented = np.concatenate([x, np.ones((10, 1))], axis=1)
    np.testing.assert_allclose(low.dense(), augmented.T @ augmented / 10, rtol=1e-5)
    full = statistics.layer_hessian(probe, tf.data.Dataset.from_tensor_slices(np.tile(x, (4, 1))).batch(8),
                                    lambda v: v, **kwargs)
    assert full.factor is None and full.samples == 40
    np.testing.assert_allclose(full.matrix, augmented.T @ augmented / 10, rtol=1e-5)


@pytest.mark.parametrize("form", ["factored", "solved"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_both_cost_forms_equal_brute_force_through_deep_block_recursion(rng, monkeypatch, form, blocks):
    """Leaves of side 2 make the blocked factorisation, solve and triangular product recurse four levels."""
    monkeypatch.setattr(costs, "_LEAF", 2)
    monkeypatch.setattr(costs, "_FACTORED_FROM", 0.0 if form == "factored" else np.inf)
    dim, n_a, n_b = 23, 9, 14
    a, b = rng.normal(size=(blocks, dim, n_a)), rng.normal(size=(blocks, dim, n_b))
    h_a, h_b = random_hessian(rng, dim), 3.0 * random_hessian(rng, dim)
    fast = costs.cost_matrix(a, b, h_a, h_b, dtype=tf.float64)
    slow = np.array([[brute_force(a[:, :, i], b[:, :, j], h_a, h_b) for j in range(n_b)] for i in range(n_a)])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_block_factor_tree_solves_and_multiplies_like_its_matrix(rng, monkeypatch):
    monkeypatch.setattr(costs, "_LEAF", 3)
    dim = 20
    h, other = random_hessian(rng, dim), random_hessian(rng, dim)
    total = np.linalg.cholesky(h + other)
    tree = costs._factor_tree(tf.constant(h + other))
    x = rng.normal(size=(dim, 5))
    np.testing.assert_allclose(costs._lower_solve(tree, tf.constant(x)), np.linalg.solve(total, x), rtol=1e-9)
    np.testing.assert_allclose(costs._upper_times(tree, tf.constant(x)), total.T @ x, rtol=1e-9)
    # The factor of a Schur complement H − ZᵀZ, with only the blocks the recursion needs formed.
    z = np.linalg.solve(total, h)
    schur = np.linalg.cholesky(h - z.T @ z)
    root = costs._factor_tree(tf.constant(h), tf.constant(z))
    np.testing.assert_allclose(costs._upper_times(root, tf.constant(x)), schur.T @ x, rtol=1e-8, atol=1e-12)
    assert bool(costs._factored(root))
    assert not bool(costs._factored(costs._factor_tree(tf.constant(-h))))


def test_factored_form_falls_back_to_solved_when_the_schur_complement_is_singular(rng, monkeypatch):
    """H_B = 0 makes M = H_A S⁻¹ H_B = 0, which has no Cholesky factor: every cost must still come out (0)."""
    monkeypatch.setattr(costs, "_FACTORED_FROM", 0.0)
    dim = 8
    h_a, h_b = random_hessian(rng, dim), np.zeros((dim, dim))
    a, b = rng.normal(size=(1, dim, 6)), rng.normal(size=(1, dim, 6))
    cost = costs.cost_matrix(a, b, h_a, h_b, dtype=tf.float64)
    np.testing.assert_allclose(cost, 0.0, atol=1e-10)


def test_factorisations_that_raise_as_on_a_gpu_fall_back_or_get_jitter(rng, monkeypatch):
    """TensorFlow's GPU Cholesky raises on a matrix that is not positive definite, the CPU one returns NaNs."""
    cholesky = tf.linalg.cholesky

    def raising_cholesky(matrix):
        factor = cholesky(matrix)
        if not np.all(np.isfinite(factor.numpy())):
            raise tf.errors.InvalidArgumentError(None, None, "Cholesky decomposition was not successful.")
        return factor

    monkeypatch.setattr(tf.linalg, "cholesky", raising_cholesky)
    monkeypatch.setattr(costs, "_FACTORED_FROM", 0.0)
    dim = 8
    a, b = rng.normal(size=(1, dim, 6)), rng.normal(size=(1, dim, 6))
    h = random_hessian(rng, dim)
    np.testing.assert_allclose(costs.cost_matrix(a, b, h, np.zeros((dim, dim)), dtype=tf.float64), 0.0, atol=1e-10)
    zero = np.zeros((dim, dim))
    assert np.isfinite(costs.cost_matrix(a, b, zero, zero)).all()
