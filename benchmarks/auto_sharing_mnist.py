"""AutoSharing on real MNIST: the sharing chosen per layer under an error budget, against the best uniform one.

For LeNet-300-100 and LeNet-5 (`tflite_examples/models.py`), experiment E2: one model on digits 0-4 (task a,
seeds 1, 3, ...), one on digits 5-9 (task b, seeds 2, 4, ...), 10 and 4 epochs as in the other MNIST
benchmarks. No retraining anywhere. Per architecture and seed pair:

1. one zip at full sharing (`sharing=1.0`), timed;
2. `AutoSharing(tolerance=0.3, data={task: (x_val, y_val)})`, timed: per layer from the input, the largest
   fraction on a 0.05 grid keeping every task within +0.3 points of its own model's validation error;
3. the best uniform sharing: the largest fraction f in 1.00, 0.95, ..., 0.00 (every hidden layer at f) whose
   validation error is within +0.3 points of each own model's (the scan stops at the first that passes,
   from the top; `--full_scan` measures every fraction).

Then the issue's checks: AutoSharing's test error within +0.5 points of each own model, more parameters
shared than the best uniform sharing, and AutoSharing taking at most 3x the full-sharing zip.

Validation data (`--validation`):

* `mnist` (default): MNIST's own validation split (10,000 images beside the 50,000 training images, split
  by digit like the rest), which the base models never see; the base models are the usual E2 ones
  (trained on each task's whole training split, the same cache entries as compare_methods.py).
* `tail`: the last `--holdout` images of each task's training split; the base models are then trained on
  the rest only (cache tag `E2a_trainsplit`), so the validation images stay held out too.

The judge uses every validation image (`AutoSharing(max_samples=...)` is set to the split's size), so
AutoSharing and the uniform scan are judged on exactly the same data. Timings: one untimed warm-up zip
first, then `--repeats` rounds of (full sharing, AutoSharing), the fastest of each kept.

    python benchmarks/auto_sharing_mnist.py [--pairs 1] [--archs lenet300,lenet5] [--tolerance 0.3]
        [--validation mnist|tail] [--full_scan]

Writes docs/auto_sharing_mnist.md and AutoSharing's trials as docs/auto_sharing_mnist_<arch>.png (first seed
pair) and docs/auto_sharing_mnist_<arch>_seeds<i>_<j>.png (the others).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

from absl import app, flags  # noqa: E402

import numpy as np  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402
from experiments import error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import calibration_sample, trained_model  # noqa: E402

ARCHS = flags.DEFINE_list("archs", ["lenet300", "lenet5"], "Architectures in tflite_examples/models.py.")
PAIRS = flags.DEFINE_integer("pairs", 1, "Seed pairs (1, 2), (3, 4), ...")
TOLERANCE = flags.DEFINE_float("tolerance", 0.3, "Points of validation error allowed per task.")
STEP = flags.DEFINE_float("step", 0.05, "Grid of fractions, for AutoSharing and the uniform scan.")
TEST_TARGET = flags.DEFINE_float("test_target", 0.5, "Points of test error allowed per task (the issue's check).")
TIME_TARGET = flags.DEFINE_float("time_target", 3.0, "AutoSharing's time allowed, in full-sharing zips.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Calibration images per task.")
VALIDATION = flags.DEFINE_enum("validation", "mnist", ["mnist", "tail"],
                               "mnist: MNIST's validation split; tail: the last --holdout training images per task.")
HOLDOUT = flags.DEFINE_integer("holdout", 5000, "Validation images per task with --validation tail.")
EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs of each base model (default: 10 for lenet300, 4 for lenet5).")
REPEATS = flags.DEFINE_integer("repeats", 2, "Timed rounds of (full sharing, AutoSharing); the fastest is kept.")
FULL_SCAN = flags.DEFINE_bool("full_scan", False, "Measure every uniform fraction, not only down to the best.")
OUT = flags.DEFINE_string("out", "docs", "Where to write the page and plots.")
COMMIT = flags.DEFINE_string("commit", None, "The tf_mtz commit measured, for the page (e.g. of a `git archive` "
                             "snapshot on PYTHONPATH).")

EPOCHS_BY_ARCH = {"lenet300": 10, "lenet5": 4}
TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}


def task_data(x_train, y_train, x_valid, y_valid, x_test, y_test):
    """Per task: (train x, train y, validation x, validation y, test x, test y), and the cache tag suffix."""
    train = experiment_data("E2", x_train, y_train, x_test, y_test)
    if VALIDATION.value == "mnist":
        valid = experiment_data("E2", x_valid, y_valid, x_valid, y_valid)
        return {t: (train[t][0], train[t][1], valid[t][0], valid[t][1], train[t][2], train[t][3])
                for t in train}, ""
    n = HOLDOUT.value
    return {t: (x[:-n], y[:-n], x[-n:], y[-n:], xt, yt) for t, (x, y, xt, yt) in train.items()}, "_trainsplit"


def grid(step: float) -> list:
    """1.00, 1 - step, ..., 0.00: the fractions tried, from the top."""
    return sorted({round(min(k * step, 1.0), 10) for k in range(int(np.ceil(1.0 / step - 1e-9)) + 1)},
                  reverse=True)


def run_pair(arch: str, pair: int, data: dict, suffix: str) -> dict:
    epochs = EPOCHS.value or EPOCHS_BY_ARCH.get(arch, 4)
    started = time.perf_counter()
    models = {t: trained_model(arch, 2 * pair + i + 1, data[t][0], data[t][1], epochs, tag=f"E2{t}{suffix}")
              for i, t in enumerate(("a", "b"))}
    print(f"[{arch} pair {pair + 1}] base models ready in {time.perf_counter() - started:.0f} s", flush=True)
    tasks = list(models)
    calibration = {t: calibration_sample(data[t][0], CALIBRATION.value) for t in tasks}
    validation = {t: (data[t][2], data[t][3]) for t in tasks}
    max_samples = max(len(v[0]) for v in validation.values())
    auto = tf_mtz.AutoSharing(tolerance=TOLERANCE.value, data=validation, step=STEP.value, max_samples=max_samples)

    def errors(predict) -> dict:
        return {"val": {t: error(predict(t, data[t][2]), data[t][3]) for t in tasks},
                "test": {t: error(predict(t, data[t][4]), data[t][5]) for t in tasks}}

    def zipped_errors(zipped) -> dict:
        return errors(lambda t, x: zipped.predict(x, verbose=0, batch_size=1000)[t])

    result = {"arch": arch, "pair": pair, "epochs": epochs, "tasks": tasks,
              "sizes": {t: {"train": len(data[t][0]), "val": len(data[t][2]), "test": len(data[t][4])}
                        for t in tasks}}
    result["own"] = errors(lambda t, x: models[t].predict(x, verbose=0, batch_size=1000))

    # Warm-up (tracing, first-call costs), untimed.
    started = time.perf_counter()
    tf_mtz.zip_models(models, calibration, sharing=1.0, verbose=0)
    result["warmup_seconds"] = time.perf_counter() - started
    full_times, auto_times, full, automatic = [], [], None, None
    load_before = os.getloadavg()[0]
    for _ in range(max(REPEATS.value, 1)):
        started = time.perf_counter()
        full = tf_mtz.zip_models(models, calibration, sharing=1.0, verbose=0)
        full_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        automatic = tf_mtz.zip_models(models, calibration, sharing=auto, verbose=0)
        auto_times.append(time.perf_counter() - started)
        print(f"[{arch} pair {pair + 1}] full sharing {full_times[-1]:.1f} s, AutoSharing {auto_times[-1]:.1f} s",
              flush=True)
    result["full_times"], result["auto_times"] = full_times, auto_times
    result["load"] = (load_before, os.getloadavg()[0])
    result["full"] = {**zipped_errors(full), "params_shared": full.zip_report.params_shared,
                      "params_zipped": full.zip_report.params_zipped, "seconds": min(full_times)}
    report = automatic.zip_report
    result["auto"] = {**zipped_errors(automatic), "params_shared": report.params_shared,
                      "params_zipped": report.params_zipped, "seconds": min(auto_times)}
    result["params_original"] = report.params_original
    result["layers"] = [{"name": layer.name, "units": dict(layer.units), "shared": layer.shared, "head": layer.head}
                        for layer in report.layers]
    result["trials"] = [{"layer": r["layer"], "width": r["width"], "chosen": r["chosen"],
                         "candidates": [(c, None if losses is None else dict(losses)) for c, losses in r["candidates"]]}
                        for r in report.auto_sharing]
    result["report"] = report
    print(f"[{arch} pair {pair + 1}] AutoSharing chose "
          + ", ".join(f"{r['layer']} {r['chosen']}/{r['width']}" for r in result["trials"])
          + f"; val {result['auto']['val']}, test {result['auto']['test']}", flush=True)

    # The uniform scan, from full sharing down.
    scan, best = [], None
    for fraction in grid(STEP.value):
        started = time.perf_counter()
        zipped = full if fraction == 1.0 else tf_mtz.zip_models(models, calibration, sharing=fraction, verbose=0)
        seconds = min(full_times) if fraction == 1.0 else time.perf_counter() - started
        measured = zipped_errors(zipped)
        losses = {t: measured["val"][t] - result["own"]["val"][t] for t in tasks}
        passes = all(loss <= TOLERANCE.value + 1e-9 for loss in losses.values())
        entry = {"fraction": fraction, **measured, "losses": losses, "passes": passes,
                 "params_shared": zipped.zip_report.params_shared, "seconds": seconds,
                 "shared": [layer.shared for layer in zipped.zip_report.layers if not layer.head]}
        scan.append(entry)
        print(f"[{arch} pair {pair + 1}] uniform {fraction:.2f}: val loss "
              + ", ".join(f"{t} {v:+.2f}" for t, v in losses.items()) + f" -> {'pass' if passes else 'fail'}",
              flush=True)
        if passes and best is None:
            best = entry
            if not FULL_SCAN.value:
                break
    result["scan"], result["uniform"] = scan, best
    return result


def checks(r: dict) -> dict:
    own, auto, best = r["own"], r["auto"], r["uniform"]
    change = {t: auto["test"][t] - own["test"][t] for t in r["tasks"]}
    val_change = {t: auto["val"][t] - own["val"][t] for t in r["tasks"]}
    ratio = auto["seconds"] / r["full"]["seconds"]
    return {"test_change": change, "val_change": val_change, "ratio": ratio,
            "test_ok": all(c <= TEST_TARGET.value + 1e-9 for c in change.values()),
            "val_ok": all(c <= TOLERANCE.value + 1e-9 for c in val_change.values()),
            "params_ok": auto["params_shared"] > best["params_shared"],
            "time_ok": ratio <= TIME_TARGET.value}


def yes(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def pair_section(r: dict, plot: str | None) -> list:
    tasks, c = r["tasks"], checks(r)
    best = r["uniform"]
    a, b = tasks

    def row(label, e, params, seconds):
        return (f"| {label} | {e['val'][a]:.2f} | {e['val'][b]:.2f} | {e['test'][a]:.2f} | {e['test'][b]:.2f} | "
                f"{params:,} | {seconds} |")

    lines = [f"### {TITLES.get(r['arch'], r['arch'])} (`{r['arch']}`), seeds {2 * r['pair'] + 1} and "
             f"{2 * r['pair'] + 2}", "",
             f"Base models: {r['epochs']} epochs on {r['sizes'][a]['train']:,} (a) and {r['sizes'][b]['train']:,} "
             f"(b) training images; validation {r['sizes'][a]['val']:,} / {r['sizes'][b]['val']:,} images, test "
             f"{r['sizes'][a]['test']:,} / {r['sizes'][b]['test']:,}. Parameters of the two models: "
             f"{r['params_original']:,}. Error in %, no retraining.", "",
             "| | val err a | val err b | test err a | test err b | params shared | seconds |",
             "|---|---|---|---|---|---|---|",
             row("own model", r["own"], 0, "–"),
             row("full sharing (1.00)", r["full"], r["full"]["params_shared"], f"{r['full']['seconds']:.1f}"),
             row(f"AutoSharing (tolerance {TOLERANCE.value:g})", r["auto"], r["auto"]["params_shared"],
                 f"{r['auto']['seconds']:.1f}")]
    if best is not None:
        lines.append(row(f"best uniform ({best['fraction']:.2f})", best, best["params_shared"],
                         f"{best['seconds']:.1f}"))
    lines += ["", "AutoSharing's choice (shared units / narrowest width per hidden layer): "
              + ", ".join(f"{t['layer']} {t['chosen']}/{t['width']} ({t['chosen'] / t['width']:.2f})"
                          for t in r["trials"]) + "."]
    if best is not None:
        lines.append(f"Best uniform: every hidden layer at {best['fraction']:.2f} = "
                     + ", ".join(f"{t['layer']} {s}" for t, s in zip(r["trials"], best["shared"])) + " units.")
    lines += ["", "Candidates AutoSharing tried, in order (count: loss of a / b in points of validation error; one "
              f"validation image is {100 / r['sizes'][a]['val']:.3f} / {100 / r['sizes'][b]['val']:.3f} points):", ""]
    for t in r["trials"]:
        lines.append(f"* {t['layer']}: " + "; ".join(
            f"{count}: " + ("not allowed" if losses is None else " / ".join(f"{losses[k]:+.3f}" for k in tasks))
            for count, losses in t["candidates"]) + f" -> {t['chosen']}")
    lines += ["", "Uniform scan (fraction: validation loss of a / b in points):",
              "; ".join(f"{s['fraction']:.2f}: " + " / ".join(f"{s['losses'][k]:+.3f}" for k in tasks)
                        + (" pass" if s["passes"] else " fail") for s in r["scan"]) + ".", ""]
    lines += [f"Timings (s): warm-up zip {r['warmup_seconds']:.1f}; full sharing "
              + ", ".join(f"{s:.1f}" for s in r["full_times"]) + "; AutoSharing "
              + ", ".join(f"{s:.1f}" for s in r["auto_times"]) + f". Ratio of the fastest: "
              f"t_auto / t_full = {c['ratio']:.2f} (mean of the rounds: "
              f"{np.mean(r['auto_times']) / np.mean(r['full_times']):.2f}). Load average (1 min) before and after "
              f"the timed rounds: {r['load'][0]:.1f}, {r['load'][1]:.1f} on {os.cpu_count()} cores.", "",
              "Checks:", "",
              f"* AutoSharing's test error within +{TEST_TARGET.value:g} points of each own model: "
              + ", ".join(f"{t} {v:+.2f}" for t, v in c["test_change"].items()) + f" -> {yes(c['test_ok'])}.",
              f"* (Its validation error within the +{TOLERANCE.value:g} tolerance: "
              + ", ".join(f"{t} {v:+.2f}" for t, v in c["val_change"].items()) + f" -> {yes(c['val_ok'])}.)",
              (f"* More parameters shared than the best uniform sharing ({best['fraction']:.2f}): "
               f"{r['auto']['params_shared']:,} vs {best['params_shared']:,} "
               f"({r['auto']['params_shared'] - best['params_shared']:+,}) -> {yes(c['params_ok'])}"
               + (" (a tie: full sharing already meets the tolerance, so no sharing can share more)."
                  if best["fraction"] == 1.0 and not c["params_ok"] else ".")
               if best is not None else "* No uniform fraction passes."),
              f"* Time at most {TIME_TARGET.value:g}x one zip at full sharing: {r['auto']['seconds']:.1f} s vs "
              f"{r['full']['seconds']:.1f} s = {c['ratio']:.2f}x -> {yes(c['time_ok'])}.", ""]
    if plot:
        seeds = f"seeds {2 * r['pair'] + 1} and {2 * r['pair'] + 2}"
        lines += [f"![AutoSharing's trials, {r['arch']}, {seeds}]({plot})", "",
                  f"[`{plot}`]({plot}): per hidden layer, each task's validation loss at each fraction "
                  "AutoSharing tried, the tolerance (dashed) and the fraction chosen.", ""]
    return lines


def main(argv):
    del argv
    print(f"tf_mtz from {os.path.dirname(tf_mtz.__file__)}", flush=True)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = load_mnist()
    data, suffix = task_data(x_train, y_train, x_valid, y_valid, x_test, y_test)
    os.makedirs(OUT.value, exist_ok=True)
    started = time.perf_counter()
    results = []
    for arch in ARCHS.value:
        for pair in range(PAIRS.value):
            r = run_pair(arch, pair, data, suffix)
            r["plot"] = f"auto_sharing_mnist_{arch}" + (f"_seeds{2 * pair + 1}_{2 * pair + 2}" if pair else "") + ".png"
            r["report"].plot_auto_sharing(os.path.join(OUT.value, r["plot"]))
            results.append(r)
    total = time.perf_counter() - started

    command = "python benchmarks/auto_sharing_mnist.py" + "".join(f" {a}" for a in sys.argv[1:])
    validation = ("MNIST's validation split (the 10,000 images beside the 50,000 training images, split by digit), "
                  "which the base models never saw; base models trained on each task's whole training split"
                  if VALIDATION.value == "mnist" else
                  f"the last {HOLDOUT.value:,} images of each task's training split; base models trained on the "
                  "rest only, so the validation images are held out")
    lines = ["# AutoSharing on MNIST: LeNet-300-100 and LeNet-5, digits 0-4 / 5-9", "",
             "The issue: with a tolerance of 0.3 points on the validation split and no retraining, test error within "
             "+0.5 points of each own model, more parameters shared than the best uniform sharing fraction (steps "
             "of 0.05) that meets the same tolerance on the same validation split, and the time at most 3x one zip "
             "at full sharing.", "",
             f"Setup: task a = digits 0-4, task b = digits 5-9 (E2), one model per task (seeds 1, 3, ... for a, "
             f"2, 4, ... for b). Validation: {validation}. AutoSharing(tolerance={TOLERANCE.value:g}, "
             f"step={STEP.value:g}) judges every validation image (max_samples set to the split's size); the "
             f"uniform scan uses the same images and the same rule (each task's validation error at most "
             f"+{TOLERANCE.value:g} points above its own model's). Calibration: {CALIBRATION.value:,} training "
             f"images per task. No retraining. Times: the fastest of {max(REPEATS.value, 1)} rounds of (full "
             "sharing, AutoSharing) after one untimed warm-up zip; the uniform zips' times are single runs.", "",
             f"Machine: {describe()}." + (f" tf_mtz at commit {COMMIT.value}." if COMMIT.value else "")
             + " Command (with `PYTHONPATH` at that package):", "", f"    {command}", "",
             f"Total run time {total / 60:.1f} min.", "", "## Summary", "",
             "| architecture | seeds | test change a / b (pts) | params shared: AutoSharing vs best uniform | "
             "t_auto / t_full | all three targets |", "|---|---|---|---|---|---|"]
    for r in results:
        c, best = checks(r), r["uniform"]
        lines.append(f"| {r['arch']} | {2 * r['pair'] + 1}, {2 * r['pair'] + 2} | "
                     + " / ".join(f"{v:+.2f}" for v in c["test_change"].values())
                     + f" ({yes(c['test_ok'])}) | {r['auto']['params_shared']:,} vs "
                     + (f"{best['params_shared']:,} at {best['fraction']:.2f}" if best else "none")
                     + f" ({yes(c['params_ok'])}{', tie at full sharing' if best and best['fraction'] == 1.0 else ''})"
                     + f" | {c['ratio']:.2f} ({yes(c['time_ok'])}) | "
                     + ("yes" if c["test_ok"] and c["params_ok"] and c["time_ok"] else "no") + " |")
    all_checks = [(checks(r), r["uniform"]) for r in results]
    ties = sum(best is not None and best["fraction"] == 1.0 for _, best in all_checks)
    every = sum(c["test_ok"] and c["params_ok"] and c["time_ok"] for c, _ in all_checks)
    lines += ["", f"Targets met in {len(results)} architecture-and-seed-pair runs: test error "
              f"{sum(c['test_ok'] for c, _ in all_checks)}/{len(results)}, more parameters shared than the best "
              f"uniform {sum(c['params_ok'] for c, _ in all_checks)}/{len(results)} ({ties} of the misses are ties "
              f"where full sharing already meets the tolerance), time {sum(c['time_ok'] for c, _ in all_checks)}/"
              f"{len(results)}; all three {every}/{len(results)}.", "", "## Per architecture", ""]
    for r in results:
        lines += pair_section(r, r["plot"])
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(OUT.value, "auto_sharing_mnist.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
