"""load_tests.perf against the real server: closed loop over gRPC, open loop over HTTP binary.

A second or two of load each; checks the report is complete and that the server's statistics deltas
agree with the client: every request the client counted was sent after the first snapshot and
answered before the second, so the server's inference count delta is at least the client's count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from load_tests import perf
from tests.integration.server import RunningServer

SHORT = ["--window-ms", "400", "--max-windows", "3", "--warmup", "0.2", "-q"]


def check_point(point: dict[str, Any], batch: int = 1) -> None:
    assert point["requests"] > 0, point
    assert point["errors"] == 0, point["error_samples"]
    assert point["throughput_rps"] > 0 and point["latency_ms"]["p99"] >= point["latency_ms"]["p50"] > 0
    assert point["windows"] == 3 and len(point["windows_detail"]) == 3
    server = point["server"]
    assert server is not None, point["server_stats_error"]
    client_requests = point["totals"]["requests"]
    assert server["inference_count"] >= client_requests * batch
    assert server["success_count"] >= client_requests
    assert server["fail_count"] == 0
    per_request = server["per_request_us"]
    for key in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        assert per_request[key] is not None and per_request[key] >= 0, (key, per_request)
    assert per_request["request"] > per_request["compute_infer"]
    assert point["client_us"]["network_server"] > 0


def test_closed_loop_grpc(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "grpc.json"
    csv_path = tmp_path / "grpc.csv"
    rc = perf.main(
        ["--url", server.grpc_url, "-i", "grpc", "-m", "simple", "-c", "2", *SHORT, "--json", str(out),
         "--csv", str(csv_path)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert rc == 0, report["points"][0]["error_samples"]
    (point,) = report["points"]
    assert point["mode"] == "concurrency" and point["concurrency"] == 2 and point["protocol"] == "grpc"
    check_point(point)
    assert point["checked_responses"] >= 1
    assert len(csv_path.read_text().splitlines()) == 2


def test_closed_loop_grpc_through_system_shared_memory(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "shm.json"
    rc = perf.main(
        ["--url", server.grpc_url, "-i", "grpc", "-m", "add_sub", "-c", "3", "--shared-memory", "system",
         *SHORT, "--json", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert rc == 0, report["points"][0]["error_samples"]
    (point,) = report["points"]
    check_point(point)
    assert report["config"]["shared_memory"] == "system"
    leftovers = [p.name for p in Path("/dev/shm").glob(f"dlinf_load_{os.getpid()}_*")]
    assert leftovers == [], f"regions left behind: {leftovers}"


def test_open_loop_http_binary_image_bytes(server: RunningServer, tmp_path: Path) -> None:
    """The image_bytes scenario (JPEG BYTES through the image_classifier handler), open loop, 40 req/s."""
    out = tmp_path / "http.json"
    rc = perf.main(
        ["--scenario", "image_bytes", "--url", server.http_url, "-i", "http-binary", "-r", "40",
         "--arrival", "poisson", "--check-every", "1", "--pool", "4", *SHORT, "--json", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert rc == 0, report["points"][0]["error_samples"]
    (point,) = report["points"]
    assert point["mode"] == "rate" and point["request_rate"] == 40 and point["protocol"] == "http-binary"
    check_point(point)
    assert point["send_lag_ms"]["p50"] is not None and point["delayed_requests"] == 0
    assert point["checked_responses"] >= point["totals"]["requests"]  # --check-every 1: every response parsed
    assert report["request"]["inputs"][0]["datatype"] == "BYTES"


def test_tf_serving_protocols_against_our_tf_serving_api(server: RunningServer, tmp_path: Path) -> None:
    """perf's tfs-rest (row and columnar) and tfs-grpc against the gateway's own TF-Serving API; the
    V2 statistics of the same server (--stats-url) see every request."""
    for protocol, url, extra in (
        ("tfs-rest", server.http_url, ["--tfs-format", "instances"]),
        ("tfs-rest", server.http_url, ["--tfs-format", "inputs"]),
        ("tfs-grpc", server.grpc_url, []),
    ):
        out = tmp_path / f"{protocol}.json"
        rc = perf.main(
            ["--url", url, "-i", protocol, "-m", "simple", "--input", "x:FP32:-1,16", "-b", "2", "-c", "2",
             "--stats-url", server.http_url, *extra, *SHORT, "--json", str(out)]
        )  # fmt: skip
        report = json.loads(out.read_text())
        assert rc == 0, (protocol, extra, report["points"][0]["error_samples"])
        (point,) = report["points"]
        assert point["protocol"] == protocol
        check_point(point, batch=2)
