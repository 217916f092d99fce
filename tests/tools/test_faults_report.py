"""The report and table functions of load_tests.faults and load_tests.soak (no servers, no load)."""

from __future__ import annotations

from typing import Any

import pytest

from load_tests.faults import (
    LOST,
    OK,
    Rec,
    endpoint_series,
    first_dispatch,
    first_state,
    format_table,
    last_dispatch,
    rss_summary,
    state_changes,
    summarize,
    table_row,
    timeline,
    verdict,
    write_simple_model,
)
from load_tests.soak import SliceStats, format_report, growth_report, rss_steps, slice_rows, soak_verdict

MIB = 2**20


def rec(intended: float, latency_ms: float, outcome: str = OK, message: str = "") -> Rec:
    return Rec(intended, intended, intended + latency_ms / 1000.0, outcome, message)


def records() -> list[Rec]:
    out = [rec(i * 0.01, 2.0 + i % 10) for i in range(100)]  # ok, 2..11 ms
    out += [rec(1.0, 1.0, "UNAVAILABLE", "node gone"), rec(1.1, 1.0, "UNAVAILABLE", "node gone")]
    out += [rec(1.2, 3.0, "RESOURCE_EXHAUSTED", "queue full"), rec(1.3, 10_000.0, LOST, "no answer")]
    return out


def test_summarize_counts_latency_and_distinct_messages() -> None:
    s = summarize(records())
    assert (s["sent"], s["ok"], s["failed"], s["lost"]) == (104, 100, 3, 1)
    assert s["failed_by_kind"] == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 2}
    assert s["latency_ms"]["p50"] == pytest.approx(7.0)  # successful ones only, from the intended time ("higher")
    assert s["latency_ms"]["p99"] == pytest.approx(11.0)
    assert s["messages"]["UNAVAILABLE"] == [{"message": "node gone", "count": 2}]
    assert s["messages"][LOST][0]["message"] == "no answer"


def test_summarize_caps_distinct_messages() -> None:
    s = summarize([rec(i, 1.0, "UNAVAILABLE", f"m{i}") for i in range(12)], max_messages=3)
    assert len(s["messages"]["UNAVAILABLE"]) == 4 and "9 more" in s["messages"]["UNAVAILABLE"][-1]["message"]


def test_summarize_empty() -> None:
    s = summarize([])
    assert s["sent"] == 0 and s["latency_ms"]["p99"] is None


def result(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"scenario": "stop_node", **summarize(records()), "allowed_failures": ["UNAVAILABLE"]}
    r.update(problems=[], notes=["a | b"], time_to_eject_s=1.234, time_to_recover_s=None)
    r.update(over)
    r["problems_all"] = verdict(r)
    return r


def test_verdict_flags_lost_and_unexpected_kinds_only() -> None:
    problems = result()["problems_all"]
    assert problems == ["1 request(s) lost (no answer within the deadline)", "1 unexpected RESOURCE_EXHAUSTED"]
    clean = summarize([rec(0, 1.0), rec(1, 1.0, "UNAVAILABLE", "gone")])
    assert verdict({**clean, "allowed_failures": ["UNAVAILABLE"]}) == []
    assert verdict({**clean, "allowed_failures": [], "problems": ["did not come back"]}) == [
        "1 unexpected UNAVAILABLE",
        "did not come back",
    ]
    blank = summarize([rec(0, 1.0, "UNAVAILABLE", "")])
    assert verdict({**blank, "allowed_failures": ["UNAVAILABLE"]}) == ["UNAVAILABLE without a message"]


