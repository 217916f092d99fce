"""Dynamic batching on the real server: randomized concurrent traffic vs unbatched in-process results."""

from __future__ import annotations

import concurrent.futures
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.integration.models import looping_model, write_model
from tests.integration.server import RunningServer, run_server

BATCHED_CONFIG = """
name: "rowwise"
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 3000 }
instance_group [{ count: 1, kind: KIND_CPU }]
"""


def rowwise_model(model_dir: Path) -> Path:
    """x FP32 [-1,-1], bias FP32 [-1,1] -> y = Softmax(x + bias) over the last axis, s = ReduceSum(x)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "bias"], ["t"]),
            helper.make_node("Softmax", ["t"], ["y"], axis=-1),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        ],
        "rowwise",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "w"]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["b", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "w"]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", 1]),
        ],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    return write_model(model_dir, graph, config=BATCHED_CONFIG)


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    repo = tmp_path_factory.mktemp("batch_repo")
    model_path = rowwise_model(repo / "rowwise")
    looping_model(
        repo / "slow",
        'name: "slow"\nmax_batch_size: 64\n'
        "dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
        "instance_group [{ count: 1, kind: KIND_CPU }]\n",
        iterations=4000,
    )
    with run_server(repo, repo.parent / "batch_server.log") as srv:
        yield srv, model_path


def test_batched_outputs_equal_unbatched_results(batch_server: tuple[RunningServer, Path]) -> None:
    server, model_path = batch_server
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = client.get_inference_statistics("rowwise").model_stats[0]

    def one(k: int) -> str:
        rng = np.random.default_rng(k)
        time.sleep(random.Random(k).random() * 0.01)  # arrival times spread out
        rows = int(rng.integers(1, 5))
        width = (3, 5)[k % 2]  # two shapes: must never share a backend call
        x = rng.standard_normal((rows, width)).astype(np.float32)
        bias = rng.standard_normal((rows, 1)).astype(np.float32)
        c = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = [grpcclient.InferInput("x", list(x.shape), "FP32"), grpcclient.InferInput("bias", [rows, 1], "FP32")]
        if k % 17 == 5:  # a bad request: wrong datatype; only it must fail
            inputs[0] = grpcclient.InferInput("x", list(x.shape), "FP64")
            inputs[0].set_data_from_numpy(x.astype(np.float64))
            inputs[1].set_data_from_numpy(bias)
            with pytest.raises(InferenceServerException) as err:
                c.infer("rowwise", inputs)
            assert "'x'" in err.value.message()
            return "bad"
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(bias)
        wanted = ["y", "s"] if k % 3 else ["s"]
        outputs = [grpcclient.InferRequestedOutput(n) for n in wanted]
        result = c.infer("rowwise", inputs, outputs=outputs, request_id=f"r{k}")
        assert result.get_response().id == f"r{k}"
        expected = dict(zip(["y", "s"], session.run(["y", "s"], {"x": x, "bias": bias})))
        assert [o.name for o in result.get_response().outputs] == wanted
        for name in wanted:
            np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-5, atol=1e-6)
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(400)))
    assert outcomes.count("bad") == sum(1 for k in range(400) if k % 17 == 5)
    after = client.get_inference_statistics("rowwise").model_stats[0]
    requests = after.inference_stats.success.count - before.inference_stats.success.count
    rows = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert requests == outcomes.count("ok")
    assert executions < requests, "no batching happened"
    assert any(b.batch_size > 4 for b in after.batch_stats)
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in after.batch_stats) == after.inference_count
    assert rows >= requests
    assert after.inference_stats.queue.ns > before.inference_stats.queue.ns


def test_full_queue_answers_429_and_resource_exhausted(batch_server: tuple[RunningServer, Path]) -> None:
    server, _ = batch_server
    x = np.ones((1, 512), np.float32)

    def grpc_call(_: int) -> str:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        i = grpcclient.InferInput("x", [1, 512], "FP32")
        i.set_data_from_numpy(x)
        start = time.monotonic()
        try:
            c.infer("slow", [i])
            return "ok"
        except InferenceServerException as exc:
            assert time.monotonic() - start < 0.5 or exc.status() != "StatusCode.RESOURCE_EXHAUSTED"
            return str(exc.status())

    def http_call(_: int) -> str:
        c = httpclient.InferenceServerClient(server.http_url)
        i = httpclient.InferInput("x", [1, 512], "FP32")
        i.set_data_from_numpy(x)
        try:
            c.infer("slow", [i])
            return "ok"
        except InferenceServerException as exc:
            return str(exc.status())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        grpc_results = list(pool.map(grpc_call, range(16)))
        http_results = list(pool.map(http_call, range(16)))
    assert "StatusCode.RESOURCE_EXHAUSTED" in grpc_results and "ok" in grpc_results
    assert "429" in http_results and "ok" in http_results
    assert set(grpc_results) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}


def test_cancelled_call_leaves_the_queue(batch_server: tuple[RunningServer, Path]) -> None:
    server, _ = batch_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("x", [1, 512], "FP32")
    x.set_data_from_numpy(np.ones((1, 512), np.float32))
    big = grpcclient.InferInput("x", [64, 512], "FP32")  # 64 rows: runs long enough to queue behind
    big.set_data_from_numpy(np.ones((64, 512), np.float32))
    before = client.get_inference_statistics("slow").model_stats[0]
    done: list[object] = []
    first = grpcclient.InferenceServerClient(server.grpc_url)
    first.async_infer("slow", [big], callback=lambda result, error: done.append(error or result))
    time.sleep(0.02)
    assert not done, "the first request finished too soon to queue anything behind it"
    with pytest.raises(InferenceServerException) as err:
        client.infer("slow", [x], client_timeout=0.05)  # queued behind the first, then given up
    assert "Deadline" in str(err.value.message()) or "DEADLINE" in str(err.value.status())
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    assert done and not isinstance(done[0], InferenceServerException), done
    after = client.get_inference_statistics("slow").model_stats[0]
    assert after.execution_count - before.execution_count == 1, "the cancelled request still ran"
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def test_priority_and_timeout_parameters_are_accepted(batch_server: tuple[RunningServer, Path]) -> None:
    server, _ = batch_server
    c = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3), np.float32))
    b = grpcclient.InferInput("bias", [1, 1], "FP32")
    b.set_data_from_numpy(np.zeros((1, 1), np.float32))
    result = c.infer("rowwise", [x, b], priority=1, timeout=10_000_000)
    assert result.as_numpy("y").shape == (1, 3)
