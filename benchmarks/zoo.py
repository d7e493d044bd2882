"""The zoo: which architectures zip, how long it takes, and what the phone gets.

The keras.applications families, and three kinds keras.applications lacks, built here: a ResNeXt-style
classifier (grouped convolutions), a U-Net (transposed convolutions, skip Concatenates, a per-pixel
output) and a detector-style model (two outputs). Per family, two instances with different seeds (weights=None, reduced input size, 5-class heads,
non-trivial BatchNormalization statistics) are zipped with every hidden layer shared (default recipe, 32
random calibration images, no retraining), each family in a subprocess with a time limit. Printed and
written to docs/zoo.md: zip time, parameters and float `.tflite` bytes of the zipped model against the two
separate models, and the single-thread LiteRT latency of one frame through the zipped model (both tasks)
against the two separate models, all measured in one run. Families tf_mtz refuses are listed with the
error it gives.

Rows are kept in docs/zoo.json with the commit that measured them; a run with `--families` remeasures those
families only and the page is rebuilt from every stored row (the page says which commit measured which).

    python benchmarks/zoo.py [--families ResNet50V2,DenseNet121] [--timeout 600] [--out docs]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FAMILIES = {  # name: (input size, keyword arguments)
    "VGG16": (32, {}),
    "ResNet50": (32, {}),
    "ResNet50V2": (32, {}),
    "MobileNet": (32, {"alpha": 0.25}),
    "MobileNetV2": (32, {"alpha": 0.35}),
    "MobileNetV3Small": (32, {}),
    "MobileNetV3Large": (32, {}),
    "EfficientNetB0": (32, {}),
    "EfficientNetV2B0": (32, {}),
    "DenseNet121": (32, {}),
    "Xception": (71, {}),
    "InceptionV3": (75, {}),
    "NASNetMobile": (32, {}),
    "ConvNeXtTiny": (32, {}),
}
# Architectures keras.applications lacks, built in this script: name -> (input size, builder(seed)).
BUILT_HERE = {"ResNeXt": 32, "UNet": 32, "Detector": 32}
ALL = {**{name: size for name, (size, _) in FAMILIES.items()}, **BUILT_HERE}

NAMES = flags.DEFINE_list("families", list(ALL), "Families to zip (keras.applications names, ResNeXt, UNet, "
                          "Detector).")
TIMEOUT = flags.DEFINE_integer("timeout", 600, "Seconds per family before it counts as not finished.")
IMAGES = flags.DEFINE_integer("images", 32, "Calibration images per task.")
OUT = flags.DEFINE_string("out", "docs", "Where to write zoo.md ('' to skip).")
ONE = flags.DEFINE_string("one", "", "Internal: measure this family in this process and print JSON.")


def measure(name: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tf_mtz
    from machine import tflite_latency

    size = ALL[name]

    def instance(seed):
        keras.utils.set_random_seed(seed)
        if name in BUILT_HERE:
            model = built_here(name, size)
        else:
            # No name=: some builders look their configuration up by the model's name (EfficientNetV2).
            model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=5,
                                                      **FAMILIES[name][1])
        return tf_mtz.testing.randomize_batch_norms(model, seed)

    models = {"a": instance(1), "b": instance(2)}
    x = np.random.default_rng(0).uniform(0, 255, (IMAGES.value, size, size, 3)).astype("float32")
    started = time.perf_counter()
    zipped = tf_mtz.zip_models(models, x, verbose=0)
    seconds = time.perf_counter() - started
    separate = [tf_mtz.tflite_bytes(m) for m in models.values()]
    together = tf_mtz.tflite_bytes(zipped)
    frame = x[:1]

    return {"family": name, "size": size, "zip_seconds": seconds,
            "params_separate": int(sum(m.count_params() for m in models.values())),
            "params_zipped": int(zipped.count_params()),
            "bytes_separate": int(sum(len(b) for b in separate)), "bytes_zipped": len(together),
            "latency_separate": sum(tflite_latency(b, frame) for b in separate),
            "latency_zipped": tflite_latency(together, frame)}


def built_here(name: str, size: int):
    """A ResNeXt-style classifier (grouped 3x3 convolutions, 8 groups), a small U-Net (Conv2DTranspose
    decoder, skip Concatenates, a per-pixel mask) or a detector-style model (one trunk, a class output and
    a box output)."""
    import keras

    layers = keras.layers
    x = inputs = keras.Input((size, size, 3))

    def conv_bn(h, filters, kernel=3, strides=1, groups=1):
        h = layers.Conv2D(filters, kernel, strides=strides, padding="same", groups=groups, use_bias=False)(h)
        return layers.ReLU()(layers.BatchNormalization()(h))

    if name == "ResNeXt":
        x = conv_bn(x, 64)
        for block in range(3):
            y = conv_bn(conv_bn(x, 128, 1), 128, 3, groups=8)
            x = layers.ReLU()(layers.Add()([x, layers.BatchNormalization()(layers.Conv2D(64, 1)(y))]))
        x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, layers.Dense(5, activation="softmax")(x))
    if name == "UNet":
        skips = []
        for filters in (32, 64, 128):
            x = conv_bn(conv_bn(x, filters), filters)
            skips.append(x)
            x = layers.MaxPooling2D()(x)
        x = conv_bn(x, 256)
        for filters, skip in zip((128, 64, 32), reversed(skips)):
            x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
            x = conv_bn(layers.Concatenate()([x, skip]), filters)
        return keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid")(x))
    if name == "Detector":
        for filters in (32, 64, 128, 256):
            x = conv_bn(conv_bn(x, filters, strides=2), filters)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(256, activation="relu")(x)
        classes = layers.Dense(5, activation="softmax", name="classes")(x)
        boxes = layers.Dense(4, name="boxes")(x)
        return keras.Model(inputs, {"classes": classes, "boxes": boxes})
    raise ValueError(f"No builder for {name}.")


def run_family(name: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--one={name}", f"--images={IMAGES.value}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT.value)
    except subprocess.TimeoutExpired:
        return {"family": name, "error": f"did not finish in {TIMEOUT.value} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ZOO "):
            return json.loads(line[4:])
    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"family": name, "error": error[:300], "seconds": time.perf_counter() - started}


def main(argv):
    del argv
    if ONE.value:
        try:
            print("ZOO " + json.dumps(measure(ONE.value)), flush=True)
        except Exception as exc:  # reported as the family's row
            print("ZOO " + json.dumps({"family": ONE.value, "error": f"{type(exc).__name__}: {exc}"[:300]}))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    stored_path = os.path.join(OUT.value, "zoo.json") if OUT.value else None
    stored = {}
    if stored_path and os.path.exists(stored_path):
        with open(stored_path) as f:
            stored = json.load(f)
    for name in NAMES.value:
        row = run_family(name)
        row["commit"] = commit
        stored[name] = row
        print(json.dumps(row), flush=True)
    text = render([stored[name] for name in ALL if name in stored], describe())
    print(text)
    if OUT.value:
        os.makedirs(OUT.value, exist_ok=True)
        with open(stored_path, "w") as f:
            json.dump(stored, f, indent=1)
        with open(os.path.join(OUT.value, "zoo.md"), "w") as f:
            f.write(text)


def render(rows: list, machine: str) -> str:
    """The page: one table row per family, from the stored measurements."""
    commits = sorted({row.get("commit", "unknown") for row in rows})
    lines = ["# The zoo: keras.applications families, grouped convolutions, a decoder, two outputs", "",
             f"`python benchmarks/zoo.py`: per family two instances (weights=None, 5-class heads, random "
             f"BatchNormalization statistics) zipped with every hidden layer shared, default recipe, "
             f"{IMAGES.value} random calibration images, no retraining, on a {machine}; each family in a "
             f"subprocess, families one after another (commit{'s' if len(commits) > 1 else ''} "
             f"{', '.join(commits)}: the last column). Latency: one frame, single-thread LiteRT (both tasks: "
             "the zipped model once, the separate models one after the other). ResNeXt (grouped 3x3 convolutions, 8 "
             "groups), UNet (a Conv2DTranspose decoder with skip Concatenates, a per-pixel output) and Detector "
             "(a class output and a box output) are built in the script.", "",
             "| family | input | zip (s) | parameters zipped / separate | .tflite bytes zipped / separate | "
             "latency zipped / separate (ms) | commit |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['family']} | {ALL[row['family']]} | not zipped: {row['error']} | | | | "
                         f"{row.get('commit', '')} |")
            continue
        lines.append(
            f"| {row['family']} | {row['size']} | {row['zip_seconds']:.0f} | "
            f"{row['params_zipped'] / row['params_separate']:.3f} ({row['params_zipped']:,}) | "
            f"{row['bytes_zipped'] / row['bytes_separate']:.3f} | "
            f"{1e3 * row['latency_zipped']:.2f} / {1e3 * row['latency_separate']:.2f} | {row.get('commit', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
