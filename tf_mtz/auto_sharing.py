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

    The loss follows each task's output layer. A softmax head: with labelled `data` (`(x, y)` per task, or
    one for all) percentage points of classification error over its own model's; with inputs alone (or
    `data=None`: the calibration inputs) the fraction of inputs on which its top-1 output departs from its
    own model's. A sigmoid head: the fraction of output units (thresholded at 0.5) that flip. A linear head
    (regression, heat maps, dense outputs): the relative output error ‖zipped − own‖ / ‖own‖. Tasks of
    different kinds take different tolerances: give `{task: tolerance}`. Each layer is judged right after
    it is zipped and the next layer refit, before any retraining, so retraining can only do better. The
    search assumes that sharing fewer units never costs more (it bisects the grid); the report lists every
    candidate tried (`zip_report.auto_sharing`) and plots them (`zip_report.plot_auto_sharing`).

    Args:
        tolerance: the loss allowed per task (percentage points with labels, a fraction without), >= 0;
            one number for every task or `{task: number}` naming every task.
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

    tolerance: object
    data: object = None
    step: float = 0.05
    max_samples: int = 2000

    def __post_init__(self):
        values = self.tolerance.values() if isinstance(self.tolerance, dict) else [self.tolerance]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
            raise ZipError(f"AutoSharing(tolerance=...) must be a number >= 0 or {{task: number >= 0}}, got "
                           f"{self.tolerance!r}.")
        if not isinstance(self.step, (int, float)) or not 0 < self.step <= 1:
            raise ZipError(f"AutoSharing(step=...) must be in (0, 1], got {self.step!r}.")
        if not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ZipError(f"AutoSharing(max_samples=...) must be a positive integer, got {self.max_samples!r}.")

    def tolerances(self, tasks: list) -> dict:
        """`{task: tolerance}` for every task.

        Raises:
            ZipError: a per-task tolerance that misses a task or names an unknown one.
        """
        if not isinstance(self.tolerance, dict):
            return {t: float(self.tolerance) for t in tasks}
        if set(self.tolerance) != set(tasks):
            raise ZipError(f"AutoSharing(tolerance={{...}}) names tasks {sorted(self.tolerance)}; give one for each "
                           f"of {sorted(tasks)}.")
        return {t: float(self.tolerance[t]) for t in tasks}


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

    def __init__(self, tolerances: dict, inputs: dict, labels: dict, originals: dict, activations: dict):
        """Per task: the loss allowed, the `inputs`, their `labels` (None where there are none), the own
        models' `originals` outputs, and the output `activations` ("softmax", "sigmoid" or "linear")."""
        self.tolerances, self.inputs, self.labels, self.originals = tolerances, inputs, labels, originals
        self.activations = activations
        # Labels count for softmax heads only (classification error); other heads compare outputs.
        self.labels = {t: (y if activations[t] == "softmax" else None) for t, y in labels.items()}
        self.own_error = {t: _error(originals[t], y) for t, y in self.labels.items() if y is not None}

    def losses(self, outputs: dict) -> dict:
        """`{task: loss}` of the zipped network's `outputs` per task."""
        result = {}
        for t, zipped in outputs.items():
            zipped, own = np.asarray(zipped, np.float64), np.asarray(self.originals[t], np.float64)
            if self.labels[t] is not None:
                result[t] = _error(zipped, self.labels[t]) - self.own_error[t]
            elif self.activations[t] == "softmax" and zipped.shape[-1] > 1:
                result[t] = float(np.mean(np.argmax(zipped, -1) != np.argmax(own, -1)))
            elif self.activations[t] == "sigmoid":
                result[t] = float(np.mean((zipped > 0.5) != (own > 0.5)))
            else:
                result[t] = float(np.linalg.norm(zipped - own) / max(np.linalg.norm(own), 1e-12))
        return result

    def passes(self, losses: dict) -> bool:
        # A slack for rounding: 15 of 5,000 images is 0.30000000000000004 points, which must meet 0.3.
        return all(loss <= self.tolerances[t] + 1e-9 for t, loss in losses.items())


def _error(outputs, labels) -> float:
    """Classification error in percent."""
    return float(np.mean(np.argmax(outputs, -1) != np.asarray(labels).reshape(-1)) * 100.0)


class SharingSearch:
    """The choice of each group's shared units, and what was tried (for the report)."""

    def __init__(self, judge: Judge, step: float):
        self.judge, self.step = judge, step
        self.probe = None  # the zipped network on the judge's inputs (a `probe.Probe`), set by the zipper
        # Models of different depths: task -> callable mapping the zipped prefix's outputs `{name: array}` on
        # the judge's inputs to the task's output (through a copy of its branch); None: the outputs are final.
        self.finish = None
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
