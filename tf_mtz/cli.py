r"""`tf-mtz`: zip saved Keras models from the command line, export them, and render zip reports.

    tf-mtz zip --model digits=a.keras --model parity=b.keras --calibration x.npy \
        --output out/zipped.keras --tflite out/zipped.tflite --saved_model out/serving/zipped/1 \
        --report_dir out/report
    tf-mtz report --report out/report/report.json --report_dir out/report2
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from tf_mtz import config as config_lib

COMMANDS = ("zip", "report")

_MODEL = flags.DEFINE_multi_string("model", [], "TASK=PATH of a saved .keras model; give one per task.")
_CALIBRATION = flags.DEFINE_multi_string(
    "calibration", [], "Calibration inputs: TASK=SOURCE per task, or one SOURCE for every task. SOURCE is a .npy "
    "file, a .npz with an array named 'x' (or a single array; for models with several inputs, one array per "
    "input name), or tfds:DATASET/SPLIT read from --data_dir without downloading. 'synthetic' (alone): no "
    "data, inputs made up from the models' BatchNormalization statistics.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TensorFlow Datasets data directory for tfds: sources.")
_SHARING = flags.DEFINE_string(
    "sharing", "1.0", "Fraction of every hidden layer's units to share, or LAYER=VALUE[,LAYER=VALUE...] where "
    "VALUE is a fraction (with a dot) or a unit count, or auto:TOLERANCE: the largest sharing per layer within "
    "TOLERANCE of each own model (points of error on --evaluation data, else departed top-1 outputs on the "
    "calibration inputs).")
_PRESET = flags.DEFINE_enum("preset", "default", ["default", "paper"],
                            "default: weight matching, averaging and refit (the measured best); paper: the "
                            "published procedure (Hessian costs, greedy matching, Hessian merge, no refit).")
_PAIRING = flags.DEFINE_enum("pairing", None, list(config_lib.PAIRINGS), "How units are paired (default: the preset's).")
_MATCHING = flags.DEFINE_enum("matching", None, list(config_lib.MATCHINGS), "One-to-one matching (default: the preset's).")
_MERGE = flags.DEFINE_enum("merge", None, list(config_lib.MERGES), "How paired weights merge (default: the preset's).")
_REFIT = flags.DEFINE_bool("refit", None, "Refit each next layer to the originals (default: the preset's).")
_DAMPING = flags.DEFINE_float("damping", config_lib.ZipConfig.damping, "Hessian damping, as a fraction of trace/dim.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Calibration batch size (default: 256, more for small networks).")
_ACTIVATION_MEMORY = flags.DEFINE_float(
    "activation_memory_gib", config_lib.ZipConfig.activation_memory_gib,
    "Memory for the calibration data's layer activations; beyond it they are spilled to a temporary directory.")
_RETRAIN_STEPS = flags.DEFINE_integer(
    "retrain_steps", 0, "Joint distillation steps after each zipped layer (label-free, on the calibration "
    "inputs); 0 skips retraining.")
_EVALUATION = flags.DEFINE_multi_string(
    "evaluation", [], "Optional labelled data for accuracies in the report: TASK=PATH per task or one PATH, "
    "each an .npz with arrays 'x' and 'y'.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the zipped .keras model.")
_TFLITE = flags.DEFINE_string("tflite", None, "Optional .tflite to write.")
_QUANTIZATION = flags.DEFINE_enum("quantization", "none", ["none", "dynamic", "float16", "int8"],
                                  "Quantization of the .tflite (int8 uses the calibration inputs).")
_SAVED_MODEL = flags.DEFINE_string("saved_model", None, "Optional SavedModel directory (<base>/<name>/<version>).")
_REPORT = flags.DEFINE_string("report", None, "report: the report.json to re-render.")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where to write report.json, report.md and report.png.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Write a checkpoint after every layer step here; rerunning the same command resumes "
    "from the last one (same result, bit for bit).")


class UsageError(app.UsageError):
    pass


def _pairs(values, what):
    out = {}
    for value in values:
        if "=" not in value:
            raise UsageError(f"--{what} expects TASK=PATH, got {value!r}.")
        key, path = value.split("=", 1)
        out[key] = path
    return out


def _load_array(path):
    import numpy as np

    if path.startswith("tfds:"):
        import tensorflow_datasets as tfds

        name, _, split = path[len("tfds:"):].partition("/")
        try:
            return tfds.load(name, split=split or "train", data_dir=_DATA_DIR.value, download=False)
        except Exception as exc:  # tfds raises many types; the user needs the message, not the trace
            raise UsageError(f"Could not read {path} from --data_dir={_DATA_DIR.value}: {exc}") from exc
    if not os.path.exists(path):
        raise UsageError(f"Calibration file {path} does not exist.")
    data = np.load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        if "x" in data.files:
            return data["x"]
        if len(data.files) == 1:
            return data[data.files[0]]
        return {name: data[name] for name in data.files}  # one array per model input, by input name
    return data


def _representative_inputs(source, zipped):
    """Inputs for int8 ranges from one calibration source: arrays as given; a few hundred from a tf.data
    pipeline (a list of arrays for several model inputs)."""
    import numpy as np
    import tensorflow as tf

    from tf_mtz import data as data_lib, graph

    if not isinstance(source, tf.data.Dataset):
        return source
    (batch,) = list(data_lib.as_dataset(source, "int8", graph.inputs_of(zipped), "Calibration data", 200).take(1))
    return [np.asarray(x) for x in batch] if isinstance(batch, tuple) else np.asarray(batch)


def _load_labelled(path):
    import numpy as np

    if not os.path.exists(path):
        raise UsageError(f"Evaluation file {path} does not exist.")
    data = np.load(path)
    if not isinstance(data, np.lib.npyio.NpzFile) or not {"x", "y"} <= set(data.files):
        raise UsageError(f"Evaluation file {path} must be an .npz with arrays 'x' and 'y'.")
    return data["x"], data["y"]


def parse_sharing(text: str):
    """'0.5' -> 0.5; 'fc1=1.0,fc2=50' -> {'fc1': 1.0, 'fc2': 50}; 'auto:0.3' -> '0.3' (a tolerance, as text)."""
    if text.startswith("auto:"):
        try:
            return str(float(text[len("auto:"):]))
        except ValueError as exc:
            raise UsageError(f"--sharing=auto:TOLERANCE needs a number, got {text!r}.") from exc
    if "=" not in text:
        try:
            return float(text)
        except ValueError as exc:
            raise UsageError(f"--sharing expects a fraction or LAYER=VALUE pairs, got {text!r}.") from exc
    sharing = {}
    for item in text.split(","):
        name, value = item.split("=", 1)
        try:
            sharing[name.strip()] = float(value) if "." in value else int(value)
        except ValueError as exc:
            raise UsageError(f"--sharing value for {name!r} is not a number: {value!r}.") from exc
    return sharing


def write_report(report, directory: str) -> list:
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, content in (("report.json", report.to_json()), ("report.md", report.to_markdown() + "\n")):
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(content)
        written.append(path)
    try:
        written.append(report.plot(os.path.join(directory, "report.png")))
    except ImportError as exc:
        print(f"tf-mtz: no plot ({exc})", file=sys.stderr)
    return written


def _config() -> config_lib.ZipConfig:
    """The configuration the flags describe: the preset, with the options given explicitly changed."""
    preset = config_lib.ZipConfig.paper() if _PRESET.value == "paper" else config_lib.ZipConfig()
    changes = {name: flag.value for name, flag in (("pairing", _PAIRING), ("matching", _MATCHING),
                                                    ("merge", _MERGE), ("refit", _REFIT)) if flag.value is not None}
    return preset.replace(damping=_DAMPING.value, batch_size=_BATCH_SIZE.value,
                          activation_memory_gib=_ACTIVATION_MEMORY.value, **changes)


def _zip():
    import keras

    import tf_mtz

    models = _pairs(_MODEL.value, "model")
    if len(models) < 2:
        raise UsageError("tf-mtz zip needs at least two --model TASK=PATH flags.")
    if not _OUTPUT.value:
        raise UsageError("tf-mtz zip needs --output PATH.keras.")
    for path in [_OUTPUT.value, _TFLITE.value, _SAVED_MODEL.value]:
        if path and os.path.exists(path) and not _OVERWRITE.value:
            raise UsageError(f"{path} exists; pass --overwrite to replace it.")
    if not _CALIBRATION.value:
        raise UsageError("tf-mtz zip needs --calibration PATH (or TASK=PATH per task).")
    one_source = len(_CALIBRATION.value) == 1 and "=" not in _CALIBRATION.value[0]
    if _CALIBRATION.value == ["synthetic"]:
        calibration = None  # made up from the models
    elif one_source:
        calibration = _load_array(_CALIBRATION.value[0])
    else:
        calibration = {task: _load_array(path) for task, path in _pairs(_CALIBRATION.value, "calibration").items()}
    loaded = {}
    for task, path in models.items():
        if not os.path.exists(path):
            raise UsageError(f"Model file {path} (task {task!r}) does not exist.")
        loaded[task] = keras.models.load_model(path)
    retrain = tf_mtz.Retrain(steps_per_layer=_RETRAIN_STEPS.value) if _RETRAIN_STEPS.value else None
    evaluation = None
    if len(_EVALUATION.value) == 1 and "=" not in _EVALUATION.value[0]:
        evaluation = _load_labelled(_EVALUATION.value[0])
    elif _EVALUATION.value:
        evaluation = {task: _load_labelled(path) for task, path in _pairs(_EVALUATION.value, "evaluation").items()}
    sharing = parse_sharing(_SHARING.value)
    if isinstance(sharing, str):  # "auto:TOLERANCE"
        sharing = tf_mtz.AutoSharing(float(sharing), data=evaluation)
    zipped = tf_mtz.zip_models(loaded, calibration, sharing=sharing, retrain=retrain, config=_config(),
                               evaluation_data=evaluation, checkpoint_dir=_CHECKPOINT_DIR.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    zipped.save(_OUTPUT.value)
    written = [_OUTPUT.value]
    if _TFLITE.value:
        quantization = None if _QUANTIZATION.value == "none" else _QUANTIZATION.value
        representative = None if calibration is None else _representative_inputs(
            calibration if one_source else next(iter(calibration.values())), zipped)
        zipped_bytes = tf_mtz.export_tflite(zipped, _TFLITE.value, quantization=quantization,
                                            representative_data=representative, overwrite=_OVERWRITE.value)
        separate_bytes = sum(len(tf_mtz.tflite_bytes(m, quantization, representative)) for m in loaded.values())
        zipped.zip_report.tflite_bytes = {"separate": separate_bytes, "zipped": zipped_bytes}
        written.append(_TFLITE.value)
    if _SAVED_MODEL.value:
        tf_mtz.export_saved_model(zipped, _SAVED_MODEL.value, overwrite=_OVERWRITE.value)
        written.append(_SAVED_MODEL.value)
    if _REPORT_DIR.value:
        written += write_report(zipped.zip_report, _REPORT_DIR.value)
    print(zipped.zip_report)
    print("written: " + ", ".join(written))


def _report():
    import tf_mtz

    if not _REPORT.value or not os.path.exists(_REPORT.value):
        raise UsageError("tf-mtz report needs --report PATH/report.json (an existing file).")
    with open(_REPORT.value) as f:
        report = tf_mtz.ZipReport.from_json(f.read())
    print(report)
    if _REPORT_DIR.value:
        print("written: " + ", ".join(write_report(report, _REPORT_DIR.value)))


def main(argv):
    commands = [a for a in argv[1:]]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise UsageError(f"usage: tf-mtz {{{'|'.join(COMMANDS)}}} [flags]; see tf-mtz --helpfull.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tf_mtz.errors import ZipError

    try:
        {"zip": _zip, "report": _report}[commands[0]]()
    except ZipError as exc:
        print(f"tf-mtz: {exc}", file=sys.stderr)
        return 2
    return 0


def run():
    """Console-script entry point."""
    if any(arg in ("--help", "-h", "--helpshort", "help") for arg in sys.argv[1:]):
        # absl's --help lists the flags of the launcher script only; show this module's instead.
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        return
    app.run(main)


if __name__ == "__main__":
    run()
