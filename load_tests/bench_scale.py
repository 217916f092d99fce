"""Scaling the front door over cores: ``serve --frontends N`` against N bare processes on one port.

The tiny ``simple`` model (x FP32 [1,16] -> y FP32 [1,4]) with ``--instances`` worker instances is
served by ``dl-inference serve --frontends F`` for each F in ``--frontends`` (default 1 and the
number of cores / 2), and, as the yardstick, by ``--bare`` copies of ``load_tests.bare_server``
sharing one port with SO_REUSEPORT (one process each: gRPC + ONNX Runtime in-process, no hop).

Load comes from ``--procs`` client processes (``load_tests.loadgen``, one gRPC connection each, ``--conc``
requests in flight each), so it is not one Python client that saturates: the kernel spreads those
connections over the server's processes. Each target runs ``--rounds`` times, alternating; the table
shows median aggregate throughput (sum over client processes) and median p50/p99 (each over every
request of a round; ``loadgen --processes`` merges them), and the
ratios the issue asks for: ours with the most frontends / ours with one (target >= 5 on 16 cores
with 8 frontends), and / the bare processes (target >= 0.6).

Run from the repository root (the client processes share the machine with the server)::

    python -m load_tests.bench_scale [--frontends 1,8] [--bare 8] [--instances 8] [--procs 8]
        [--json load_tests/results/bench_scale.json]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from load_tests.lib.load import run_loadgen
from load_tests.lib.report import finish, machine_info
from load_tests.lib.server import Server, free_port, ours_command, run_in_workdir, start_server, stop_server, wait_ready

MODEL = "simple"


def write_repo(root: Path, instances: int) -> Path:
    from dl_inference.examples import make_example_repository

    examples = root / "examples"
    make_example_repository(examples)
    repo = root / "repo"
    shutil.copytree(examples / MODEL, repo / MODEL)
    config = repo / MODEL / "config.pbtxt"
    text = re.sub(r"instance_group\s*\{[^}]*\}", "", config.read_text())  # this bench sets its own
    config.write_text(text + f"\ninstance_group {{ count: {instances} kind: KIND_CPU }}\n")
    return repo


def parallel_load(url: str, procs: int, conc: int, duration: float, warmup: float, work: Path) -> dict[str, Any]:
    """``loadgen --processes procs`` (one connection each, ``conc`` in flight each): summed throughput,
    latency percentiles over every request."""
    report = run_loadgen(url, "grpc", procs * conc, duration, warmup, work / "load.json", MODEL,
                         ("--processes", str(procs)))  # fmt: skip
    return {
        "throughput_rps": report["throughput_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "errors": report["errors"],
        "requests": report["requests"],
    }


def start_ours(repo: Path, frontends: int, work: Path) -> Server:
    grpc_port, http_port = free_port(), free_port()
    cmd = [*ours_command(repo, grpc_port, http_port, free_port()), "--frontends", str(frontends)]
    server = start_server(f"ours --frontends {frontends}", cmd, work / f"ours{frontends}.log", f"127.0.0.1:{grpc_port}")
    wait_ready(server, 180)
    return server


def start_bare(repo: Path, copies: int, work: Path) -> list[Server]:
    port = free_port()
    model = repo / MODEL / "1" / "model.onnx"
    servers = []
    for i in range(copies):
        cmd = [sys.executable, "-m", "load_tests.bare_server", "--model", str(model), "--name", MODEL,
               "--port", str(port), "--host", "127.0.0.1", "--reuse-port"]  # fmt: skip
        servers.append(start_server(f"bare #{i}", cmd, work / f"bare{i}.log", f"127.0.0.1:{port}"))
    for server in servers:
        wait_ready(server, 60)
    return servers


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    repo = write_repo(work, args.instances)
    targets = [f"ours-{f}" for f in args.frontends] + ([f"bare-{args.bare}"] if args.bare else [])
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for rnd in range(args.rounds):
        for target in targets:
            kind, n = target.split("-")
            servers = start_bare(repo, int(n), work) if kind == "bare" else [start_ours(repo, int(n), work)]
            try:
                row = parallel_load(servers[0].grpc_url, args.procs, args.conc, args.duration, args.warmup, work)
            finally:
                for server in servers:
                    stop_server(server)
            runs[target].append(row)
            print(
                f"round {rnd + 1} {target:10} {row['throughput_rps']:9.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                f"p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}",
                file=sys.stderr,
            )
    rows = []
    for target, values in runs.items():
        rows.append({"target": target, **{k: statistics.median(v[k] for v in values) for k in values[0]}})
    by = {r["target"]: r for r in rows}
    most, one = f"ours-{max(args.frontends)}", f"ours-{min(args.frontends)}"
    ratios = {f"{most} / {one}": by[most]["throughput_rps"] / by[one]["throughput_rps"]}
    if args.bare:
        ratios[f"{most} / bare-{args.bare}"] = by[most]["throughput_rps"] / by[f"bare-{args.bare}"]["throughput_rps"]
    return {
        "tool": "bench_scale",
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
        "ratios": ratios,
        "runs": runs,
    }


def report_text(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"front door scaling: tiny model, {s['instances']} instances, {s['procs']} client processes x {s['conc']} "
        f"in flight, medians of {s['rounds']} rounds on {m.get('cpu', '?')} ({m.get('cpu_count')} cores)",
        f"{'target':12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['target']:12} {r['throughput_rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:7.0f}"
        )
    lines += [f"{name}: {value:.2f}" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 2
    p = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--frontends", type=_int_list, default=[1, max(2, cores // 2)], help="comma list")
    p.add_argument("--bare", type=int, default=max(2, cores // 2), help="bare processes on one port (0: none)")
    p.add_argument("--instances", type=int, default=max(2, cores // 2), help="worker instances of the model")
    p.add_argument("--procs", type=int, default=max(2, cores // 2), help="client processes (one connection each)")
    p.add_argument("--conc", type=int, default=8, help="requests in flight per client process")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server logs (kept on errors)")
    args = p.parse_args(argv)
    result = run_in_workdir("bench_scale", args.keep_logs, lambda work: bench(args, work))
    return finish(result, report_text, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
