"""load_tests.loadgen against load_tests.bare_server (a real subprocess), plus its response checks.

Fast (a few seconds): the server starts on a free port (``--port 0``, it prints the port), loadgen
runs ~1 s at concurrency 4 over gRPC through its CLI, checking every response.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dl_inference.examples import make_example_repository
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from load_tests.loadgen import (
    LoadConfig,
    TensorSpec,
    Workload,
    build_workload,
    check_grpc_response,
    check_http_response,
    http_request,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a bare server running the example ``simple`` model."""
    root = tmp_path_factory.mktemp("repo")
    make_example_repository(root)
    log = (root / "bare.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "load_tests.bare_server",
            "--model",
            str(root / "simple" / "1" / "model.onnx"),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 15
        line = b""
        while not line.startswith(b"READY") and time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                if not line:  # EOF: it died
                    break
        if not line.startswith(b"READY"):
            log.flush()
            pytest.fail(f"bare server did not start: {(root / 'bare.log').read_text()[-2000:]}")
        port = int(line.split(b"port=")[1].split()[0])
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_loadgen_grpc_against_bare_server(bare_server: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "load_tests.loadgen",
            "--url",
            bare_server,
            "--protocol",
            "grpc",
            "--model",
            "simple",
            "--concurrency",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--check-every",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "req/s" in proc.stdout and "p50" in proc.stdout
    report = json.loads(out.read_text())
    assert report["errors"] == 0, report["error_samples"]
    assert report["errors_by_status"] == {}
    assert report["requests"] > 50
    assert report["concurrency"] == 4 and report["protocol"] == "grpc" and report["model"] == "simple"
    assert report["throughput_rps"] == pytest.approx(report["requests"] / report["duration_s"])
    assert report["checked_responses"] >= report["requests"]  # --check-every 1
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 16]}]


def test_loadgen_processes_and_connections_merge_into_one_report(bare_server: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "load_tests.loadgen", "--url", bare_server, "--model", "simple", "-c", "5",
           "--processes", "2", "--connections", "2", "--duration", "1", "--warmup", "0.3",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["concurrency"] == 5 and report["connections"] == 2
    assert report["errors"] == 0 and report["requests"] > 50
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    # Rates are summed over the processes: all their requests over the (nearly common) measured second.
    assert report["throughput_rps"] == pytest.approx(report["requests"] / report["duration_s"], rel=0.2)


def test_loadgen_reports_unknown_model(bare_server: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "load_tests.loadgen",
            "--url",
            bare_server,
            "--model",
            "nope",
            "--duration",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "NOT_FOUND" in proc.stderr


def _simple_workload(batch: int = 2) -> tuple[LoadConfig, Workload]:
    cfg = LoadConfig(model="simple", batch=batch)
    work = build_workload([TensorSpec("x", "FP32", [-1, 16])], [TensorSpec("y", "FP32", [-1, 4])], cfg)
    return cfg, work


def _grpc_response(shape: list[int], nbytes: int, name: str = "y") -> bytes:
    response = pb.ModelInferResponse(model_name="simple", model_version="1")
    response.outputs.add(name=name, datatype="FP32", shape=shape)
    response.raw_output_contents.append(b"\0" * nbytes)
    return response.SerializeToString()


def test_workload_shapes_follow_batch() -> None:
    _, work = _simple_workload(batch=3)
    assert work.inputs[0].shape == [3, 16]
    assert work.arrays[0].shape == (3, 16) and work.arrays[0].dtype == np.float32
    assert work.outputs[0].shape == [3, 4]


def test_grpc_response_check() -> None:
    cfg, work = _simple_workload()
    assert check_grpc_response(_grpc_response([2, 4], 32), cfg, work) is None
    assert "missing" in (check_grpc_response(_grpc_response([2, 4], 32, name="z"), cfg, work) or "")
    assert "shape" in (check_grpc_response(_grpc_response([1, 4], 16), cfg, work) or "")
    assert "raw bytes" in (check_grpc_response(_grpc_response([2, 4], 31), cfg, work) or "")
    assert "parse" in (check_grpc_response(b"\xff\xff\xff", cfg, work) or "")


def test_http_binary_request_and_response_check() -> None:
    cfg, work = _simple_workload()
    cfg.http_binary = True
    body, headers = http_request(cfg, work)
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 2 * 16 * 4 == len(body) - n
    assert header["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]

    out = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}]}
    head = json.dumps(out).encode()
    assert check_http_response(head + b"\0" * 32, str(len(head)), work) is None
    assert check_http_response(head + b"\0" * 30, str(len(head)), work) is not None
    as_json = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}
    assert check_http_response(json.dumps(as_json).encode(), None, work) is None
    as_json["outputs"][0]["data"] = [0.0] * 7
    assert check_http_response(json.dumps(as_json).encode(), None, work) is not None
