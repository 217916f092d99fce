"""End-to-end fuzz of the real server (``dl-inference serve`` on the example repository).

Hypothesis sends malformed HTTP infer requests (JSON and binary, with and without a well-formed
``Inference-Header-Content-Length``) and malformed gRPC ModelInfer requests (raw bytes through a
generic unary call). Properties:

* every HTTP answer is 2xx or 4xx, a 4xx with a JSON ``{"error": "..."}`` body; never 5xx, never a
  dropped connection;
* every gRPC error is a client error (INVALID_ARGUMENT, NOT_FOUND, ...), never INTERNAL, UNKNOWN,
  UNAVAILABLE or DEADLINE_EXCEEDED (a request the server never answers);
* afterwards the server is ready, answers a valid request on both transports, and still has the
  same worker processes (no worker crashed and was restarted), and its log holds no traceback.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dl_inference.examples import make_example_repository
from dl_inference.protocol.datatypes import numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from tests.fuzz.strategies import (
    INT64_MAX,
    TensorSpec,
    broken_http_cases,
    infer_requests,
    json_values,
    mutated_bytes,
    pb_datatypes,
    pb_shapes,
    raw_for,
    valid_http_cases,
)
from tests.integration.server import RunningServer, run_server

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
HEADER = "Inference-Header-Content-Length"
# The models served and, per model, its inputs with -1 dimensions made concrete (batch 1).
MODELS = ["simple", "identity_all", "add_sub", "image_classifier", "versioned"]
_E2E = settings(  # ci: 300 requests per transport; long: 5,000
    max_examples=max(300, min(5000, settings.default.max_examples // 4)),
    suppress_health_check=list(HealthCheck),
    deadline=None,
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("fuzz_repo")
    make_example_repository(repo)
    log = tmp_path_factory.mktemp("fuzz_logs") / "server.log"
    with run_server(repo, log) as srv:
        yield srv


@pytest.fixture(scope="module")
def specs(fuzz_server: RunningServer) -> dict[str, list[TensorSpec]]:
    conn = http.client.HTTPConnection("127.0.0.1", fuzz_server.http_port, timeout=30)
    out = {}
    for model in MODELS:
        conn.request("GET", f"/v2/models/{model}")
        meta = json.loads(conn.getresponse().read())
        out[model] = [
            TensorSpec(t["name"], t["datatype"], [1 if d < 0 else d for d in t["shape"]]) for t in meta["inputs"]
        ]
    conn.close()
    return out


class Http:
    """One keep-alive connection; a request the server drops fails the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        self.last = "nothing yet"

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        what = f"POST {path} {headers} {body[:300]!r}"
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()  # a fresh connection for the next example
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            raise AssertionError(f"connection dropped: {exc!r} on {what}; the request before: {self.last}") from None
        result = response.status, {k.lower(): v for k, v in response.getheaders()}, data
        self.last = f"{what} -> {response.status} {response.getheaders()} {data[:200]!r}"
        if response.will_close:
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return result


def asks_for_a_timeout(body: bytes, headers: dict[str, str]) -> bool:
    """Whether the request sets Triton's ``timeout`` parameter (µs): a short one may expire (504)."""
    try:
        length = headers.get(HEADER)
        doc = json.loads(body if length is None else body[: int(length)])
        timeout = doc["parameters"]["timeout"]
    except Exception:
        return False
    return type(timeout) is int and timeout > 0


def check_http_answer(status: int, headers: dict[str, str], data: bytes, what: str, deadline_ok: bool = False) -> None:
    # Not server faults: the client's own deadline passing (504), and 501 for shared-memory inputs,
    # a protocol extension this server does not offer (Triton's UNSUPPORTED -> 501).
    if not (deadline_ok and status == 504) and not (status == 501 and b"shared-memory" in data):
        assert status < 500, f"{status} for {what}: {data[:300]!r}"
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), headers
        doc = json.loads(data)
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
        return
    assert status == 200, status
    length = headers.get(HEADER.lower())
    doc = json.loads(data if length is None else data[: int(length)])
    assert isinstance(doc.get("outputs"), list), doc


