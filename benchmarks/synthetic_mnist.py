"""Zipping without data on real MNIST: calibration inputs made up from the models against real images.

Two CNNs with BatchNormalization (`tflite_examples/models.py`): `lenet5_bn` (LeNet-5 with BN after each conv
and the hidden Dense) and `resnet` (residual_cnn: stem, two residual blocks, BN after every conv), each
trained on digits 0-4 (task a, seeds 1, 3, 5) and on digits 5-9 (task b, seeds 2, 4, 6), 4 epochs. Every
pair is zipped fully (`sharing=1.0`) four ways:

* real calibration: `--calibration` (2,000) training images per task, no retraining;
* synthetic calibration: `calibration_data=tf_mtz.SyntheticInputs(...)` (the defaults: 2,048 inputs per task
  optimised for 200 steps until the statistics at every BatchNormalization's input match the stored moving
  mean and variance), no retraining. To make the inputs once per pair rather than twice, this zip gets the
  inputs `tf_mtz.synthesis.synthesize` made (timed, and looked at) as its calibration data: the synthesis is
  seeded and gives the same inputs bit for bit as `calibration_data=SyntheticInputs(...)` would;
* each of those with `--retrain_steps` (1,000) steps of label-free distillation after the last layer
  (`Retrain(steps_per_layer=0, final_steps=1000)`): the real zip distills on each task's training images
  (`Retrain(data={task: x_train})`), the synthetic one on the synthetic inputs (no `data=`: retraining falls
  back to the calibration inputs, so no real image is used anywhere).

No threshold: the table (test error %, mean ± std over the seed pairs) is the result. The page also gives
the seconds to make the synthetic inputs and to zip, and what the synthetic inputs look like to the models
(pixel range, the own model's confidence and class spread on them).

    python benchmarks/synthetic_mnist.py [--archs lenet5_bn,resnet] [--pairs 3] [--retrain_steps 1000]
        [--samples 2048] [--synthesis_steps 200] [--epochs 4]

Base models are cached (see tflite_examples/mnist_data.py); the page goes to docs/synthetic_mnist.md.
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
from tf_mtz import synthesis  # noqa: E402
from machine import describe  # noqa: E402
from experiments import error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import calibration_sample, trained_model  # noqa: E402

ARCHS = flags.DEFINE_list("archs", ["lenet5_bn", "resnet"], "Architectures in tflite_examples/models.py (with BN).")
PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs (1, 2), (3, 4), ...")
EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Real calibration images per task.")
RETRAIN = flags.DEFINE_integer("retrain_steps", 1000, "Label-free distillation steps after the last zipped layer.")
SAMPLES = flags.DEFINE_integer("samples", 2048, "SyntheticInputs(samples=...): inputs made per task.")
SYNTH_STEPS = flags.DEFINE_integer("synthesis_steps", 200, "SyntheticInputs(steps=...): optimisation steps per batch.")
OUT = flags.DEFINE_string("out", "docs", "Where to write the page.")

DESCRIPTIONS = {"lenet5_bn": "LeNet-5 with BN after conv1, conv2 and fc1",
                "resnet": "residual CNN (stem, two residual blocks, BN after every conv)"}


def spec() -> tf_mtz.SyntheticInputs:
    return tf_mtz.SyntheticInputs(samples=SAMPLES.value, steps=SYNTH_STEPS.value)


def run_arch(arch, data):
    """Per row `{name: [[error a, error b] per pair]}`, per-pair timings and synthetic-input statistics."""
    rows, times, looks, report = {}, {}, [], None
    tasks = ("a", "b")
    for pair in range(PAIRS.value):
        models = {t: trained_model(arch, 2 * pair + 1 + k, data[t][0], data[t][1], EPOCHS.value, tag=f"E2{t}")
                  for k, t in enumerate(tasks)}
        calibration = {t: calibration_sample(data[t][0], CALIBRATION.value) for t in tasks}

        def errors(predict):
            return [error(predict(t, data[t][2]), data[t][3]) for t in tasks]

        def zipped_errors(zipped):
            outputs = zipped.predict(np.concatenate([data[t][2] for t in tasks]), verbose=0, batch_size=1000)
            sizes = np.cumsum([0] + [len(data[t][2]) for t in tasks])
            return [error(outputs[t][sizes[k]:sizes[k + 1]], data[t][3]) for k, t in enumerate(tasks)]

        def timed(name, *args, **kwargs):
            started = time.perf_counter()
            zipped = tf_mtz.zip_models(*args, **kwargs)
            times.setdefault(name, []).append(time.perf_counter() - started)
            return zipped

        rows.setdefault("own model", []).append(errors(lambda t, x: models[t].predict(x, verbose=0, batch_size=1000)))

        # The synthetic inputs on their own: what they cost and what the models make of them.
        started = time.perf_counter()
        made = synthesis.synthesize(models, spec())
        times.setdefault("make synthetic inputs (both tasks)", []).append(time.perf_counter() - started)
        for t in tasks:
            probabilities = models[t].predict(made[t], verbose=0, batch_size=1000)
            real = models[t].predict(calibration[t], verbose=0, batch_size=1000)
            shares = np.bincount(probabilities.argmax(-1), minlength=probabilities.shape[-1]) / len(made[t])
            looks.append({"pair": pair + 1, "task": t, "mean": float(made[t].mean()), "std": float(made[t].std()),
                          "min": float(made[t].min()), "max": float(made[t].max()),
                          "in01": float(np.mean((made[t] >= 0) & (made[t] <= 1)) * 100),
                          "confidence": float(probabilities.max(-1).mean()),
                          "real_confidence": float(real.max(-1).mean()),
                          "top_class": float(shares.max() * 100), "classes": int(np.sum(shares > 0.01))})

        real0 = timed("zip, real calibration", models, calibration, sharing=1.0, verbose=0)
        rows.setdefault("zipped, real calibration", []).append(zipped_errors(real0))
        # The inputs made above, given as calibration data: what `calibration_data=spec()` makes (the synthesis
        # is seeded and deterministic) without paying for it again; the retrained zip below makes its own.
        synthetic0 = timed("zip, synthetic calibration (inputs made above)", models, made, sharing=1.0, verbose=0)
        rows.setdefault("zipped, synthetic calibration", []).append(zipped_errors(synthetic0))

        steps = RETRAIN.value
        real = timed(f"zip + {steps} steps, real", models, calibration, sharing=1.0, verbose=0,
                     retrain=tf_mtz.Retrain(data={t: data[t][0] for t in tasks}, steps_per_layer=0,
                                            final_steps=steps, seed=pair))
        rows.setdefault(f"zipped, real calibration + {steps:,} distillation steps on real images", []).append(
            zipped_errors(real))
        synthetic = timed(f"zip + {steps} steps, synthetic (incl. making the inputs)", models, spec(), sharing=1.0,
                          verbose=0,
                          retrain=tf_mtz.Retrain(steps_per_layer=0, final_steps=steps, seed=pair))
        assert synthetic.zip_report.synthetic_calibration and not real.zip_report.synthetic_calibration
        rows.setdefault(f"zipped, synthetic calibration + {steps:,} distillation steps on synthetic inputs",
                        []).append(zipped_errors(synthetic))
        report = report or synthetic.zip_report
        print(f"{arch} pair {pair + 1}: " + "; ".join(f"{k} {v[-1][0]:.2f}/{v[-1][1]:.2f}" for k, v in rows.items()),
              flush=True)
        times.setdefault("load average (1 min) after the pair", []).append(os.getloadavg()[0])
        print(f"{arch} pair {pair + 1} seconds: " + "; ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()),
              flush=True)
    return rows, times, looks, report


def cell(values, task):
    column = np.array(values)[:, task]
    return f"{column.mean():.2f} ± {column.std():.2f}" if len(column) > 1 else f"{column[0]:.2f}"


def section(arch, rows, times, looks, report):
    names = list(rows)
    own, real0, synthetic0, real, synthetic = (np.array(rows[n]) for n in names)
    lines = [f"## {arch}: {DESCRIPTIONS.get(arch, arch)}", "",
             "| | task a error % | task b error % |", "|---|---|---|"]
    lines += [f"| {name} | {cell(values, 0)} | {cell(values, 1)} |" for name, values in rows.items()]
    lines += ["", "Per pair (task a / task b error %):", "",
              "| pair | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in range(len(own)):
        lines.append(f"| {p + 1} | " + " | ".join(f"{rows[n][p][0]:.2f} / {rows[n][p][1]:.2f}" for n in names) + " |")
    gap0, gap = synthetic0 - real0, synthetic - real
    lines += ["", "Synthetic minus real (percentage points, mean over pairs; positive: synthetic is worse): "
              f"before retraining a {gap0[:, 0].mean():+.2f}, b {gap0[:, 1].mean():+.2f}; after retraining "
              f"a {gap[:, 0].mean():+.2f}, b {gap[:, 1].mean():+.2f}. Synthetic after retraining minus own model: "
              f"a {(synthetic - own)[:, 0].mean():+.2f}, b {(synthetic - own)[:, 1].mean():+.2f}; real after "
              f"retraining minus own model: a {(real - own)[:, 0].mean():+.2f}, b {(real - own)[:, 1].mean():+.2f}.",
              "", "Seconds per pair:", "", "| step | mean | per pair |", "|---|---|---|"]
    lines += [f"| {name} | {np.mean(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |"
              for name, values in times.items()]
    lines += ["", "What the synthetic inputs look like (real MNIST pixels lie in [0, 1]; confidence: the own "
              "model's mean top-1 probability, on the synthetic inputs and on the real calibration images; top "
              "class: the share of synthetic inputs the own model puts in its most frequent class; classes: "
              "those with over 1% of them):", "",
              "| pair | task | pixel mean | pixel std | min | max | % in [0, 1] | confidence (synthetic) | "
              "confidence (real) | top class % | classes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['pair']} | {x['task']} | {x['mean']:.2f} | {x['std']:.2f} | {x['min']:.1f} | {x['max']:.1f} | "
              f"{x['in01']:.0f} | {x['confidence']:.3f} | {x['real_confidence']:.3f} | {x['top_class']:.0f} | "
              f"{x['classes']} |" for x in looks]
    lines += ["", f"Parameters (first pair): {report.params_original:,} in the two models -> "
              f"{report.params_zipped:,} zipped ({report.params_zipped / report.params_original:.3f}x).", ""]
    return lines, (gap0.mean(axis=0), gap.mean(axis=0), (synthetic - own).mean(axis=0), (real - own).mean(axis=0))


def main(_):
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    data = experiment_data("E2", x_train, y_train, x_test, y_test)
    steps = RETRAIN.value
    command = ("python benchmarks/synthetic_mnist.py" + (f" --archs {','.join(ARCHS.value)}"
               if ARCHS.value != ["lenet5_bn", "resnet"] else "") + f" --pairs {PAIRS.value}"
               + "".join(f" --{flag.name} {flag.value}" for flag in (EPOCHS, CALIBRATION, RETRAIN, SAMPLES, SYNTH_STEPS)
                         if flag.value != flag.default))
    body, summary = [], {}
    for arch in ARCHS.value:
        rows, times, looks, report = run_arch(arch, data)
        lines, summary[arch] = section(arch, rows, times, looks, report)
        body += lines
    where = []
    for arch, (gap0, gap, synthetic_own, real_own) in summary.items():
        where.append(f"* {arch}: before retraining, synthetic calibration is {gap0[0]:+.2f} / {gap0[1]:+.2f} "
                     f"points (task a / b) against real calibration; after {steps:,} distillation steps it is "
                     f"{gap[0]:+.2f} / {gap[1]:+.2f} against real-data distillation, and {synthetic_own[0]:+.2f} / "
                     f"{synthetic_own[1]:+.2f} against the own models (real data: {real_own[0]:+.2f} / "
                     f"{real_own[1]:+.2f}).")
    spec_text = (f"SyntheticInputs(samples={SAMPLES.value}, steps={SYNTH_STEPS.value}, learning_rate=0.1, "
                 "batch_size=256)")
    lines = ["# Zipping without data: synthetic calibration inputs against real MNIST images", "",
             "Task a: digits 0-4 (seeds 1, 3, ...); task b: digits 5-9 (seeds 2, 4, ...); "
             f"`tflite_examples/models.py`, {EPOCHS.value} epochs each. Every hidden layer fully shared "
             f"(`sharing=1.0`). Real calibration: {CALIBRATION.value} training images per task. Synthetic "
             f"calibration: `tf_mtz.{spec_text}` per task, random inputs optimised until the batch statistics "
             "at every BatchNormalization's input match the stored moving mean and variance (no real image "
             f"used). Retraining: label-free distillation, `Retrain(steps_per_layer=0, final_steps={steps})`, "
             "on each task's training images for the real rows and on the synthetic inputs themselves (no "
             "`data=`) for the synthetic rows; the retrained synthetic zip is one `zip_models(models, "
             "SyntheticInputs(...), retrain=...)` call, the other synthetic zip gets the same inputs made "
             "beforehand (the synthesis is seeded and deterministic). Test error %, mean ± std over "
             f"{PAIRS.value} seed pair(s). No threshold: the table is the result.", "",
             f"    {command}", "", f"Machine: {describe()}. Seconds are wall-clock; the load average after each "
             "pair (in the timing tables) says whether other work shared the cores.", "",
             "Where synthetic data falls short of real data (differences in error points, means over pairs):", "",
             *where, ""] + body
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "synthetic_mnist.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
