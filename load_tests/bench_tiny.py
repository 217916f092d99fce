"""Tiny-model benchmark: ``dl-inference serve`` against the bare reference server, same machine, same model.

What it does:

1. writes the example repository (``dl_inference.examples``) into a temp dir and keeps only ``simple``
   (x FP32 [-1,16] -> y FP32 [-1,4]);
2. starts, as subprocesses on free ports, ``load_tests.bare_server`` on that model and
   ``dl-inference serve`` on that repository, and waits until each says ServerReady and
   ModelReady('simple') over gRPC (a server that dies or times out stops the bench with the tail of
   its log);
3. runs ``load_tests.loadgen`` (a subprocess each time) over gRPC at each concurrency, alternating
   targets round by round (bare, ours, bare, ours, ...) so drift on the machine hits both alike;
   then ours over HTTP JSON once per concurrency as an extra row;
4. times the model in-process (onnxruntime ``session.run`` on batch 1 in a tight loop, one thread,
   the same session options as the servers) - the floor under any server;
5. prints a table of medians across rounds (target | conc | req/s | p50 ms | p99 ms) and the ratios
   ours/bare: p50 at the lowest concurrency (target <= 1.3) and throughput at the highest
   (target >= 0.8); writes everything, per-round runs included, as JSON.

Run from the repository root (about 3-4 minutes with the defaults)::

    python -m load_tests.bench_tiny [--duration 10] [--rounds 3] [--json load_tests/results/bench_tiny.json]
    python -m load_tests.bench_tiny --targets bare --rounds 1 --duration 3     # reference only
    python -m load_tests.bench_tiny --check      # exit 1 when a ratio misses its target

Subprocesses are always stopped (whole process group: the server's workers too), on errors and on
Ctrl-C as well. The numbers depend on the machine: the client shares it with the servers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.lib.load import run_loadgen
from load_tests.lib.report import BUSY_LOADAVG, int_list, machine_info, num, ratio, round_medians, write_json
from load_tests.lib.server import (
    REPO_ROOT,
    Server,
    free_port,
    ours_command,
    run_in_workdir,
    start_server,
    stop_server,
    wait_ready,
)

MODEL = "simple"
P50_RATIO_TARGET = 1.3  # ours/bare p50 at the lowest concurrency: at most this
RPS_RATIO_TARGET = 0.8  # ours/bare throughput at the highest concurrency: at least this
DESIGN_REFERENCE = "DESIGN.md reference, bare server on the 2-core dev box: p50 0.56 ms at c=1, 2,700 req/s at c=16"


def ort_inprocess(model_path: Path, duration: float) -> dict[str, Any]:
    """session.run on batch 1 in a tight single-threaded loop: latency percentiles and throughput."""
    from load_tests.bare_server import make_session

    session = make_session(model_path)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    feeds = {name: x}
    for _ in range(500):
        session.run(None, feeds)
    clock = time.perf_counter
    lat: list[float] = []
    t_begin = clock()
    t_end = t_begin + duration
    while True:
        t0 = clock()
        if t0 >= t_end:
            break
        session.run(None, feeds)
        lat.append(clock() - t0)
    elapsed = clock() - t_begin
    ms = np.asarray(lat) * 1000.0
    return {
        "calls": len(lat),
        "duration_s": elapsed,
        "throughput_rps": len(lat) / elapsed,
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()),
            "max": float(ms.max()),
        },
    }


def median_row(target: str, concurrency: int, reports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "target": target,
        "concurrency": concurrency,
        **round_medians(reports),
        "errors": sum(r["errors"] for r in reports),
        "throughput_rps_each": [round(r["throughput_rps"], 1) for r in reports],
        "p50_ms_each": [None if r["latency_ms"]["p50"] is None else round(r["latency_ms"]["p50"], 3) for r in reports],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'target':<14} | {'conc':>4} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r['target']:<14} | {r['concurrency']:>4} | {num(r['throughput_rps'], '8.1f')} | "
            f"{num(r['p50_ms'], '7.3f')} | {num(r['p99_ms'], '7.3f')} | {r.get('errors', 0):>6}"
        )
    return "\n".join(lines)


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from dl_inference.examples import make_example_repository

    make_example_repository(workdir / "all_examples")
    repo = workdir / "repo"
    repo.mkdir()
    shutil.copytree(workdir / "all_examples" / MODEL, repo / MODEL)  # serve only the benchmark model
    model_path = repo / MODEL / "1" / "model.onnx"
    concurrencies: list[int] = args.concurrency
    targets: list[str] = args.targets

    servers: dict[str, Server] = {}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "concurrency": concurrencies,
            "targets": targets,
            "http": args.http,
            "model": MODEL,
        },
        "runs": [],
    }
    try:
        if "bare" in targets:
            port = free_port()
            servers["bare"] = start_server(
                "bare server",
                [
                    sys.executable,
                    "-m",
                    "load_tests.bare_server",
                    "--model",
                    str(model_path),
                    "--port",
                    str(port),
                ],
                workdir / "bare.log",
                f"127.0.0.1:{port}",
            )
        if "ours" in targets:
            grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
            servers["ours"] = start_server(
                "dl-inference serve",
                ours_command(repo, grpc_port, http_port, metrics_port),
                workdir / "ours.log",
                f"127.0.0.1:{grpc_port}",
                f"127.0.0.1:{http_port}",
            )
        for server in servers.values():
            took = wait_ready(server, args.ready_timeout)
            print(
                f"{server.name} ready in {took:.1f} s (gRPC {server.grpc_url}, pid {server.proc.pid})",
                flush=True,
            )

        scratch = workdir / "loadgen.json"
        by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rnd in range(1, args.rounds + 1):
            for key in targets:
                for conc in concurrencies:
                    rep = run_loadgen(servers[key].grpc_url, "grpc", conc, args.duration, args.warmup, scratch)
                    rep.update(round=rnd, target=key)
                    result["runs"].append(rep)
                    by_key.setdefault((key, conc), []).append(rep)
                    print(f"  round {rnd} {key:<4} {_short(rep)}", flush=True)
        if args.http and "ours" in servers:
            http_url = servers["ours"].http_url
            assert http_url is not None
            for conc in concurrencies:
                rep = run_loadgen(http_url, "http", conc, args.duration, args.warmup, scratch)
                rep.update(round=1, target="ours-http")
                result["runs"].append(rep)
                by_key.setdefault(("ours-http", conc), []).append(rep)
                print(f"  http    ours {_short(rep)}", flush=True)
    finally:
        for server in servers.values():
            stop_server(server)

    print("  in-process onnxruntime ...", flush=True)
    result["ort_inprocess"] = ort_inprocess(model_path, args.ort_duration)

    rows = [median_row(k, c, reps) for (k, c), reps in by_key.items()]
    order = {"bare": 0, "ours": 1, "ours-http": 2}
    rows.sort(key=lambda r: (order.get(r["target"], 9), r["concurrency"]))
    ort = result["ort_inprocess"]
    rows.append(
        {
            "target": "ort in-process",
            "concurrency": 1,
            "rounds": 1,
            "throughput_rps": ort["throughput_rps"],
            "p50_ms": ort["latency_ms"]["p50"],
            "p99_ms": ort["latency_ms"]["p99"],
            "errors": 0,
        }
    )
    result["summary"] = rows

    cell = {(r["target"], r["concurrency"]): r for r in rows}
    lo, hi = min(concurrencies), max(concurrencies)
    ratios: dict[str, Any] = {}
    if ("bare", lo) in cell and ("ours", lo) in cell:
        value = ratio(cell[("ours", lo)]["p50_ms"], cell[("bare", lo)]["p50_ms"])
        ratios[f"p50_c{lo}"] = {
            "value": value,
            "target": f"<= {P50_RATIO_TARGET}",
            "met": value is not None and value <= P50_RATIO_TARGET,
        }
    if ("bare", hi) in cell and ("ours", hi) in cell:
        value = ratio(cell[("ours", hi)]["throughput_rps"], cell[("bare", hi)]["throughput_rps"])
        ratios[f"throughput_c{hi}"] = {
            "value": value,
            "target": f">= {RPS_RATIO_TARGET}",
            "met": value is not None and value >= RPS_RATIO_TARGET,
        }
    result["ratios_ours_over_bare"] = ratios
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _short(rep: dict[str, Any]) -> str:
    lat = rep["latency_ms"]
    p50 = "-" if lat["p50"] is None else f"{lat['p50']:.3f}"
    p99 = "-" if lat["p99"] is None else f"{lat['p99']:.3f}"
    cpu = rep.get("client_cpu_util")
    client = "" if cpu is None else f"  (client cpu {cpu:.2f} cores)"
    return (
        f"{rep['protocol']:<4} c={rep['concurrency']:<3} {rep['throughput_rps']:8.1f} req/s  "
        f"p50 {p50} ms  p99 {p99} ms  errors {rep['errors']}{client}"
    )


def report_text(result: dict[str, Any]) -> str:
    lines = ["", format_table(result["summary"]), ""]
    for name, r in result["ratios_ours_over_bare"].items():
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        lines.append(f"ours/bare {name}: {value} (target {r['target']}: {'met' if r['met'] else 'MISSED'})")
    load = result["machine"]["loadavg_start"][0]
    lines.append(f"({DESIGN_REFERENCE}; 1-min load average {load:.2f} at start)")
    if load > BUSY_LOADAVG:
        lines.append("WARNING: the machine was busy when the bench started; numbers are noisy, rerun when idle")
    return "\n".join(lines)


def _targets(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = set(names) - {"bare", "ours"}
    if bad or not names:
        raise argparse.ArgumentTypeError(f"targets are bare and/or ours, got {text!r}")
    return [n for n in ("bare", "ours") if n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_tiny", description="bare server vs dl-inference serve")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per target")
    p.add_argument("--concurrency", type=int_list, default=[1, 16], help="comma list (default 1,16)")
    p.add_argument("--targets", type=_targets, default=["bare", "ours"], help="bare,ours (default both)")
    p.add_argument("--no-http", dest="http", action="store_false", help="skip the ours-over-HTTP rows")
    p.add_argument("--ort-duration", type=float, default=3.0, help="seconds of the in-process ORT loop")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for each server")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "load_tests" / "results" / "bench_tiny.json")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server logs (kept on errors)")
    p.add_argument("--check", action="store_true", help="exit 1 when a ratio misses its target")
    args = p.parse_args(argv)

    result = run_in_workdir("bench_tiny", args.keep_logs, lambda workdir: bench(args, workdir))
    if result is None:
        return 2
    print(report_text(result))
    write_json(result, args.json)
    missed = [k for k, r in result["ratios_ours_over_bare"].items() if not r["met"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