def assert_healthy(srv: RunningServer, pids: list[int], specs: dict[str, list[TensorSpec]]) -> None:
    """Ready, a valid request works on both transports, same workers, no traceback logged."""
    http_ = Http(srv.http_port)
    http_.conn.request("GET", "/v2/health/ready")
    assert http_.conn.getresponse().status == 200
    http_.conn.close()
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": list(range(16))}]}
    status, _, data = Http(srv.http_port).post("/v2/models/simple/infer", json.dumps(doc).encode(), {})
    assert status == 200, data
    assert json.loads(data)["outputs"][0]["shape"] == [1, 4]
    reply = grpc_infer(srv, valid_grpc_request("simple", specs["simple"]).SerializeToString())
    assert isinstance(reply, bytes), reply
    assert pb.ModelInferResponse.FromString(reply).outputs[0].name == "y"
    assert sorted(srv.worker_pids()) == sorted(pids), "a worker died during the fuzz"
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------

versions = st.sampled_from(["", "1", "2", "3", "0", "-1", "99999999999999999999", "x"])
header_values = st.sampled_from(["abc", "-1", " 5", "1e3", "", "0x10", "99999999999999999999", "+0", "1_0"])


@st.composite
def http_requests(draw: st.DrawFn, specs: dict[str, list[TensorSpec]]) -> tuple[str, bytes, dict[str, str]]:
    model = draw(st.sampled_from(MODELS) | st.text(min_size=1, max_size=6))
    version = draw(versions)
    quoted = urllib.parse.quote(model, safe="")
    path = f"/v2/models/{quoted}" + (f"/versions/{version}" if version else "") + "/infer"
    headers: dict[str, str] = {}
    how = draw(st.sampled_from(["broken", "broken", "broken", "valid", "bytes", "json", "header"]))
    model_specs = specs.get(model, specs["simple"])
    if how in ("broken", "valid"):
        case = draw(broken_http_cases(model_specs) if how == "broken" else valid_http_cases(model_specs))
        body, header_length = case.body()
        if header_length is not None:
            headers[HEADER] = str(header_length)
    elif how == "bytes":
        body = draw(st.binary(max_size=200))
        if draw(st.booleans()):
            headers[HEADER] = str(draw(st.integers(-2, len(body) + 2)))
    elif how == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        case = draw(valid_http_cases(model_specs))
        body, _ = case.body()
        headers[HEADER] = draw(header_values)
    if draw(st.integers(0, 9)) == 0:  # a compressed body, sometimes not really compressed
        body = gzip.compress(body) if draw(st.booleans()) else body
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "x-what"]))
    return path, body, headers


def test_http_fuzz(fuzz_server: RunningServer, specs: dict[str, list[TensorSpec]]) -> None:
    pids = fuzz_server.worker_pids()
    client = Http(fuzz_server.http_port)

    @_E2E
    @given(req=http_requests(specs))
    # Regressions: each answered 500 before the fix (a lone surrogate in the JSON; a dimension
    # beyond int64), or a BYTES shape of 2**40 elements crashed the worker's decoding (no answer).
    @example(req=("/v2/models/simple/infer", b'{"id":"\\ud800","inputs":[]}', {}))
    @example(
        req=(
            "/v2/models/simple/infer",
            b'{"inputs":[{"name":"x","datatype":"FP32","shape":[9223372036854775808,16],"data":[]}]}',
            {},
        )
    )
    @example(req=_bytes_input_request(specs, 2**40))
    @example(req=_bytes_input_request(specs, INT64_MAX))
    # Regression: answered 404 without reading a body that does not decompress, then the connection
    # was dropped without "Connection: close" (the next request failed with a broken pipe).
    @example(req=("/v2/models/no_such_model/infer", b"not gzip", {"Content-Encoding": "gzip"}))
    # Regressions: bodies aiohttp fails to decode while parsing were answered in text/plain, not JSON.
    @example(req=("/v2/models/simple/infer", b"[]", {"Content-Encoding": "deflate"}))
    @example(req=("/v2/models/simple/infer", b"{}", {"Content-Encoding": "zstd"}))
    @example(req=_timeout_request(1))  # 504: the client's 1 µs deadline passed
    @example(req=_timeout_request(INT64_MAX))  # a deadline ~292,000 years away
    def run(req: tuple[str, bytes, dict[str, str]]) -> None:
        path, body, headers = req
        status, answer_headers, data = client.post(path, body, headers)
        what = f"POST {path} {headers} {body[:200]!r}"
        check_http_answer(status, answer_headers, data, what, asks_for_a_timeout(body, headers))

    run()
    assert_healthy(fuzz_server, pids, specs)


