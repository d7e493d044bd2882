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
