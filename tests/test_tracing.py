"""Traced functions kept per geometry: each traced once, and TensorFlow's frequent-retracing warning
(which counts every function made from one code object together) not printed for them."""

import logging

import numpy as np
import tensorflow as tf

from tf_mtz import tracing


def test_one_trace_per_geometry_and_no_retracing_warning(caplog):
    traces = []

    def make():
        def square_sum(x):
            traces.append(tuple(x.shape))
            return tf.reduce_sum(x * x)
        return square_sum

    functions = tracing.PerGeometry()
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(2):
            for n in range(1, 10):
                x = tf.constant(np.ones((n, 3), np.float32))
                assert float(functions.run(("square_sum", n), make, x)) == 3.0 * n
    assert traces == [(n, 3) for n in range(1, 10)]  # the second round reuses every trace
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    assert not logging.getLogger("tensorflow").filters  # removed after each call


def test_the_cache_is_bounded():
    functions = tracing.PerGeometry(limit=3)
    for n in range(5):
        functions.run(n, lambda: tf.reduce_sum, tf.ones((n + 1,)))
    assert len(functions._functions) == 3
