"""The TF-Serving API of the real server, driven by the stock ``tensorflow-serving-api`` client over
gRPC and by plain ``requests`` over REST; answers are compared with the V2 answer for the same input."""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from PIL import Image

from tests.integration.server import RunningServer, run_server

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_serving.apis.predict_pb2")

from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

ALL_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": ml_dtypes.bfloat16, "BYTES": np.object_,
}  # fmt: skip


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_url) as ch:
        yield ch


@pytest.fixture
def predict_stub(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture
def model_stub(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


def v2_infer(server: RunningServer, model: str, inputs: dict[str, np.ndarray], version: str = "") -> dict[str, Any]:
    """The V2 answer for the same inputs (through tritonclient), to compare with."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensors = []
    for name, arr in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr)
        tensors.append(t)
    result = client.infer(model, tensors, model_version=version)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def predict_request(
    model: str, version: int | None = None, label: str = "", signature: str = "", **inputs: Any
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    if signature:
        request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if hasattr(value, "tensor_shape") else tf.make_tensor_proto(value))
    return request


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), rgb).save(buf, "PNG")
    return buf.getvalue()


def grpc_error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call(*args, timeout=30)
    return exc.value


# ------------------------------------------------------------------------------------------------
# gRPC: PredictionService


def test_predict_matches_v2(server: RunningServer, predict_stub: Any) -> None:
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    response = predict_stub.Predict(predict_request("simple", x=x), timeout=30)
    assert response.model_spec.name == "simple" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    y = tf.make_ndarray(response.outputs["y"])
    assert y.dtype == np.float32 and y.shape == (3, 4)
    np.testing.assert_array_equal(y, v2_infer(server, "simple", {"x": x})["y"])
    np.testing.assert_array_equal(y, np.maximum(y, 0))  # Relu


def test_predict_versions_labels_and_signature(predict_stub: Any) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for kwargs, factor in (({}, 3), ({"version": 2}, 2), ({"label": "1"}, 1)):
        response = predict_stub.Predict(predict_request("versioned", signature="serving_default", x=x, **kwargs))
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), x * factor)
        assert response.model_spec.version.value == factor


def test_predict_two_inputs_and_output_filter(predict_stub: Any) -> None:
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((2, 16)).astype(np.float32) for _ in range(2))
    request = predict_request("add_sub", INPUT0=a, INPUT1=b)
    both = predict_stub.Predict(request, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(both.outputs["OUTPUT0"]), a + b, rtol=1e-6)
    np.testing.assert_allclose(tf.make_ndarray(both.outputs["OUTPUT1"]), a - b, rtol=1e-6)
    request.output_filter.append("OUTPUT1")
    only = predict_stub.Predict(request, timeout=30)
    assert list(only.outputs) == ["OUTPUT1"]
    np.testing.assert_allclose(tf.make_ndarray(only.outputs["OUTPUT1"]), a - b, rtol=1e-6)


def test_predict_every_datatype(predict_stub: Any) -> None:
    """identity_all: one tensor per TensorFlow dtype through make_tensor_proto and back."""
    rng = np.random.default_rng(3)
    inputs = {}
    for datatype, dtype in ALL_TYPES.items():
        if datatype == "BYTES":
            arr = np.array([b"", b"a", "h\u00e9llo".encode(), b"x" * 300, b"q", b"r"], dtype=object).reshape(2, 3)
        elif datatype == "BOOL":
            arr = rng.integers(0, 2, (2, 3)).astype(bool)
        elif np.dtype(dtype).kind == "f" or datatype == "BF16":
            arr = rng.standard_normal((2, 3)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arr = rng.integers(info.min, info.max, (2, 3), dtype=dtype, endpoint=True)
        inputs[f"in_{datatype}"] = arr
    response = predict_stub.Predict(predict_request("identity_all", **inputs), timeout=30)
    for datatype in ALL_TYPES:
        got = tf.make_ndarray(response.outputs[f"out_{datatype}"])
        sent = inputs[f"in_{datatype}"]
        assert got.shape == sent.shape, datatype
        if datatype == "BYTES":
            assert got.tolist() == sent.tolist()
        else:
            assert got.dtype == sent.dtype and got.tobytes() == sent.tobytes(), datatype


def test_predict_fill_value(predict_stub: Any) -> None:
    """make_tensor_proto(scalar, shape) sends one float_val that fills the tensor."""
    proto = tf.make_tensor_proto(0.5, shape=[2, 4], dtype=tf.float32)
    response = predict_stub.Predict(predict_request("versioned", version=2, x=proto), timeout=30)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), np.full((2, 4), 1.0, np.float32))


def test_predict_bytes_model(predict_stub: Any) -> None:
    images = np.array([[png((250, 10, 10))], [png((10, 10, 245))]], dtype=object)
    response = predict_stub.Predict(predict_request("image_classifier", image=images), timeout=60)
    labels = tf.make_ndarray(response.outputs["labels"])
    assert labels.shape[0] == 2
    assert labels[0][0].decode().endswith(":red") and labels[1][0].decode().endswith(":blue")


def test_get_model_metadata(predict_stub: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "simple"
    response = predict_stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == "simple" and response.model_spec.version.value == 1
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sigmap)
    sig = sigmap.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["x"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in sig.inputs["x"].tensor_shape.dim] == [-1, 16]
    assert [d.size for d in sig.outputs["y"].tensor_shape.dim] == [-1, 4]

    request.model_spec.name = "image_classifier"
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    predict_stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(sigmap)
    assert sigmap.signature_def["serving_default"].inputs["image"].dtype == tf.string.as_datatype_enum


def test_get_model_metadata_needs_signature_def(predict_stub: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "simple"
    err = grpc_error(predict_stub.GetModelMetadata, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature_def" in err.details()
    request.metadata_field.append("assets")
    err = grpc_error(predict_stub.GetModelMetadata, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'assets'" in err.details()


# ------------------------------------------------------------------------------------------------
# gRPC: ModelService


def test_get_model_status(model_stub: Any) -> None:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "simple"
    (status,) = model_stub.GetModelStatus(request, timeout=30).model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0 and status.status.error_message == ""

    request.model_spec.name = "versioned"
    versions = model_stub.GetModelStatus(request, timeout=30).model_version_status
    assert sorted(s.version for s in versions) == [1, 2, 3]
    request.model_spec.version.value = 2
    assert [s.version for s in model_stub.GetModelStatus(request, timeout=30).model_version_status] == [2]
    request.model_spec.version.value = 9
    err = grpc_error(model_stub.GetModelStatus, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version 9" in err.details()


# ------------------------------------------------------------------------------------------------
# gRPC errors


def test_grpc_errors(predict_stub: Any, model_stub: Any) -> None:
    x = np.zeros((1, 16), np.float32)
    err = grpc_error(predict_stub.Predict, predict_request("no_such_model", x=x))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no_such_model" in err.details()

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "no_such_model"
    assert grpc_error(model_stub.GetModelStatus, status).code() == grpc.StatusCode.NOT_FOUND

    complex_input = tf.make_tensor_proto(np.zeros((1, 16), np.complex64))
    err = grpc_error(predict_stub.Predict, predict_request("simple", x=complex_input))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in err.details() and "DT_COMPLEX64" in err.details()

    err = grpc_error(predict_stub.Predict, predict_request("simple", x=np.zeros((1, 16), np.float64)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'x'" in err.details() and "FP64" in err.details()

    err = grpc_error(predict_stub.Predict, predict_request("simple", x=np.zeros((1, 15), np.float32)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'x'" in err.details() and "[1,15]" in err.details()

    err = grpc_error(predict_stub.Predict, predict_request("simple", signature="classify_x", x=x))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no signature 'classify_x'" in err.details()

    err = grpc_error(predict_stub.Predict, predict_request("simple", label="stable", x=x))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "label 'stable'" in err.details()

    err = grpc_error(predict_stub.Classify, classification_pb2.ClassificationRequest())
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and "Classify" in err.details()


# ------------------------------------------------------------------------------------------------
# REST


def url(server: RunningServer, path: str) -> str:
    return f"http://{server.http_url}{path}"


def test_rest_row_and_columnar(server: RunningServer) -> None:
    x = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    expected = v2_infer(server, "simple", {"x": x})["y"]
    r = requests.post(url(server, "/v1/models/simple:predict"), json={"instances": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array(r.json()["predictions"], np.float32), expected)
    r = requests.post(url(server, "/v1/models/simple:predict"), json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array(r.json()["outputs"], np.float32), expected)


def test_rest_named_inputs_and_outputs(server: RunningServer) -> None:
    a, b = [1.0] * 16, [0.5] * 16
    body = {"signature_name": "serving_default", "instances": [{"INPUT0": a, "INPUT1": b}]}
    r = requests.post(url(server, "/v1/models/add_sub:predict"), json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [{"OUTPUT0": [1.5] * 16, "OUTPUT1": [0.5] * 16}]}
    r = requests.post(url(server, "/v1/models/add_sub:predict"), json={"inputs": {"INPUT0": [a], "INPUT1": [b]}})
    assert r.json() == {"outputs": {"OUTPUT0": [[1.5] * 16], "OUTPUT1": [[0.5] * 16]}}


def test_rest_versions_and_labels(server: RunningServer) -> None:
    body = {"instances": [[1.0, 2.0, 3.0, 4.0]]}
    for path, factor in (("", 3), ("/versions/2", 2), ("/labels/1", 1)):
        r = requests.post(url(server, f"/v1/models/versioned{path}:predict"), json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": [[1.0 * factor, 2.0 * factor, 3.0 * factor, 4.0 * factor]]}
    r = requests.post(url(server, "/v1/models/versioned/labels/stable:predict"), json=body, timeout=30)
    assert r.status_code == 400 and "label 'stable'" in r.json()["error"]


def test_rest_b64(server: RunningServer) -> None:
    image = base64.b64encode(png((10, 240, 10))).decode()
    r = requests.post(url(server, "/v1/models/image_classifier:predict"), json={"instances": [[{"b64": image}]]})
    assert r.status_code == 200, r.text
    (row,) = r.json()["predictions"]
    assert row[0].endswith(":green")

    text = "h\u00e9llo"
    inputs = {f"in_{t}": [[1]] for t in ALL_TYPES if t not in ("BOOL", "BYTES")}
    inputs |= {"in_BOOL": [[True]], "in_BYTES": [[{"b64": base64.b64encode(text.encode()).decode()}]]}
    r = requests.post(url(server, "/v1/models/identity_all:predict"), json={"inputs": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert outputs["out_BYTES"] == [[text]] and outputs["out_BOOL"] == [[True]] and outputs["out_FP16"] == [[1.0]]


def test_rest_status_and_metadata(server: RunningServer) -> None:
    r = requests.get(url(server, "/v1/models/simple"), timeout=30)
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    r = requests.get(url(server, "/v1/models/versioned/versions/2"), timeout=30)
    assert [s["version"] for s in r.json()["model_version_status"]] == ["2"]

    r = requests.get(url(server, "/v1/models/simple/metadata"), timeout=30)
    assert r.status_code == 200
    doc = r.json()
    assert doc["model_spec"] == {"name": "simple", "signature_name": "", "version": "1"}
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "16"]
    r = requests.get(url(server, "/v1/models/versioned/versions/2/metadata"), timeout=30)
    assert r.json()["model_spec"]["version"] == "2"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/v1/models/no_such_model:predict", {"instances": [[1.0]]}, 404, ["no_such_model"]),
        ("GET", "/v1/models/no_such_model", None, 404, ["no_such_model"]),
        ("GET", "/v1/models/no_such_model/metadata", None, 404, ["no_such_model"]),
        ("POST", "/v1/models/simple:predict", {"signature_name": "bad", "instances": [[0.0] * 16]}, 400, ["'bad'"]),
        ("POST", "/v1/models/simple:predict", {"instances": [[0.0] * 15]}, 400, ["input 'x'", "[1,15]"]),
        ("POST", "/v1/models/simple:predict", b'{"instances": [', 400, ["malformed request JSON"]),
        ("POST", "/v1/models/simple:predict", {"instances": [[1.0], [1.0, 2.0]]}, 400, ["input 'x'", "rectangular"]),
        ("POST", "/v1/models/simple:predict", {"rows": []}, 400, ["'rows'"]),
        ("POST", "/v1/models/simple/versions/abc:predict", {"instances": [[0.0] * 16]}, 400, ["'abc'"]),
        ("POST", "/v1/models/simple/versions/7:predict", {"instances": [[0.0] * 16]}, 404, ["version 7"]),
        ("POST", "/v1/models/simple:classify", {"examples": []}, 501, [":classify"]),
        ("POST", "/v1/models/simple:explain", {"instances": []}, 400, [":explain"]),
    ],
)
def test_rest_errors(server: RunningServer, method: str, path: str, body: Any, status: int, words: list[str]) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    r = requests.request(method, url(server, path), timeout=30, **kwargs)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert all(w in message for w in words), message


def test_rest_body_limits(server: RunningServer) -> None:
    deep = b'{"inputs": ' + b"[" * 200 + b"]" * 200 + b"}"
    r = requests.post(url(server, "/v1/models/simple:predict"), data=deep, timeout=30)
    assert r.status_code == 400 and "nested" in r.json()["error"]


# ------------------------------------------------------------------------------------------------
# the V2 routes' guards apply: tokens, rate limit, body size


TOKEN = "tfserving-token-0123456789"


@pytest.fixture(scope="module")
def guarded_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("tfserving_guarded")
    repo = root / "repo"
    repo.mkdir()
    shutil.copytree(example_repo / "simple", repo / "simple")
    (root / "server.yaml").write_text(
        f"auth: {{tokens: [{TOKEN}]}}\nrate_limit: {{requests_per_s: 2, burst: 3}}\nmax_request_bytes: 65536\n"
    )
    with run_server(repo, root / "server.log", "--config", str(root / "server.yaml")) as srv:
        yield srv


def _rest_predict(srv: RunningServer, token: str | None = TOKEN, body: Any = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is None:
        body = {"instances": [[0.0] * 16]}
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    return requests.post(url(srv, "/v1/models/simple:predict"), headers=headers, timeout=30, **kwargs)


def test_tokens_are_required(guarded_server: RunningServer) -> None:
    time.sleep(1.5)  # a full rate-limit bucket
    assert _rest_predict(guarded_server, None).status_code == 401
    assert requests.get(url(guarded_server, "/v1/models/simple"), timeout=30).status_code == 401
    assert _rest_predict(guarded_server).status_code == 200
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(url(guarded_server, "/v1/models/simple"), headers=headers, timeout=30).status_code == 200
    with grpc.insecure_channel(guarded_server.grpc_url) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        request = predict_request("simple", x=np.zeros((1, 16), np.float32))
        err = grpc_error(stub.Predict, request)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "simple"
        err = grpc_error(model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus, status)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        response = stub.Predict(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
        assert tf.make_ndarray(response.outputs["y"]).shape == (1, 4)


def test_rate_limit(guarded_server: RunningServer) -> None:
    time.sleep(1.5)
    answers = [_rest_predict(guarded_server) for _ in range(6)]
    codes = [r.status_code for r in answers]
    assert 200 in codes and 429 in codes, codes
    assert "rate limit" in next(r for r in answers if r.status_code == 429).json()["error"]
    time.sleep(1.5)
    with grpc.insecure_channel(guarded_server.grpc_url) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        request = predict_request("simple", x=np.zeros((1, 16), np.float32))
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        outcomes = []
        for _ in range(6):
            try:
                stub.Predict(request, metadata=metadata, timeout=30)
                outcomes.append("ok")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                outcomes.append("limited")
        assert "ok" in outcomes and "limited" in outcomes


def test_body_size_limit(guarded_server: RunningServer) -> None:
    time.sleep(1.5)
    r = _rest_predict(guarded_server, body=b'{"instances": [' + b" " * 70000 + b"]}")
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]
    # A few bytes asking for a huge tensor (one float_val filling [8, 100000]) are refused before expanding.
    fill = tf.make_tensor_proto(0.0, shape=[8, 100000], dtype=tf.float32)
    with grpc.insecure_channel(guarded_server.grpc_url) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Predict(predict_request("simple", x=fill), metadata=(("x-api-key", TOKEN),), timeout=30)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_bytes" in exc.value.details()
