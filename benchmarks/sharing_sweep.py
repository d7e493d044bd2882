"""Error versus share of units shared, without retraining, on real MNIST (E1 and E2, LeNet-300-100).

    python benchmarks/sharing_sweep.py [--seeds 3]

Writes docs/sharing_<arch>.md and docs/sharing_<arch>.png.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tf_mtz  # noqa: E402
from experiments import METHODS, error, experiment_data  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import trained_model  # noqa: E402

SEEDS = flags.DEFINE_integer("seeds", 3, "Seed pairs.")
ARCH = flags.DEFINE_enum("arch", "lenet300", ["lenet300", "lenet5"], "Architecture.")
FRACTIONS = flags.DEFINE_list("fractions", ["0", "0.25", "0.5", "0.75", "0.9", "1.0"], "Shared fractions.")
OUT = flags.DEFINE_string("out", "docs", "Output folder.")
SHOWN = ("tf_mtz default", "paper (no refit)", "paper + refit", "euclidean + average", "random + average")


def main(_):
    logging.set_verbosity(logging.WARNING)
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    fractions = [float(f) for f in FRACTIONS.value]
    epochs = 10 if ARCH.value == "lenet300" else 4
    lines = [f"{ARCH.value}: MNIST test error % (task A / task B) without retraining versus the fraction of every "
             f"hidden layer's units shared; mean over {SEEDS.value} seed pairs", ""]
    curves = {}
    for experiment in ("E1", "E2"):
        data = experiment_data(experiment, x_train, y_train, x_test, y_test)
        table = {m: {f: [] for f in fractions} for m in SHOWN}
        shared_parameters = {f: [] for f in fractions}
        for pair in range(SEEDS.value):
            models = {t: trained_model(ARCH.value, 2 * pair + i + 1, data[t][0], data[t][1], epochs,
                                       tag=f"{experiment}{t}") for i, t in enumerate("ab")}
            rng = np.random.default_rng(pair)
            calibration = {t: data[t][0][rng.permutation(len(data[t][0]))[:10000]] for t in data}
            for label in SHOWN:
                for fraction in fractions:
                    zipped = tf_mtz.zip_models(models, calibration, sharing=fraction, seed=pair, verbose=0,
                                               **METHODS[label])
                    out = {t: zipped.predict(data[t][2], verbose=0, batch_size=1000)[t] for t in "ab"}
                    table[label][fraction].append([error(out[t], data[t][3]) for t in "ab"])
                    if label == "tf_mtz default":
                        shared_parameters[fraction].append(zipped.zip_report.shared_fraction)
        lines += [f"**{experiment}**", "", "| method | " + " | ".join(
            f"{f:.0%} units ({np.mean(shared_parameters[f]):.0%} params)" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for label in SHOWN:
            means = [np.mean(table[label][f], axis=0) for f in fractions]
            lines.append(f"| {label} | " + " | ".join(f"{m[0]:.2f} / {m[1]:.2f}" for m in means) + " |")
        lines.append("")
        curves[experiment] = (table, shared_parameters)
        print("\n".join(lines), flush=True)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, f"sharing_{ARCH.value}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis, (experiment, (table, shared_parameters)) in zip(axes, curves.items()):
        x = [100 * np.mean(shared_parameters[f]) for f in fractions]
        for label in SHOWN:
            mean_error = [np.mean(table[label][f]) for f in fractions]
            axis.plot(x, mean_error, marker="o", label=label, linewidth=2.5 if label == "tf_mtz default" else 1)
        axis.set_xlabel("parameters shared (% of a task model)")
        axis.set_ylabel("test error %, mean of both tasks")
        axis.set_title(f"{ARCH.value} {experiment}, no retraining")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT.value, f"sharing_{ARCH.value}.png"), dpi=100)


if __name__ == "__main__":
    app.run(main)
