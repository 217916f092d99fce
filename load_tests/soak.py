"""Soak test: a long open-loop run at half capacity, watching memory, errors and latency drift.

Run from the repository root (``make soak``)::

    python -m load_tests.soak                     # 30 minutes at half the measured capacity
    python -m load_tests.soak --minutes 2         # a short run (1-minute slices)
    python -m load_tests.soak --rate 500 --minutes 60

What it does: serves the example ``simple`` model (``dl-inference serve``, one worker instance,
free ports, temp dir); measures its capacity (closed loop, ``--capacity-concurrency`` clients for
``--capacity-seconds``) unless ``--rate`` is given, and sends half of it open loop
(``load_tests.faults.OpenLoop``: constant arrival, pre-serialized gRPC requests, latency from the
intended send time, a ``--request-timeout`` deadline per request; no per-request records are kept,
so the client's own memory stays flat). Every ``--sample-s`` (10) seconds it reads the RSS of the
gateway and of every process below it (its workers) from /proc, its own RSS, and how busy the
machine's CPUs were.

Report: RSS first / after the warm-up minute / last / max and growth % from the first sample after
the warm-up to the last one (target: under ``--growth-target`` = 5 %, gateway and workers each),
plus a least-squares slope in MiB/hour over the same span; errors by kind, lost requests; p50/p99
per ``--slice-minutes`` slice (5; 1 for runs shorter than 10 minutes). JSON + text to ``--json`` /
``--txt`` (default ``load_tests/results/soak.{json,txt}``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from load_tests.faults import (
    LOST,
    OK,
    RESULTS,
    GrpcSender,
    MachineWatch,
    OpenLoop,
    clock,
    closed_loop,
    example_model_file,
    start_gateway,
    write_simple_model,
)
from load_tests.histogram import Histogram
from load_tests.lib.procs import cpu_times, rss_bytes, tree_rss
from load_tests.lib.report import machine_info, to_json, write_json_and_text
from load_tests.lib.server import BenchError, Server, stop_server
from load_tests.loadgen import run_coroutine

MODEL = "simple"
GROWTH_TARGET_PCT = 5.0


class SliceStats:
    """Per-slice counters and latency histogram, fed one finished request at a time."""

    def __init__(self, t0: float, slice_s: float, duration_s: float | None = None) -> None:
        self.t0 = t0
        self.slice_s = slice_s
        # requests due in the last moments past the duration belong to the last slice, not a new one
        self.last = None if duration_s is None else max(0, int(-(-duration_s // slice_s)) - 1)
        self.slices: dict[int, dict[str, Any]] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, str] = {}
        self.done = 0

    def _slice(self, index: int) -> dict[str, Any]:
        s = self.slices.get(index)
        if s is None:
            s = self.slices[index] = {"sent": 0, "ok": 0, "lost": 0, "errors": collections.Counter(),
                                      "hist": Histogram()}  # fmt: skip
        return s

    def __call__(self, intended: float, sent: float, done: float, outcome: str, message: str) -> None:
        index = max(0, int((intended - self.t0) // self.slice_s))
        s = self._slice(index if self.last is None else min(index, self.last))
        s["sent"] += 1
        self.done += 1
        if outcome == OK:
            s["ok"] += 1
            s["hist"].record(max(0, int((done - intended) * 1e9)))
            return
        if outcome == LOST:
            s["lost"] += 1
        else:
            s["errors"][outcome] += 1
        self.errors[outcome] += 1
        self.samples.setdefault(outcome, message[:300])


def slice_rows(slices: dict[int, dict[str, Any]], slice_s: float, end_s: float) -> list[dict[str, Any]]:
    """One row per slice: its span in minutes, counts, throughput, p50/p99/max of successful requests."""
    rows = []
    for index in sorted(slices):
        s = slices[index]
        start = index * slice_s
        span = max(1e-9, min(end_s, start + slice_s) - start)
        hist: Histogram = s["hist"]
        p50, p99 = hist.percentile(50), hist.percentile(99)
        rows.append(
            {
                "from_min": round(start / 60, 2),
                "to_min": round(min(end_s, start + slice_s) / 60, 2),
                "sent": s["sent"],
                "ok": s["ok"],
                "errors": dict(s["errors"]),
                "lost": s["lost"],
                "throughput_rps": round(s["ok"] / span, 1),
                "p50_ms": None if p50 is None else round(p50 / 1e6, 3),
                "p99_ms": None if p99 is None else round(p99 / 1e6, 3),
                "max_ms": None if hist.max is None else round(hist.max / 1e6, 3),
            }
        )
    return rows


def growth_report(samples: Sequence[dict[str, Any]], key: str, warmup_s: float) -> dict[str, Any] | None:
    """RSS of one series (bytes in ``samples[i][key]``, time in ``samples[i]["t"]``): first, after
    the warm-up, last, max (MiB), growth % from the first sample at or after ``warmup_s`` to the last,
    and the least-squares slope over that span in MiB/hour."""
    series = [(s["t"], s[key]) for s in samples if s.get(key)]
    if not series:
        return None
    after = [(t, v) for t, v in series if t >= warmup_s] or series[-1:]
    base_t, base = after[0]
    last = series[-1][1]
    slope = None
    if len(after) >= 3:
        ts = np.array([t for t, _ in after], dtype=np.float64)
        vs = np.array([v for _, v in after], dtype=np.float64) / 2**20
        slope = float(np.polyfit(ts, vs, 1)[0] * 3600.0)
    mib = 2**20
    half = [(t, v) for t, v in after if t >= (after[0][0] + series[-1][0]) / 2]
    half_slope = None
    if len(half) >= 3:
        hs = np.polyfit(np.array([t for t, _ in half]), np.array([v for _, v in half]) / mib, 1)[0]
        half_slope = round(float(hs * 3600.0), 2)
    return {
        "first_mib": round(series[0][1] / mib, 2),
        "after_warmup_mib": round(base / mib, 2),
        "after_warmup_t_s": base_t,
        "last_mib": round(last / mib, 2),
        "max_mib": round(max(v for _, v in series) / mib, 2),
        "growth_pct": round((last - base) / base * 100.0, 2),
        "slope_mib_per_hour": None if slope is None else round(slope, 2),
        # the second half of that span alone: a leak keeps growing there, a high-water mark does not
        "second_half_growth_pct": round((last - half[0][1]) / half[0][1] * 100.0, 2) if half else None,
        "second_half_slope_mib_per_hour": half_slope,
    }


def rss_steps(samples: Sequence[dict[str, Any]], key: str = "gateway", min_mib: float = 1.0) -> list[dict[str, Any]]:
    """Samples where ``key``'s RSS rose by at least ``min_mib`` since the previous one, with what else
    happened in that interval: peak requests in flight, new errors, the client's longest loop stall."""
    out = []
    for prev, cur in itertools.pairwise(samples):
        if prev.get(key) and cur.get(key) and cur[key] - prev[key] >= min_mib * 2**20:
            out.append(
                {
                    "t": cur["t"],
                    "rise_mib": round((cur[key] - prev[key]) / 2**20, 2),
                    "to_mib": round(cur[key] / 2**20, 2),
                    "peak_inflight": cur.get("peak_inflight"),
                    "new_errors": cur.get("errors", 0) - prev.get("errors", 0),
                    "client_lag_max_ms": cur.get("client_lag_max_ms"),
                }
            )
    return out


