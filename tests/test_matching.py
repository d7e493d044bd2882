import itertools

import numpy as np
import pytest

from tf_mtz import matching


def brute_force_best(cost, count):
    n_rows, n_cols = cost.shape
    best = np.inf
    for rows in itertools.combinations(range(n_rows), count):
        for cols in itertools.permutations(range(n_cols), count):
            best = min(best, cost[list(rows), list(cols)].sum())
    return best


@pytest.mark.parametrize("shape,count", [((4, 4), 4), ((4, 5), 3), ((5, 4), 2), ((5, 5), 1)])
def test_optimal_is_exact_and_never_worse_than_greedy(shape, count):
    rng = np.random.default_rng(sum(shape) + count)
    for _ in range(5):
        cost = rng.random(shape)
        rows, cols = matching.match(cost, count, "optimal")
        g_rows, g_cols = matching.match(cost, count, "greedy")
        for r, c in ((rows, cols), (g_rows, g_cols)):
            assert len(set(r)) == len(set(c)) == count
        np.testing.assert_allclose(cost[rows, cols].sum(), brute_force_best(cost, count))
        assert cost[rows, cols].sum() <= cost[g_rows, g_cols].sum() + 1e-12


def test_greedy_takes_cheapest_available_pair_first():
    cost = np.array([[0.0, 1.0, 9.0], [0.5, 9.0, 9.0], [9.0, 9.0, 2.0]])
    rows, cols = matching.match(cost, 3, "greedy")
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (2, 2), (1, 1)]
    # Optimal swaps the first two pairs: 1.0 + 0.5 + 2.0 < 0.0 + 9.0 + 2.0.
    rows, cols = matching.match(cost, 3, "optimal")
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0), (2, 2)]


def test_pairs_are_sorted_by_cost_and_bad_arguments_raise():
    cost = np.random.default_rng(1).random((6, 6))
    rows, cols = matching.match(cost, 4, "greedy")
    assert np.all(np.diff(cost[rows, cols]) >= 0)
    with pytest.raises(ValueError, match="matching must be one of"):
        matching.match(cost, 2, "hungry")
    with pytest.raises(ValueError, match="Cannot pick 7 pairs"):
        matching.match(cost, 7)
    assert matching.match(cost, 0)[0].size == 0
