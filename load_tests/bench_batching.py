"""Dynamic batching benchmark: the same CNN served with and without ``dynamic_batching``, one server.

What it does:

1. writes a repository (``load_tests.models``) with two copies of a small ResNet-18-like CNN
   (input ``image`` FP32 [-1,3,64,64], width 32, output ``logits`` FP32 [-1,10]), each with
   max_batch_size 32 and one KIND_CPU instance: ``cnn_nobatch`` (no ``dynamic_batching``) and
   ``cnn_batch`` (``dynamic_batching { max_queue_delay_microseconds: 2000 }``);
2. starts ONE ``dl-inference serve`` on that repository (free ports) so both models share the
   machine the same way, and waits for ServerReady and ModelReady of both over gRPC;
3. for each concurrency, alternating the two models (and their order round by round), runs
   ``load_tests.loadgen`` in-process over gRPC with batch 1 per request, and reads gRPC
   ModelStatistics before and after the run: ``inference_count`` / ``execution_count`` deltas give
   the average executed batch size, ``inference_stats.queue`` ns / count the queue time per request,
   ``batch_stats`` the histogram of executed batch sizes (the deltas cover the warm-up too);
4. stops the server, then measures the in-process ONNX Runtime ceiling: ``session.run`` in a tight
   loop, with the session options the server's workers use (``OnnxRuntimeBackend._session_options``:
   intra_op_num_threads=1, inter_op 1, sequential, spinning off, ORT_ENABLE_ALL), at batch 1 and at
   each average batch size seen on ``cnn_batch`` (rounded, at least 1), in images/s;
5. prints a table (model | conc | req/s | p50 ms | p99 ms | avg batch | queue ms/req), the ceiling
   rows and the targets:

   * c=16 throughput ``cnn_batch`` / ``cnn_nobatch`` >= 1.5;
   * c=16 throughput ``cnn_batch`` / in-process ceiling at that batch size >= 0.9;
   * c=1 p50 ``cnn_batch`` - ``cnn_nobatch`` <= max_queue_delay (2 ms);

   (the highest concurrency stands in for 16 and the lowest for 1 when those are not measured), and
   writes everything as JSON, plus a PNG of throughput against concurrency when matplotlib is
   importable.

The model's cost, measured on the 2-core AMD EPYC dev VM (onnxruntime 1.31, one thread, in-process, server
stopped): 6.2-6.6 ms per image at batch 1 (150-160 images/s), 47 ms per batch of 8 (~170 images/s),
195 ms per batch of 32 (~165 images/s). On this CPU batching buys ONNX Runtime itself only 5-15% per
image for this model; the ``ceiling(batch) / ceiling(1)`` line printed under the targets says how
much, and the rest of any speed-up is per-request cost in the served path (one request per
``session.run``) that a batch amortizes.

Run from the repository root (about 2 minutes with the defaults: ~25 s per concurrency, ~4 s per ceiling size)::

    python -m load_tests.bench_batching [--duration 8] [--concurrency 1,4,16,64] \\
        [--json load_tests/results/bench_batching.json]
    python -m load_tests.bench_batching --duration 3 --concurrency 1,16     # quick look
    python -m load_tests.bench_batching --check     # exit 1 when a target is missed

The server is always stopped (its whole process group, workers included), on errors and Ctrl-C too.
The client shares the machine with the server: compare the two models within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.lib.report import BUSY_LOADAVG, int_list, machine_info, num, ratio, round_medians, write_json
from load_tests.lib.server import (
    REPO_ROOT,
    BenchError,
    free_port,
    model_stats,
    ours_command,
    run_in_workdir,
    start_server,
    stop_server,
    wait_ready,
)
from load_tests.loadgen import LoadConfig, LoadgenError, summary_line
from load_tests.loadgen import run as run_load
from load_tests.models import INPUT, write_model_repo

NOBATCH = "cnn_nobatch"
BATCH = "cnn_batch"
MODELS = (NOBATCH, BATCH)
IMAGE = 64  # input H = W
WIDTH = 32  # channels of the first stage
MAX_BATCH_SIZE = 32
DELAY_US = 2000  # cnn_batch max_queue_delay_microseconds
SPEEDUP_TARGET = 1.5  # cnn_batch / cnn_nobatch throughput at c=16: at least this
CEILING_TARGET = 0.9  # cnn_batch throughput / in-process ORT at the same batch size, c=16: at least this
THROUGHPUT_CONC = 16
LATENCY_CONC = 1


# ---------------------------------------------------------------------------------------------
# server side


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before, plus the derived avg_batch (None without executions) and queue_ms_per_request."""
    delta: dict[str, Any] = {k: after[k] - before[k] for k in after if k != "batch_executions"}
    hist = {
        k: v - before["batch_executions"].get(k, 0)
        for k, v in after["batch_executions"].items()
        if v - before["batch_executions"].get(k, 0)
    }
    delta["batch_executions"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    return derive(delta)


def derive(delta: dict[str, Any]) -> dict[str, Any]:
    delta["avg_batch"] = delta["inference_count"] / delta["execution_count"] if delta["execution_count"] else None
    delta["queue_ms_per_request"] = delta["queue_ns"] / delta["queue_count"] / 1e6 if delta["queue_count"] else None
    return delta


def measure(url: str, model: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """One loadgen run (gRPC, batch 1) with the ModelStatistics delta around it as ``server_stats``."""
    cfg = LoadConfig(
        url=url,
        protocol="grpc",
        model=model,
        concurrency=concurrency,
        duration=args.duration,
        warmup=args.warmup,
        batch=1,
    )
    before = model_stats(url, model)
    try:
        report = run_load(cfg)
    except LoadgenError as exc:
        raise BenchError(f"loadgen could not run on {model}: {exc}") from None
    report["server_stats"] = stats_delta(before, model_stats(url, model))
    if report["requests"] == 0:
        raise BenchError(f"no request to '{model}' succeeded at c={concurrency}: {report['error_samples']}")
    return report


# ---------------------------------------------------------------------------------------------
# in-process ceiling


def ort_ceiling(model_dir: Path, batch_sizes: list[int], duration: float) -> list[dict[str, Any]]:
    """session.run at each batch size in a tight loop, the server's session options: images/s."""
    import onnxruntime as ort

    from dl_inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dl_inference.repository.config import load_model_config

    options = OnnxRuntimeBackend._session_options(load_model_config(model_dir))
    session = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    clock = time.perf_counter
    rows: list[dict[str, Any]] = []
    for batch in batch_sizes:
        feeds = {INPUT: rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)}
        t_warm = clock() + min(1.0, duration / 4)
        while clock() < t_warm:
            session.run(None, feeds)
        lat: list[float] = []
        t_begin = clock()
        t_end = t_begin + duration
        while True:
            t0 = clock()
            if t0 >= t_end and lat:
                break
            session.run(None, feeds)
            lat.append(clock() - t0)
        elapsed = clock() - t_begin
        ms = np.asarray(lat) * 1000.0
        rows.append(
            {
                "batch": batch,
                "calls": len(lat),
                "duration_s": elapsed,
                "images_per_s": batch * len(lat) / elapsed,
                "ms_per_batch": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))},
            }
        )
        print(
            f"  ort in-process b={batch:<3} {rows[-1]['images_per_s']:8.1f} images/s  "
            f"{rows[-1]['ms_per_batch']['p50']:.2f} ms/batch p50",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# report


def summary_row(model: str, concurrency: int, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across rounds for the client numbers; server counters summed across rounds."""

    keys = ("inference_count", "execution_count", "queue_count", "queue_ns")
    total = derive({k: sum(r["server_stats"][k] for r in reports) for k in keys})
    return {
        "model": model,
        "concurrency": concurrency,
        **round_medians(reports),
        "errors": sum(r["errors"] for r in reports),
        "avg_batch": total["avg_batch"],
        "queue_ms_per_request": total["queue_ms_per_request"],
        "throughput_rps_each": [round(r["throughput_rps"], 1) for r in reports],
    }


def format_table(rows: list[dict[str, Any]], ceiling: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<16} | {'conc':>4} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | "
        f"{'avg batch':>9} | {'queue ms/req':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<16} | {r['concurrency']:>4} | {num(r['throughput_rps'], '8.1f')} | "
            f"{num(r['p50_ms'], '7.2f')} | {num(r['p99_ms'], '7.2f')} | {num(r['avg_batch'], '9.2f')} | "
            f"{num(r['queue_ms_per_request'], '12.3f')}" + (f"   errors {r['errors']}" if r["errors"] else "")
        )
    lines.append("-" * len(head))
    for c in ceiling:
        lines.append(
            f"{'ort in-process':<16} | {'-':>4} | {c['images_per_s']:8.1f} | {c['ms_per_batch']['p50']:7.2f} | "
            f"{c['ms_per_batch']['p99']:7.2f} | {c['batch']:>9} | {'-':>12}"
        )
    lines.append("(ort in-process rows: images/s, and ms per session.run of the whole batch)")
    return "\n".join(lines)


def ceiling_batch(avg_batch: float | None) -> int:
    return max(1, round(avg_batch)) if avg_batch is not None else 1


def targets(rows: list[dict[str, Any]], ceiling: list[dict[str, Any]], delay_us: int) -> dict[str, Any]:
    cell = {(r["model"], r["concurrency"]): r for r in rows}
    concs = sorted({r["concurrency"] for r in rows})
    hi = THROUGHPUT_CONC if THROUGHPUT_CONC in concs else concs[-1]
    lo = LATENCY_CONC if LATENCY_CONC in concs else concs[0]
    ips = {c["batch"]: c["images_per_s"] for c in ceiling}
    out: dict[str, Any] = {}
    nb, b = cell.get((NOBATCH, hi)), cell.get((BATCH, hi))
    if nb and b:
        value = ratio(b["throughput_rps"], nb["throughput_rps"])
        out[f"speedup_c{hi}"] = {
            "what": f"throughput {BATCH} / {NOBATCH} at c={hi}",
            "value": value,
            "target": f">= {SPEEDUP_TARGET}",
            "met": value is not None and value >= SPEEDUP_TARGET,
        }
        size = ceiling_batch(b["avg_batch"])
        value = ratio(b["throughput_rps"], ips.get(size))
        out[f"vs_ceiling_c{hi}"] = {
            "what": f"throughput {BATCH} at c={hi} / in-process ORT at batch {size}",
            "batch": size,
            "value": value,
            "target": f">= {CEILING_TARGET}",
            "met": value is not None and value >= CEILING_TARGET,
        }
        bound = ratio(ips.get(size), ips.get(1))
        out[f"ort_batch_gain_c{hi}"] = {
            "what": f"in-process ORT images/s at batch {size} / at batch 1 (what batching can buy the model itself)",
            "batch": size,
            "value": bound,
            "target": "info",
            "met": True,
        }
    nb, b = cell.get((NOBATCH, lo)), cell.get((BATCH, lo))
    if nb and b and nb["p50_ms"] is not None and b["p50_ms"] is not None:
        value = b["p50_ms"] - nb["p50_ms"]
        limit = delay_us / 1000.0
        out[f"p50_increase_c{lo}"] = {
            "what": f"p50 {BATCH} - {NOBATCH} at c={lo}, ms (max_queue_delay {limit:g} ms)",
            "value": value,
            "target": f"<= {limit:g} ms",
            "met": value <= limit,
        }
    return out


def report_text(result: dict[str, Any]) -> str:
    lines = ["", format_table(result["summary"], result["ort_ceiling"]), ""]
    for t in result["targets"].values():
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "" if t["target"] == "info" else f" (target {t['target']}: {'met' if t['met'] else 'MISSED'})"
        lines.append(f"{t['what']}: {value}{verdict}")
    load = result["machine"]["loadavg_start"][0]
    lines.append(f"(1-min load average {load:.2f} at start; statistics deltas include each run's warm-up)")
    if load > BUSY_LOADAVG:
        lines.append("WARNING: the machine was busy when the bench started; numbers are noisy, rerun when idle")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Throughput against concurrency per model, ceiling as dashed lines; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in MODELS:
        pts = sorted((r["concurrency"], r["throughput_rps"]) for r in result["summary"] if r["model"] == model)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
    for c in result["ort_ceiling"]:
        ax.axhline(c["images_per_s"], linestyle="--", linewidth=0.8, color="gray")
        ax.annotate(f"ORT b={c['batch']}", (ax.get_xlim()[0], c["images_per_s"]), fontsize=7, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (closed-loop clients, batch 1 each)")
    ax.set_ylabel("requests/s (= images/s)")
    ax.set_title(f"dynamic batching, ResNet-like {IMAGE}x{IMAGE} w{WIDTH}, delay {result['config']['delay_us']} us")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# main


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    repo = workdir / "repo"
    write_model_repo(repo, NOBATCH, batching=False, max_batch_size=MAX_BATCH_SIZE, image=IMAGE, width=WIDTH)
    write_model_repo(
        repo,
        BATCH,
        batching=True,
        max_batch_size=MAX_BATCH_SIZE,
        delay_us=args.delay_us,
        preferred=args.preferred,
        image=IMAGE,
        width=WIDTH,
    )
    concurrencies: list[int] = args.concurrency
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "concurrency": concurrencies,
            "models": list(MODELS),
            "image": IMAGE,
            "width": WIDTH,
            "max_batch_size": MAX_BATCH_SIZE,
            "delay_us": args.delay_us,
            "preferred_batch_size": args.preferred or [],
            "instances": 1,
            "protocol": "grpc",
            "request_batch": 1,
        },
        "runs": [],
    }
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    server = start_server(
        "dl-inference serve",
        ours_command(repo, grpc_port, http_port, metrics_port),
        workdir / "server.log",
        f"127.0.0.1:{grpc_port}",
        f"127.0.0.1:{http_port}",
    )
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        took = wait_ready(server, args.ready_timeout, MODELS)
        print(f"{server.name} ready in {took:.1f} s (gRPC {server.grpc_url}, pid {server.proc.pid})", flush=True)
        for rnd in range(1, args.rounds + 1):
            for i, conc in enumerate(concurrencies):
                flip = (rnd + i) % 2 == 0  # which model goes first alternates by concurrency and by round
                for model in reversed(MODELS) if flip else MODELS:
                    rep = measure(server.grpc_url, model, conc, args)
                    rep["round"] = rnd
                    result["runs"].append(rep)
                    by_key.setdefault((model, conc), []).append(rep)
                    st = rep["server_stats"]
                    print(
                        f"  round {rnd} {summary_line(rep)}\n"
                        f"      avg batch {num(st['avg_batch'], '.2f')}  "
                        f"queue {num(st['queue_ms_per_request'], '.3f')} ms/req  "
                        f"executions by batch size {st['batch_executions']}  "
                        f"client cpu {num(rep.get('client_cpu_util'), '.2f')} cores",
                        flush=True,
                    )
    finally:
        stop_server(server)

    rows = [summary_row(m, c, by_key[(m, c)]) for c in concurrencies for m in MODELS]
    result["summary"] = rows
    sizes = sorted({1} | {ceiling_batch(r["avg_batch"]) for r in rows if r["model"] == BATCH})
    print(f"  in-process onnxruntime ceiling at batch sizes {sizes} ...", flush=True)
    result["ort_ceiling"] = ort_ceiling(repo / BATCH, sizes, args.ort_duration)
    result["targets"] = targets(rows, result["ort_ceiling"], args.delay_us)
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    global IMAGE, WIDTH  # the model's size, read by the helpers above
    p = argparse.ArgumentParser(
        prog="python -m load_tests.bench_batching", description="same CNN with and without dynamic batching"
    )
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians across rounds)")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 64], help="comma list (default 1,4,16,64)")
    p.add_argument("--image", type=int, default=IMAGE, help="input height = width (default 64)")
    p.add_argument("--width", type=int, default=WIDTH, help="channels of the first stage (default 32)")
    p.add_argument("--delay-us", type=int, default=DELAY_US, help="cnn_batch max_queue_delay_microseconds")
    p.add_argument(
        "--preferred", type=int_list, default=None, help="cnn_batch preferred_batch_size, comma list (default none)"
    )
    p.add_argument("--ort-duration", type=float, default=3.0, help="seconds of the in-process loop per batch size")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the server")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "load_tests" / "results" / "bench_batching.json")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server log (kept on errors)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    IMAGE, WIDTH = args.image, args.width

    result = run_in_workdir("bench_batching", args.keep_logs, lambda workdir: bench(args, workdir))
    if result is None:
        return 2
    print(report_text(result))
    write_json(result, args.json)
    png = write_plot(result, args.json.with_suffix(".png"))
    if png:
        print(f"wrote {png}")
    missed = [k for k, t in result["targets"].items() if not t["met"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
