"""Speed of the merge-cost matrix, measured side by side with a plain matmul in one run.

A 4096-unit Dense layer with 4096 inputs (plus bias): the whole ΔE matrix versus one 4096x4096x4096
float32 matmul on the same machine, and versus a per-pair Python loop (timed on a sub-block, extrapolated).

    python benchmarks/speed_costs.py [--units 4096] [--repeats 3]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tf_mtz import costs, matching, statistics  # noqa: E402

UNITS = flags.DEFINE_integer("units", 4096, "Units and inputs of the layer.")
REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats of the matmul and the cost matrix, interleaved.")
LOOP_PAIRS = flags.DEFINE_integer("loop_pairs", 200, "Pairs timed for the per-pair loop.")


def run_times(*functions, repeats):
    """Times the functions alternately, after one warm-up call each (kernels, traces, allocations), so
    they all see the same machine state; returns one array of seconds per function."""
    for fn in functions:
        fn()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, spent in zip(functions, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [np.array(spent) for spent in times]


def best_time(fn, repeats):
    return run_times(fn, repeats=repeats)[0].min()


def tree_tensors(tree) -> list:
    """Every tensor of a block factor, so a traced stage has to compute all of it."""
    if hasattr(tree, "inverse"):
        return [tree.factor, tree.inverse]
    return tree_tensors(tree.top) + [tree.lower_left_t] + tree_tensors(tree.bottom)


def stage_times(h_a, h_b, a, b, repeats):
    """Seconds of each stage of the factored form, as differences of traced prefixes of the pipeline."""
    h, other = (h_a, h_b) if np.trace(h_a) <= np.trace(h_b) else (h_b, h_a)
    h, other, a, b = (tf.constant(m, tf.float32) for m in (h, other, a[0], b[0]))

    def factor():
        return costs._factor_tree(h + other)

    def solve():
        return costs._lower_solve(factor(), h)

    def root():
        return costs._factor_tree(h, solve())

    def products():
        tree = root()
        return costs._upper_times(tree, a), costs._upper_times(tree, b)

    prefixes = {"Cholesky factor of S": lambda: tree_tensors(factor()),
                "d x d solve Z = L^-1 H": solve,
                "Schur complement H - Z^T Z + its factor": lambda: tree_tensors(root()),
                "triangular products F^T A, F^T B": products}
    traced = [tf.function(fn, autograph=False) for fn in prefixes.values()]
    spent = run_times(*[lambda fn=fn: [t.numpy() for t in tf.nest.flatten(fn())] for fn in traced],
                      repeats=repeats)
    return dict(zip(prefixes, np.diff([0.0] + [times.min() for times in spent])))


def main(_):
    n = UNITS.value
    rng = np.random.default_rng(0)
    d = n + 1
    samples = rng.normal(size=(2 * d, d)).astype(np.float32)
    h_a = statistics.damped(samples[:d].T @ samples[:d] / d, 1e-2)
    h_b = statistics.damped(samples[d:].T @ samples[d:] / d, 1e-2)
    a = rng.normal(size=(1, d, n)).astype(np.float32)
    b = rng.normal(size=(1, d, n)).astype(np.float32)

    x = tf.constant(rng.normal(size=(n, n)).astype(np.float32))
    y = tf.constant(rng.normal(size=(n, n)).astype(np.float32))
    matmuls, cost_runs = run_times(lambda: tf.matmul(x, y).numpy(), lambda: costs.cost_matrix(a, b, h_a, h_b),
                                   repeats=REPEATS.value)
    t_matmul, t_costs = matmuls.min(), cost_runs.min()
    ratios = cost_runs / matmuls
    cost = costs.cost_matrix(a, b, h_a, h_b)
    t_greedy = best_time(lambda: matching.match(cost, n, "greedy"), 1)
    t_optimal = best_time(lambda: matching.match(cost, n, "optimal"), 1)

    # The per-pair loop the reference code effectively runs: one solve per pair.
    h_a64, h_b64 = h_a.astype(np.float64), h_b.astype(np.float64)
    pairs = LOOP_PAIRS.value

    def loop():
        for p in range(pairs):
            i, j = p % n, (p * 7) % n
            diff = (a[0, :, i] - b[0, :, j]).astype(np.float64)
            0.5 * diff @ h_a64 @ np.linalg.solve(h_a64 + h_b64, h_b64 @ diff)

    t_loop = best_time(loop, 1) / pairs * n * n

    print(f"{n}-unit Dense layer, {n} inputs + bias, {tf.config.list_physical_devices()[-1].device_type}:")
    print(f"  one {n}^3 float32 matmul      {t_matmul:8.3f} s")
    print(f"  full cost matrix ({n}x{n})   {t_costs:8.3f} s   = {t_costs / t_matmul:.2f}x the matmul, best against "
          "best (flops: 3.3 matmuls; target <= 5x)")
    print(f"  same, run by run             median {np.median(ratios):.2f}x, range {ratios.min():.2f}-{ratios.max():.2f}x "
          f"over {len(ratios)} interleaved runs")
    stages = stage_times(h_a, h_b, a, b, REPEATS.value)
    stages["rest: product for all pairs, diagonal terms, copies"] = t_costs - sum(stages.values())
    print("  where the cost matrix's time goes (best of traced prefixes, differenced):")
    for name, seconds in stages.items():
        print(f"    {name:42s} {seconds:6.3f} s")
    print(f"  per-pair loop (extrapolated) {t_loop:8.0f} s   -> vectorised is {t_loop / t_costs:,.0f}x faster")
    print(f"  greedy matching              {t_greedy:8.3f} s")
    print(f"  optimal matching             {t_optimal:8.3f} s")


if __name__ == "__main__":
    app.run(main)