def _bytes_input_request(specs: dict[str, list[TensorSpec]], count: int) -> tuple[str, bytes, dict[str, str]]:
    """identity_all with every input valid but in_BYTES claiming ``count`` elements in 0 bytes."""
    inputs: list[dict[str, Any]] = []
    for spec in specs["identity_all"]:
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}
        if spec.datatype == "BYTES":
            entry["shape"] = [1, count]
            entry["parameters"] = {"binary_data_size": 0}
        elif spec.datatype == "BF16":
            entry["parameters"] = {"binary_data_size": 2}
        else:
            entry["data"] = [False if spec.datatype == "BOOL" else 0]
        inputs.append(entry)
    header = json.dumps({"inputs": inputs}).encode()
    return "/v2/models/identity_all/infer", header + b"\x00\x00", {HEADER: str(len(header))}


def _timeout_request(timeout_us: int) -> tuple[str, bytes, dict[str, str]]:
    doc = {"parameters": {"timeout": timeout_us}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16]}]}
    doc["inputs"][0]["data"] = [0.0] * 16
    return "/v2/models/simple/infer", json.dumps(doc).encode(), {}


# --------------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------------

BAD_GRPC_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DATA_LOSS,
}
_channels: dict[int, grpc.Channel] = {}


def grpc_infer(srv: RunningServer, payload: bytes) -> bytes | grpc.RpcError:
    channel = _channels.get(srv.grpc_port)
    if channel is None:
        channel = _channels[srv.grpc_port] = grpc.insecure_channel(srv.grpc_url)
    call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
    try:
        reply: bytes = call(payload, timeout=20)
    except grpc.RpcError as exc:
        return exc
    return reply


def valid_grpc_request(model: str, specs: list[TensorSpec], rng_seed: int = 0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="fuzz")
    rng = np.random.default_rng(rng_seed)
    for spec in specs:
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        n = int(np.prod(spec.shape))
        if spec.datatype == "BYTES":
            raw = b"".join(len(b"ab").to_bytes(4, "little") + b"ab" for _ in range(n))
        else:
            raw = rng.integers(0, 2, n).astype(numpy_dtype(spec.datatype)).tobytes()
        request.raw_input_contents.append(raw)
    return request


