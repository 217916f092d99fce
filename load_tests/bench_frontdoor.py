"""Front-door cost: CPU time per request of every server process, ours against the bare one-process server.

The question (issue "the front door at many-core, GPU speed"): how much CPU does ``dl-inference serve``
(gateway + worker processes) spend per request beyond what a bare ``grpc.aio`` + ONNX Runtime server
in one process (``load_tests.bare_server``) spends on the same request? Two requests:

* ``tiny``: the example ``simple`` model (x FP32 [1,16] -> y FP32 [1,4]);
* ``image``: FP32 [1,3,224,224] (602 KB) in, its per-channel mean FP32 [1,3] out (ReduceMean), so the
  cost is taking the image in, as for a classifier;

each over gRPC, and for ours also over HTTP with binary tensors (the bare server has no HTTP: that row is
compared with bare gRPC). Per target: one warm-up loadgen run, then one closed-loop client (``-c 1``,
``--concurrency`` to change) for ``--duration`` seconds while the CPU time (user + system) of the
server's whole process group is read from ``/proc`` before and after; CPU per request = that delta /
requests answered. Rounds alternate bare and ours; the table shows medians across rounds, and the ratio
ours / bare for CPU per request and for p50 latency (targets: CPU <= 1.25x, tiny p50 <= 1.3x).

Run from the repository root (about 2 minutes with the defaults)::

    python -m load_tests.bench_frontdoor [--rounds 3] [--duration 8] [--json load_tests/results/bench_frontdoor.json]

The client shares the machine with the servers; the numbers depend on the machine (printed with them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from load_tests.lib.load import run_loadgen
from load_tests.lib.procs import group_cpu_seconds
from load_tests.lib.report import finish, machine_info
from load_tests.lib.server import (
    BenchError,
    Server,
    free_port,
    ours_command,
    run_in_workdir,
    start_server,
    stop_server,
    wait_ready,
)

REQUESTS = {"tiny": "simple", "image": "image_mean"}
CPU_TARGET = 1.25
# The bare server gets the allocator settings ours sets for itself (dl_inference.memtrim.tune_malloc),
# so the comparison is of the request path, not of glibc's defaults (which cost a 602 KB request ~1 ms).
BARE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
P50_TARGET = 1.3


def write_models(root: Path) -> None:
    """``simple`` from the example repository and ``image_mean`` (ONNX ReduceMean over H, W)."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from dl_inference.examples import make_example_repository

    examples = root / "examples"
    make_example_repository(examples)
    shutil.copytree(examples / "simple", root / "simple")
    shutil.rmtree(examples)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
        "image_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (root / "image_mean" / "1").mkdir(parents=True)
    (root / "image_mean" / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (root / "image_mean" / "config.pbtxt").write_text(
        'name: "image_mean"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [3, 224, 224] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [3] }\n'
        "instance_group { count: 1 kind: KIND_CPU }\n"
    )


def measure(server: Server, protocol: str, model: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    url = server.http_url if protocol != "grpc" else server.grpc_url
    assert url is not None
    extra = ("--http-binary",) if protocol == "http-binary" else ()
    wire = "http" if protocol == "http-binary" else "grpc"
    run_loadgen(url, wire, args.concurrency, 2.0, 0.0, work / "warm.json", model, extra)
    before = group_cpu_seconds(server.proc.pid)
    report = run_loadgen(url, wire, args.concurrency, args.duration, 0.0, work / "run.json", model, extra)
    cpu = group_cpu_seconds(server.proc.pid) - before
    n = report["requests"]
    if not n or report["errors"]:
        raise BenchError(f"{server.name} {protocol} {model}: {n} answered, {report['errors']} errors")
    return {
        "requests": n,
        "throughput_rps": report["throughput_rps"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "server_cpu_s": cpu,
        "cpu_us_per_request": cpu / n * 1e6,
    }


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    repo = work / "repo"
    write_models(repo)
    servers: dict[str, Server] = {}
    try:
        for request, model in REQUESTS.items():
            port = free_port()
            servers[f"bare-{request}"] = start_server(
                f"bare {model}",
                [sys.executable, "-m", "load_tests.bare_server", "--model", str(repo / model / "1" / "model.onnx"),
                 "--name", model, "--port", str(port)],
                work / f"bare-{request}.log", f"127.0.0.1:{port}", env_extra=BARE_MALLOC,
            )  # fmt: skip
        grpc_port, http_port = free_port(), free_port()
        servers["ours"] = start_server(
            "dl-inference serve", ours_command(repo, grpc_port, http_port, free_port()), work / "ours.log",
            f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}",
        )  # fmt: skip
        for request, model in REQUESTS.items():
            wait_ready(servers[f"bare-{request}"], 60, (model,))
        wait_ready(servers["ours"], 120, tuple(REQUESTS.values()))

        runs: dict[str, list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for request, model in REQUESTS.items():
                for target, server, protocol in (
                    ("bare grpc", servers[f"bare-{request}"], "grpc"),
                    ("ours grpc", servers["ours"], "grpc"),
                    ("ours http-binary", servers["ours"], "http-binary"),
                ):
                    row = measure(server, protocol, model, args, work)
                    runs.setdefault(f"{request}|{target}", []).append(row)
                    print(
                        f"round {rnd + 1} {request:5} {target:16} {row['throughput_rps']:8.1f} req/s "
                        f"p50 {row['p50_ms']:6.3f} ms  {row['cpu_us_per_request']:7.0f} us CPU/request",
                        file=sys.stderr,
                    )
    finally:
        for server in servers.values():
            stop_server(server)

    rows = []
    for key, values in runs.items():
        request, target = key.split("|")
        med = {k: statistics.median(v[k] for v in values) for k in values[0]}
        rows.append({"request": request, "target": target, **med})
    for row in rows:
        bare = next(r for r in rows if r["request"] == row["request"] and r["target"] == "bare grpc")
        row["cpu_ratio"] = row["cpu_us_per_request"] / bare["cpu_us_per_request"]
        row["p50_ratio"] = row["p50_ms"] / bare["p50_ms"]
    return {
        "tool": "bench_frontdoor",
        "machine": machine_info(),
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "concurrency": args.concurrency},
        "targets": {"cpu_ratio_max": CPU_TARGET, "tiny_p50_ratio_max": P50_TARGET},
        "rows": rows,
        "runs": runs,
    }


def report_text(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"front door, c={result['settings']['concurrency']}, medians of {result['settings']['rounds']} rounds "
        f"on {m.get('cpu', '?')} ({m.get('cpu_count')} cores)",
        f"{'request':8} {'target':17} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} "
        f"{'CPU x bare':>10} {'p50 x bare':>10}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['request']:8} {r['target']:17} {r['throughput_rps']:8.1f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
            f"{r['cpu_us_per_request']:11.0f} {r['cpu_ratio']:10.2f} {r['p50_ratio']:10.2f}"
        )
    lines.append(f"targets: CPU x bare <= {CPU_TARGET} (every row of ours), tiny p50 x bare <= {P50_TARGET}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_frontdoor", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server logs (kept on errors)")
    args = p.parse_args(argv)
    result = run_in_workdir("bench_frontdoor", args.keep_logs, lambda work: bench(args, work))
    return finish(result, report_text, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
