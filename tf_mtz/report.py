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
        seconds: time spent on this layer's step: its inputs, statistics, costs, matching, merging and
            the next layer's refit.
        stage_seconds: `{stage: seconds}` of that time: "inputs" (the probe's forward computation),
            "pair" (statistics, pair costs and matching, where the layer starts its unit group), "merge"
            (its own statistics and the merge), "refit" (the next layer's refit).
        retrain_loss: summed joint loss at the end of this layer's retraining, if any.
        shared_units: `{task: [unit index in that task's original layer]}`, in shared-unit order: shared
            unit i merges unit `shared_units[t][i]` of every task t.
        accuracy_zipped: `{task: accuracy}` on the evaluation data right after this layer was zipped.
        accuracy_retrained: `{task: accuracy}` after this layer's retraining.
        mismatch: with the refit, on a layer whose inputs earlier merges changed: what is left after its
            refit in its pre-activations, Σ over tasks of ‖zipped − original‖² on the calibration data
            over the variance of the original (0 = reproduced exactly); None where nothing was refit.
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
    accuracy_zipped: dict = dataclasses.field(default_factory=dict)
    accuracy_retrained: dict = dataclasses.field(default_factory=dict)
    mismatch: float | None = None
    stage_seconds: dict = dataclasses.field(default_factory=dict)


SYNTHETIC_NOTE = ("no real data was used: the calibration inputs were made up from the models' own statistics "
                  "(tf_mtz.SyntheticInputs)")


@dataclasses.dataclass
class ZipReport:
    """What `zip_models` did. Printable as a table (`str(report)`) and as JSON (`report.to_json()`).

    Attributes:
        tasks: task names in order.
        layers: one `LayerReport` per layer with units, input to output.
        params_original: parameters of the task models together.
        params_zipped: parameters of the zipped model.
        params_shared: parameters held once for all tasks.
        settings: the options the model was zipped with, and `calibration_samples` (per task, the samples
            its statistics read) and `synthetic_calibration` (whether they were made up).
        accuracy_original: `{task: accuracy}` of each original model on the evaluation data (if given).
        accuracy_final: `{task: accuracy}` of the returned zipped model (if evaluation data was given).
        tflite_bytes: `{"separate": bytes, "zipped": bytes}` when filled in (the CLI does with --tflite).
        auto_sharing: with `sharing=tf_mtz.AutoSharing(...)`, per layer that chose its group's sharing:
            `{"layer", "width", "chosen", "candidates": [(count, {task: loss} or None where that count is
            not allowed)]}` in the order tried.
        prefix: for models of different depths, `{"prefix_layers", "stopped", "cuts", "branches"}`: the
            zipped layers (first model's names), where and why the models stop lining up, the layers whose
            outputs the branches read, and each task's branch layers; None where the models zip whole.
    """

    tasks: list
    layers: list
    params_original: int
    params_zipped: int
    params_shared: int
    settings: dict
    accuracy_original: dict = dataclasses.field(default_factory=dict)
    accuracy_final: dict = dataclasses.field(default_factory=dict)
    tflite_bytes: dict = dataclasses.field(default_factory=dict)
    auto_sharing: list = dataclasses.field(default_factory=list)
    prefix: dict | None = None

    @property
    def synthetic_calibration(self) -> bool:
        """Whether the zip used inputs made up from the models (`tf_mtz.SyntheticInputs`), no real data."""
        return bool(self.settings.get("synthetic_calibration"))

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

    @classmethod
    def from_json(cls, text: str) -> "ZipReport":
        """Reads a report written by `to_json`."""
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(LayerReport)}
        layers = [LayerReport(**{k: v for k, v in layer.items() if k in fields}) for layer in data["layers"]]
        return cls(tasks=data["tasks"], layers=layers, params_original=data["params_original"],
                   params_zipped=data["params_zipped"], params_shared=data["params_shared"],
                   settings=data.get("settings", {}), accuracy_original=data.get("accuracy_original", {}),
                   accuracy_final=data.get("accuracy_final", {}), tflite_bytes=data.get("tflite_bytes", {}),
                   auto_sharing=data.get("auto_sharing", []), prefix=data.get("prefix"))

    def plot_auto_sharing(self, path: str) -> str:
        """Plots what AutoSharing measured: per layer, each task's loss at each fraction tried, the
        tolerance and the fraction chosen. Needs matplotlib.

        Args:
            path: the image file to write (`.png`).

        Returns:
            `path`.

        Raises:
            ValueError: the report has no AutoSharing record (the zip used a fixed sharing).

        Example:

        ```python
        zipped.zip_report.plot_auto_sharing("auto_sharing.png")
        ```
        """
        if not self.auto_sharing:
            raise ValueError("This report has no AutoSharing record: the models were zipped with a fixed sharing.")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tolerance = self.settings.get("sharing", {}).get("tolerance") if isinstance(
            self.settings.get("sharing"), dict) else None
        fig, axes = plt.subplots(1, len(self.auto_sharing), figsize=(4.5 * len(self.auto_sharing), 3.6),
                                 squeeze=False)
        for axis, record in zip(axes[0], self.auto_sharing):
            tried = sorted((count, losses) for count, losses in record["candidates"] if losses is not None)
            for task in self.tasks:
                axis.plot([c / record["width"] for c, _ in tried], [losses[task] for _, losses in tried], "o-",
                          label=task)
            if isinstance(tolerance, dict):  # one tolerance per task
                for task in self.tasks:
                    axis.axhline(tolerance[task], color="gray", linestyle=":", label=f"tolerance {task}")
            elif tolerance is not None:
                axis.axhline(tolerance, color="gray", linestyle="--", label="tolerance")
            axis.axvline(record["chosen"] / record["width"], color="black", label="chosen")
            axis.set_title(record["layer"])
            axis.set_xlabel("fraction of units shared")
            axis.set_ylabel("loss against the own model")
            axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def to_markdown(self) -> str:
        """The per-layer table and totals as markdown."""
        lines = ["| layer | kind | " + " | ".join(f"units {t}" for t in self.tasks)
                 + " | shared | cost sum | cost max | params before | params after |",
                 "|---|---|" + "---|" * len(self.tasks) + "---|---|---|---|---|"]
        for layer in self.layers:
            units = " | ".join(str(layer.units[t]) for t in self.tasks)
            lines.append(f"| {layer.name}{' (head)' if layer.head else ''} | {layer.kind} | {units} | "
                         f"{layer.shared} | {layer.cost_sum:.4g} | {layer.cost_max:.4g} | "
                         f"{layer.params_before:,} | {layer.params_after:,} |")
        lines += ["", f"Parameters: {self.params_original:,} in {len(self.tasks)} models → {self.params_zipped:,} "
                      f"zipped ({self.compression:.1%}); {self.params_shared:,} shared = {self.shared_fraction:.1%} "
                      "of an average task model."]
        if self.synthetic_calibration:
            lines.append(f"{SYNTHETIC_NOTE}.")
        if self.tflite_bytes:
            lines.append(f".tflite bytes: separate models {self.tflite_bytes['separate']:,}, zipped "
                         f"{self.tflite_bytes['zipped']:,} ({self.tflite_bytes['zipped'] / self.tflite_bytes['separate']:.2f}x).")
        if self.accuracy_original:
            lines += ["", "| accuracy | " + " | ".join(self.tasks) + " |", "|---|" + "---|" * len(self.tasks)]
            for label, values in self.accuracy_rows():
                lines.append(f"| {label} | " + " | ".join(f"{values[t]:.4f}" for t in self.tasks) + " |")
        return "\n".join(lines)

    def accuracy_rows(self) -> list:
        """(label, {task: accuracy}) rows: the originals, each layer before and after retraining, final."""
        rows = [("original models", self.accuracy_original)]
        for layer in self.layers:
            if layer.accuracy_zipped:
                rows.append((f"{layer.name} zipped", layer.accuracy_zipped))
            if layer.accuracy_retrained:
                rows.append((f"{layer.name} retrained", layer.accuracy_retrained))
        if self.accuracy_final:
            rows.append(("zipped model", self.accuracy_final))
        return rows

    def plot(self, path: str) -> str:
        """Saves a PNG: units shared per layer and task, merge cost per layer, parameters before/after.

        Needs matplotlib (`pip install matplotlib`). Returns `path`.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("ZipReport.plot needs matplotlib: pip install matplotlib") from exc
        import numpy as np

        hidden = [layer for layer in self.layers if not layer.head]
        names = [layer.name for layer in hidden]
        x = np.arange(len(hidden))
        panels = 3 + bool(self.tflite_bytes) + bool(self.accuracy_original)
        rows = 1 if panels <= 3 else 2
        fig, grid = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
        axes = grid.reshape(-1)
        for unused in axes[panels:]:
            unused.axis("off")
        width = 0.8 / (len(self.tasks) + 1)
        for i, task in enumerate(self.tasks):
            axes[0].bar(x + i * width, [layer.units[task] for layer in hidden], width, label=f"units of {task}")
        axes[0].bar(x + len(self.tasks) * width, [layer.shared for layer in hidden], width, color="black",
                    label="shared by all")
        axes[0].set_xticks(x + width * len(self.tasks) / 2, names, rotation=30)
        axes[0].set_title("units per layer")
        axes[0].legend(fontsize=8)
        axes[1].bar(x - 0.2, [layer.cost_sum for layer in hidden], 0.4, color="tab:red", label="sum")
        axes[1].bar(x + 0.2, [layer.cost_max for layer in hidden], 0.4, color="tab:orange", label="largest pair")
        axes[1].set_xticks(x, names, rotation=30)
        axes[1].set_title("merge cost ΔE of the chosen pairs")
        axes[1].legend(fontsize=8)
        all_names = [layer.name for layer in self.layers]
        xx = np.arange(len(self.layers))
        axes[2].bar(xx - 0.2, [layer.params_before for layer in self.layers], 0.4, label="separate models")
        axes[2].bar(xx + 0.2, [layer.params_after for layer in self.layers], 0.4, label="zipped")
        axes[2].set_xticks(xx, all_names, rotation=30)
        axes[2].set_title(f"parameters: {self.params_original:,} → {self.params_zipped:,}")
        axes[2].legend(fontsize=8)
        panel = 3
        if self.tflite_bytes:
            labels = ["separate models", "zipped"]
            axes[panel].bar(labels, [self.tflite_bytes["separate"], self.tflite_bytes["zipped"]],
                            color=["tab:blue", "tab:orange"])
            axes[panel].set_title(".tflite bytes")
            panel += 1
        if self.accuracy_original:
            rows = self.accuracy_rows()
            for task in self.tasks:
                axes[panel].plot(range(len(rows)), [values[task] for _, values in rows], marker="o", label=task)
            axes[panel].set_xticks(range(len(rows)), [label for label, _ in rows], rotation=30, ha="right")
            axes[panel].set_title("accuracy on the evaluation data")
            axes[panel].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

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
        if self.synthetic_calibration:
            lines.append(f"note: {SYNTHETIC_NOTE}.")
        if self.prefix:
            lines.append(f"note: the models differ ({self.prefix['stopped']}): the layers up to "
                         f"'{self.prefix['prefix_layers'][-1]}' are zipped; each task keeps its own branch of "
                         + ", ".join(f"{len(layers)} layers ({task})" for task, layers in self.prefix['branches'].items())
                         + ".")
        for layer in self.layers:
            if layer.rank_deficient:
                lines.append(f"note: layer '{layer.name}' Hessian is rank-deficient for {layer.rank_deficient} "
                             "(fewer calibration samples than inputs); damping keeps it solvable.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()
