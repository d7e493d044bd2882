"""Graphs traced once per input geometry, kept and reused.

Wide layers' statistics and costs run as TensorFlow graphs, one per geometry (shapes, kernel, frame
indices baked in as constants). TensorFlow's frequent-retracing warning counts every `tf.function` made
from one Python code object together, so a network with many layer shapes trips it although no function
ever retraces; calls made here silence that one logger while they trace.
"""

from __future__ import annotations

import contextlib
import logging

import tensorflow as tf


class PerGeometry:
    """A bounded cache of traced functions, `run(key, make, *tensors)` tracing `make()` once per key."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._functions: dict = {}

    def run(self, key, make, *tensors):
        if key not in self._functions:
            if len(self._functions) >= self.limit:
                self._functions.pop(next(iter(self._functions)))
            self._functions[key] = tf.function(make(), autograph=False)
        with quiet_retracing():
            return self._functions[key](*tensors)


class _NoRetracingWarning(logging.Filter):
    def filter(self, record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def quiet_retracing():
    """Drops TensorFlow's frequent-retracing warning (only that one) while the block runs: functions kept
    per geometry here, and Keras's own per-call functions (grouped convolutions) when the probe runs a
    model layer by layer, trip it without retracing anything that could be kept."""
    logger, drop = logging.getLogger("tensorflow"), _NoRetracingWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
