"""What a benchmark ran on, for the pages it writes: "2-core AMD EPYC ... CPU" (and the GPU, if any)."""

from __future__ import annotations

import os


def describe() -> str:
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{os.cpu_count()}-core {name}"
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return text + (f" with {len(gpus)} GPU(s)" if gpus else "")


def stage_summary(report) -> str:
    """Where a zip's time went, summed over its layers: "inputs 91 s, pair 28 s, merge 5 s, refit 283 s"."""
    totals = {}
    for layer in report.layers:
        for stage, seconds in layer.stage_seconds.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in totals.items())