@st.composite
def grpc_payloads(draw: st.DrawFn, specs: dict[str, list[TensorSpec]]) -> bytes:
    model = draw(st.sampled_from(MODELS))
    base = valid_grpc_request(model, specs[model])
    if model == "versioned" or draw(st.integers(0, 4)) == 0:
        base.model_version = draw(versions)
    how = draw(st.sampled_from(["tensor", "tensor", "message", "mutate", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "mutate":
        return draw(mutated_bytes(base.SerializeToString()))
    if how == "message":
        names = [model, *(s.name for s in specs[model])]
        request = draw(infer_requests(names_pool=names))
        if draw(st.booleans()):
            request.model_name = model
        return request.SerializeToString()
    # one tensor of a valid request replaced: wrong datatype, shape, raw size, contents mixed in
    i = draw(st.integers(0, len(base.inputs) - 1))
    tensor = base.inputs[i]
    if draw(st.booleans()):
        tensor.datatype = draw(pb_datatypes)
    if draw(st.booleans()):
        del tensor.shape[:]
        tensor.shape.extend(draw(pb_shapes))
    if draw(st.booleans()):
        base.raw_input_contents[i] = draw(raw_for(tensor.datatype, list(tensor.shape)))
    if draw(st.integers(0, 4)) == 0:
        tensor.contents.fp32_contents.extend([1.0])
    if draw(st.integers(0, 4)) == 0:
        base.outputs.add(name=draw(st.sampled_from(["y", "zz", ""])))
    return base.SerializeToString()


def test_grpc_fuzz(fuzz_server: RunningServer, specs: dict[str, list[TensorSpec]]) -> None:
    pids = fuzz_server.worker_pids()

    @_E2E
    @given(payload=grpc_payloads(specs))
    # Regressions: a BYTES input of 2**40 / 2**62 elements in 0 bytes made the worker's decoding
    # raise MemoryError/ValueError, which it only logged: the call hung until its deadline.
    @example(payload=_grpc_bytes_request(specs, [1, 2**40]))
    @example(payload=_grpc_bytes_request(specs, [1, 2**62]))
    def run(payload: bytes) -> None:
        result = grpc_infer(fuzz_server, payload)
        if isinstance(result, grpc.RpcError):
            code = result.code()
            assert code not in BAD_GRPC_CODES, f"{code}: {result.details()} for {payload[:200]!r}"
            assert result.details()
        else:
            pb.ModelInferResponse.FromString(result)

    run()
    assert_healthy(fuzz_server, pids, specs)


def _grpc_bytes_request(specs: dict[str, list[TensorSpec]], shape: list[int]) -> bytes:
    """identity_all with every input valid but in_BYTES of ``shape`` in 0 bytes."""
    request = valid_grpc_request("identity_all", specs["identity_all"])
    i = [t.name for t in request.inputs].index("in_BYTES")
    del request.inputs[i].shape[:]
    request.inputs[i].shape.extend(shape)
    request.raw_input_contents[i] = b""
    return request.SerializeToString()


def test_grpc_stream_fuzz(fuzz_server: RunningServer, specs: dict[str, list[TensorSpec]]) -> None:
    """ModelStreamInfer: every message on the stream gets exactly one answer (a response or an
    error message), and a bad message does not end the stream."""
    pids = fuzz_server.worker_pids()
    channel = grpc.insecure_channel(fuzz_server.grpc_url)
    stream = channel.stream_stream(MODEL_STREAM_INFER, request_serializer=None, response_deserializer=None)

    @settings(_E2E, max_examples=max(50, _E2E.max_examples // 5))
    @given(payloads=st.lists(grpc_payloads(specs), min_size=1, max_size=6))
    def run(payloads: list[bytes]) -> None:
        answers = [pb.ModelStreamInferResponse.FromString(a) for a in stream(iter(payloads), timeout=30)]
        assert len(answers) == len(payloads)
        for answer in answers:
            assert answer.error_message or answer.HasField("infer_response")
            assert "cannot prepare the request" not in answer.error_message, answer.error_message

    try:
        run()
    finally:
        channel.close()
    assert_healthy(fuzz_server, pids, specs)


@pytest.mark.parametrize(
    "path",
    ["/v2/models/no_such_model/infer", "/v2/models/simple/infer", "/v2/no_such_route", "/v2/models/simple/ready"],
)
@pytest.mark.parametrize("gzip_body", [False, True])
def test_keep_alive_survives_a_body_that_does_not_decompress(
    fuzz_server: RunningServer, path: str, gzip_body: bool
) -> None:
    """Regression: a compressed body the server answered without reading (404 for an unknown model or
    route, 405) or could not decompress (400) made aiohttp drop the connection after an answer that
    did not say "Connection: close", so the client's next request on it failed with a broken pipe."""
    client = Http(fuzz_server.http_port)
    body = b'{"inputs": []}'
    headers = {"Content-Encoding": "gzip"}
    for _ in range(3):
        status, _, data = client.post(path, gzip.compress(body) if gzip_body else body, headers)
        assert 400 <= status < 500, (status, data)
        assert json.loads(data)["error"]
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}]}
        status, _, data = client.post("/v2/models/simple/infer", json.dumps(doc).encode(), {})
        assert status == 200, data


def _raw_http(srv: RunningServer, head: bytes, body: bytes, pause: float = 0.3) -> tuple[bytes, float]:
    """Send the request head, wait, send the body (the handler has started before the body
    arrives); read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.http_port)) as sock:
        sock.settimeout(30)
        sock.sendall(head)
        time.sleep(pause)
        start = time.monotonic()
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - start


@pytest.mark.parametrize("body", [b"[]", b"x\x9c", b"\x00\x01"])
def test_deflate_body_after_the_headers_is_answered_at_once(fuzz_server: RunningServer, body: bytes) -> None:
    """Regression (found by test_http_fuzz under load): a deflate body that ends before its stream
    does, arriving after the handler started reading, left the handler waiting for more body forever
    (aiohttp raised the error only inside its parser). Now it is a 400 at once, and the connection
    is closed."""
    head = (
        f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer, seconds = _raw_http(fuzz_server, head, body)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert seconds < 5, f"answered after {seconds:.1f} s"
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def test_client_leaving_mid_body_is_not_a_server_error(fuzz_server: RunningServer) -> None:
    """Regression: a client that closed the connection before its body was complete was logged as an
    unhandled server error with a traceback (and answered 500 to nobody)."""
    with socket.create_connection(("127.0.0.1", fuzz_server.http_port)) as sock:
        sock.sendall(b'POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"in')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "client closed the connection" not in fuzz_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = fuzz_server.log()
    assert "client closed the connection" in log
    assert "Traceback" not in log, log[-3000:]


def test_server_still_healthy_at_the_end(fuzz_server: RunningServer, specs: dict[str, list[TensorSpec]]) -> None:
    assert_healthy(fuzz_server, fuzz_server.worker_pids(), specs)
    assert Path(fuzz_server.log_path).exists()
