"""Quality on real MNIST: pairs of models trained with different seeds on the 50k training split, every
hidden layer 100% shared, test error before and after joint retraining (mean and spread over seed pairs).

    python benchmarks/quality_mnist.py                       # LeNet-300-100, 3 seed pairs, 0/1000/2000 steps
    python benchmarks/quality_mnist.py --arch lenet5 --conv_hessian channel
    python benchmarks/quality_mnist.py --recipe paper        # the paper's SGD + labels retraining

Base models are cached (see tflite_examples/mnist_data.py); results go to docs/ as markdown and JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_mtz  # noqa: E402
from machine import describe  # noqa: E402
from tf_mtz.experimental import ExperimentalConfig  # noqa: E402
from mnist_data import load_mnist  # noqa: E402
from models import trained_model  # noqa: E402

ARCH = flags.DEFINE_enum("arch", "lenet300", ["lenet300", "lenet5"], "Base architecture.")
PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs (1,2), (3,4), ...")
BUDGETS = flags.DEFINE_list("budgets", ["0", "1000", "2000"], "Total joint retraining steps.")
EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs of each base model.")
CALIBRATION = flags.DEFINE_integer("calibration", 10000, "Calibration images per task.")
CONV_HESSIAN = flags.DEFINE_enum("conv_hessian", "channel", ["patch", "channel"], "Conv Hessian.")
MATCHING = flags.DEFINE_enum("matching", None, ["greedy", "optimal"], "Matching (default: the preset's).")
RECIPE = flags.DEFINE_enum("recipe", "default", ["default", "paper"], "Retraining recipe.")
METHOD = flags.DEFINE_enum("method", "default", ["default", "paper"], "ZipConfig preset.")
OUT = flags.DEFINE_string("out", "docs", "Where to write the result table.")


def error(out, y):
    return float(np.mean(np.argmax(out, axis=-1) != y) * 100.0)


def config() -> ExperimentalConfig:
    preset = ExperimentalConfig.paper() if METHOD.value == "paper" else ExperimentalConfig()
    return preset.replace(conv_hessian=CONV_HESSIAN.value, **({"matching": MATCHING.value} if MATCHING.value else {}))


def main(_):
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    epochs = EPOCHS.value if ARCH.value == "lenet300" else min(EPOCHS.value, 4)
    rng = np.random.default_rng(0)
    calibration = x_train[rng.permutation(len(x_train))[:CALIBRATION.value]]
    budgets = [int(b) for b in BUDGETS.value]
    rows = {"model A": [], "model B": []}
    rows.update({f"zipped, {b} steps": [] for b in budgets})
    seconds = []
    for pair in range(PAIRS.value):
        seed_a, seed_b = 2 * pair + 1, 2 * pair + 2
        model_a = trained_model(ARCH.value, seed_a, x_train, y_train, epochs)
        model_b = trained_model(ARCH.value, seed_b, x_train, y_train, epochs)
        models = {"a": model_a, "b": model_b}
        rows["model A"].append([error(model_a.predict(x_test, verbose=0, batch_size=1000), y_test), np.nan])
        rows["model B"].append([np.nan, error(model_b.predict(x_test, verbose=0, batch_size=1000), y_test)])
        for budget in budgets:
            hidden = sum(1 for layer in model_a.layers if hasattr(layer, "kernel")) - 1
            retrain = None
            if budget:
                per_layer = budget // hidden
                if RECIPE.value == "paper":
                    retrain = tf_mtz.paper_retrain((x_train, y_train), steps_per_layer=per_layer)
                else:
                    retrain = tf_mtz.Retrain(data=x_train, steps_per_layer=per_layer, seed=pair)
            started = time.perf_counter()
            zipped = tf_mtz.zip_models(models, calibration, retrain=retrain, config=config(), verbose=0)
            seconds.append(time.perf_counter() - started)
            out = zipped.predict(x_test, verbose=0, batch_size=1000)
            rows[f"zipped, {budget} steps"].append([error(out["a"], y_test), error(out["b"], y_test)])
            print(f"pair {pair + 1}: {budget:5d} steps -> {rows[f'zipped, {budget} steps'][-1]}", flush=True)

    conv = f", conv_hessian={CONV_HESSIAN.value}" if ARCH.value == "lenet5" else ""
    title = (f"MNIST test error (%), {ARCH.value}, all hidden layers 100% shared, matching={MATCHING.value}"
             f"{conv}, method={METHOD.value}, recipe={RECIPE.value}, mean ± std over {PAIRS.value} seed pairs")
    lines = [title, "", "| | task A | task B | A − base A | B − base B |", "|---|---|---|---|---|"]
    base = np.array([[r[0] for r in rows["model A"]], [r[1] for r in rows["model B"]]])  # (2, pairs)
    for label, values in rows.items():
        values = np.array(values)  # (pairs, 2)
        cells = []
        for task in range(2):
            column = values[:, task]
            cells.append("–" if np.isnan(column).all() else f"{column.mean():.2f} ± {column.std():.2f}")
        for task in range(2):
            column = values[:, task]
            cells.append("–" if np.isnan(column).all() or label.startswith("model")
                         else f"{(column - base[task]).mean():+.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"zip_models wall time per run: {np.mean(seconds):.1f} s on average (on a {describe()}).")
    text = "\n".join(lines)
    print()
    print(text)
    os.makedirs(OUT.value, exist_ok=True)
    conv = f"_{CONV_HESSIAN.value}" if ARCH.value == "lenet5" else ""
    stem = f"quality_{ARCH.value}{conv}_{METHOD.value}_{MATCHING.value or 'preset'}_{RECIPE.value}"
    with open(os.path.join(OUT.value, stem + ".md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(OUT.value, stem + ".json"), "w") as f:
        json.dump({k: v for k, v in rows.items()}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