def test_table_row_and_markdown_table() -> None:
    r = result()
    row = table_row(r)
    assert row[:8] == ["stop_node", "104", "100", "3 (RESOURCE_EXHAUSTED 1, UNAVAILABLE 2)", "1", "11.0", "1.23 s", "-"]
    assert row[8].startswith("FAIL: 1 request(s) lost") and row[8].endswith("a | b")
    ok = result(allowed_failures=["UNAVAILABLE", "RESOURCE_EXHAUSTED"], lost=0, notes=[])
    assert table_row(ok)[8] == "PASS"
    lines = format_table([r, ok]).splitlines()
    assert lines[0].startswith("| scenario | sent | ok | failed (by kind) | lost | p99 ms |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|"
    assert len(lines) == 4 and all(line.count("|") == 10 for line in lines)  # a "|" inside a cell is escaped


def samples() -> list[tuple[float, dict[str, dict[str, Any]]]]:
    """node b: serving, stopped at t=1 (counter frozen from 1.2), unhealthy at 2, back at 4, traffic at 5."""
    out = []
    requests = 0
    for i in range(61):
        t = i * 0.1
        if t < 1.2 or t >= 5.0:
            requests += 3
        state = "unhealthy" if 2.0 <= t < 4.0 else "healthy"
        out.append((t, {"a": {"state": "healthy", "requests": i * 5}, "b": {"state": state, "requests": requests}}))
    return out


def test_eject_and_recover_times_from_endpoint_samples() -> None:
    s = samples()
    assert first_state(s, "b", 1.0, healthy=False) == pytest.approx(2.0)
    assert last_dispatch(s, "b", 1.0, 4.0) == pytest.approx(1.1)  # the last sample its counter grew
    assert last_dispatch(s, "a", 1.0, 4.0) == pytest.approx(4.0)
    assert first_state(s, "b", 3.0, healthy=True) == pytest.approx(4.0)
    assert first_dispatch(s, "b", 4.0) == pytest.approx(5.0)
    assert first_dispatch(s, "b", 6.0) is None
    assert last_dispatch(s, "b", 1.25, 4.0) == 1.25  # nothing after the fault: stopped at once
    changes = state_changes(s, 0.0)
    assert [(c["t"], c["endpoint"], c["state"]) for c in changes if c["endpoint"] == "b"] == [
        (0.0, "b", "healthy"),
        (2.0, "b", "unhealthy"),
        (4.0, "b", "healthy"),
    ]


def test_timeline_buckets_by_intended_time() -> None:
    rows = timeline(records(), 0.0)
    assert [r["t"] for r in rows] == [0.0, 1.0]
    assert rows[0]["sent"] == 100 and rows[0]["ok"] == 100 and rows[0]["failed"] == 0
    assert (rows[1]["sent"], rows[1]["failed"], rows[1]["lost"]) == (4, 3, 1)
    assert rows[1]["p99_ms"] is None


def test_rss_summary() -> None:
    s = [{"gateway": 100 * MIB}, {"gateway": 120 * MIB}, {"gateway": 110 * MIB}, {"gateway": None}]
    assert rss_summary(s, "gateway") == {"first_mib": 100.0, "last_mib": 110.0, "max_mib": 120.0, "growth_pct": 10.0}
    assert rss_summary(s, "workers") is None


def test_sleeping_model_config(tmp_path: Any) -> None:
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not really onnx")
    d = write_simple_model(tmp_path / "repo", "bounded", onnx_file, sleep_ms_per_row=10, max_queue_size=16)
    config = (d / "config.pbtxt").read_text()
    assert "default_queue_policy { max_queue_size: 16 }" in config and "count: 1 kind: KIND_CPU" in config
    assert 'key: "sleep_ms_per_row" value { string_value: "10" }' in config
    assert (d / "handler.py").exists() and (d / "1" / "model.onnx").read_bytes() == b"not really onnx"
    plain = write_simple_model(tmp_path / "repo", "simple", onnx_file, dynamic_batching=False)
    assert "dynamic_batching" not in (plain / "config.pbtxt").read_text() and not (plain / "handler.py").exists()


# -- soak ------------------------------------------------------------------------------------------


def test_growth_report_measures_from_after_the_warmup() -> None:
    # 100 MiB at start, jumps to 150 during the warm-up, then +1 MiB per minute for 10 minutes
    s = [{"t": 0.0, "gateway": 100 * MIB}, {"t": 30.0, "gateway": 150 * MIB}]
    s += [{"t": 60.0 + 60 * i, "gateway": (150 + i) * MIB} for i in range(11)]
    g = growth_report(s, "gateway", warmup_s=60.0)
    assert g is not None
    assert (g["first_mib"], g["after_warmup_mib"], g["last_mib"], g["max_mib"]) == (100.0, 150.0, 160.0, 160.0)
    assert g["growth_pct"] == pytest.approx(10 / 150 * 100, abs=0.01)
    assert g["slope_mib_per_hour"] == pytest.approx(60.0, abs=0.01)
    assert g["second_half_growth_pct"] == pytest.approx(5 / 155 * 100, abs=0.01)  # from t=360 s on
    assert g["second_half_slope_mib_per_hour"] == pytest.approx(60.0, abs=0.01)
    # a step early on, then flat: growth overall, none in the second half (a high-water mark, not a leak)
    plateau = [{"t": 60.0 * i, "gateway": (100 if i < 3 else 120) * MIB} for i in range(1, 31)]
    p = growth_report(plateau, "gateway", warmup_s=60.0)
    assert p is not None and p["growth_pct"] == 20.0
    assert p["second_half_growth_pct"] == 0.0 and p["second_half_slope_mib_per_hour"] == pytest.approx(0.0)
    assert growth_report(s, "workers", 60.0) is None
    short = growth_report(s[:2], "gateway", warmup_s=60.0)  # nothing after the warm-up: the last sample
    assert short is not None and short["growth_pct"] == 0.0 and short["slope_mib_per_hour"] is None


def test_slice_stats_and_rows() -> None:
    stats = SliceStats(t0=100.0, slice_s=60.0)
    for i in range(120):  # 2 per second for 60 s, 5 ms each
        stats(100.0 + i * 0.5, 100.0 + i * 0.5, 100.0 + i * 0.5 + 0.005, OK, "")
    stats(170.0, 170.0, 170.001, "CANCELLED", "CANCELLED")
    stats(171.0, 171.0, 181.0, LOST, "no answer")
    stats(172.0, 172.0, 172.050, OK, "")
    rows = slice_rows(stats.slices, 60.0, end_s=90.0)
    assert [(r["from_min"], r["to_min"]) for r in rows] == [(0.0, 1.0), (1.0, 1.5)]
    assert (rows[0]["sent"], rows[0]["ok"], rows[0]["throughput_rps"]) == (120, 120, 2.0)
    assert rows[0]["p50_ms"] == pytest.approx(5.0, rel=0.01) and rows[0]["p99_ms"] == pytest.approx(5.0, rel=0.01)
    assert rows[1]["errors"] == {"CANCELLED": 1} and rows[1]["lost"] == 1 and rows[1]["ok"] == 1
    assert stats.errors == {"CANCELLED": 1, LOST: 1} and stats.samples["CANCELLED"] == "CANCELLED"
    folded = SliceStats(t0=0.0, slice_s=60.0, duration_s=120.0)
    for t in (1.0, 61.0, 120.001, 120.5):  # due just past the end: counted in the last slice
        folded(t, t, t + 0.001, OK, "")
    assert sorted(folded.slices) == [0, 1] and folded.slices[1]["ok"] == 3


def soak_report(growth: float, errors: int = 0) -> dict[str, Any]:
    mem = {
        "first_mib": 70.0,
        "after_warmup_mib": 80.0,
        "last_mib": 80.0 * (1 + growth / 100),
        "max_mib": 90.0,
        "growth_pct": growth,
        "slope_mib_per_hour": 1.5,
        "after_warmup_t_s": 60.0,
    }
    return {
        "config": {
            "model": "simple",
            "instances": 1,
            "rate": 1000.0,
            "warmup_s": 60.0,
            "growth_target_pct": 5.0,
            "request_timeout_s": 10.0,
            "sample_s": 10.0,
        },
        "capacity": {"throughput_rps": 2000.0, "concurrency": 16},
        "duration_s": 1800.0,
        "machine": {"cpu_count": 2, "loadavg_start": [1.0, 1.0, 1.0]},
        "memory": {"gateway": mem, "workers": dict(mem, growth_pct=0.5), "total": mem, "client": mem},
        "totals": {
            "sent": 10,
            "ok": 10 - errors,
            "errors": errors,
            "errors_by_kind": {"CANCELLED": errors} if errors else {},
            "lost": 0,
            "delayed_by_cap": 0,
        },
        "slices": [
            {
                "from_min": 0.0,
                "to_min": 5.0,
                "sent": 10,
                "ok": 10,
                "errors": {},
                "lost": 0,
                "throughput_rps": 1000.0,
                "p50_ms": 1.5,
                "p99_ms": 4.0,
                "max_ms": 9.0,
            }
        ],
        "samples": [{"cpu_busy_pct": 50.0}, {"cpu_busy_pct": 70.0}],
    }


def test_soak_verdict_and_report_text() -> None:
    good = soak_report(1.0)
    good["problems"] = soak_verdict(good)
    assert good["problems"] == []
    text = format_report(good)
    assert "| gateway | 70.0 | 80.0 | 80.8 | 90.0 | +1.00% | +1.50 |" in text
    assert "| 0-5 | 10 | 10 | 0 | 0 | 1000.0 | 1.500 | 4.000 | 9.0 |" in text
    assert "half the measured capacity 2000 req/s" in text and text.rstrip().endswith("verdict: PASS")
    bad = soak_report(7.5, errors=2)
    bad["problems"] = soak_verdict(bad)
    assert bad["problems"] == [
        "gateway RSS grew 7.5% after the warm-up (target < 5%)",
        "2 error(s): {'CANCELLED': 2}",
    ]
    assert "verdict: FAIL: gateway RSS grew 7.5%" in format_report(bad)


def test_rss_steps_line_up_with_what_happened() -> None:
    s = [
        {"t": 0.0, "gateway": 100 * MIB, "errors": 0},
        {"t": 10.0, "gateway": 100.5 * MIB, "errors": 0, "peak_inflight": 3},
        {"t": 20.0, "gateway": 110 * MIB, "errors": 40, "peak_inflight": 1500, "client_lag_max_ms": 900.0},
        {"t": 30.0, "gateway": 109 * MIB, "errors": 40},
    ]
    assert rss_steps(s) == [
        {
            "t": 20.0,
            "rise_mib": 9.5,
            "to_mib": 110.0,
            "peak_inflight": 1500,
            "new_errors": 40,
            "client_lag_max_ms": 900.0,
        }
    ]
    report = soak_report(1.0)
    report["samples"] = s
    report["problems"] = []
    assert "20 s: +9.5 -> 110.0 MiB; peak in flight 1500, 40 new errors, client loop stall max 900 ms" in (
        format_report(report)
    )


def test_endpoint_series_keeps_every_state_change() -> None:
    series = endpoint_series(samples(), "b", t0=0.0, step=0.5)
    assert series["fields"][:3] == ["t", "state", "requests"] and series["step_s"] == 0.5
    times = [row[0] for row in series["rows"]]
    assert times[:3] == [0.0, 0.5, 1.0] and 2.0 in times and 4.0 in times
    assert all(row[1] in ("healthy", "unhealthy") for row in series["rows"])
