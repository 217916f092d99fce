"""The real server driven over HTTP/REST: stock tritonclient.http and hand-made raw requests."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests.integration.server import RunningServer, run_server
from tests.integration.test_grpc import ALL_TYPES, sample

HEADER = "Inference-Header-Content-Length"
EVERY_TYPE = [*ALL_TYPES, "BF16"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request: (status, headers with lower-case names, body); HTTP errors are returned."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get(server: RunningServer, path: str) -> tuple[int, dict[str, str], bytes]:
    return request(server.http_port, "GET", path)


def post_json(server: RunningServer, path: str, obj: Any) -> tuple[int, dict[str, str], bytes]:
    return request(server.http_port, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def post_binary(
    server: RunningServer, path: str, header: dict[str, Any], *buffers: bytes
) -> tuple[int, dict[str, str], bytes]:
    """JSON header followed by raw tensors, with Inference-Header-Content-Length."""
    head = json.dumps(header).encode()
    return request(
        server.http_port,
        "POST",
        path,
        head + b"".join(buffers),
        {"Content-Type": "application/octet-stream", HEADER: str(len(head))},
    )


def serialize_bytes(arr: np.ndarray) -> bytes:
    out = serialize_byte_tensor(arr)
    return out.item() if out.size else b""


def split_response(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse an infer response by hand: the JSON part and each binary output's bytes by name."""
    length = headers.get(HEADER.lower())
    if length is None:
        return json.loads(body), {}
    n = int(length)
    head = json.loads(body[:n])
    raws, offset = {}, n
    for out in head["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            assert "data" not in out, out
            raws[out["name"]] = body[offset : offset + size]
            offset += size
    assert offset == len(body), "binary outputs do not add up to the body"
    return head, raws


def error_of(status_headers_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers.get("content-type", "").startswith("application/json"), headers
    obj = json.loads(body)
    assert isinstance(obj, dict) and set(obj) == {"error"} and isinstance(obj["error"], str), obj
    return status, obj["error"]


def assert_model_ready(server: RunningServer, model: str = "simple") -> None:
    status, _, body = get(server, f"/v2/models/{model}/ready")
    assert (status, body) == (200, b"")


def x_json(rows: int = 2, nested: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    x = (np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) - 7.0) / 3.0
    data = x.tolist() if nested else x.ravel().tolist()
    return x, {"name": "x", "datatype": "FP32", "shape": [rows, 16], "data": data}


def identity_all_json(rng: np.random.Generator) -> dict[str, Any]:
    """A JSON request for identity_all with every input except BF16 (which is binary-only)."""
    inputs = []
    for datatype in ALL_TYPES:
        arr = sample(datatype, (1, 3), rng)
        data = [v.decode() for v in arr.ravel()] if datatype == "BYTES" else arr.ravel().tolist()
        inputs.append({"name": f"in_{datatype}", "datatype": datatype, "shape": [1, 3], "data": data})
    inputs.append({"name": "in_BF16", "datatype": "BF16", "shape": [1, 3], "data": [1.0, 2.0, -0.5]})
    return {"inputs": inputs}


@pytest.fixture
def client(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url, network_timeout=120.0)


@pytest.fixture(scope="module")
def simple_reference(server: RunningServer) -> tuple[np.ndarray, np.ndarray]:
    """x (3 x 16) and simple's y for it, via tritonclient.grpc (an independent path)."""
    x = np.linspace(-2, 2, 48, dtype=np.float32).reshape(3, 16)
    i = grpcclient.InferInput("x", [3, 16], "FP32")
    i.set_data_from_numpy(x)
    y = grpcclient.InferenceServerClient(server.grpc_url).infer("simple", [i]).as_numpy("y")
    return x, y


# --------------------------------------------------------------------------------------------------
# tritonclient.http
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_out", [True, False], ids=["out-binary", "out-json"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
def test_every_datatype_round_trips(
    client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    rng = np.random.default_rng(7)
    inputs, outputs, expected = [], [], {}
    for datatype in EVERY_TYPE:
        arr = sample(datatype, (2, 5), rng)
        i = httpclient.InferInput(f"in_{datatype}", [2, 5], datatype)
        # BF16 over HTTP is binary-only (tritonclient refuses JSON for it).
        i.set_data_from_numpy(arr, binary_data=binary_in or datatype == "BF16")
        inputs.append(i)
        outputs.append(httpclient.InferRequestedOutput(f"out_{datatype}", binary_data=binary_out or datatype == "BF16"))
        expected[f"out_{datatype}"] = arr
    result = client.infer("identity_all", inputs, outputs=outputs, request_id=f"dt-{binary_in}-{binary_out}")
    response = result.get_response()
    assert response["id"] == f"dt-{binary_in}-{binary_out}"
    assert response["model_name"] == "identity_all"
    by_name = {o["name"]: o for o in response["outputs"]}
    assert set(by_name) == set(expected)
    for name, arr in expected.items():
        out = by_name[name]
        assert out["datatype"] == name[4:] and out["shape"] == [2, 5], out
        is_binary = binary_out or name == "out_BF16"
        assert ("data" in out) is not is_binary, out
        assert ("binary_data_size" in out.get("parameters", {})) is is_binary, out
        got = result.as_numpy(name)
        assert got is not None and got.shape == arr.shape, name
        if arr.dtype == object:
            assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.ravel()] == list(arr.ravel()), name
        elif name == "out_BF16":
            assert got.dtype == ml_dtypes.bfloat16
            assert got.tobytes() == arr.tobytes()
        else:
            assert got.dtype == arr.dtype, name
            np.testing.assert_array_equal(got, arr, err_msg=name)


def test_bf16_raw_bytes(client: httpclient.InferenceServerClient) -> None:
    """BF16 built by hand as raw bytes (bit patterns incl. subnormal/inf/nan), not via ml_dtypes."""
    bits = np.array([0x0000, 0x8000, 0x3F80, 0xBF80, 0x0001, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x4049], "<u2")
    inputs = []
    rng = np.random.default_rng(3)
    for datatype in ALL_TYPES:
        i = httpclient.InferInput(f"in_{datatype}", [1, 2], datatype)
        i.set_data_from_numpy(sample(datatype, (1, 2), rng))
        inputs.append(i)
    bf = httpclient.InferInput("in_BF16", [1, 10], "BF16")
    bf._raw_data = bits.tobytes()
    bf._parameters["binary_data_size"] = len(bf._raw_data)
    inputs.append(bf)
    result = client.infer("identity_all", inputs, outputs=[httpclient.InferRequestedOutput("out_BF16")])
    got = result.as_numpy("out_BF16")
    assert got.shape == (1, 10)
    assert got.tobytes() == bits.tobytes()


def test_requested_output_subset_id_and_parameters(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, np.float32)
    ins = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        i = httpclient.InferInput(name, [2, 16], "FP32")
        i.set_data_from_numpy(arr)
        ins.append(i)
    result = client.infer(
        "add_sub",
        ins,
        outputs=[httpclient.InferRequestedOutput("OUTPUT1")],
        request_id="req-77",
        parameters={"my_string": "hello", "my_int": 3, "my_bool": True, "my_float": 0.25},
    )
    response = result.get_response()
    assert response["id"] == "req-77"
    assert [o["name"] for o in response["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_response(
    client: httpclient.InferenceServerClient, simple_reference: tuple[np.ndarray, np.ndarray], algorithm: str
) -> None:
    x, y = simple_reference
    for binary in (True, False):
        i = httpclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(
            "simple", [i], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
        )
        np.testing.assert_array_equal(result.as_numpy("y"), y)


def test_tritonclient_health_metadata_config(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("simple") and client.is_model_ready("versioned", "2")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert {"statistics", "model_repository", "binary_tensor_data"} <= set(meta["extensions"])
    md = client.get_model_metadata("simple")
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [("x", "FP32", [-1, 16])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["outputs"]] == [("y", "FP32", [-1, 4])]
    cfg = client.get_model_config("simple")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [16]
    stats = client.get_inference_statistics("simple")
    assert stats["model_stats"][0]["name"] == "simple"
    index = client.get_model_repository_index()
    assert {"name": "simple", "version": "1", "state": "READY"}.items() <= next(
        m for m in index if m["name"] == "simple"
    ).items()


def test_tritonclient_errors_carry_message(client: httpclient.InferenceServerClient) -> None:
    x = httpclient.InferInput("x", [1, 16], "INT32")
    x.set_data_from_numpy(np.ones((1, 16), np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", [x])
    assert err.value.status() == "400"
    for word in ("'x'", "FP32", "INT32"):
        assert word in err.value.message(), err.value.message()
    assert client.is_model_ready("simple")

    with pytest.raises(InferenceServerException) as err:
        client.infer("no_such_model", [x])
    assert err.value.status() == "404" and "no_such_model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("versioned", "9")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("simple")
    assert err.value.status() == "400" and "explicit" in err.value.message()
    assert client.is_model_ready("simple")


# --------------------------------------------------------------------------------------------------
# raw JSON / binary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_raw_json_infer(server: RunningServer, simple_reference: tuple[np.ndarray, np.ndarray], nested: bool) -> None:
    x, y = simple_reference
    data = x.tolist() if nested else x.ravel().tolist()
    status, headers, body = post_json(
        server,
        "/v2/models/simple/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 16], "data": data}]},
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert HEADER.lower() not in headers
    resp = json.loads(body)
    assert set(resp) == {"model_name", "model_version", "outputs"}, resp  # no id when none was sent
    assert resp["model_name"] == "simple" and resp["model_version"] == "1"
    [out] = resp["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [3, 4])
    assert isinstance(out["data"], list) and len(out["data"]) == 12  # flat, row-major
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(3, 4), y)


def test_raw_json_id_and_parameters(server: RunningServer) -> None:
    _, inp = x_json(1)
    status, _, body = post_json(
        server,
        "/v2/models/simple/infer",
        {"id": "abc-1", "parameters": {"custom": "v", "n": 5, "priority": 0}, "inputs": [inp],
         "outputs": [{"name": "y", "parameters": {"binary_data": False}}]},
    )  # fmt: skip
    assert status == 200, body
    resp = json.loads(body)
    assert resp["id"] == "abc-1" and resp["outputs"][0]["shape"] == [1, 4]


def test_raw_versions_routing(server: RunningServer) -> None:
    x = [1.0, -2.0, 3.5, 0.25]
    inp = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}
    for version in ("1", "2", "3"):
        status, _, body = post_json(server, f"/v2/models/versioned/versions/{version}/infer", {"inputs": [inp]})
        assert status == 200, body
        resp = json.loads(body)
        assert resp["model_name"] == "versioned" and resp["model_version"] == version
        assert resp["outputs"][0]["data"] == [v * int(version) for v in x]
    status, _, body = post_json(server, "/v2/models/versioned/infer", {"inputs": [inp]})
    assert status == 200 and json.loads(body)["model_version"] == "3"
    status, _, body = get(server, "/v2/models/versioned/versions/2")
    assert status == 200 and json.loads(body)["name"] == "versioned"
    assert get(server, "/v2/models/versioned/versions/2/ready")[0] == 200


def test_binary_data_output_parameter(server: RunningServer, simple_reference: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = simple_reference
    status, headers, body = post_json(
        server,
        "/v2/models/simple/infer",
        {"id": "b1", "parameters": {"binary_data_output": True},
         "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 16], "data": x.ravel().tolist()}]},
    )  # fmt: skip
    assert status == 200, body
    assert HEADER.lower() in headers
    head, raws = split_response(headers, body)
    assert head["id"] == "b1"
    [out] = head["outputs"]
    assert out["parameters"]["binary_data_size"] == 48 and "data" not in out
    assert "binary_data_output" not in head.get("parameters", {})
    np.testing.assert_array_equal(np.frombuffer(raws["y"], "<f4").reshape(3, 4), y)


def test_per_output_binary_data(server: RunningServer) -> None:
    a = np.arange(16, dtype=np.float32)[None]
    b = np.full((1, 16), 2.0, np.float32)
    # Inputs as binary too, built by hand; OUTPUT0 binary, OUTPUT1 JSON (overriding binary_data_output).
    header = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
        ],
        "outputs": [
            {"name": "OUTPUT0", "parameters": {"binary_data": True}},
            {"name": "OUTPUT1", "parameters": {"binary_data": False}},
        ],
    }
    status, headers, body = post_binary(server, "/v2/models/add_sub/infer", header, a.tobytes(), b.tobytes())
    assert status == 200, body
    head, raws = split_response(headers, body)
    outs = {o["name"]: o for o in head["outputs"]}
    assert set(raws) == {"OUTPUT0"}
    np.testing.assert_array_equal(np.frombuffer(raws["OUTPUT0"], "<f4").reshape(1, 16), a + b)
    assert outs["OUTPUT1"]["data"] == (a - b).ravel().tolist()

    # No binary outputs at all: plain JSON body, no header.
    header["parameters"] = {}
    header["outputs"] = [{"name": "OUTPUT0"}, {"name": "OUTPUT1"}]
    status, headers, body = post_binary(server, "/v2/models/add_sub/infer", header, a.tobytes(), b.tobytes())
    assert status == 200 and HEADER.lower() not in headers
    assert [o["data"] for o in json.loads(body)["outputs"]] == [(a + b).ravel().tolist(), (a - b).ravel().tolist()]


def test_header_length_zero_raw_binary(server: RunningServer, simple_reference: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = simple_reference
    status, headers, body = request(
        server.http_port, "POST", "/v2/models/simple/infer", x.tobytes(),
        {"Content-Type": "application/octet-stream", HEADER: "0"},
    )  # fmt: skip
    assert status == 200, body
    head, raws = split_response(headers, body)
    [out] = head["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [3, 4])  # 3 rows from 192 bytes
    np.testing.assert_array_equal(np.frombuffer(raws["y"], "<f4").reshape(3, 4), y)

    status, msg = error_of(request(server.http_port, "POST", "/v2/models/simple/infer", b"\0" * 70, {HEADER: "0"}))
    assert status == 400 and "'x'" in msg and "70" in msg, msg
    status, msg = error_of(request(server.http_port, "POST", "/v2/models/add_sub/infer", b"\0" * 64, {HEADER: "0"}))
    assert status == 400 and "one input" in msg, msg
    assert_model_ready(server)


# --------------------------------------------------------------------------------------------------
# endpoints
# --------------------------------------------------------------------------------------------------


def test_server_metadata_and_health(server: RunningServer) -> None:
    status, headers, body = get(server, "/v2")
    assert status == 200 and headers["content-type"].startswith("application/json")
    meta = json.loads(body)
    assert isinstance(meta["name"], str) and meta["name"]
    assert isinstance(meta["version"], str) and meta["version"]
    assert {"binary_tensor_data", "statistics", "model_repository", "model_configuration"} <= set(meta["extensions"])
    for path in ("/v2/health/live", "/v2/health/ready"):
        status, _, body = get(server, path)
        assert (status, body) == (200, b""), path


def test_model_endpoints(server: RunningServer) -> None:
    status, _, body = get(server, "/v2/models/simple")
    assert status == 200
    md = json.loads(body)
    assert md["name"] == "simple" and md["versions"] == ["1"] and md["platform"]
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert md["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert get(server, "/v2/models/simple/ready")[:3:2] == (200, b"")
    assert get(server, "/v2/models/simple/versions/1/ready")[0] == 200
    assert get(server, "/v2/models/simple/versions/7/ready")[0] == 400
    assert get(server, "/v2/models/no_such_model/ready")[0] == 400

    status, headers, body = get(server, "/v2/models/simple/config")
    assert status == 200 and headers["content-type"].startswith("application/json")
    cfg = json.loads(body)
    assert cfg["name"] == "simple" and cfg["max_batch_size"] == 8
    assert cfg["input"][0]["name"] == "x" and cfg["input"][0]["dims"] == [16]
    assert cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["output"][0]["dims"] == [4]
    # identity_all has no config file: auto-completed from the model.
    cfg = json.loads(get(server, "/v2/models/identity_all/config")[2])
    assert {i["name"] for i in cfg["input"]} == {f"in_{t}" for t in EVERY_TYPE}


def test_statistics_endpoints(server: RunningServer) -> None:
    def simple_stats() -> dict[str, Any]:
        status, _, body = get(server, "/v2/models/simple/stats")
        assert status == 200
        [entry] = json.loads(body)["model_stats"]
        return entry

    before = simple_stats()
    _, inp = x_json(2)
    for _ in range(3):
        assert post_json(server, "/v2/models/simple/infer", {"inputs": [inp]})[0] == 200
    after = simple_stats()
    assert after["name"] == "simple" and after["version"] == "1"
    assert isinstance(after["inference_count"], int)  # numbers, not protobuf-JSON strings
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["last_inference"] >= before["last_inference"]

    status, _, body = get(server, "/v2/models/stats")
    assert status == 200
    names = {(m["name"], m["version"]) for m in json.loads(body)["model_stats"]}
    assert {("simple", "1"), ("add_sub", "1"), ("identity_all", "1"), ("versioned", "2")} <= names
    status, _, body = get(server, "/v2/models/versioned/versions/2/stats")
    assert status == 200 and [(m["name"], m["version"]) for m in json.loads(body)["model_stats"]] == [
        ("versioned", "2")
    ]
    assert error_of(get(server, "/v2/models/no_such_model/stats"))[0] == 404


def test_repository_index_and_control(server: RunningServer) -> None:
    for body in (b"", b"{}", b'{"ready": true}'):
        status, headers, raw = request(server.http_port, "POST", "/v2/repository/index", body)
        assert status == 200 and headers["content-type"].startswith("application/json"), raw
        index = json.loads(raw)
        assert isinstance(index, list)
        entries = {(m["name"], m.get("version")): m.get("state") for m in index}
        for key in (("simple", "1"), ("identity_all", "1"), ("add_sub", "1"),
                    ("versioned", "1"), ("versioned", "2"), ("versioned", "3")):  # fmt: skip
            assert entries.get(key) == "READY", (key, index)
    for action in ("load", "unload"):
        status, msg = error_of(post_json(server, f"/v2/repository/models/simple/{action}", {}))
        assert status == 400, (action, msg)
        assert "none" in msg and "explicit" in msg, msg
    assert_model_ready(server)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def _simple_req(**fields: Any) -> bytes:
    inp = {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}
    inp.update(fields)
    return json.dumps({"inputs": [inp]}).encode()


def _binary_req(sizes: list[int], payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [
        {"name": f"INPUT{i}", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": s}}
        for i, s in enumerate(sizes)
    ]}).encode()  # fmt: skip
    return head + payload, {HEADER: str(len(head))}


def _out_of_range_body() -> bytes:
    req = identity_all_json(np.random.default_rng(5))
    next(i for i in req["inputs"] if i["name"] == "in_UINT8")["data"] = [1, 300, 2]
    return json.dumps(req).encode()


_ERRORS = {
    "unknown-model": ("/v2/models/no_such_model/infer", _simple_req(), {}, 404, ["no_such_model"]),
    "unknown-version": ("/v2/models/versioned/versions/9/infer", _simple_req(shape=[1, 4], data=[1] * 4), {}, 404,
                        ["9"]),
    "wrong-datatype": ("/v2/models/simple/infer", _simple_req(datatype="INT32", data=[1] * 16), {}, 400,
                       ["'x'", "FP32", "INT32"]),
    "wrong-shape": ("/v2/models/simple/infer", _simple_req(shape=[1, 15], data=[0.5] * 15), {}, 400, ["'x'", "15"]),
    "too-big-batch": ("/v2/models/simple/infer", _simple_req(shape=[9, 16], data=[0.5] * 144), {}, 400, ["'x'"]),
    "data-count": ("/v2/models/simple/infer", _simple_req(data=[0.5] * 15), {}, 400, ["'x'", "16", "15"]),
    "nested-count": ("/v2/models/simple/infer", _simple_req(shape=[2, 16], data=[[0.5] * 16]), {}, 400, ["'x'", "32"]),
    "ragged": ("/v2/models/simple/infer", _simple_req(shape=[2, 16], data=[[0.5] * 16, [0.5] * 15 + [[1]]]), {}, 400,
               ["'x'"]),
    "string-in-fp32": ("/v2/models/simple/infer", _simple_req(data=["a"] * 16), {}, 400, ["'x'", "FP32"]),
    "malformed-json": ("/v2/models/simple/infer", b'{"inputs": [{"name": "x",', {}, 400, ["JSON"]),
    "not-an-object": ("/v2/models/simple/infer", b"[1, 2]", {}, 400, ["object"]),
    "no-inputs": ("/v2/models/simple/infer", b"{}", {}, 400, ["inputs"]),
    "unknown-datatype": ("/v2/models/simple/infer", _simple_req(datatype="FP128"), {}, 400, ["FP128"]),
    "too-deep": ("/v2/models/simple/infer",
                 b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": '
                 + b"[" * 70 + b"0.5" + b"]" * 70 + b"}]}", {}, 400, ["64"]),
    "too-deep-params": ("/v2/models/simple/infer",
                        b'{"parameters": {"p": ' + b'{"a": ' * 65 + b"1" + b"}" * 65 + b"}, " + _simple_req()[1:],
                        {}, 400, ["64"]),
    "unknown-input": ("/v2/models/simple/infer", _simple_req(name="bogus"), {}, 400, ["'bogus'"]),
    "out-of-range-uint8": ("/v2/models/identity_all/infer", _out_of_range_body(), {}, 400, ["300", "UINT8"]),
    "bool-not-bool": ("/v2/models/identity_all/infer",
                      json.dumps({"inputs": [{"name": "in_BOOL", "datatype": "BOOL", "shape": [1, 1],
                                              "data": [2]}]}).encode(),
                      {}, 400, ["BOOL"]),
    "unknown-output": ("/v2/models/simple/infer",
                       json.dumps({"inputs": json.loads(_simple_req())["inputs"],
                                   "outputs": [{"name": "zz"}]}).encode(),
                       {}, 400, ["'zz'"]),
    "binary-short": ("/v2/models/add_sub/infer", *_binary_req([64, 64], b"\0" * 100), 400, ["INPUT1"]),
    "binary-extra": ("/v2/models/add_sub/infer", *_binary_req([64, 64], b"\0" * 130), 400, ["128", "130"]),
    "binary-wrong-size": ("/v2/models/add_sub/infer", *_binary_req([60, 68], b"\0" * 128), 400, ["INPUT0", "64", "60"]),
    "header-past-body": ("/v2/models/simple/infer", b"{}", {HEADER: "50"}, 400, [HEADER]),
    "header-not-int": ("/v2/models/simple/infer", b"{}", {HEADER: "abc"}, 400, [HEADER]),
    "corrupt-gzip": ("/v2/models/simple/infer", _simple_req(), {"Content-Encoding": "gzip"}, 400, ["gzip"]),
    "size-without-header": ("/v2/models/simple/infer", _simple_req(data=None, parameters={"binary_data_size": 64}), {},
                            400, ["binary_data_size"]),
}  # fmt: skip


@pytest.mark.parametrize(("path", "body", "headers", "status", "words"), list(_ERRORS.values()), ids=list(_ERRORS))
def test_errors(
    server: RunningServer, path: str, body: bytes, headers: dict[str, str], status: int, words: list[str]
) -> None:
    got_status, msg = error_of(request(server.http_port, "POST", path, body, headers))
    assert got_status == status, msg
    for word in words:
        assert word in msg, msg
    model = path.split("/")[3]
    assert_model_ready(server, model if model != "no_such_model" else "simple")


def test_json_depth_limit_is_64(server: RunningServer) -> None:
    """{"inputs": [{"data": <k levels>}]} is k + 3 deep; nested data only has to hold 16 elements."""

    def body(k: int) -> bytes:
        data = b"[" * (k - 1) + json.dumps([0.5] * 16).encode() + b"]" * (k - 1)
        return b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": ' + data + b"}]}"

    status, _, out = request(server.http_port, "POST", "/v2/models/simple/infer", body(61))
    assert status == 200, out
    status, msg = error_of(request(server.http_port, "POST", "/v2/models/simple/infer", body(62)))
    assert status == 400 and "65" in msg and "64" in msg, msg


def test_get_errors(server: RunningServer) -> None:
    assert error_of(get(server, "/v2/models/no_such_model"))[0] == 404
    assert error_of(get(server, "/v2/models/simple/versions/5"))[0] == 404
    assert error_of(get(server, "/v2/models/no_such_model/config"))[0] == 404
    assert error_of(get(server, "/v2/no/such/route"))[0] == 404
    # Wrong method on an existing route: an error status, still JSON.
    assert error_of(request(server.http_port, "GET", "/v2/models/simple/infer"))[0] == 405


# --------------------------------------------------------------------------------------------------
# request size limit (a second server with a 1 MiB limit)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limit_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("limit") / "server.log"
    with run_server(example_repo, log, "--max-request-bytes", "1048576") as srv:
        yield srv


def test_request_over_the_limit(small_limit_server: RunningServer) -> None:
    srv = small_limit_server
    rows = 2 * 1024 * 1024 // 64  # 2 MiB of FP32 [rows, 16]
    big = np.zeros((rows, 16), np.float32)
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [rows, 16], "parameters": {"binary_data_size": big.nbytes}}
            ]
        }
    ).encode()
    try:
        result = request(
            srv.http_port, "POST", "/v2/models/simple/infer", head + big.tobytes(), {HEADER: str(len(head))}
        )
    except (ConnectionError, urllib.error.URLError) as exc:  # pragma: no cover - diagnostic
        pytest.fail(f"server dropped the connection instead of answering 413: {exc!r}")
    status, msg = error_of(result)
    assert status == 413, msg
    assert "1048576" in msg, msg
    # The limit applies to the decompressed body (a 2 MiB body gzips to a few KiB).
    status, msg = error_of(
        request(
            srv.http_port,
            "POST",
            "/v2/models/simple/infer",
            gzip.compress(head + big.tobytes()),
            {HEADER: str(len(head)), "Content-Encoding": "gzip"},
        )
    )
    assert status == 413, msg

    # gRPC on the same server: RESOURCE_EXHAUSTED for a 2 MiB tensor.
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    i = grpcclient.InferInput("x", [rows, 16], "FP32")
    i.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as err:
        g.infer("simple", [i])
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED", err.value

    # Exactly at the limit succeeds: identity_all with a big UINT8 input (its second dim is free)
    # sized so that JSON header + binary data is exactly 1 MiB, over HTTP; just under it over gRPC.
    limit = 1048576
    rng = np.random.default_rng(2)
    arrays = {t: sample(t, (1, 1), rng) for t in EVERY_TYPE}
    n = limit
    for _ in range(3):  # the header's length depends on the digits of n
        arrays["UINT8"] = np.arange(n, dtype=np.uint8)[None]
        raws = [serialize_bytes(a) if t == "BYTES" else a.tobytes() for t, a in arrays.items()]
        head = json.dumps({"inputs": [
            {"name": f"in_{t}", "datatype": t, "shape": list(a.shape), "parameters": {"binary_data_size": len(r)}}
            for (t, a), r in zip(arrays.items(), raws, strict=True)
        ], "outputs": [{"name": "out_UINT8", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
        n -= len(head) + sum(map(len, raws)) - limit
    body = head + b"".join(raws)
    assert len(body) == limit
    status, headers, out = request(
        srv.http_port, "POST", "/v2/models/identity_all/infer", body, {HEADER: str(len(head))}
    )
    assert status == 200, out
    _, got = split_response(headers, out)
    assert got["out_UINT8"] == arrays["UINT8"].tobytes()
    status, msg = error_of(
        request(srv.http_port, "POST", "/v2/models/identity_all/infer", body + b"\0", {HEADER: str(len(head))})
    )
    assert status == 413, msg

    ginputs = []
    arrays["UINT8"] = np.zeros((1, limit - 4096), np.uint8)
    for t, a in arrays.items():
        gi = grpcclient.InferInput(f"in_{t}", list(a.shape), t)
        if t == "BF16":
            gi._raw_content = a.tobytes()
        else:
            gi.set_data_from_numpy(a)
        ginputs.append(gi)
    gr = g.infer("identity_all", ginputs, outputs=[grpcclient.InferRequestedOutput("out_UINT8")])
    assert gr.as_numpy("out_UINT8").shape == (1, limit - 4096)
    assert_model_ready(srv)


# --------------------------------------------------------------------------------------------------
# a 64 MiB tensor through the default limit (96 MiB)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    import onnx
    from onnx import TensorProto, helper

    root = tmp_path_factory.mktemp("bigrepo")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "big_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (root / "big_identity" / "1").mkdir(parents=True)
    (root / "big_identity" / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (root / "big_identity" / "config.pbtxt").write_text(
        'name: "big_identity"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [-1] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [-1] }\n'
        "instance_group { count: 1 kind: KIND_CPU }\n"
    )
    with run_server(root, root / "server.log") as srv:
        yield srv


def test_64mib_tensor_http_and_grpc(big_model_server: RunningServer) -> None:
    srv = big_model_server
    n = 16 * 1024 * 1024
    x = np.random.default_rng(11).standard_normal(n, dtype=np.float32)
    assert x.nbytes == 64 * 1024 * 1024

    t0 = time.monotonic()
    c = httpclient.InferenceServerClient(srv.http_url, network_timeout=300.0, connection_timeout=300.0)
    i = httpclient.InferInput("x", [n], "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    r = c.infer("big_identity", [i], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)])
    y = r.as_numpy("y")
    assert y.shape == (n,) and y.tobytes() == x.tobytes()
    del r, y

    g = grpcclient.InferenceServerClient(srv.grpc_url)
    gi = grpcclient.InferInput("x", [n], "FP32")
    gi.set_data_from_numpy(x)
    gr = g.infer("big_identity", [gi], client_timeout=300)
    gy = gr.as_numpy("y")
    assert gy.shape == (n,) and gy.tobytes() == x.tobytes()
    elapsed = time.monotonic() - t0
    assert elapsed < 60, elapsed
