"""load_tests.perf and load_tests.histogram: histogram accuracy, the stability rule, the open-loop
scheduler (coordinated omission), report writers, scenarios, encoders, and TF-Serving REST against a
tiny aiohttp fake (the server has no TF-Serving API yet). No real server here: see
tests/tools/test_perf_tool.py."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import math
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from load_tests import perf
from load_tests.histogram import Histogram
from load_tests.perf import (
    PerfConfig,
    PerfError,
    Point,
    Prepared,
    Target,
    encode_grpc,
    encode_http,
    encode_tfs_rest,
    is_stable,
    normalize_stats,
    run_sweep_async,
    stats_delta,
)
from load_tests.scenarios import (
    DataSource,
    InputDecl,
    ScenarioError,
    available_scenarios,
    load_scenario,
    make_array,
    make_repository,
    parse_scenario,
)

# ---------------------------------------------------------------------------------------------
# histogram


def test_histogram_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(1)
    values = np.rint(rng.lognormal(mean=math.log(2e6), sigma=0.8, size=50_000)).astype(np.int64)  # ~2 ms in ns
    h = Histogram()
    h.record_many(values)
    assert h.count == values.size and h.min == values.min() and h.max == values.max()
    assert h.mean == pytest.approx(values.mean(), rel=1e-12)
    ordered = np.sort(values)
    for p in (1, 10, 50, 90, 95, 99, 99.9, 100):
        exact = float(ordered[max(1, math.ceil(p * values.size / 100 - 1e-9)) - 1])  # the value at that rank
        got = h.percentile(p)
        assert got is not None
        # Never below the value at that rank, and within the bucket's width (3 significant digits).
        assert exact <= got <= exact * (1 + 1 / 1024) + 1, (p, exact, got)
        assert got == pytest.approx(float(np.percentile(values, p)), rel=5e-3)  # numpy's interpolated percentile


def test_histogram_small_values_exact_and_record_equivalence() -> None:
    h1, h2 = Histogram(), Histogram()
    values = [0, 1, 2, 5, 1000, 2047, 2048, 2049, 4095, 123_456_789]
    for v in values:
        h1.record(v)
    h2.record_many(values)
    assert h1.to_dict() == h2.to_dict()
    assert h1.percentile(10) == 0 and h1.percentile(40) == 5  # below 2048 every integer has its own counter
    assert h1.percentile(100) == 123_456_789
    assert h1.lowest_equivalent(123_456_789) <= 123_456_789 <= h1.highest_equivalent(123_456_789)
    width = h1.highest_equivalent(123_456_789) - h1.lowest_equivalent(123_456_789) + 1
    assert width / 123_456_789 < 1e-3


def test_histogram_merge_serialize_and_limits() -> None:
    rng = np.random.default_rng(2)
    a_vals, b_vals = rng.integers(1, 10**7, 1000), rng.integers(10**5, 10**9, 1000)
    a, b, both = Histogram(), Histogram(), Histogram()
    a.record_many(a_vals)
    b.record_many(b_vals)
    both.record_many(np.concatenate([a_vals, b_vals]))
    merged = Histogram.merged([a, b])
    assert merged.to_dict() == both.to_dict()
    assert Histogram.from_dict(json.loads(json.dumps(merged.to_dict()))).to_dict() == both.to_dict()
    as_list = dict(merged.to_dict(), counts=[p.split(":") for p in merged.to_dict()["counts"].split(",")])
    assert Histogram.from_dict(as_list).to_dict() == both.to_dict()
    assert a.copy().merge(b).percentile(99) == both.percentile(99)
    with pytest.raises(ValueError):
        a.merge(Histogram(significant_digits=2))
    with pytest.raises(ValueError):
        a.record(-1)
    with pytest.raises(ValueError):
        a.record_many(np.array([5, -3]))
    small = Histogram(highest=10**6)
    small.record_many([10**7, 5])
    assert small.saturated == 1 and small.max == 10**6
    assert Histogram().percentile(50) is None and Histogram().mean is None


# ---------------------------------------------------------------------------------------------
# stability rule, windows, arrival times


def test_stability_rule() -> None:
    assert is_stable([(100, 5.0), (105, 5.2), (98, 4.9)], 3, 10)
    assert not is_stable([(100, 5.0), (105, 5.2)], 3, 10)  # too few windows
    assert not is_stable([(100, 5.0), (130, 5.2), (98, 4.9)], 3, 10)  # throughput off
    assert not is_stable([(100, 5.0), (100, 7.0), (100, 5.0)], 3, 10)  # p99 off
    assert not is_stable([(100, 5.0), (0, None), (100, 5.0)], 3, 10)  # an empty window
    assert is_stable([(10, 50.0), (300, 90.0), (100, 5.0), (101, 5.1), (99, 5.0)], 3, 10)  # only the last 3
    assert is_stable([(100, 5.0), (118, 5.0), (100, 5.0)], 3, 15) and not is_stable(
        [(100, 5.0), (118, 5.0), (100, 5.0)], 3, 10
    )


# ---------------------------------------------------------------------------------------------
# the load engine against fake targets


class FakeTarget(Target):
    """Answers after ``service_s``; during a stall every request waits until the stall is over."""

    protocol = "fake"

    def __init__(self, cfg: PerfConfig, service_s: float = 0.002, stall_after: float | None = None,
                 stall_s: float = 0.0) -> None:  # fmt: skip
        super().__init__(cfg)
        self.service_s = service_s
        self.stall_after = stall_after
        self.stall_s = stall_s
        self.stall: tuple[float, float] | None = None
        self.calls = 0

    async def connect(self) -> None:
        return None

    def encode(self, arrays: list[np.ndarray]) -> bytes:
        return b"request"

    async def infer(self, index: int, verify: bool) -> perf.Outcome:
        now = perf.clock()
        self.calls += 1
        if self.stall is None and self.stall_after is not None:
            self.stall = (now + self.stall_after, now + self.stall_after + self.stall_s)
        if self.stall and self.stall[0] <= now < self.stall[1]:
            await asyncio.sleep(self.stall[1] - now)
        await asyncio.sleep(self.service_s)
        return None, 0.0, 0.0, 0.0


def fake_cfg(**kw: Any) -> PerfConfig:
    base: dict[str, Any] = dict(
        inputs=[InputDecl("x", "FP32", [-1, 4])],
        window_ms=300,
        max_windows=3,
        warmup=0,
        server_stats=False,
        quiet=True,
        progress=False,
        protocol="grpc",
    )
    base.update(kw)
    return PerfConfig(**base)


def run(cfg: PerfConfig, target: Target) -> dict[str, Any]:
    return asyncio.run(run_sweep_async(cfg, target=target))


def test_open_loop_latency_counts_from_intended_time() -> None:
    """A 250 ms stall inside an open-loop run shows up in the percentiles: every request the schedule
    wanted sent during the stall carries the wait, not just the one that was in flight."""
    cfg = fake_cfg(rate=[200.0])
    target = FakeTarget(cfg, stall_after=0.3, stall_s=0.25)
    point = run(cfg, target)["points"][0]
    lat = point["latency_ms"]
    assert point["requests"] > 100 and point["errors"] == 0
    assert lat["max"] >= 200
    assert lat["p99"] >= 150
    assert lat["p90"] >= 40  # ~50 of ~180 requests were scheduled inside the stall
    assert point["send_lag_ms"]["p50"] < 20  # the scheduler itself kept to the schedule
    assert point["delayed_requests"] == 0


def test_closed_loop_hides_the_same_stall() -> None:
    """The contrast: one closed-loop worker just waits; only one request sees the stall."""
    cfg = fake_cfg(concurrency=[1])
    target = FakeTarget(cfg, stall_after=0.3, stall_s=0.25)
    point = run(cfg, target)["points"][0]
    assert point["latency_ms"]["max"] >= 200
    assert point["latency_ms"]["p90"] < 40
    assert point["send_lag_ms"] is None


def test_open_loop_outstanding_cap_still_measures_from_intended_time() -> None:
    cfg = fake_cfg(rate=[200.0], max_outstanding=2)
    target = FakeTarget(cfg, stall_after=0.3, stall_s=0.25)
    point = run(cfg, target)["points"][0]
    assert point["delayed_requests"] > 0  # the cap held requests back during the stall...
    assert point["latency_ms"]["p99"] >= 150  # ...and their latency still counts from when they were due
    assert point["send_lag_ms"]["max"] >= 150


def test_open_loop_overload_counts_delayed_and_unsent() -> None:
    """Capacity 1 / 40 ms = 25 req/s under 100 req/s: latency grows, backlog is reported."""
    cfg = fake_cfg(rate=[100.0], max_outstanding=1, request_timeout=2.0)
    point = run(cfg, FakeTarget(cfg, service_s=0.04))["points"][0]
    assert point["throughput_rps"] < 40
    assert point["delayed_requests"] > 10
    assert point["unsent_requests"] > 20
    assert point["latency_ms"]["max"] > 200
    assert not point["stable"]  # latency keeps growing window after window


def test_engine_reports_errors_and_windows() -> None:
    class Flaky(FakeTarget):
        async def infer(self, index: int, verify: bool) -> perf.Outcome:
            await asyncio.sleep(0.001)
            self.calls += 1
            if self.calls % 5 == 0:
                self.note("UNAVAILABLE", "no instance")
                return "UNAVAILABLE", 0.0, 0.0, 0.0
            return None, 0.0, 0.0, 0.0

    cfg = fake_cfg(concurrency=[2], max_windows=2, stability_windows=2, stability_pct=100)
    report = run(cfg, Flaky(cfg))
    point = report["points"][0]
    assert point["errors"] > 0 and point["errors_by_status"].keys() == {"UNAVAILABLE"}
    assert point["error_samples"]["UNAVAILABLE"] == "no instance"
    assert len(point["windows_detail"]) == point["windows"] <= 2
    assert point["totals"]["requests"] >= point["requests"]


def test_progress_line_only_when_enabled(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = fake_cfg(concurrency=[1], max_windows=1, window_ms=200, progress=None, quiet=False)
    out = io.StringIO()
    asyncio.run(run_sweep_async(cfg, target=FakeTarget(cfg), out=out))
    assert "\r" not in capsys.readouterr().err  # stderr is not a TTY under pytest
    assert "c=1" in out.getvalue() and "infer/s" in out.getvalue()
    stream = io.StringIO()
    progress = perf.Progress(True, stream)
    progress.show("[c=1] 1.0 s")
    progress.clear()
    assert stream.getvalue().startswith("\r[c=1] 1.0 s")


# ---------------------------------------------------------------------------------------------
# server statistics


def stat_entry(name: str, version: str, n: int, ns: int) -> dict[str, Any]:
    d = {"count": n, "ns": ns}
    return {
        "name": name,
        "version": version,
        "inference_count": 2 * n,
        "execution_count": n,
        "inference_stats": {k: dict(d) for k in perf.STAT_KEYS} | {"fail": {"count": 0, "ns": 0}},
    }


def test_stats_delta_per_request_averages() -> None:
    before = normalize_stats([stat_entry("m", "1", 10, 10_000), stat_entry("other", "1", 99, 1)], "m")
    after = normalize_stats([stat_entry("m", "1", 30, 50_000), stat_entry("m", "2", 10, 0)], "m", "1")
    assert before is not None and after is not None
    delta = stats_delta(before, after)
    assert delta["inference_count"] == 40 and delta["execution_count"] == 20 and delta["avg_batch"] == 2.0
    assert delta["per_request_us"]["queue"] == pytest.approx(40_000 / 20 / 1000)
    assert delta["per_request_us"]["request"] == pytest.approx(2.0)
    assert normalize_stats([stat_entry("other", "1", 1, 1)], "m") is None
    both = normalize_stats([stat_entry("m", "1", 1, 1), stat_entry("m", "2", 2, 2)], "m")
    assert both is not None and both["execution_count"] == 3


# ---------------------------------------------------------------------------------------------
# output files


def test_csv_json_and_table(tmp_path: Path) -> None:
    cfg = fake_cfg(concurrency=[1, 2], rate=[50.0], max_windows=1, window_ms=200)
    report = run(cfg, FakeTarget(cfg))
    points = report["points"]
    assert [p["label"] for p in points] == ["c=1", "c=2", "r=50/s"]
    perf.write_csv(tmp_path / "out.csv", points)
    perf.write_json(tmp_path / "out.json", report)
    with (tmp_path / "out.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == perf.CSV_COLUMNS and len(rows) == 3
    assert rows[0]["mode"] == "concurrency" and rows[2]["request_rate"] == "50"
    assert float(rows[1]["inferences_per_s"]) > 0 and rows[0]["server_queue_us"] == ""
    loaded = json.loads((tmp_path / "out.json").read_text())
    assert loaded["tool"] == "load_tests.perf" and len(loaded["points"]) == 3
    hist = Histogram.from_dict(loaded["points"][0]["latency_histogram"])
    assert hist.count == loaded["points"][0]["requests"]
    for p in points:
        assert p["label"] in perf.table_row(p)
        assert "client:" in perf.breakdown_line(p)
    assert len(perf.table_row(points[0])) == len(perf.table_header())


def test_from_json_reprints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = fake_cfg(concurrency=[1], rate=[40.0], max_windows=1, window_ms=150)
    perf.write_json(tmp_path / "r.json", run(cfg, FakeTarget(cfg)))
    assert perf.main(["--from-json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("load") and "c=1" in out and "r=40/s" in out and "send lag" in out
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 3
    assert perf.main(["--from-json", str(tmp_path / "missing.json")]) == 2


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    cfg = fake_cfg(concurrency=[1, 2], max_windows=1, window_ms=150)
    report = run(cfg, FakeTarget(cfg))
    perf.write_plot(tmp_path / "p.png", report["points"], "fake")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# scenarios, data, repositories


def test_bundled_scenarios_parse() -> None:
    names = available_scenarios()
    assert {"tiny_mlp", "resnet_cnn", "large_tensor", "image_bytes"} <= set(names)
    for name in names:
        s = load_scenario(name)
        assert s.options["model"] and s.repository and s.description
    big = load_scenario("large_tensor")
    assert big.inputs[0].shape == [4096, 2048] and math.prod(big.inputs[0].shape) * 4 == 32 * 2**20
    img = load_scenario("image_bytes")
    assert img.inputs[0].data.kind == "jpeg" and img.parameters == {"top_k": 3}


def test_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="unknown keys"):
        parse_scenario({"model": "m", "concurency": [1]})
    with pytest.raises(ScenarioError, match="not a data source"):
        parse_scenario({"inputs": [{"name": "x", "data": "ones"}]})
    with pytest.raises(ScenarioError, match="datatype"):
        parse_scenario({"inputs": [{"name": "x", "datatype": "FLOAT"}]})
    with pytest.raises(ScenarioError, match="repository kind"):
        parse_scenario({"repository": [{"kind": "tensorflow"}]})
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("no_such_scenario")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ScenarioError, match="YAML"):
        load_scenario(str(bad))


def test_data_sources(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    zeros = make_array("x", "FP32", [2, 3], DataSource("zeros"), rng)
    assert zeros.dtype == np.float32 and zeros.shape == (2, 3) and not zeros.any()
    rnd = make_array("x", "INT64", [4], DataSource("random"), rng)
    assert rnd.dtype == np.int64
    jpegs = make_array("img", "BYTES", [2, 1], DataSource("jpeg", size=(48, 64)), rng)
    with Image.open(io.BytesIO(jpegs[1, 0])) as im:
        assert im.format == "JPEG" and im.size == (64, 48)
    np.save(tmp_path / "row.npy", np.arange(3, dtype=np.float64))
    tiled = make_array("x", "FP32", [4, 3], DataSource("file", path="row.npy", base_dir=tmp_path), rng)
    assert tiled.dtype == np.float32 and tiled.shape == (4, 3) and (tiled[3] == [0, 1, 2]).all()
    (tmp_path / "raw.bin").write_bytes(np.arange(6, dtype=np.int32).tobytes())
    raw = make_array("x", "INT32", [2, 3], DataSource("file", path=str(tmp_path / "raw.bin")), rng)
    assert raw.tolist() == [[0, 1, 2], [3, 4, 5]]
    files = tmp_path / "blobs"
    files.mkdir()
    (files / "a").write_bytes(b"AA")
    (files / "b").write_bytes(b"BBB")
    blobs = make_array("s", "BYTES", [3], DataSource("file", path=str(files)), rng)
    assert blobs.tolist() == [b"AA", b"BBB", b"AA"]
    with pytest.raises(ScenarioError, match="do not fit"):
        make_array("x", "FP32", [5], DataSource("file", path=str(tmp_path / "raw.bin")), rng)


def test_make_repository_builds_servable_models(tmp_path: Path) -> None:
    import onnxruntime as ort

    names = make_repository(load_scenario("large_tensor"), tmp_path)
    names += make_repository(load_scenario("tiny_mlp"), tmp_path)
    assert names == ["large_reduce", "simple"]
    assert (tmp_path / "large_reduce" / "config.pbtxt").is_file()
    session = ort.InferenceSession(str(tmp_path / "large_reduce" / "1" / "model.onnx"))
    x = np.ones((4096, 2048), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (4096,) and float(y[0]) == 2048.0


def test_config_precedence(tmp_path: Path) -> None:
    parser = perf.build_parser()
    scenario = load_scenario("tiny_mlp")
    cfg = perf.config_from_args(parser.parse_args(["--scenario", "tiny_mlp"]), scenario)
    assert cfg.concurrency == [1, 4, 16] and cfg.rate == [] and cfg.model == "simple" and cfg.pool == 16
    assert cfg.window_ms == 5000 and cfg.outputs == ["y"]
    cfg = perf.config_from_args(parser.parse_args(["-c", "2", "--window-ms", "100", "-i", "http"]), scenario)
    assert cfg.concurrency == [2] and cfg.window_ms == 100 and cfg.protocol == "http"
    cfg = perf.config_from_args(
        parser.parse_args(["-r", "10,20", "--shape", "x:-1,8", "--parameter", "top_k=2", "--data", "x=zeros"]),
        scenario,
    )
    assert cfg.concurrency == [] and cfg.rate == [10.0, 20.0] and cfg.parameters == {"top_k": 2}
    assert cfg.inputs[0].shape == [-1, 8] and cfg.inputs[0].data.kind == "zeros"
    assert cfg.inputs[0].datatype == "FP32"  # kept from the scenario
    assert perf.config_from_args(parser.parse_args([]), None).points() == [Point("concurrency", 1)]


def test_cli_make_repo_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert perf.main(["--scenario", "tiny_mlp", "--make-repo", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "simple" / "1" / "model.onnx").is_file()
    assert perf.main(["--scenario", "nope"]) == 2
    assert perf.main(["--url", "127.0.0.1:1", "--connect-timeout", "0.5", "-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown scenario" in err and "cannot connect" in err


# ---------------------------------------------------------------------------------------------
# request encodings


def prepared(*specs: tuple[str, str, list[int]], arrays: list[np.ndarray], outputs: tuple[str, ...] = ()) -> Prepared:
    from load_tests.loadgen import TensorSpec

    return Prepared([TensorSpec(*s) for s in specs], [DataSource()] * len(specs), [arrays], [], list(outputs))


def test_encode_grpc_and_http() -> None:
    from dl_inference.protocol.generated import grpc_service_pb2 as pb

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    prep = prepared(("x", "FP32", [2, 4]), arrays=[x], outputs=("y",))
    cfg = PerfConfig(model="m", model_version="2", parameters={"top_k": 2, "flag": True, "name": "a", "f": 0.5})
    req = pb.ModelInferRequest.FromString(encode_grpc(cfg, prep, [x]))
    assert req.model_name == "m" and req.model_version == "2" and [o.name for o in req.outputs] == ["y"]
    assert np.frombuffer(req.raw_input_contents[0], np.float32).tolist() == x.reshape(-1).tolist()
    assert req.parameters["top_k"].int64_param == 2 and req.parameters["flag"].bool_param
    assert req.parameters["f"].double_param == 0.5 and req.parameters["name"].string_param == "a"
    body, headers = encode_http(cfg, prep, [x], binary=True)
    n = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:n])
    assert len(body) - n == 32 and doc["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]
    body, headers = encode_http(cfg, prep, [x], binary=False)
    assert json.loads(body)["inputs"][0]["data"] == x.reshape(-1).tolist()
    blob = np.array([[b"\xff\xd8\xff"]], dtype=object)
    bprep = prepared(("image", "BYTES", [1, 1]), arrays=[blob])
    with pytest.raises(PerfError, match="http-binary"):
        encode_http(cfg, bprep, [blob], binary=False)


def test_encode_tfs_rest() -> None:
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    cfg = PerfConfig(protocol="tfs-rest", tfs_signature="serving_default")
    prep = prepared(("x", "INT32", [2, 3]), arrays=[x])
    doc = json.loads(encode_tfs_rest(cfg, prep, [x])[0])
    assert doc == {"signature_name": "serving_default", "instances": [[0, 1, 2], [3, 4, 5]]}
    blob = np.array([[b"\xff\xd8"], [b"text"]], dtype=object)
    prep2 = prepared(("x", "INT32", [2, 3]), ("img", "BYTES", [2, 1]), arrays=[x, blob])
    doc = json.loads(encode_tfs_rest(PerfConfig(), prep2, [x, blob])[0])
    assert doc["instances"][0] == {"x": [0, 1, 2], "img": [{"b64": base64.b64encode(b"\xff\xd8").decode()}]}
    assert doc["instances"][1]["img"] == ["text"]
    doc = json.loads(encode_tfs_rest(PerfConfig(tfs_format="inputs"), prep2, [x, blob])[0])
    assert doc["inputs"]["x"] == x.tolist() and doc["inputs"]["img"][1] == ["text"]


def test_tfs_grpc_needs_the_package() -> None:
    try:
        import tensorflow_serving.apis  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorflow-serving-api is installed")
    cfg = PerfConfig(protocol="tfs-grpc", inputs=[InputDecl("x", "FP32", [1, 4])], quiet=True, server_stats=False)
    with pytest.raises(PerfError, match="tensorflow-serving-api"):
        asyncio.run(run_sweep_async(cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tfs_rest_against_fake_server() -> None:
    """TF-Serving REST (``POST /v1/models/{m}:predict``) end to end against a tiny aiohttp fake."""
    from aiohttp import web

    seen: list[dict[str, Any]] = []

    async def predict(request: web.Request) -> web.Response:
        assert request.match_info["model"] == "half_plus_two"
        doc = await request.json()
        if len(seen) < 3:
            seen.append(doc)
        rows = doc["instances"]
        return web.json_response({"predictions": [[v / 2 + 2 for v in row] for row in rows]})

    async def scenario() -> dict[str, Any]:
        app = web.Application()
        app.router.add_post("/v1/models/{model}:predict", predict)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            cfg = PerfConfig(
                url=f"127.0.0.1:{port}",
                protocol="tfs-rest",
                model="half_plus_two",
                batch=2,
                inputs=[InputDecl("x", "FP32", [-1, 3])],
                concurrency=[2],
                rate=[100.0],
                window_ms=200,
                max_windows=2,
                stability_windows=2,
                warmup=0.1,
                check_every=1,
                quiet=True,
                progress=False,
            )
            return await run_sweep_async(cfg)
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    for point in report["points"]:
        assert point["requests"] > 0 and point["errors"] == 0, point["error_samples"]
        assert point["server"] is None and point["checked_responses"] > 0
    assert report["request"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]
    assert len(seen[0]["instances"]) == 2 and len(seen[0]["instances"][0]) == 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
