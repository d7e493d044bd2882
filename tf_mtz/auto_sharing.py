"""Choosing the sharing under an error budget: layer by layer from the input, the largest share of a layer's
units whose zipped network stays within a tolerance of the original models on held-out data.

The zipper asks `SharingSearch.choose` at each layer that starts a unit group, with a function that zips
that layer at a given count (the same step as any zip: pair, merge, refit the next layer) on a copy of the
zip state and returns the zipped network's outputs; this module judges them (`Judge`) and searches the
candidates (`largest_passing`). It sees arrays, never layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tf_mtz.errors import ZipError


@dataclasses.dataclass(frozen=True)
class AutoSharing:
    """Lets `zip_models` choose each hidden layer's sharing: from the input, the largest fraction (on a grid
    of `step`) whose zipped network stays within `tolerance` of every task's own model on `data`.

    With labelled `data` (`(x, y)` per task, or one for all) the tolerance is in percentage points of
    classification error per task. With inputs alone (or `data=None`: the calibration inputs) it is the
    fraction of inputs on which a task's top-1 output departs from its own model's; for a regression head
    (one output unit) the relative output error ‖zipped − own‖ / ‖own‖. Each layer is judged right after
    it is zipped and the next layer refit, before any retraining, so retraining can only do better. The
    search assumes that sharing fewer units never costs more (it bisects the grid); the report lists every
    candidate tried (`zip_report.auto_sharing`) and plots them (`zip_report.plot_auto_sharing`).

    Args:
        tolerance: the loss allowed per task (percentage points with labels, a fraction without), >= 0.
        data: held-out data, as `calibration_data` takes it (numpy arrays); None uses the calibration data,
            which is then not held out. At most `max_samples` samples per task are used.
        step: the grid of fractions tried, in (0, 1].
        max_samples: samples per task used to judge.

    Raises:
        ValueError (`tf_mtz.ZipError`): a tolerance below 0, a step outside (0, 1], max_samples below 1.

    Example:

    ```python
    zipped = tf_mtz.zip_models(models, x_train[:5000],
                               sharing=tf_mtz.AutoSharing(tolerance=0.3, data=(x_val, y_val)))
    print(zipped.zip_report.auto_sharing)
    ```
    """

    tolerance: float
    data: object = None
    step: float = 0.05
    max_samples: int = 2000

    def __post_init__(self):
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or self.tolerance < 0:
            raise ZipError(f"AutoSharing(tolerance=...) must be a number >= 0, got {self.tolerance!r}.")
        if not isinstance(self.step, (int, float)) or not 0 < self.step <= 1:
            raise ZipError(f"AutoSharing(step=...) must be in (0, 1], got {self.step!r}.")
        if not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ZipError(f"AutoSharing(max_samples=...) must be a positive integer, got {self.max_samples!r}.")


def candidate_counts(width: int, step: float) -> list:
    """The unit counts of the fractions 0, step, 2·step, …, 1 of `width`, ascending, without repeats."""
    fractions = np.append(np.arange(0.0, 1.0, step), 1.0)
    return sorted({int(round(f * width)) for f in fractions})


def largest_passing(candidates: list, passes) -> int:
    """The largest of `candidates` (ascending; the first, no sharing, taken to pass) for which `passes(count)`
    holds, by bisection: passing is assumed to hold for every count below a passing one. The largest is
    tried first, as a full share often passes."""
    if len(candidates) == 1 or passes(candidates[-1]):
        return candidates[-1]
    low, high = 0, len(candidates) - 1  # candidates[low] passes (or is the floor), candidates[high] fails
    while high - low > 1:
        middle = (low + high) // 2
        if passes(candidates[middle]):
            low = middle
        else:
            high = middle
    return candidates[low]


class Judge:
    """The loss of each task's zipped output against its own model's on held-out inputs (see AutoSharing)."""

    def __init__(self, tolerance: float, inputs: dict, labels: dict, originals: dict):
        """`inputs`, `labels` (None where there are none) and the own models' `originals` outputs, per task."""
        self.tolerance, self.inputs, self.labels, self.originals = tolerance, inputs, labels, originals
        self.own_error = {t: _error(originals[t], labels[t]) for t in inputs if labels[t] is not None}

    def losses(self, outputs: dict) -> dict:
        """`{task: loss}` of the zipped network's `outputs` per task."""
        result = {}
        for t, zipped in outputs.items():
            zipped, own = np.asarray(zipped, np.float64), np.asarray(self.originals[t], np.float64)
            if self.labels[t] is not None:
                result[t] = _error(zipped, self.labels[t]) - self.own_error[t]
            elif zipped.shape[-1] > 1:
                result[t] = float(np.mean(np.argmax(zipped, -1) != np.argmax(own, -1)))
            else:
                result[t] = float(np.linalg.norm(zipped - own) / max(np.linalg.norm(own), 1e-12))
        return result

    def passes(self, losses: dict) -> bool:
        # A slack for rounding: 15 of 5,000 images is 0.30000000000000004 points, which must meet 0.3.
        return all(loss <= self.tolerance + 1e-9 for loss in losses.values())


def _error(outputs, labels) -> float:
    """Classification error in percent."""
    return float(np.mean(np.argmax(outputs, -1) != np.asarray(labels).reshape(-1)) * 100.0)


class SharingSearch:
    """The choice of each group's shared units, and what was tried (for the report)."""

    def __init__(self, judge: Judge, step: float):
        self.judge, self.step = judge, step
        self.probe = None  # the zipped network on the judge's inputs (a `probe.Probe`), set by the zipper
        self.tried = []  # {"layer", "width", "candidates": [(count, {task: loss} or None)], "chosen"}

    def choose(self, layer_name: str, width: int, zip_at) -> int:
        """The largest count passing the judge; `zip_at(count)` zips the layer at `count` on a copy of the
        state and returns the outputs `{task: array}`, or raises ZipError where that count is not allowed
        (a LayerNormalization's units all or none, no shared inputs)."""
        record = {"layer": layer_name, "width": width, "candidates": [], "chosen": 0}

        def passes(count):
            try:
                losses = self.judge.losses(zip_at(count))
            except ZipError:
                record["candidates"].append((count, None))
                return False
            record["candidates"].append((count, losses))
            return self.judge.passes(losses)

        record["chosen"] = largest_passing(candidate_counts(width, self.step), passes)
        self.tried.append(record)
        return record["chosen"]
