"""tf_mtz's default against the paper and the merging baselines, on real MNIST, at several retraining budgets.

E1: two models trained with different seeds on all ten digits (the paper's first experiment).
E2: one model on digits 0-4, one on digits 5-9 (different tasks).
Every method zips all hidden layers 100%, gets the same refit setting and the same label-free retraining
(distillation from the original models, Adam 1e-3, cosine decay, batch 64 per task) after the last
zipped layer; test error is read after 0, 100, 300 and 1,000 joint steps of one run. "unzipped + training"
gives the original models the same number of extra steps on labels, to show what extra training alone does.

    python benchmarks/compare_methods.py                 # LeNet-300-100 and LeNet-5, E1 and E2, 3 seeds
    python benchmarks/compare_methods.py --quick         # LeNet-300-100, E1, 1 seed, budgets 0 and 100

Writes docs/compare_<arch>_<experiment>.md and a plot of error versus retraining steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tf_mtz  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import trained_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiments import METHODS, error, experiment_data  # noqa: E402

QUICK = flags.DEFINE_bool("quick", False, "One seed, LeNet-300-100, E1, budgets 0 and 100.")
ARCHS = flags.DEFINE_list("archs", ["lenet300", "lenet5"], "Architectures.")
EXPERIMENTS = flags.DEFINE_list("experiments", ["E1", "E2"], "Experiments.")
SEEDS = flags.DEFINE_integer("seeds", 3, "Seed pairs.")
BUDGETS = flags.DEFINE_list("budgets", ["0", "100", "300", "1000"], "Total joint retraining steps.")
OUT = flags.DEFINE_string("out", "docs", "Output folder.")

def main(_):
    logging.set_verbosity(logging.WARNING)
    archs, experiments, seeds = ARCHS.value, EXPERIMENTS.value, SEEDS.value
    budgets = sorted(int(b) for b in BUDGETS.value)
    if QUICK.value:
        archs, experiments, seeds, budgets = ["lenet300"], ["E1"], 1, [0, 100]
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    started = time.perf_counter()
    os.makedirs(OUT.value, exist_ok=True)
    for arch in archs:
        epochs = 10 if arch == "lenet300" else 4
        for experiment in experiments:
            data = experiment_data(experiment, x_train, y_train, x_test, y_test)
            results = {m: {b: [] for b in budgets} for m in ["models A / B", "unzipped + training", *METHODS]}
            for pair in range(seeds):
                models = {t: trained_model(arch, 2 * pair + i + 1, data[t][0], data[t][1], epochs,
                                           tag=f"{experiment}{t}")
                          for i, t in enumerate(("a", "b"))}
                rng = np.random.default_rng(pair)
                calibration = {t: data[t][0][rng.permutation(len(data[t][0]))[:10000]] for t in data}
                distill = {t: data[t][0] for t in data}
                test = {t: (data[t][2], data[t][3]) for t in data}
                for b in budgets:
                    results["models A / B"][b].append(
                        [error(models[t].predict(test[t][0], verbose=0, batch_size=1000), test[t][1]) for t in "ab"])
                # The originals given the same extra training, on labels.
                for t_index, t in enumerate("ab"):
                    model = keras.models.clone_model(models[t])
                    model.set_weights(models[t].get_weights())
                    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
                    done = 0
                    for b in budgets:
                        if b > done:
                            idx = rng.permutation(len(data[t][0]))[:(b - done) * 64]
                            model.fit(data[t][0][idx], data[t][1][idx], batch_size=64, epochs=1, verbose=0)
                            done = b
                        value = error(model.predict(test[t][0], verbose=0, batch_size=1000), test[t][1])
                        if t_index == 0:
                            results["unzipped + training"][b].append([value, np.nan])
                        else:
                            results["unzipped + training"][b][-1][1] = value
                for label, options in METHODS.items():
                    zipped = tf_mtz.zip_models(models, calibration, seed=pair, verbose=0, **options)
                    done = 0
                    for b in budgets:
                        if b > done:
                            retrain = tf_mtz.Retrain(data=distill, seed=pair, learning_rate=1e-3)
                            tf_mtz.fine_tune(zipped, retrain, steps=b - done, teachers=models, verbose=0)
                            done = b
                        out = {t: zipped.predict(test[t][0], verbose=0, batch_size=1000)[t] for t in "ab"}
                        results[label][b].append([error(out[t], test[t][1]) for t in "ab"])
                    print(f"{arch} {experiment} pair {pair + 1} {label}: "
                          f"{[np.round(results[label][b][-1], 2).tolist() for b in budgets]}", flush=True)
            write(arch, experiment, results, budgets, seeds)
    print(f"total {time.perf_counter() - started:.0f} s")


def write(arch, experiment, results, budgets, seeds):
    stem = os.path.join(OUT.value, f"compare_{arch}_{experiment}")
    title = (f"{arch}, {experiment}, all hidden layers shared: MNIST test error % (task A / task B), mean ± std "
             f"over {seeds} seed pairs, after N joint distillation steps in total")
    lines = [title, "", "| method | " + " | ".join(f"{b} steps" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for label, per_budget in results.items():
        cells = []
        for b in budgets:
            values = np.array(per_budget[b])
            mean, std = values.mean(0), values.std(0)
            cells.append(f"{mean[0]:.2f}±{std[0]:.2f} / {mean[1]:.2f}±{std[1]:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({k: {str(b): v for b, v in per.items()} for k, per in results.items()}, f)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for task_index, task in enumerate("AB"):
        for label, per_budget in results.items():
            means = [np.mean(np.array(per_budget[b])[:, task_index]) for b in budgets]
            axes[task_index].plot(budgets, means, marker="o", label=label,
                                  linewidth=2.5 if label == "tf_mtz default" else 1)
        axes[task_index].set_xscale("symlog", linthresh=100)
        axes[task_index].set_xlabel("joint retraining steps")
        axes[task_index].set_ylabel("test error %")
        axes[task_index].set_title(f"{arch} {experiment}, task {task}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
