"""The tf-mtz command line, end to end in a subprocess."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

import tf_mtz
from conftest import mlp


def run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tf_mtz.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_zip_then_report_from_saved_files(tmp_path, rng):
    from ai_edge_litert.interpreter import Interpreter

    a, b = mlp("a", seed=0), mlp("b", seed=1)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    x = rng.normal(size=(300, 20)).astype("float32")
    np.save(tmp_path / "x_a.npy", x)
    np.savez(tmp_path / "x_b.npz", x=x)
    y = np.argmax(a.predict(x, verbose=0), axis=1)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    out = tmp_path / "out"
    result = run_cli("zip", f"--model=digits={tmp_path / 'a.keras'}", f"--model=parity={tmp_path / 'b.keras'}",
                     f"--calibration=digits={tmp_path / 'x_a.npy'}", f"--calibration=parity={tmp_path / 'x_b.npz'}",
                     "--sharing=fc1=1.0,fc2=8", "--preset=paper", "--matching=optimal", f"--output={out / 'zipped.keras'}",
                     f"--tflite={out / 'zipped.tflite'}", f"--saved_model={out / 'serving' / 'zipped' / '1'}",
                     f"--report_dir={out / 'report'}", f"--evaluation={tmp_path / 'eval.npz'}")
    assert result.returncode == 0, result.stderr[-3000:]
    zipped = keras.models.load_model(out / "zipped.keras")
    expected = zipped.predict(x, verbose=0)
    assert set(expected) == {"digits", "parity"}
    lite = Interpreter(model_path=str(out / "zipped.tflite")).get_signature_runner("serving_default")
    np.testing.assert_allclose(lite(features=x)["parity"], expected["parity"], atol=1e-5)
    assert (out / "serving" / "zipped" / "1" / "saved_model.pb").exists()
    report = json.loads((out / "report" / "report.json").read_text())
    assert [layer["shared"] for layer in report["layers"]] == [24, 8, 0]
    assert {k: report["settings"][k] for k in ("pairing", "matching", "merge", "refit")} == {
        "pairing": "hessian", "matching": "optimal", "merge": "hessian", "refit": False}  # paper, one change
    assert report["accuracy_original"]["digits"] == 1.0  # labels are model a's own predictions
    assert set(report["layers"][0]["accuracy_zipped"]) == {"digits", "parity"}
    assert report["tflite_bytes"]["zipped"] == (out / "zipped.tflite").stat().st_size
    assert report["tflite_bytes"]["separate"] > 0
    assert (out / "report" / "report.png").stat().st_size > 10_000
    markdown = (out / "report" / "report.md").read_text()
    assert "| fc1 | Dense |" in markdown and "| original models | 1.0000 |" in markdown

    again = run_cli("report", f"--report={out / 'report' / 'report.json'}", f"--report_dir={tmp_path / 'r2'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fc2" in again.stdout and (tmp_path / "r2" / "report.png").exists()

    refused = run_cli("zip", f"--model=digits={tmp_path / 'a.keras'}", f"--model=parity={tmp_path / 'b.keras'}",
                      f"--calibration={tmp_path / 'x_a.npy'}", f"--output={out / 'zipped.keras'}")
    assert refused.returncode != 0 and "--overwrite" in refused.stderr


def test_cli_errors_are_messages_not_tracebacks(tmp_path, rng):
    a = mlp("a", seed=0)
    a.save(tmp_path / "a.keras")
    mlp("b", seed=1, inputs=21).save(tmp_path / "b.keras")
    np.save(tmp_path / "x.npy", rng.normal(size=(50, 20)).astype("float32"))
    result = run_cli("zip", f"--model=a={tmp_path / 'a.keras'}", f"--model=b={tmp_path / 'b.keras'}",
                     f"--calibration={tmp_path / 'x.npy'}", f"--output={tmp_path / 'z.keras'}")
    assert result.returncode == 2
    assert "takes input (21,)" in result.stderr and "Traceback" not in result.stderr
    help_text = run_cli("--help").stdout
    for flag in ("--model", "--calibration", "--sharing", "--tflite", "--saved_model", "--report_dir"):
        assert flag in help_text
    assert run_cli("unzip").returncode != 0


def test_zip_sequential_models_from_keras_and_h5_files_with_tflite(tmp_path, rng):
    from ai_edge_litert.interpreter import Interpreter

    def sequential(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(5, activation="softmax")])

    sequential(0).save(tmp_path / "m0.keras")
    sequential(1).save(tmp_path / "m1.h5")
    x = rng.normal(size=(200, 20)).astype("float32")
    np.save(tmp_path / "cal.npy", x)
    for quantization in ("none", "int8"):
        out = tmp_path / quantization
        result = run_cli("zip", f"--model=one={tmp_path / 'm0.keras'}", f"--model=two={tmp_path / 'm1.h5'}",
                         f"--calibration={tmp_path / 'cal.npy'}", "--sharing=0.75", f"--output={out / 'z.keras'}",
                         f"--tflite={out / 'z.tflite'}", f"--quantization={quantization}",
                         f"--saved_model={out / 'saved' / '1'}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        expected = keras.models.load_model(out / "z.keras").predict(x, verbose=0)
        interpreter = Interpreter(model_path=str(out / "z.tflite"))
        (input_name,) = interpreter.get_signature_list()["serving_default"]["inputs"]
        lite = interpreter.get_signature_runner("serving_default")(**{input_name: x[:16]})
        np.testing.assert_allclose(lite["two"], expected["two"][:16], atol=1e-5 if quantization == "none" else 0.1)
        assert (out / "saved" / "1" / "saved_model.pb").exists()


def test_zip_without_data_and_with_automatic_sharing(tmp_path, rng):
    import tf_mtz

    models = {"a": mlp("a", seed=0), "b": mlp("b", seed=1)}
    for task, model in models.items():
        norm = keras.layers.Normalization(mean=0.0, variance=1.0)
        inputs = keras.Input((20,), name="features")
        wrapped = keras.Model(inputs, model(norm(inputs)), name=task)  # an input Normalization to draw from
        wrapped.save(tmp_path / f"{task}.keras")
    x = rng.normal(size=(200, 20)).astype("float32")
    y = np.argmax(models["a"].predict(x, verbose=0), axis=1)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    out = tmp_path / "out"
    result = run_cli("zip", f"--model=a={tmp_path / 'a.keras'}", f"--model=b={tmp_path / 'b.keras'}",
                     "--calibration=synthetic", "--sharing=auto:5.0", f"--evaluation={tmp_path / 'eval.npz'}",
                     f"--output={out / 'zipped.keras'}", f"--report_dir={out / 'report'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no real data was used" in result.stdout
    report = tf_mtz.ZipReport.from_json((out / "report" / "report.json").read_text())
    assert report.synthetic_calibration and report.auto_sharing
    assert report.settings["sharing"]["tolerance"] == 5.0
    bad = run_cli("zip", f"--model=a={tmp_path / 'a.keras'}", f"--model=b={tmp_path / 'b.keras'}",
                  "--calibration=synthetic", "--sharing=auto:lots", f"--output={out / 'other.keras'}")
    assert bad.returncode != 0 and "auto:TOLERANCE needs a number" in bad.stderr


def test_zip_with_a_checkpoint_directory_resumes_a_finished_run(tmp_path, rng):
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    np.save(tmp_path / "x.npy", rng.normal(size=(200, 20)).astype("float32"))
    args = ["zip", f"--model=a={tmp_path / 'a.keras'}", f"--model=b={tmp_path / 'b.keras'}",
            f"--calibration={tmp_path / 'x.npy'}", f"--checkpoint_dir={tmp_path / 'ckpt'}", "--overwrite"]
    first = run_cli(*args, f"--output={tmp_path / 'first.keras'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "ckpt" / tf_mtz.checkpoint.FILE_NAME).exists()
    second = run_cli(*args, f"--output={tmp_path / 'second.keras'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from the checkpoint after 3 layer steps (finished)" in second.stdout + second.stderr
    for got, expected in zip(keras.models.load_model(tmp_path / "second.keras").get_weights(),
                             keras.models.load_model(tmp_path / "first.keras").get_weights()):
        np.testing.assert_array_equal(got, expected)
