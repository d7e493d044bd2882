"""Adding a task to a zipped model on real MNIST: A+B zipped, then C added, against A, B and C zipped at once.

Three LeNet-300-100 (`tflite_examples/models.py`) on the same MNIST images with three label functions, each
with its own softmax head: task a = the digit (10-way), task b = its parity (2-way), task c = the digit mod 3
(3-way). Per seed s (1, 2, 3) the three models are trained with seeds 3(s-1)+1, +2, +3 (`--epochs` epochs,
Adam, cached like the other MNIST benchmarks' base models) and zipped with every hidden layer fully shared
(`sharing=1.0`, the default ZipConfig) on the same `--calibration` training images:

* at once: `tf_mtz.zip_models({"a": A, "b": B, "c": C}, calib, sharing=1.0)`;
* sequential: `zab = tf_mtz.zip_models({"a": A, "b": B}, calib, sharing=1.0)`, then
  `tf_mtz.add_task(zab, {"c": C}, calib, sharing=1.0)`;

each without retraining and with the same label-free retraining, `--retrain_steps` (1,000) joint distillation
steps on the training images (`Retrain(data=x_train, steps_per_layer=0, final_steps=1000, seed=s)`):

* at once + retraining: the Retrain given to zip_models (the teachers are the own models A, B, C);
* sequential, retraining in add_task: A+B zipped without retraining, the same Retrain given to add_task. add_task
  reads the zipped model as its task models, so the teachers of a and b are the A+B zip's heads (not A and B);
* sequential + fine_tune: A+B zipped and C added without retraining, then `tf_mtz.fine_tune(grown,
  Retrain(data=x_train, seed=s), 1000, teachers={"a": A, "b": B, "c": C})`: the same steps, data, optimiser and
  teachers as the at-once row (zip_models' final retraining and fine_tune run the same trainer; the page reports
  the largest output difference between `zip_models(..., retrain=R)` and `zip_models(...)` + `fine_tune` as a check);
* sequential, split: the product workflow, A+B zipped with half the steps, then add_task with the other half
  (teachers of a and b in the second half: the retrained A+B zip). Same 1,000 joint steps in all, but a and b train
  in both halves and c only in the second.

Sequential is "within the seed spread" of at once for a task when |mean(sequential) - mean(at once)| <= the larger
of the two standard deviations over the seeds (population std, as the table shows them).

Then the second requirement: the A+B zip's outputs for a and b, before and after adding C with the refit off
(`config=tf_mtz.ZipConfig(refit=False)`), at a sharing equal to the zip's (1.0) and below it (0.5): the largest
absolute difference of their softmax outputs over the test images and how many predictions change. For contrast
the same with the refit on and with retraining.

    python benchmarks/add_task_mnist.py [--seeds 3] [--epochs 5] [--calibration 2000] [--retrain_steps 1000]
        [--commit <sha of the tf_mtz on PYTHONPATH>]

Writes docs/add_task_mnist.md.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402
from mnist_data import cache_dir, load_mnist  # noqa: E402
from models import calibration_sample, trained_model  # noqa: E402

SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds; seed s trains its three models with seeds 3(s-1)+1, +2, +3.")
EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 2000, "Calibration images (the same for every task).")
RETRAIN = flags.DEFINE_integer("retrain_steps", 1000, "Label-free distillation steps in the retrained rows.")
OUT = flags.DEFINE_string("out", "docs", "Where to write the page.")
COMMIT = flags.DEFINE_string("commit", None, "The tf_mtz commit measured, for the page (e.g. of a `git archive` "
                             "snapshot on PYTHONPATH).")

TASKS = ("a", "b", "c")
LABELS = {"a": lambda y: y, "b": lambda y: y % 2, "c": lambda y: y % 3}
TAGS = {"a": "ATdigit", "b": "ATparity", "c": "ATmod3"}
TITLES = {"a": "a: digit (10-way)", "b": "b: parity (2-way)", "c": "c: digit mod 3 (3-way)"}


def error(probabilities, y) -> float:
    return float(np.mean(np.argmax(probabilities, -1) != y) * 100)


class Seed:
    """One seed's models, zips and measurements."""

    def __init__(self, seed, x_train, y_train, x_test, y_test):
        self.seed, self.x_train, self.x_test = seed, x_train, x_test
        self.y_test = {t: LABELS[t](y_test) for t in TASKS}
        self.rows, self.times, self.params, self.unchanged, self.notes = {}, {}, {}, [], {}
        started = time.perf_counter()
        self.cached = sum(os.path.exists(os.path.join(cache_dir(), f"lenet300_{TAGS[t]}_seed{3 * (seed - 1) + k + 1}"
                                                                  f"_e{EPOCHS.value}.keras"))
                          for k, t in enumerate(TASKS))
        self.models = {t: trained_model("lenet300", 3 * (seed - 1) + k + 1, x_train, LABELS[t](y_train),
                                        EPOCHS.value, tag=TAGS[t]) for k, t in enumerate(TASKS)}
        self.times["train (or load) the 3 models"] = time.perf_counter() - started
        self.calibration = calibration_sample(x_train, CALIBRATION.value)

    def predict(self, model) -> dict:
        outputs = model.predict(self.x_test, verbose=0, batch_size=1000)
        return outputs if isinstance(outputs, dict) else {"own": outputs}

    def record(self, name, model, tasks=TASKS):
        outputs = self.predict(model)
        self.rows[name] = {t: error(outputs[t], self.y_test[t]) for t in tasks}
        self.params[name] = int(model.count_params())
        return outputs

    def timed(self, name, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        self.times[name] = time.perf_counter() - started
        return result

    def retrain(self, steps):
        return tf_mtz.Retrain(data=self.x_train, steps_per_layer=0, final_steps=steps, seed=self.seed)

    def run(self):
        models, calib, steps = self.models, self.calibration, RETRAIN.value
        ab = {t: models[t] for t in ("a", "b")}
        # Before d8c9a2d the retraining's data order also depended on TensorFlow's global seed (which training a
        # base model sets and loading it from the cache does not); setting it keeps older commits comparable.
        keras.utils.set_random_seed(self.seed)
        self.rows["own models"] = {t: error(self.predict(models[t])["own"], self.y_test[t]) for t in TASKS}
        self.params["own models"] = int(sum(m.count_params() for m in models.values()))

        once = self.timed("zip A, B, C at once", tf_mtz.zip_models, models, calib, sharing=1.0, verbose=0)
        self.record("at once", once)
        zab = self.timed("zip A+B", tf_mtz.zip_models, ab, calib, sharing=1.0, verbose=0)
        before = self.predict(zab)
        grown = self.timed("add_task C", tf_mtz.add_task, zab, {"c": models["c"]}, calib, sharing=1.0, verbose=0)
        self.record("A+B, then add C", grown)

        once_r = self.timed(f"zip A, B, C at once + {steps} steps", tf_mtz.zip_models, models, calib, sharing=1.0,
                            retrain=self.retrain(steps), verbose=0)
        self.record(f"at once + {steps:,} steps", once_r)
        grown_r = self.timed(f"add_task C + {steps} steps (to the unretrained A+B zip)", tf_mtz.add_task, zab,
                             {"c": models["c"]}, calib, sharing=1.0, retrain=self.retrain(steps), verbose=0)
        self.record(f"A+B, then add C with {steps:,} steps in add_task", grown_r)
        # The same retraining as the at-once row: own models as teachers, after the sequential zip.
        tuned = tf_mtz.add_task(zab, {"c": models["c"]}, calib, sharing=1.0, verbose=0)
        self.timed(f"fine_tune {steps} steps", tf_mtz.fine_tune, tuned,
                   tf_mtz.Retrain(data=self.x_train, seed=self.seed), steps, teachers=models, verbose=0)
        self.record(f"A+B, then add C, then fine_tune {steps:,} steps (own models as teachers)", tuned)
        # Check: zip_models' final retraining is fine_tune after the zip (same trainer, same seed).
        once_t = tf_mtz.zip_models(models, calib, sharing=1.0, verbose=0)
        tf_mtz.fine_tune(once_t, tf_mtz.Retrain(data=self.x_train, seed=self.seed), steps, teachers=models, verbose=0)
        out_r, out_t = self.predict(once_r), self.predict(once_t)
        self.notes["retrain_vs_fine_tune"] = max(float(np.abs(out_r[t] - out_t[t]).max()) for t in TASKS)
        half = steps // 2
        zab_r = self.timed(f"zip A+B + {half} steps", tf_mtz.zip_models, ab, calib, sharing=1.0,
                           retrain=self.retrain(half), verbose=0)
        split = self.timed(f"add_task C + {steps - half} steps (to the retrained A+B zip)", tf_mtz.add_task, zab_r,
                           {"c": models["c"]}, calib, sharing=1.0, retrain=self.retrain(steps - half), verbose=0)
        self.record(f"A+B with {half:,} steps, then add C with {steps - half:,} steps", split)
        self.record("(A+B zip alone)", zab, tasks=("a", "b"))

        # Second requirement: a and b unchanged when C shares only already-shared units and the refit is off.
        for sharing, refit, retrain in ((1.0, False, None), (0.5, False, None), (1.0, True, None), (0.5, True, None),
                                        (1.0, False, self.retrain(steps))):
            config = tf_mtz.ZipConfig(refit=refit)
            added = tf_mtz.add_task(zab, {"c": models["c"]}, calib, sharing=sharing, config=config, retrain=retrain,
                                    verbose=0)
            after = self.predict(added)
            self.unchanged.append({
                "sharing": sharing, "refit": refit, "retrain": retrain is not None,
                "diff": {t: float(np.abs(after[t] - before[t]).max()) for t in ("a", "b")},
                "flips": {t: int(np.sum(after[t].argmax(-1) != before[t].argmax(-1))) for t in ("a", "b")},
                "error": {t: error(after[t], self.y_test[t]) for t in TASKS},
                "params": int(added.count_params()),
                "shared": [layer.shared for layer in added.zip_report.layers if not layer.head]})
        self.params["(A+B zip alone)"] = int(zab.count_params())
        self.notes["seconds_per_step"] = self.times[f"fine_tune {steps} steps"] / max(steps, 1)
        self.notes["load"] = os.getloadavg()[0]
        print(f"seed {self.seed}: " + "; ".join(f"{name} " + "/".join(f"{v:.2f}" for v in row.values())
                                                 for name, row in self.rows.items()), flush=True)
        print(f"seed {self.seed} seconds: " + "; ".join(f"{k} {v:.1f}" for k, v in self.times.items()), flush=True)
        return self


def stats(results, name, task):
    values = np.array([r.rows[name][task] for r in results])
    return values.mean(), values.std()


def cell(results, name, task):
    if task not in results[0].rows[name]:
        return "–"
    mean, std = stats(results, name, task)
    return f"{mean:.2f} ± {std:.2f}" if len(results) > 1 else f"{mean:.2f}"


def main(argv):
    del argv
    print(f"tf_mtz from {os.path.dirname(tf_mtz.__file__)}", flush=True)
    started = time.perf_counter()
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    results = [Seed(s + 1, x_train, y_train, x_test, y_test).run() for s in range(SEEDS.value)]
    total = time.perf_counter() - started
    steps, half = RETRAIN.value, RETRAIN.value // 2
    names = list(results[0].rows)
    header = "| | " + " | ".join(f"{TITLES[t]} error %" for t in TASKS) + " | parameters |"
    table = [header, "|---|---|---|---|---|"]
    table += [f"| {name} | " + " | ".join(cell(results, name, t) for t in TASKS) + f" | {results[0].params[name]:,} |"
              for name in names]

    comparisons = [("A+B, then add C", "at once", "no retraining"),
                   (f"A+B, then add C, then fine_tune {steps:,} steps (own models as teachers)",
                    f"at once + {steps:,} steps", "the same retraining (fine_tune, own models as teachers)"),
                   (f"A+B, then add C with {steps:,} steps in add_task", f"at once + {steps:,} steps",
                    "retraining in add_task (a, b distilled from the A+B zip)"),
                   (f"A+B with {half:,} steps, then add C with {steps - half:,} steps", f"at once + {steps:,} steps",
                    "split retraining")]
    verdict = ["| sequential row (against) | " + " | ".join(f"{t}: difference of means, max std -> within?"
                                                          for t in TASKS) + " | per-seed differences (a / b / c) |",
               "|---|---|---|---|---|"]
    within_count = {}
    for seq, once, label in comparisons:
        cells, within = [], []
        for t in TASKS:
            (m1, s1), (m2, s2) = stats(results, seq, t), stats(results, once, t)
            ok = abs(m1 - m2) <= max(s1, s2) + 1e-9
            within.append(ok)
            cells.append(f"{m1 - m2:+.2f}, {max(s1, s2):.2f} -> {'**yes**' if ok else '**no**'}")
        within_count[label] = within
        per_seed = "; ".join(" / ".join(f"{r.rows[seq][t] - r.rows[once][t]:+.2f}" for t in TASKS) for r in results)
        verdict.append(f"| {label} (vs {once}) | " + " | ".join(cells) + f" | {per_seed} |")

    per_seed = ["| seed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        per_seed.append(f"| {r.seed} | " + " | ".join(" / ".join(f"{v:.2f}" for v in r.rows[n].values())
                                                     for n in names) + " |")

    unchanged = ["| seed | add_task sharing | refit | retraining | max abs diff a | max abs diff b | predictions "
                 "changed a / b | c error % | params | shared units fc1, fc2 |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for u in r.unchanged:
            unchanged.append(f"| {r.seed} | {u['sharing']:.1f} | {'on' if u['refit'] else 'off'} | "
                             f"{f'{steps:,} steps' if u['retrain'] else 'none'} | {u['diff']['a']:.2g} | "
                             f"{u['diff']['b']:.2g} | {u['flips']['a']} / {u['flips']['b']} | {u['error']['c']:.2f} | "
                             f"{u['params']:,} | {', '.join(map(str, u['shared']))} |")
    off = [u for r in results for u in r.unchanged if not u["refit"] and not u["retrain"]]
    worst_off = max(max(u["diff"].values()) for u in off)
    flips_off = sum(sum(u["flips"].values()) for u in off)

    time_names = list(results[0].times)
    times = ["| step | mean | per seed |", "|---|---|---|"]
    times += [f"| {n} | {np.mean([r.times[n] for r in results]):.1f} | "
              f"{', '.join(f'{r.times[n]:.1f}' for r in results)} |" for n in time_names]
    per_step = [r.notes["seconds_per_step"] for r in results]

    command = "python benchmarks/add_task_mnist.py" + "".join(
        f" --{flag.name} {flag.value}" for flag in (SEEDS, EPOCHS, CALIBRATION, RETRAIN, COMMIT)
        if flag.value != flag.default)
    check = max(r.notes["retrain_vs_fine_tune"] for r in results)
    on = [u for r in results for u in r.unchanged if u["refit"] and not u["retrain"]]
    retrained = [u for r in results for u in r.unchanged if u["retrain"]]
    u05 = [u for r in results for u in r.unchanged if u["sharing"] == 0.5][0]
    zab_params, c_params = results[0].params["(A+B zip alone)"], int(results[0].models["c"].count_params())

    def verdicts(label):
        return " / ".join("**yes**" if ok else "**no**" for ok in within_count[label])

    def means(name, tasks=TASKS):
        return " / ".join(f"{stats(results, name, t)[0]:.2f}" for t in tasks)

    def gaps(seq, once):
        return " / ".join(f"{stats(results, seq, t)[0] - stats(results, once, t)[0]:+.2f}" for t in TASKS)

    (no_re, once0, _), (same_re, once1, _), (in_add, _, _), (split_re, _, _) = comparisons
    as_zab = all(r.rows[no_re][t] == r.rows["(A+B zip alone)"][t] for r in results for t in ("a", "b"))
    result = [
        "## Result", "",
        "Sequential within the seed spread of at once, per task (a / b / c; definition and numbers below):", "",
        f"* Without retraining: {verdicts('no retraining')} (differences of means {gaps(no_re, once0)} points). "
        + ("a's and b's errors are exactly the A+B zip's (adding C leaves their outputs unchanged). " if as_zab else "")
        + "add_task keeps the shared units' weights (the A+B zip's) and fits C to them only through the refit of "
        "the layers after them, where the at-once zip merges C's own units into the shared ones.",
        f"* With the same retraining (fine_tune {steps:,} steps from the own models, as the at-once zip retrains): "
        f"{verdicts('the same retraining (fine_tune, own models as teachers)')} (differences {gaps(same_re, once1)}).",
        f"* With the Retrain given to add_task: {verdicts('retraining in add_task (a, b distilled from the A+B zip)')} "
        f"(differences {gaps(in_add, once1)}): add_task distils a and b from the zipped model it is given, here the "
        f"unretrained A+B zip (a / b error {means('(A+B zip alone)', ('a', 'b'))}), so they end at "
        f"{means(in_add, ('a', 'b'))} against {means(once1, ('a', 'b'))} at once. To retrain a and b towards their "
        "own models, fine_tune from them after adding, or retrain the A+B zip before adding (the split row).",
        f"* Split retraining ({half:,} + {steps - half:,} steps): {verdicts('split retraining')} "
        f"(differences {gaps(split_re, once1)}).",
        f"* A and B unchanged when C shares only already-shared units and the refit is off: largest output "
        f"difference {worst_off:.2g}, {flips_off} predictions changed (sharing 1.0 and 0.5, every seed) -> "
        + ("**met**" if flips_off == 0 and worst_off < 1e-4 else "**missed**")
        + f". With the refit on: at most {max(max(u['diff'].values()) for u in on):.2g}; with {steps:,} retraining "
        f"steps in add_task: up to {max(max(u['diff'].values()) for u in retrained):.2g}.",
        f"* Below the zipped model's sharing, add_task un-shares: at sharing 0.5 the three tasks share "
        f"{', '.join(map(str, u05['shared']))} units of fc1, fc2 and a and b each get their own copy of the rest, "
        f"{u05['params']:,} parameters against {zab_params:,} for the A+B zip and {zab_params + c_params:,} for the "
        "A+B zip and C kept side by side.", ""]
    summary_within = {label: ", ".join(f"{t} {'yes' if ok else 'no'}" for t, ok in zip(TASKS, within))
                      for label, within in within_count.items()}
    lines = [
        "# Adding a task to a zipped model: A+B then C against A, B and C at once (MNIST, LeNet-300-100)", "",
        "The issue (19, \"Add a task to a zipped model\"): zipping A+B and then adding C gives, per task, test error "
        "within the seed spread of zipping A, B and C at once (MNIST, three LeNet-300-100 for three label "
        "functions, 3 seeds); tasks A and B's outputs are unchanged when C shares only units that were already "
        "shared and the refit is off.", "",
        "Setup: the same MNIST images (50,000 training, 10,000 test) with three label functions, one "
        "LeNet-300-100 (784-300-100-head, softmax) per task: " + ", ".join(TITLES[t] for t in TASKS) + f". Seed s "
        f"trains its three models with seeds 3(s-1)+1, +2, +3 ({EPOCHS.value} epochs, Adam 1e-3, batch 128). "
        f"Calibration: the same {CALIBRATION.value:,} training images for every task. Every zip shares every "
        "hidden layer whole (`sharing=1.0`, default ZipConfig) unless a row says otherwise. Test error in %, "
        f"mean ± std (population std) over {len(results)} seeds. `keras.utils.set_random_seed(s)` before each "
        "seed's zips (before commit d8c9a2d the retraining's data order also depended on TensorFlow's global "
        "seed; since then on `Retrain.seed`, the task and the phase alone).", "",
        "What each row got:", "",
        "* **own models**: the three trained models.",
        "* **at once**: `zip_models({\"a\": A, \"b\": B, \"c\": C}, calib, sharing=1.0)`, no retraining.",
        "* **A+B, then add C**: `zab = zip_models({\"a\": A, \"b\": B}, calib, sharing=1.0)`, then `add_task(zab, "
        "{\"c\": C}, calib, sharing=1.0)`, no retraining.",
        f"* **at once + {steps:,} steps**: `zip_models(..., retrain=Retrain(data=x_train, steps_per_layer=0, "
        f"final_steps={steps}, seed=s))`: {steps:,} joint label-free distillation steps (Adam 1e-3, cosine, "
        "batch 64 per task, temperature 2) after the last zipped layer; teachers: the own models A, B, C.",
        f"* **A+B, then add C with {steps:,} steps in add_task**: `zab` (no retraining), then the same Retrain "
        f"given to add_task: {steps:,} joint steps; add_task reads `zab` as its task models, so the teachers of a "
        "and b are the A+B zip's own heads (its errors), not A and B; C's teacher is C.",
        f"* **A+B, then add C, then fine_tune {steps:,} steps (own models as teachers)**: the sequential zip "
        f"without retraining, then `fine_tune(grown, Retrain(data=x_train, seed=s), {steps}, teachers={{a: A, b: "
        "B, c: C})`: the same steps, data, optimiser, seed and teachers as the at-once row. (zip_models' final "
        "retraining is this fine_tune: `zip_models(..., retrain=R)` and `zip_models(...)` + `fine_tune` give "
        + ("bit-identical outputs" if check == 0 else f"outputs within {check:.2g} of each other") + " in every seed.)",
        f"* **A+B with {half:,} steps, then add C with {steps - half:,} steps**: the product workflow: the A+B zip "
        f"retrained {half:,} steps (teachers A, B), then add_task with {steps - half:,} steps (teachers of a and b: "
        f"that retrained zip). {steps:,} joint steps in all; a and b train in both parts, c in the second only.",
        "* **(A+B zip alone)**: `zab`, for reference.", "",
        (f"tf_mtz at commit {COMMIT.value} (a `git archive` snapshot on `PYTHONPATH`). " if COMMIT.value else "")
        + "Command:", "", f"    {command}", "",
        f"Machine: {describe()}. Total run time {total / 60:.1f} min ({sum(r.cached for r in results)} of "
        f"{3 * len(results)} base models loaded from the cache, the others trained in the run). One joint "
        f"retraining step (three tasks, 64 images each) took {np.mean(per_step) * 1000:.1f} ms on average "
        "(fine_tune's seconds over its steps). "
        "Load average (1 min) after each seed: " + ", ".join(f"{r.notes['load']:.1f}" for r in results)
        + f" on {os.cpu_count()} cores (other work shared them).", "", *result,
        "## Test error", "", *table, "",
        "## Is sequential within the seed spread of at once?", "",
        "Definition: for each task, sequential is within the seed spread of at once when |mean(sequential) - "
        "mean(at once)| <= max(std(sequential), std(at once)), means and population standard deviations over the "
        "seeds of that task's test error. The per-seed differences (sequential minus at once, same base models) "
        "are given as well; positive means sequential is worse.", "", *verdict, "",
        "Summary: " + "; ".join(f"{label}: {text}" for label, text in summary_within.items()) + ".", "",
        "Per seed (error % a / b / c):", "", *per_seed, "",
        "## A and B unchanged when C shares only already-shared units and the refit is off", "",
        "`zab` (A+B, `sharing=1.0`, the default refit) against `add_task(zab, {\"c\": C}, calib, sharing=..., "
        "config=ZipConfig(refit=...), retrain=...)`: the largest absolute difference of a's and b's softmax "
        "outputs on the 10,000 test images, and how many of their predictions change. Sharing 1.0 and 0.5 are "
        "both at or below zab's sharing, so C shares only units a and b already share.", "",
        *unchanged, "",
        f"With the refit off (and no retraining), a's and b's outputs differ by at most {worst_off:.2g} "
        f"(float rounding: the shared units keep their weights and are only reordered) and {flips_off} "
        "predictions change over all seeds and both sharings.", "",
        "## Seconds per step", "", *times, "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "add_task_mnist.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
