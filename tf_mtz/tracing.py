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
        with _quiet_tensorflow_warnings():
            return self._functions[key](*tensors)


@contextlib.contextmanager
def _quiet_tensorflow_warnings():
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