def soak_verdict(report: dict[str, Any]) -> list[str]:
    problems = []
    target = report["config"]["growth_target_pct"]
    for key in ("gateway", "workers"):
        g = report["memory"].get(key)
        if g is not None and g["growth_pct"] >= target:
            problems.append(f"{key} RSS grew {g['growth_pct']:.1f}% after the warm-up (target < {target:g}%)")
    if report["totals"]["errors"]:
        problems.append(f"{report['totals']['errors']} error(s): {report['totals']['errors_by_kind']}")
    if report["totals"]["lost"]:
        problems.append(f"{report['totals']['lost']} request(s) lost")
    return problems


def _num(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    cap = report.get("capacity")
    how = (
        f"half the measured capacity {cap['throughput_rps']:.0f} req/s (closed loop c={cap['concurrency']})"
        if cap
        else "--rate"
    )
    lines = [
        f"soak: {report['duration_s'] / 60:.1f} min of '{cfg['model']}' at {cfg['rate']:.0f} req/s open loop ({how}); "
        f"{cfg['instances']} worker instance(s), deadline {cfg['request_timeout_s']:g} s, "
        f"{report['machine'].get('cpu_count')} CPUs, load average {report['machine'].get('loadavg_start')} at start",
        "",
        f"RSS (MiB), growth from the first sample after {cfg['warmup_s']:g} s to the last "
        f"(target < {cfg['growth_target_pct']:g}% for gateway and workers):",
        "| process | first | after warm-up | last | max | growth | slope MiB/h | 2nd half: growth | slope MiB/h |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("gateway", "workers", "total", "client"):
        g = report["memory"].get(key)
        if g:
            lines.append(
                f"| {key} | {g['first_mib']:.1f} | {g['after_warmup_mib']:.1f} | {g['last_mib']:.1f} | "
                f"{g['max_mib']:.1f} | {g['growth_pct']:+.2f}% | {_num(g['slope_mib_per_hour'], '+.2f')} | "
                f"{_num(g.get('second_half_growth_pct'), '+.2f')}% | "
                f"{_num(g.get('second_half_slope_mib_per_hour'), '+.2f')} |"
            )
    t = report["totals"]
    if report.get("stalls_at_s"):
        lines.append(f"gateway SIGSTOPped for {cfg['stall_s']:g} s at (s): {report['stalls_at_s']}")
    lines += [
        "",
        f"requests: {t['sent']} sent, {t['ok']} ok, {t['errors']} errors {t['errors_by_kind'] or ''}, "
        f"{t['lost']} lost; {t['delayed_by_cap']} held back by the in-flight cap",
        "",
        "| minutes | sent | ok | errors | lost | req/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["slices"]:
        errors = sum(r["errors"].values())
        lines.append(
            f"| {r['from_min']:g}-{r['to_min']:g} | {r['sent']} | {r['ok']} | {errors} | {r['lost']} | "
            f"{r['throughput_rps']:.1f} | {_num(r['p50_ms'], '.3f')} | {_num(r['p99_ms'], '.3f')} | "
            f"{_num(r['max_ms'], '.1f')} |"
        )
    for kind, message in report.get("error_samples", {}).items():
        lines.append(f"  {kind}: {message}")
    steps = rss_steps(report["samples"])
    if steps:
        lines += ["", "gateway RSS rises of 1 MiB or more between two samples, and what happened meanwhile:"]
        for st in steps:
            lines.append(
                f"  {st['t']:7.0f} s: +{st['rise_mib']:.1f} -> {st['to_mib']:.1f} MiB; peak in flight "
                f"{_num(st['peak_inflight'], 'd')}, {st['new_errors']} new errors, client loop stall max "
                f"{_num(st['client_lag_max_ms'], '.0f')} ms"
            )
    busy = [s["cpu_busy_pct"] for s in report["samples"] if s.get("cpu_busy_pct") is not None]
    if busy:
        lines.append(
            f"\nmachine CPU busy (all cores) per {cfg['sample_s']:g} s sample: mean {np.mean(busy):.0f}%, "
            f"max {max(busy):.0f}%"
        )
    problems = report["problems"]
    lines.append("\nverdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    return "\n".join(lines) + "\n"


async def soak(gw: Server, args: argparse.Namespace) -> dict[str, Any]:
    from load_tests.faults import request_body

    body, check = request_body(MODEL)
    sender = GrpcSender(gw.grpc_url, body, args.request_timeout, check)
    await sender.open()
    capacity = None
    rate = args.rate
    if rate is None:
        print(f"soak: measuring capacity ({args.capacity_concurrency} clients, {args.capacity_seconds:g} s) ...")
        capacity = await closed_loop(sender, args.capacity_concurrency, args.capacity_seconds, warmup=2.0)
        if capacity["throughput_rps"] <= 0:
            raise BenchError(f"capacity measurement failed: {capacity}")
        rate = capacity["throughput_rps"] / 2
        print(f"soak: capacity {capacity['throughput_rps']:.0f} req/s -> {rate:.0f} req/s", flush=True)
    duration = args.minutes * 60.0
    slice_s = (args.slice_minutes or (5.0 if args.minutes >= 10 else 1.0)) * 60.0
    t0 = clock() + 0.05
    stats = SliceStats(t0, slice_s, duration)
    loop = OpenLoop(sender, rate, timeout=args.request_timeout, sink=stats)
    watch = MachineWatch().start()
    loop.start(t0)
    stalls: list[float] = []
    staller = asyncio.get_running_loop().create_task(stall_gateway(gw, args, t0, duration, stalls))
    samples: list[dict[str, Any]] = []
    cpu_prev = cpu_times()
    next_t = t0
    while True:
        now = clock()
        s = tree_rss(gw.proc.pid)
        s["client"] = rss_bytes(os.getpid())
        busy, total = cpu_times()
        s["cpu_busy_pct"] = round(100.0 * (busy - cpu_prev[0]) / max(1, total - cpu_prev[1]), 1) if samples else None
        cpu_prev = (busy, total)
        s.update(t=round(now - t0, 2), done=stats.done, errors=sum(stats.errors.values()), inflight=len(loop.inflight))
        s["peak_inflight"], loop.peak_inflight = loop.peak_inflight, len(loop.inflight)
        s["client_lag_max_ms"] = round(max(watch.lags_ms, default=0.0), 1)
        watch.lags_ms.clear()
        samples.append(s)
        print(
            f"soak {s['t']:7.0f} s: gateway {(s['gateway'] or 0) / 2**20:6.1f} MiB, workers "
            f"{s['workers'] / 2**20:6.1f} MiB, client {(s['client'] or 0) / 2**20:6.1f} MiB, "
            f"{s['done']} done, {s['errors']} errors, in flight {s['inflight']} (peak {s['peak_inflight']}), "
            f"client lag max {s['client_lag_max_ms']:.0f} ms, CPU {s['cpu_busy_pct']}%",
            flush=True,
        )
        if gw.proc.poll() is not None:
            print(f"soak: the gateway exited with {gw.proc.returncode}", flush=True)
            break
        if now - t0 >= duration:
            break
        next_t += args.sample_s
        await asyncio.sleep(max(0.0, min(next_t, t0 + duration) - clock()))
    end_s = clock() - t0
    staller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await staller
    await watch.stop()
    await loop.stop()
    await sender.close()
    total_errors = sum(v for k, v in stats.errors.items() if k != LOST)
    report: dict[str, Any] = {
        "tool": "load_tests.soak",
        "config": {
            "model": MODEL,
            "instances": args.instances,
            "rate": rate,
            "minutes": args.minutes,
            "warmup_s": args.warmup_minutes * 60.0,
            "slice_s": slice_s,
            "sample_s": args.sample_s,
            "request_timeout_s": args.request_timeout,
            "growth_target_pct": args.growth_target,
            "server_settings": list(getattr(args, "server_setting", [])),
            "stall_every_s": args.stall_every,
            "stall_s": args.stall_s,
        },
        "capacity": capacity,
        "duration_s": round(end_s, 1),
        "totals": {
            "sent": loop.sent,
            "ok": sum(s["ok"] for s in stats.slices.values()),
            "errors": total_errors,
            "errors_by_kind": {k: v for k, v in stats.errors.items() if k != LOST},
            "lost": stats.errors.get(LOST, 0),
            "delayed_by_cap": loop.delayed,
        },
        "memory": {
            key: growth_report(samples, key, args.warmup_minutes * 60.0)
            for key in ("gateway", "workers", "total", "client")
        },
        "slices": slice_rows(stats.slices, slice_s, end_s),
        "stalls_at_s": stalls,
        "error_samples": stats.samples,
        "samples": samples,
    }
    return report


async def stall_gateway(gw: Server, args: argparse.Namespace, t0: float, duration: float, out: list[float]) -> None:
    """``--stall-every``: SIGSTOP the gateway for ``--stall-s`` seconds every ``--stall-every`` seconds
    (after the warm-up, not in the last minute): the scheduler stalls of a busy machine, on purpose."""
    if not args.stall_every:
        return
    t = t0 + args.warmup_minutes * 60.0 + args.stall_every
    while t + 60.0 < t0 + duration:
        await asyncio.sleep(max(0.0, t - clock()))
        out.append(round(clock() - t0, 2))
        os.kill(gw.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(args.stall_s)
        finally:
            os.kill(gw.proc.pid, signal.SIGCONT)
        t += args.stall_every


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.soak",
        description="Long open-loop run at half capacity: RSS growth, errors, latency per slice.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: half the measured capacity)")
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--capacity-seconds", type=float, default=5.0)
    p.add_argument("--instances", type=int, default=1, help="worker instances of the model")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--slice-minutes", type=float, default=None, help="latency slices (default 5; 1 under 10 min)")
    p.add_argument("--warmup-minutes", type=float, default=1.0, help="growth is measured from after this")
    p.add_argument("--growth-target", type=float, default=GROWTH_TARGET_PCT, help="RSS growth limit, %%")
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--stall-every", type=float, default=0.0, metavar="S",
                   help="SIGSTOP the gateway every S seconds after the warm-up (0: never)")  # fmt: skip
    p.add_argument("--stall-s", type=float, default=1.5, help="how long each --stall-every stall lasts")
    p.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    p.add_argument("--txt", type=Path, default=RESULTS / "soak.txt")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument(
        "--server-setting", action="append", default=[], metavar="KEY=VALUE",
        help="a gateway setting (YAML value), e.g. memory_trim_interval_s=0; repeatable",
    )  # fmt: skip
    p.add_argument("--from-json", type=Path, default=None, metavar="REPORT",
                   help="print (and write --txt) the report of a saved --json run; no load")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        warmup = saved["config"]["warmup_s"]
        saved["memory"] = {
            k: growth_report(saved["samples"], k, warmup) for k in ("gateway", "workers", "total", "client")
        }
        saved["problems"] = soak_verdict(saved)
        text = format_report(saved)
        print(text)
        args.txt.write_text(text)
        return 0 if not saved["problems"] else 1
    machine = machine_info()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    workdir = Path(tempfile.mkdtemp(prefix="dl_soak_"))
    gw: Server | None = None
    try:
        repo = workdir / "repo"
        write_simple_model(repo, MODEL, example_model_file(workdir), instances=args.instances, dynamic_batching=False)
        settings = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.server_setting)}
        gw = start_gateway(workdir, "gateway-soak", repo, [MODEL], config=settings or None)
        report = run_coroutine(soak(gw, args))
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        if gw is not None:
            with contextlib.suppress(Exception):
                stop_server(gw)
        if args.keep_logs:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    report["machine"] = machine
    report["started_at"] = started_at
    report["problems"] = soak_verdict(report)
    text = format_report(report)
    print("\n" + text)
    write_json_and_text(args.json, to_json(report) + "\n", args.txt, text)
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
