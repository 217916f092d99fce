"""The real server driven by stock tritonclient over gRPC."""

from __future__ import annotations

import concurrent.futures
import urllib.request
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.server import RunningServer

ALL_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}  # fmt: skip


def sample(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        # ONNX Runtime string tensors hold UTF-8 text; arbitrary bytes are covered by the codec tests.
        words = [b"", b"a", "h\u00e9llo".encode(), b"nul\x00inside", b"x" * 300]
        return np.array([words[i % len(words)] for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BF16":
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    dtype = np.dtype(ALL_TYPES[datatype])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.fixture
def client(server: RunningServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def _input(name: str, arr: np.ndarray, datatype: str) -> grpcclient.InferInput:
    i = grpcclient.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr)
    return i


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert "statistics" in meta.extensions and "model_repository" in meta.extensions
    md = client.get_model_metadata("simple")
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("y", "FP32", [-1, 4])]
    cfg = client.get_model_config("simple").config
    assert cfg.max_batch_size == 8 and cfg.input[0].name == "x"


def test_every_datatype_round_trips(client: grpcclient.InferenceServerClient) -> None:
    rng = np.random.default_rng(1)
    inputs, expected = [], {}
    for datatype in [*ALL_TYPES]:  # BF16 separately below: tritonclient's numpy path has no bfloat16
        arr = sample(datatype, (2, 5), rng)
        inputs.append(_input(f"in_{datatype}", arr, datatype))
        expected[f"out_{datatype}"] = arr
    bf16 = sample("BF16", (2, 5), rng)
    bf16_in = grpcclient.InferInput("in_BF16", [2, 5], "BF16")
    bf16_in._raw_content = bf16.tobytes()
    inputs.append(bf16_in)
    result = client.infer("identity_all", inputs, request_id="req-42")
    assert result.get_response().id == "req-42"
    for name, arr in expected.items():
        got = result.as_numpy(name)
        assert got.shape == arr.shape, name
        if arr.dtype == object:
            assert got.tolist() == arr.tolist(), name
        else:
            np.testing.assert_array_equal(got, arr, err_msg=name)
    raw = result.get_response()
    idx = [o.name for o in raw.outputs].index("out_BF16")
    assert raw.outputs[idx].datatype == "BF16"
    assert raw.raw_output_contents[idx] == bf16.tobytes()


def test_requested_output_subset(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("add_sub", [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_versions(client: grpcclient.InferenceServerClient) -> None:
    x = np.ones((1, 4), np.float32)
    for version in ("1", "2", "3"):
        r = client.infer("versioned", [_input("x", x, "FP32")], model_version=version)
        assert r.get_response().model_version == version
        np.testing.assert_array_equal(r.as_numpy(r.get_response().outputs[0].name), x * int(version))
    latest = client.infer("versioned", [_input("x", x, "FP32")])
    assert latest.get_response().model_version == "3"
    with pytest.raises(InferenceServerException) as err:
        client.infer("versioned", [_input("x", x, "FP32")], model_version="9")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert set(client.get_model_metadata("versioned").versions) == {"1", "2", "3"}


@pytest.mark.parametrize(
    ("build", "status", "words"),
    [
        (lambda: [_input("x", np.ones((1, 16), np.int32), "INT32")], "INVALID_ARGUMENT", ["'x'", "FP32", "INT32"]),
        (lambda: [_input("x", np.ones((1, 15), np.float32), "FP32")], "INVALID_ARGUMENT", ["'x'", "[-1,16]"]),
        (lambda: [_input("x", np.ones((9, 16), np.float32), "FP32")], "INVALID_ARGUMENT", ["'x'", "batch"]),
        (lambda: [_input("bogus", np.ones((1, 16), np.float32), "FP32")], "INVALID_ARGUMENT", ["'bogus'"]),
        (lambda: [], "INVALID_ARGUMENT", ["'x'"]),
    ],
)
def test_bad_input_is_a_clear_error(
    client: grpcclient.InferenceServerClient, build: object, status: str, words: list[str]
) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", build())  # type: ignore[operator]
    assert err.value.status() == f"StatusCode.{status}"
    for word in words:
        assert word in err.value.message(), err.value.message()
    assert client.is_model_ready("simple")


def test_byte_count_not_matching_shape(client: grpcclient.InferenceServerClient) -> None:
    i = grpcclient.InferInput("x", [1, 16], "FP32")
    i._raw_content = b"\0" * 60
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", [i])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in err.value.message() and "64" in err.value.message()


def test_unknown_model_and_version(client: grpcclient.InferenceServerClient) -> None:
    x = _input("x", np.ones((1, 16), np.float32), "FP32")
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [x])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_64_concurrent_requests_no_cross_talk(server: RunningServer) -> None:
    def one(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        a = np.full((1 + k % 4, 16), float(k), np.float32)
        b = np.arange(16, dtype=np.float32)[None].repeat(a.shape[0], 0)
        r = c.infer("add_sub", [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")], request_id=str(k))
        assert r.get_response().id == str(k)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(64 * 4)))


def test_statistics_and_metrics(server: RunningServer, client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("simple").model_stats[0]
    x = _input("x", np.ones((3, 16), np.float32), "FP32")
    for _ in range(5):
        client.infer("simple", [x])
    with pytest.raises(InferenceServerException):
        client.infer("simple", [_input("x", np.ones((1, 16), np.int32), "INT32")])
    after = client.get_inference_statistics("simple").model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 5
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count == 15
    assert after.execution_count - before.execution_count == 5
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        d_count = getattr(after.inference_stats, part).count - getattr(before.inference_stats, part).count
        assert d_count == 5, part
        assert getattr(after.inference_stats, part).ns > getattr(before.inference_stats, part).ns, part
    assert any(b.batch_size == 3 for b in after.batch_stats)
    text = urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics").read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success{model="simple"'))
    assert int(line.split()[-1]) == after.inference_stats.success.count
    for name in (
        "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
        "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    ):  # fmt: skip
        assert f'{name}{{model="simple",version="1"' in text, name
    assert 'nv_inference_request_failure{model="simple",version="1",reason="REJECTED"}' in text


def test_stream_infer(server: RunningServer) -> None:
    import queue

    results: queue.Queue[object] = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: results.put(error or result))
    x = np.ones((1, 16), np.float32)
    c.async_stream_infer("simple", [_input("x", x, "FP32")], request_id="s1")
    c.async_stream_infer("simple", [_input("x", x.astype(np.int32), "INT32")], request_id="s2")
    first, second = results.get(timeout=10), results.get(timeout=10)
    c.stop_stream()
    assert first.as_numpy("y").shape == (1, 4)  # type: ignore[union-attr]
    assert isinstance(second, InferenceServerException) and "'x'" in second.message()


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("simple", "1")] == "READY"
    assert index[("versioned", "3")] == "READY"


def test_malformed_protobuf_is_invalid_argument(server: RunningServer) -> None:
    import grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x06simple\x2a\xff\xff\xff\x0f", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x06simple\x2a\x05\x0a\x01x\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_typed_contents_input(server: RunningServer) -> None:
    """Inputs in typed ``contents`` (not raw) are accepted; outputs still come back raw."""
    import grpc

    from dl_inference.protocol.generated import grpc_service_pb2 as pb
    from dl_inference.protocol.generated import grpc_service_pb2_grpc as pb_grpc

    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    request = pb.ModelInferRequest(model_name="add_sub", id="typed")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[2, 16])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 16), x + x)


def test_grpc_health_and_reflection(server: RunningServer) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("method", ["ModelMetadata", "ServerReady", "ModelConfig", "RepositoryIndex"])
def test_undecodable_request_is_invalid_argument(server: RunningServer, method: str) -> None:
    """Bytes that are no protobuf message: INVALID_ARGUMENT naming the message, not UNKNOWN + traceback."""
    import grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid inference." in (info.value.details() or "")
    assert "DecodeError" not in server.log()


def test_sequences_and_classification_are_refused_not_ignored(client: grpcclient.InferenceServerClient) -> None:
    x = _input("x", np.ones((1, 16), np.float32), "FP32")
    with pytest.raises(InferenceServerException, match="sequence_id, sequence_start cannot be honoured"):
        client.infer("simple", [x], sequence_id=7, sequence_start=True)
    with pytest.raises(InferenceServerException, match="output 'y': the classification extension"):
        client.infer("simple", [x], outputs=[grpcclient.InferRequestedOutput("y", class_count=2)])
    # what stock clients send without a sequence is still fine
    assert client.infer("simple", [x], sequence_id=0).as_numpy("y").shape == (1, 4)


def test_ports_in_use_fail_in_one_line_and_workers_get_their_token_off_the_command_line(
    server: RunningServer, example_repo: Path
) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dl_inference", "serve", "--model-repository", str(example_repo),
           "--host", "127.0.0.1", "--metrics-port", "0"]  # fmt: skip
    for ports in (["--http-port", str(server.http_port), "--grpc-port", "0"], ["--grpc-port", str(server.grpc_port)]):
        done = subprocess.run([*cmd, *ports], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert "address" in done.stderr and "in use" in done.stderr and "choose other ports" in done.stderr
    for pid in server.worker_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--token" not in cmdline, cmdline
