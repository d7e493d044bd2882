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
    search assumes that sharing fewer units never costs more (it narrows the grid down from a full share,
    guessing where the loss crosses the tolerance); the report lists every candidate tried
    (`zip_report.auto_sharing`) and plots them (`zip_report.plot_auto_sharing`).

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


def candidate_counts(width: int, step: float, least: int = 0) -> list:
    """The unit counts of the fractions 0, step, 2·step, …, 1 of `width`, ascending, without repeats; counts
    below `least` are raised to it."""
    fractions = np.append(np.arange(0.0, 1.0, step), 1.0)
    return sorted({max(int(round(f * width)), least) for f in fractions})


def largest_passing(candidates: list, judge, floor: float = 0.0) -> int:
    """The largest of `candidates` (ascending; the first, no sharing, taken to pass) that the judge passes,
    assuming every count below a passing one passes too. `judge(count)` returns `(passes, ratio)`, the
    ratio being the worst task's loss over its tolerance (at most 1 where it passes); `floor` is the ratio
    taken at the first candidate.

    The largest is tried first, as a full share often passes. Then the search keeps the largest count known
    to pass and the smallest known to fail and tries where the ratio, interpolated linearly in the count
    between them, crosses 1 (the losses grow about in proportion to the units shared), so that the boundary
    is usually found in two or three trials; after two such steps that moved the same end it halves the
    interval instead, so it never takes more than about three times bisection's trials."""
    if len(candidates) == 1:
        return candidates[-1]
    passed, high_ratio = judge(candidates[-1])
    if passed:
        return candidates[-1]
    low, high, low_ratio = 0, len(candidates) - 1, min(floor, 1.0)  # candidates[low] passes, [high] fails
    same_end, last_end = 0, None  # interpolation steps in a row that moved the same end
    while high - low > 1:
        bisect = same_end >= 2 or not (np.isfinite(high_ratio) and high_ratio > low_ratio)
        guess = (low + high) // 2
        if not bisect:
            share = (1.0 - low_ratio) / (high_ratio - low_ratio)
            target = candidates[low] + share * (candidates[high] - candidates[low])
            guess = min(max(int(np.searchsorted(candidates, target, side="right")) - 1, low + 1), high - 1)
        passed, ratio = judge(candidates[guess])
        if bisect:
            same_end, last_end = 0, None
        else:
            same_end, last_end = (same_end + 1 if passed == last_end else 1), passed
        if passed:
            low, low_ratio = guess, min(ratio, 1.0)
        else:
            high, high_ratio = guess, max(ratio, 1.0)
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

    def worst_ratio(self, losses: dict) -> float:
        """The largest loss over tolerance among the tasks (a zero tolerance: 0 where nothing is lost, else
        infinity)."""
        return max((loss / self.tolerances[t] if self.tolerances[t] > 0 else (0.0 if loss <= 1e-9 else np.inf))
                   for t, loss in losses.items())

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
        # The worst loss ratio of the network as the last layer left it: the next layer's search takes it as
        # that layer's ratio when it shares nothing.
        self.floor = 0.0

    def choose(self, layer_name: str, width: int, zip_at, least: int = 0) -> tuple:
        """The largest count passing the judge, and what `zip_at` returned with that count's outputs (None
        where it was not tried: no sharing). `zip_at(count)` zips the layer at `count` on a copy of the state
        and returns `(outputs, trial)`: the outputs `{task: array}` and whatever lets the caller take that zip
        without zipping again; it raises ZipError where that count is not allowed (a LayerNormalization's
        units all or none, no shared inputs). Only the best passing trial so far is kept. `least`: the fewest
        units the layer may share (1 where a layer already shared reads it through a residual merge); the
        smallest such candidate is taken to pass."""
        record = {"layer": layer_name, "width": width, "candidates": [], "chosen": 0}
        kept = {}

        def judged(count):
            try:
                outputs, trial = zip_at(count)
            except ZipError:
                record["candidates"].append((count, None))
                return False, np.inf
            losses = self.judge.losses(outputs)
            record["candidates"].append((count, losses))
            passed = self.judge.passes(losses)
            if passed and count > kept.get("count", -1):
                kept.update(count=count, trial=trial)
            return passed, self.judge.worst_ratio(losses)

        record["chosen"] = largest_passing(candidate_counts(width, self.step, least), judged, self.floor)
        chosen_losses = dict(record["candidates"]).get(record["chosen"])
        if chosen_losses is not None:
            self.floor = min(self.judge.worst_ratio(chosen_losses), 1.0)
        self.tried.append(record)
        return record["chosen"], (kept["trial"] if kept.get("count") == record["chosen"] else None)
