"""max_inflight_requests: a gateway-wide bound on requests held at once, answered 429 / RESOURCE_EXHAUSTED
at once on both transports, with the requests already admitted unharmed."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.models import looping_model
from tests.integration.server import RunningServer, run_node, run_server

WIDTH = 512


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("limit_repo")
    looping_model(
        repo / "slow",
        'name: "slow"\nmax_batch_size: 8\ninstance_group [{ count: 1, kind: KIND_CPU }]\n',
        iterations=6000,
    )
    with run_server(repo, repo.parent / "limit_server.log", "--max-inflight-requests", "2") as srv:
        yield srv


def _infer(url: str) -> float:
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", [1, WIDTH], "FP32")
    x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    t0 = time.monotonic()
    client.infer("slow", [x], client_timeout=60)
    return time.monotonic() - t0


def _wait_pending(srv: RunningServer, want: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = requests.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).text
        pending = [ln for ln in metrics.splitlines() if ln.startswith("nv_inference_pending_request_count")]
        if pending and sum(float(ln.rsplit(" ", 1)[1]) for ln in pending) >= want:
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {want} requests pending")


def test_excess_is_refused_at_once_and_admitted_requests_finish(limited: RunningServer) -> None:
    assert _infer(limited.grpc_url) > 0  # warm
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(_infer, limited.grpc_url) for _ in range(2)]
        _wait_pending(limited, 2)
        x = grpcclient.InferInput("x", [1, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        client = grpcclient.InferenceServerClient(limited.grpc_url)
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException, match=r"max_inflight_requests 2") as info:
            client.infer("slow", [x])
        refused_in = time.monotonic() - t0
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        body = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": [1.0] * WIDTH}]}
        reply = requests.post(f"http://{limited.http_url}/v2/models/slow/infer", json=body, timeout=30)
        assert reply.status_code == 429 and "server busy" in reply.json()["error"]
        still_running = [f for f in admitted if not f.done()]
        assert still_running, "the admitted requests finished before the check: the model is too fast"
        for f in admitted:
            assert f.result() > 0  # both admitted requests answered
    assert refused_in < 0.5, refused_in
    assert _infer(limited.grpc_url) > 0  # the slots came back
    stats = grpcclient.InferenceServerClient(limited.grpc_url).get_inference_statistics("slow").model_stats[0]
    assert stats.inference_stats.fail.count >= 2


def test_sigterm_refuses_new_requests_clearly_while_in_flight_ones_finish(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """After SIGTERM (drain_delay_s 0) the listeners stay open while requests drain: a new request gets
    UNAVAILABLE "shutting down" (gRPC) / 503 (HTTP) at once, not a dropped call, and the ones in flight
    are answered before the gateway exits 0."""
    repo = tmp_path_factory.mktemp("drain_repo")
    looping_model(
        repo / "slow",
        'name: "slow"\nmax_batch_size: 8\ninstance_group [{ count: 1, kind: KIND_CPU }]\n',
        iterations=40000,
    )
    with run_server(repo, repo.parent / "drain_server.log") as srv:
        assert _infer(srv.grpc_url) > 0  # warm
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(_infer, srv.grpc_url) for _ in range(2)]
            _wait_pending(srv, 2)
            srv.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            x = grpcclient.InferInput("x", [1, WIDTH], "FP32")
            x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
            t0 = time.monotonic()
            with pytest.raises(InferenceServerException, match="server is shutting down") as info:
                grpcclient.InferenceServerClient(srv.grpc_url).infer("slow", [x])
            refused_in = time.monotonic() - t0
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            body = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": [1.0] * WIDTH}]}
            reply = requests.post(f"http://{srv.http_url}/v2/models/slow/infer", json=body, timeout=30)
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]
            assert [f for f in in_flight if not f.done()], (
                "the in-flight requests finished first: the model is too fast"
            )
            for f in in_flight:
                assert f.result() > 0  # answered, not cut off
        assert srv.process.wait(30) == 0
    assert refused_in < 0.5, refused_in


def test_a_standalone_worker_drains_on_sigterm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A rolling update of a worker node: after SIGTERM it is NOT_SERVING, answers new requests UNAVAILABLE
    "shutting down" (which a gateway re-sends elsewhere) and finishes the ones in flight before it exits 0.
    Before, it stopped its gRPC server at once and gRPC core dropped the calls it held as a bare CANCELLED."""
    repo = tmp_path_factory.mktemp("drain_node_repo")
    looping_model(
        repo / "slow",
        'name: "slow"\nmax_batch_size: 8\ninstance_group [{ count: 1, kind: KIND_CPU }]\n',
        iterations=40000,
    )
    with run_node(repo, "slow", repo.parent / "drain_node.log") as node:
        assert _infer(node.address) > 0  # warm
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(_infer, node.address) for _ in range(2)]
            time.sleep(0.3)
            node.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            client = grpcclient.InferenceServerClient(node.address)
            assert not client.is_server_ready()
            x = grpcclient.InferInput("x", [1, WIDTH], "FP32")
            x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
            with pytest.raises(InferenceServerException, match="shutting down") as info:
                client.infer("slow", [x])
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert [f for f in in_flight if not f.done()], (
                "the in-flight requests finished first: the model is too fast"
            )
            for f in in_flight:
                assert f.result() > 0
        assert node.process.wait(30) == 0
