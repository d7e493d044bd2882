"""Matching: choosing which unit of one task shares with which unit of another, one to one."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

MATCHINGS = ("greedy", "optimal")


def match(costs: np.ndarray, count: int, method: str = "greedy") -> tuple[np.ndarray, np.ndarray]:
    """Picks `count` one-to-one pairs (row, column) of a cost matrix, returned cheapest first.

    Args:
        costs: `(n_rows, n_cols)` merge costs.
        count: number of pairs, at most `min(n_rows, n_cols)`.
        method: "greedy" takes the cheapest remaining pair until `count` are chosen (the paper);
            "optimal" finds the `count` pairs of least total cost (an exact assignment).

    Returns:
        `(rows, cols)` integer arrays of length `count`, sorted by pair cost.

    Raises:
        ValueError: for an unknown method or an impossible count.

    Example:

    >>> rows, cols = match(np.array([[0.0, 5.0], [1.0, 0.2]]), 2)
    >>> rows.tolist(), cols.tolist()
    ([0, 1], [0, 1])
    """
    n_rows, n_cols = costs.shape
    if not 0 <= count <= min(n_rows, n_cols):
        raise ValueError(f"Cannot pick {count} pairs from a {n_rows}x{n_cols} cost matrix.")
    if count == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if method == "greedy":
        rows, cols = _greedy(costs, count)
    elif method == "optimal":
        rows, cols = _optimal(costs, count)
    else:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {method!r}.")
    order = np.argsort(costs[rows, cols], kind="stable")
    return rows[order], cols[order]


def _greedy(costs: np.ndarray, count: int):
    """The paper's greedy matching: the cheapest pair whose row and column are both free, until `count`.

    Sorting all n² costs cost more than the rest of a 4096-unit layer's matching (1.5 s), so it sorts only
    the cheapest entries among the free rows and columns, a few per unit, takes what it can from them,
    and repeats on the rows and columns still free. That is the same order as one stable sort of everything
    (ties by index): an entry among the free ones that was not taken lies above every entry sorted so far.
    """
    if not np.isfinite(costs).all():  # NaNs and infinities: one plain sort orders them
        return _take_in_order(np.argsort(costs, axis=None, kind="stable"), costs.shape, count)
    free_rows, free_cols = np.arange(costs.shape[0]), np.arange(costs.shape[1])
    rows, cols = [], []
    while len(rows) < count:
        free = costs[np.ix_(free_rows, free_cols)].reshape(-1)
        size = 8 * (free_rows.size + free_cols.size)
        batch = np.arange(free.size) if size >= free.size else np.flatnonzero(free <= np.partition(free, size)[size])
        batch = batch[np.argsort(free[batch], kind="stable")]
        taken_rows, taken_cols = _take_in_order(batch, (free_rows.size, free_cols.size), count - len(rows))
        rows.extend(free_rows[taken_rows].tolist())
        cols.extend(free_cols[taken_cols].tolist())
        free_rows = np.delete(free_rows, taken_rows)
        free_cols = np.delete(free_cols, taken_cols)
    return np.array(rows), np.array(cols)


def _take_in_order(order: np.ndarray, shape: tuple, count: int) -> tuple:
    """Walks flat indices of a `shape` matrix in `order`, taking each whose row and column are still free,
    until `count` are taken or the order ends; returns their rows and columns."""
    n_cols = shape[1]
    used_rows, used_cols = np.zeros(shape[0], bool), np.zeros(n_cols, bool)
    rows, cols = [], []
    # Most entries hit a row or column taken earlier; filter them a chunk at a time with numpy and walk
    # only the survivors in Python.
    chunk = max(4 * sum(shape), 4096)
    for start in range(0, order.size, chunk):
        r, c = np.divmod(order[start:start + chunk], n_cols)
        alive = ~used_rows[r] & ~used_cols[c]
        for row, col in zip(r[alive].tolist(), c[alive].tolist()):
            if used_rows[row] or used_cols[col]:
                continue
            used_rows[row] = used_cols[col] = True
            rows.append(row)
            cols.append(col)
            if len(rows) == count:
                return np.array(rows, np.int64), np.array(cols, np.int64)
    return np.array(rows, np.int64), np.array(cols, np.int64)


def _optimal(costs: np.ndarray, count: int):
    """Exact minimum-cost matching of exactly `count` pairs.

    Padding rows/columns at zero cost let `n_rows - count` rows and `n_cols - count` columns stay unmatched;
    pairing two padding entries is forbidden, which forces exactly `count` real pairs.
    """
    n_rows, n_cols = costs.shape
    if count == min(n_rows, n_cols):
        rows, cols = linear_sum_assignment(costs)
        return rows, cols
    forbidden = (np.abs(costs).max() + 1.0) * (n_rows + n_cols) * 4
    size = n_rows + n_cols - count
    padded = np.zeros((size, size))
    padded[:n_rows, :n_cols] = costs
    padded[n_rows:, n_cols:] = forbidden
    rows, cols = linear_sum_assignment(padded)
    real = (rows < n_rows) & (cols < n_cols)
    return rows[real], cols[real]


def match_heads(key_a: np.ndarray, value_a: np.ndarray, key_b: np.ndarray, value_b: np.ndarray) -> tuple:
    """Matches B's attention heads to A's by weight matching, and within each matched pair the query/key
    dims and the value dims (exact assignments, as Git Re-Basin matches units).

    A head pair's cost is the best −aᵀb of its query/key dims plus the best of its value dims, each found by
    its own assignment; the heads are then assigned on those costs.

    Args:
        key_a, key_b: `(heads, features, key_dim)`: per head and query/key dim, its query and key weights.
        value_a, value_b: `(heads, features, value_dim)`: per head and value dim, its value weights and its
            row of the output projection.

    Returns:
        `(heads, key_dims, value_dims, costs)`: B's head at each of A's head positions `(heads,)`, B's dims
        in A's order within each of them `(heads, key_dim)` and `(heads, value_dim)`, and each matched
        pair's cost `(heads,)`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> key, value = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 7, 3))
    >>> heads, key_dims, _, _ = match_heads(key, value, key[::-1, :, ::-1], value[::-1])
    >>> heads.tolist(), key_dims[0].tolist()
    ([1, 0], [2, 1, 0])
    """
    count = key_a.shape[0]
    costs = np.zeros((count, count))
    orders = {}
    for i in range(count):
        for j in range(count):
            total = 0.0
            for name, a, b in (("key", key_a, key_b), ("value", value_a, value_b)):
                pair_cost = -(a[i].T.astype(np.float64) @ b[j])
                rows, cols = linear_sum_assignment(pair_cost)
                orders[name, i, j] = cols[np.argsort(rows)]
                total += float(pair_cost[rows, cols].sum())
            costs[i, j] = total
    rows, heads = linear_sum_assignment(costs)
    heads = heads[np.argsort(rows)]
    key_dims = np.stack([orders["key", i, heads[i]] for i in range(count)])
    value_dims = np.stack([orders["value", i, heads[i]] for i in range(count)])
    return heads, key_dims, value_dims, costs[np.arange(count), heads]
