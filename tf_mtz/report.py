"""The zip report: what was shared where, at what merge cost, and what it saved."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass
class LayerReport:
    """One layer with units.

    Attributes:
        name: the layer's name in the first model.
        kind: "Dense", "Conv2D", ...; `head` is True for the task outputs (never merged).
        units: `{task: units}`.
        shared: units shared by all tasks.
        cost_sum, cost_max: sum and maximum of the chosen pairs' merge costs ΔE.
        params_before: parameters of this layer summed over the task models.
        params_after: parameters of this layer in the zipped model.
        calibration_samples: `{task: Hessian samples}` (0 where the layer was not zipped).
        rank_deficient: tasks whose Hessian had fewer samples than dimensions.
        seconds: time spent on statistics, costs, matching and merging.
        retrain_loss: summed joint loss at the end of this layer's retraining, if any.
        shared_units: `{task: [unit index in that task's original layer]}`, in shared-unit order: shared
            unit i merges unit `shared_units[t][i]` of every task t.
    """

    name: str
    kind: str
    head: bool
    units: dict
    shared: int
    cost_sum: float
    cost_max: float
    params_before: int
    params_after: int
    calibration_samples: dict
    rank_deficient: list
    seconds: float
    retrain_loss: float | None = None
    shared_units: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ZipReport:
    """What `zip_models` did. Printable as a table (`str(report)`) and as JSON (`report.to_json()`).

    Attributes:
        tasks: task names in order.
        layers: one `LayerReport` per layer with units, input to output.
        params_original: parameters of the task models together.
        params_zipped: parameters of the zipped model.
        params_shared: parameters held once for all tasks.
        settings: the options the model was zipped with.
    """

    tasks: list
    layers: list
    params_original: int
    params_zipped: int
    params_shared: int
    settings: dict

    @property
    def shared_fraction(self) -> float:
        """Share of an average task model's parameters that are now shared with the other tasks."""
        return self.params_shared / (self.params_original / len(self.tasks))

    @property
    def compression(self) -> float:
        """Zipped parameters over the task models' parameters together."""
        return self.params_zipped / self.params_original

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shared_fraction"] = self.shared_fraction
        out["compression"] = self.compression
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        header = ["layer", "kind", "units per task", "shared", "cost sum", "cost max", "params before",
                  "params after"]
        rows = []
        for layer in self.layers:
            units = "/".join(str(layer.units[t]) for t in self.tasks)
            rows.append([layer.name + (" (head)" if layer.head else ""), layer.kind, units, str(layer.shared),
                         f"{layer.cost_sum:.4g}", f"{layer.cost_max:.4g}", f"{layer.params_before:,}",
                         f"{layer.params_after:,}"])
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append("")
        lines.append(f"parameters: {self.params_original:,} in {len(self.tasks)} models -> "
                     f"{self.params_zipped:,} zipped ({self.compression:.1%}); {self.params_shared:,} shared "
                     f"= {self.shared_fraction:.1%} of an average task model")
        for layer in self.layers:
            if layer.rank_deficient:
                lines.append(f"note: layer '{layer.name}' Hessian is rank-deficient for {layer.rank_deficient} "
                             "(fewer calibration samples than inputs); damping keeps it solvable.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()
