"""What the MNIST benchmarks share: the methods compared and the two experiments."""

from __future__ import annotations

import numpy as np

import tf_mtz
from tf_mtz.experimental import ExperimentalConfig

METHODS = {
    "tf_mtz default": tf_mtz.ZipConfig(),
    "paper (no refit)": tf_mtz.ZipConfig.paper(),
    "hessian + average": ExperimentalConfig(pairing="hessian", merge="average", matching="greedy", refit=True),
    "euclidean + average": ExperimentalConfig(pairing="euclidean", merge="average", matching="greedy", refit=True),
    # The same recipe as the default (kept as the baseline issue 4 names).
    "weight matching + average": ExperimentalConfig(pairing="weights", merge="average", matching="optimal"),
    "correlation + average": ExperimentalConfig(pairing="correlation", merge="average", matching="greedy"),
    "hessian pairing, A's weights": ExperimentalConfig(pairing="hessian", merge="first", matching="greedy"),
    "random + average": ExperimentalConfig(pairing="random", merge="average", matching="greedy"),
}
# What the default has to beat: every method above but itself (the paper's exact procedure included).
BASELINES = [m for m in METHODS if m != "tf_mtz default"]


def experiment_data(name, x_train, y_train, x_test, y_test):
    """Per task: (x_train, y_train, x_test, y_test)."""
    if name == "E1":
        return {"a": (x_train, y_train, x_test, y_test), "b": (x_train, y_train, x_test, y_test)}
    low_train, low_test = y_train < 5, y_test < 5
    return {"a": (x_train[low_train], y_train[low_train], x_test[low_test], y_test[low_test]),
            "b": (x_train[~low_train], y_train[~low_train] - 5, x_test[~low_test], y_test[~low_test] - 5)}


def error(predictions, y):
    return float(np.mean(np.argmax(predictions, -1) != y) * 100)
