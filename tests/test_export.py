"""TFLite/LiteRT and SavedModel exports: every signature equals the Keras model."""

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import tf_mtz
from conftest import small_cnn


def weight_bytes(path):
    """Bytes of all constant buffers in a .tflite file (weights, biases, shape constants)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(path)
    return sum(b.data.size for b in model.buffers if b.data is not None and not isinstance(b.data, list))


@pytest.fixture(scope="module")
def zipped_and_data():
    rng = np.random.default_rng(0)
    # fc is wide enough (>1024 weights) for the quantizers to touch it.
    a, b = small_cnn("a", dense=200, seed=0), small_cnn("b", dense=200, classes=4, seed=1)
    x = rng.normal(size=(64, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing=0.75, verbose=0)
    return zipped, x, zipped.predict(x, verbose=0)


def test_tflite_signatures_match_keras_and_share_weights(zipped_and_data, tmp_path):
    zipped, x, expected = zipped_and_data
    path = str(tmp_path / "z.tflite")
    assert tf_mtz.export_tflite(zipped, path) > 0
    interpreter = Interpreter(model_path=path)
    assert set(interpreter.get_signature_list()) == {"serving_default", "a", "b"}
    both = interpreter.get_signature_runner("serving_default")(image=x)
    assert set(both) == {"a", "b"}
    for task in ("a", "b"):
        np.testing.assert_allclose(both[task], expected[task], atol=1e-5)
        alone = interpreter.get_signature_runner(task)(image=x)
        assert set(alone) == {task}
        np.testing.assert_array_equal(alone[task], both[task])
    # Three signatures, one copy of the weights: the constant buffers hold each parameter once.
    assert 0.95 * 4 * zipped.count_params() <= weight_bytes(path) < 4 * zipped.count_params() + 2048
    with pytest.raises(FileExistsError):
        tf_mtz.export_tflite(zipped, path)
    before = weight_bytes(path)
    assert tf_mtz.export_tflite(zipped, path, overwrite=True) > 0
    assert weight_bytes(path) == before


def test_tflite_without_task_signatures_is_smaller_and_serves_every_task(zipped_and_data, tmp_path):
    zipped, x, expected = zipped_and_data
    full, lean = str(tmp_path / "full.tflite"), str(tmp_path / "lean.tflite")
    full_bytes = tf_mtz.export_tflite(zipped, full)
    lean_bytes = tf_mtz.export_tflite(zipped, lean, task_signatures=False)
    interpreter = Interpreter(model_path=lean)
    assert set(interpreter.get_signature_list()) == {"serving_default"}
    both = interpreter.get_signature_runner("serving_default")(image=x)
    for task in ("a", "b"):
        np.testing.assert_allclose(both[task], expected[task], atol=1e-5)
    # The same weights, one operator table instead of three.
    assert weight_bytes(lean) == weight_bytes(full) and lean_bytes < full_bytes


def _subgraph_count(content):
    from tensorflow.lite.python import schema_py_generated as schema

    return schema.Model.GetRootAsModel(content, 0).SubgraphsLength()


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fully_shared_task_signatures_read_the_all_tasks_graph(quantization):
    # Every hidden layer shared: a task's own path would skip only the other head, so its signature runs
    # the all-tasks subgraph and the file is no larger than the one without task signatures.
    rng = np.random.default_rng(1)
    a, b = small_cnn("a", seed=0), small_cnn("b", classes=4, seed=1)
    x = rng.normal(size=(64, 12, 12, 1)).astype("float32")
    zipped = tf_mtz.zip_models({"a": a, "b": b}, x, sharing=1.0, verbose=0)
    content = tf_mtz.tflite_bytes(zipped, quantization, representative_data=x)
    lean = tf_mtz.tflite_bytes(zipped, quantization, representative_data=x, task_signatures=False)
    assert _subgraph_count(content) == 1 and len(content) <= len(lean) + 256
    interpreter = Interpreter(model_content=content)
    assert set(interpreter.get_signature_list()) == {"serving_default", "a", "b"}
    expected = zipped.predict(x[:4], verbose=0)
    both = interpreter.get_signature_runner("serving_default")(image=x[:4])
    for task in ("a", "b"):
        alone = interpreter.get_signature_runner(task)(image=x[:4])
        assert set(alone) == {task}
        np.testing.assert_array_equal(alone[task], both[task])
        np.testing.assert_allclose(alone[task], expected[task], atol=1e-5 if quantization is None else 0.05)


def test_partly_shared_tasks_keep_their_own_subgraphs(zipped_and_data):
    zipped, _, _ = zipped_and_data  # 75% shared: each task's path skips a quarter of the hidden units
    assert _subgraph_count(tf_mtz.tflite_bytes(zipped)) == 3


def test_subgraph_work_counts_multiply_adds():
    from tensorflow.lite.python import schema_py_generated as schema
    from tf_mtz import flatbuffer

    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu")(x)
    model = keras.Model(x, keras.layers.Dense(4)(h))
    content = tf_mtz.tflite_bytes(model)
    parsed = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
    assert flatbuffer._work(parsed, parsed.subgraphs[0]) == 8 * 16 + 16 * 4


@pytest.mark.parametrize("quantization,atol", [("dynamic", 0.02), ("float16", 1e-3), ("int8", 0.05)])
def test_quantized_tflite_close_to_keras_and_smaller(zipped_and_data, tmp_path, quantization, atol):
    zipped, x, expected = zipped_and_data
    path = str(tmp_path / f"z_{quantization}.tflite")
    tf_mtz.export_tflite(zipped, path, quantization=quantization, representative_data=x)
    bytes_per_weight = {"dynamic": 1, "float16": 2, "int8": 1}[quantization]
    # Weights stored once, at their reduced width (small tensors and biases stay wider).
    assert weight_bytes(path) < bytes_per_weight * 1.3 * zipped.count_params() + 2048
    interpreter = Interpreter(model_path=path)
    out = interpreter.get_signature_runner("serving_default")(image=x)
    for task in ("a", "b"):
        np.testing.assert_allclose(out[task], expected[task], atol=atol)
    if quantization == "int8":
        kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
        assert np.int8 in kinds


def test_int8_needs_representative_data_and_bad_quantization(zipped_and_data, tmp_path):
    zipped, x, _ = zipped_and_data
    with pytest.raises(ValueError, match="representative_data"):
        tf_mtz.export_tflite(zipped, str(tmp_path / "q.tflite"), quantization="int8")
    with pytest.raises(ValueError, match="representative_data has samples of shape"):
        tf_mtz.export_tflite(zipped, str(tmp_path / "q.tflite"), quantization="int8",
                             representative_data=x[:, :6])
    with pytest.raises(ValueError, match="quantization must be one of"):
        tf_mtz.export_tflite(zipped, str(tmp_path / "q.tflite"), quantization="int4")
    assert not (tmp_path / "q.tflite").exists()


def test_saved_model_signatures_for_serving(zipped_and_data, tmp_path):
    zipped, x, expected = zipped_and_data
    path = tf_mtz.export_saved_model(zipped, str(tmp_path / "serving" / "zipped" / "1"))
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "a", "b"}
    both = loaded.signatures["serving_default"](image=tf.constant(x))
    for task in ("a", "b"):
        np.testing.assert_allclose(both[task].numpy(), expected[task], atol=1e-5)
        alone = loaded.signatures[task](image=tf.constant(x))
        assert set(alone) == {task}
        np.testing.assert_allclose(alone[task].numpy(), expected[task], atol=1e-5)
    with pytest.raises(FileExistsError):
        tf_mtz.export_saved_model(zipped, path)


def test_keras_model_with_single_output_exports(tmp_path):
    model = small_cnn("single", seed=3)
    x = np.random.default_rng(1).normal(size=(8, 12, 12, 1)).astype("float32")
    path = str(tmp_path / "single.tflite")
    tf_mtz.export_tflite(model, path)
    out = Interpreter(model_path=path).get_signature_runner("serving_default")(image=x)
    np.testing.assert_allclose(out["output"], model.predict(x, verbose=0), atol=1e-5)


def test_tf_serving_predict_request_matches_signature(zipped_and_data, tmp_path):
    from tensorflow_serving.apis import predict_pb2

    zipped, x, _ = zipped_and_data
    path = tf_mtz.export_saved_model(zipped, str(tmp_path / "serving" / "zipped" / "1"))
    signature = tf.saved_model.load(path).signatures["serving_default"]
    (input_key,) = signature.structured_input_signature[1]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "zipped"
    request.model_spec.signature_name = "serving_default"
    request.inputs[input_key].CopyFrom(tf.make_tensor_proto(x[:2]))
    decoded = tf.make_ndarray(request.inputs["image"])
    np.testing.assert_array_equal(decoded, x[:2])
    assert set(signature.structured_outputs) == {"a", "b"}


@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None,
                    reason="tensorflow_model_server is not on the PATH")
def test_tf_serving_rest_and_grpc(zipped_and_data, tmp_path):
    import json
    import socket
    import subprocess
    import time
    import urllib.request

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    zipped, x, expected = zipped_and_data
    base = tmp_path / "serving"
    tf_mtz.export_saved_model(zipped, str(base / "zipped" / "1"))

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    grpc_port, rest_port = free_port(), free_port()
    server = subprocess.Popen(["tensorflow_model_server", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                               "--model_name=zipped", f"--model_base_path={base / 'zipped'}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{rest_port}/v1/models/zipped:predict"
        body = json.dumps({"signature_name": "serving_default", "instances": x[:2].tolist()}).encode()
        for _ in range(60):
            try:
                reply = json.load(urllib.request.urlopen(urllib.request.Request(url, body), timeout=2))
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("tensorflow_model_server did not answer on loopback within 30 s")
        for task in ("a", "b"):
            np.testing.assert_allclose([p[task] for p in reply["predictions"]], expected[task][:2], atol=1e-5)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "zipped"
        request.model_spec.signature_name = "a"
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(x[:2]))
        response = stub.Predict(request, timeout=10)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["a"]), expected["a"][:2], atol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=10)
