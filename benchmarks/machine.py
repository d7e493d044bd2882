"""What a benchmark ran on, for the pages it writes: "2-core AMD EPYC ... CPU" (and the GPU, if any)."""

from __future__ import annotations

import os
import time


def describe() -> str:
    """The machine in a few words, e.g. "2-core AMD EPYC (AVX-512)": VMs under one model name differ by
    generation, and TensorFlow's CPU kernels by the vector instructions they find (about 1.8x on ResNet50
    between two such EPYC VMs)."""
    name, flags = "CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = f" {line.split(':', 1)[1].strip()} "
    except OSError:
        pass
    simd = "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else ""
    text = f"{os.cpu_count()}-core {name}" + (f" ({simd})" if simd else "")
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


def tflite_latency(content: bytes, frame, repeats: int = 30) -> float:
    """Median seconds of one single-threaded LiteRT invocation of a `.tflite` model on `frame` (its first
    input; a warm-up call first)."""
    import numpy as np
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], frame)
    interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
