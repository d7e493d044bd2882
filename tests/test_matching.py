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


def _greedy_by_one_sort(cost, count):
    """The definition: walk every entry in one stable sort, taking those whose row and column are free."""
    used_rows, used_cols, pairs = set(), set(), []
    for flat in np.argsort(cost, axis=None, kind="stable"):
        row, col = divmod(int(flat), cost.shape[1])
        if row not in used_rows and col not in used_cols:
            used_rows.add(row)
            used_cols.add(col)
            pairs.append((row, col))
            if len(pairs) == count:
                break
    return pairs


@pytest.mark.parametrize("values", ["continuous", "tied", "non-finite"])
@pytest.mark.parametrize("shape", [(40, 40), (300, 120), (90, 260)])
def test_greedy_in_batches_takes_the_pairs_of_one_full_sort(shape, values):
    rng = np.random.default_rng(shape[0] * shape[1])
    cost = rng.standard_normal(shape)
    if values == "tied":
        cost = np.round(cost * 2)  # a handful of distinct values: ties decided by index
    elif values == "non-finite":
        cost[rng.integers(0, shape[0], 20), rng.integers(0, shape[1], 20)] = np.inf
        cost[0, 1] = np.nan
    for count in (1, min(shape) // 3, min(shape)):
        rows, cols = matching._greedy(cost, count)
        assert list(zip(rows.tolist(), cols.tolist())) == _greedy_by_one_sort(cost, count)
