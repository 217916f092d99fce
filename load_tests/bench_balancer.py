"""Balancer benchmark: a gateway over two fast nodes and one ~3x slower node, per balancing policy.

What it does:

1. writes the example repository's ``simple`` model (x FP32 [-1,16] -> y FP32 [-1,4]) into a temp
   dir and starts three standalone nodes on it (``dl-inference worker --grpc-port``, free ports);
2. puts each node behind ``load_tests.delay_proxy``, so a node takes real time without burning the
   CPU: the two fast nodes wait ``--delay-ms`` per ModelInfer, the slow node ``--slow-delay-ms``.
   By default that is calibrated: the unloaded (c=1) latency L of fast-1 through its proxy is
   measured and the slow delay set to ``delay + (factor - 1) * L``, so the slow node answers in about
   ``--slow-factor`` (3) x the fast nodes' time (3 x the delay alone would give less than 3x, the
   node's own time being added to both). Each node's unloaded latency is measured and reported;
3. for each policy (``weighted_round_robin``, ``least_request``): starts ``dl-inference serve`` on an
   empty repository with ``nodes: [the three proxies]`` and ``balancer: {policy: ...}``, waits for
   GET /v2/health/ready, all three nodes healthy in GET /v2/endpoints and gRPC ModelReady; runs
   ``load_tests.loadgen`` in-process over gRPC (closed loop, ``--concurrency`` workers): a warm-up
   run, then the measured run; reads /v2/endpoints (gateway's count of requests per node) and each
   node's own gRPC ModelStatistics before and after the measured run; stops the gateway (the nodes
   and proxies stay up for the next policy). With ``--rounds N`` that is done N times, the
   policies' order alternating round by round;
4. prints a table (policy | req/s | p50 ms | p99 ms | share of requests per node | errors: medians
   over rounds for req/s and latencies, shares of all rounds' requests), the ratio of p99 (and p50)
   weighted_round_robin / least_request and per-node details, writes that report to ``--txt`` and
   everything (settings, machine, calibration, raw loadgen reports, endpoint tables) as JSON to
   ``--json``.

Shares are of the measured run only (endpoint counters after minus before it), from the gateway's
counters; the nodes' own success counts are kept next to them as a cross-check.

Run from the repository root (about 1 minute with the defaults, 25 s with ``--quick``)::

    python -m load_tests.bench_balancer [--duration 10] [--concurrency 16] [--delay-ms 5]
    python -m load_tests.bench_balancer --quick          # 3 s per policy
    python -m load_tests.bench_balancer --rounds 3       # medians of 3 alternating rounds (less noise)
    python -m load_tests.bench_balancer --slow-delay-ms 15 --policies least_request

All subprocesses (nodes, proxies, gateway; each in its own process group) are stopped with SIGTERM,
then SIGKILL, on errors and Ctrl-C too. The client, the gateway and the nodes share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from load_tests.lib.report import BUSY_LOADAVG, machine_info, median, num, write_json
from load_tests.lib.server import (
    REPO_ROOT,
    BenchError,
    Server,
    free_port,
    log_tail,
    model_stats,
    py_module,
    run_in_workdir,
    start_server,
    stop_server,
    wait_ready,
)
from load_tests.loadgen import LoadConfig, LoadgenError, summary_line
from load_tests.loadgen import run as run_load

MODEL = "simple"
POLICIES = ("weighted_round_robin", "least_request")
NODES = ("fast-1", "fast-2", "slow")
RESULTS = REPO_ROOT / "load_tests" / "results"


# ---------------------------------------------------------------------------------------------
# processes


def start_node(label: str, repo: Path, workdir: Path) -> Server:
    port = free_port()
    cmd = py_module("dl_inference", "worker", "--model-repository", str(repo), "--model", MODEL,
                    "--grpc-port", str(port), "--host", "127.0.0.1")  # fmt: skip
    return start_server(f"node {label}", cmd, workdir / f"node-{label}.log", f"127.0.0.1:{port}")


def start_proxy(label: str, target: str, delay_ms: float, workdir: Path) -> Server:
    port = free_port()
    cmd = py_module("load_tests.delay_proxy", "--port", str(port), "--target", target, "--delay-ms", f"{delay_ms:g}")
    return start_server(f"proxy {label}", cmd, workdir / f"proxy-{label}.log", f"127.0.0.1:{port}")


def start_gateway(policy: str, proxies: list[Server], workdir: Path) -> Server:
    empty = workdir / "empty_repo"
    empty.mkdir(exist_ok=True)
    config = workdir / f"gateway-{policy}.yaml"
    config.write_text(yaml.safe_dump({"nodes": [p.grpc_url for p in proxies], "balancer": {"policy": policy}}))
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cmd = py_module("dl_inference", "serve", "--model-repository", str(empty), "--config", str(config),
                    "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                    "--metrics-port", str(metrics_port))  # fmt: skip
    return start_server(
        f"gateway ({policy})",
        cmd,
        workdir / f"gateway-{policy}.log",
        f"127.0.0.1:{grpc_port}",
        f"127.0.0.1:{http_port}",
    )


def http_get(server: Server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def endpoint_table(gateway: Server) -> dict[str, Any]:
    status, body = http_get(gateway, "/v2/endpoints")
    if status != 200:
        raise BenchError(f"GET /v2/endpoints on {gateway.name} answered {status}: {body[:500]!r}")
    table: dict[str, Any] = json.loads(body)
    return table


def wait_gateway(gateway: Server, addresses: list[str], timeout: float) -> float:
    """HTTP ready, every node healthy and serving the model in /v2/endpoints, gRPC ModelReady."""
    t0 = time.monotonic()
    last = "no answer yet"
    while True:
        code = gateway.proc.poll()
        if code is not None:
            raise BenchError(
                f"{gateway.name} exited with status {code}; its log ({gateway.log}) ends with:\n{log_tail(gateway.log)}"
            )
        if time.monotonic() - t0 > timeout:
            raise BenchError(
                f"{gateway.name} not ready after {timeout:.0f} s ({last}); its log ({gateway.log}) ends with:\n"
                f"{log_tail(gateway.log)}"
            )
        try:
            status, _ = http_get(gateway, "/v2/health/ready")
            if status != 200:
                last = f"/v2/health/ready answered {status}"
            else:
                table = endpoint_table(gateway)
                states = {e["endpoint"]: e["state"] for e in table["endpoints"]}
                serving = {a for label, eps in table["models"].items() if label.startswith(f"{MODEL}:") for a in eps}
                waiting = [a for a in addresses if states.get(a) != "healthy" or a not in serving]
                if not waiting:
                    break
                last = f"nodes not healthy/serving yet: {waiting}"
        except (OSError, ValueError, KeyError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    wait_ready(gateway, max(1.0, timeout - (time.monotonic() - t0)))
    return time.monotonic() - gateway.started


# ---------------------------------------------------------------------------------------------
# measuring


def load(url: str, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    cfg = LoadConfig(url=url, protocol="grpc", model=MODEL, concurrency=concurrency, duration=duration, warmup=warmup)
    try:
        return run_load(cfg)
    except LoadgenError as exc:
        raise BenchError(f"loadgen could not run on {url}: {exc}") from None


def node_successes(node: Server) -> int | None:
    """The node's own count of successful inferences (None when it cannot tell)."""
    try:
        return int(model_stats(node.grpc_url, MODEL)["success_count"])
    except BenchError as exc:
        print(f"  (no statistics from {node.name}: {exc})", flush=True)
        return None


def probe(label: str, proxy: Server, duration: float) -> dict[str, Any]:
    """Unloaded latency of one node through its proxy: c=1, straight to the proxy."""
    rep = load(proxy.grpc_url, 1, duration, min(0.5, duration))
    if not rep["requests"]:
        raise BenchError(f"probe of {label} ({proxy.grpc_url}): no request succeeded: {rep['error_samples']}")
    lat = rep["latency_ms"]
    print(f"  probe {label:<6} c=1: p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms", flush=True)
    return {
        "node": label,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "mean_ms": lat["mean"],
        "requests": rep["requests"],
    }


def run_policy(
    policy: str, nodes: list[Server], proxies: list[Server], workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    addresses = [p.grpc_url for p in proxies]
    gateway = start_gateway(policy, proxies, workdir)
    try:
        took = wait_gateway(gateway, addresses, args.ready_timeout)
        print(f"{gateway.name} ready in {took:.1f} s (gRPC {gateway.grpc_url}, pid {gateway.proc.pid})", flush=True)
        if args.warmup > 0:
            warm = load(gateway.grpc_url, args.concurrency, args.warmup, 0.0)
            print(f"  warm-up {policy}: {warm['throughput_rps']:.1f} req/s, errors {warm['errors']}", flush=True)
        before = endpoint_table(gateway)
        node_before = [node_successes(n) for n in nodes]
        report = load(gateway.grpc_url, args.concurrency, args.duration, 0.0)
        after = endpoint_table(gateway)
        node_after = [node_successes(n) for n in nodes]
        print(f"  {policy}: {summary_line(report)}", flush=True)
        for key, message in report["error_samples"].items():
            print(f"    {key}: {message}", flush=True)
        if gateway.proc.poll() is not None:
            raise BenchError(f"{gateway.name} exited during the run; log ends with:\n{log_tail(gateway.log)}")
    finally:
        stop_server(gateway)

    rows_before = {e["endpoint"]: e for e in before["endpoints"]}
    rows_after = {e["endpoint"]: e for e in after["endpoints"]}
    per_node: list[dict[str, Any]] = []
    for label, address, nb, na in zip(NODES, addresses, node_before, node_after):
        b, a = rows_before.get(address, {}), rows_after.get(address, {})
        per_node.append(
            {
                "node": label,
                "address": address,
                "requests": a.get("requests", 0) - b.get("requests", 0),
                "failures": a.get("failures", 0) - b.get("failures", 0),
                "retries": a.get("retries", 0) - b.get("retries", 0),
                "ejections": a.get("ejections", 0) - b.get("ejections", 0),
                "node_successes": None if nb is None or na is None else na - nb,
                "latency_ewma_ms": a.get("latency_ewma_ms"),
                "state": a.get("state"),
            }
        )
    total = sum(n["requests"] for n in per_node)
    for n in per_node:
        n["share"] = n["requests"] / total if total else None
    counters = {k: v - before["counters"].get(k, 0) for k, v in after["counters"].items()}
    return {
        "policy": policy,
        "loadgen": report,
        "nodes": per_node,
        "balancer_counters": counters,
        "endpoints_before": before,
        "endpoints_after": after,
    }


# ---------------------------------------------------------------------------------------------
# report


def summary_row(policy: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's row: medians of req/s, p50, p99 over its rounds; shares of all its rounds' requests."""

    reps = [run["loadgen"] for run in runs]
    counts = {label: sum(n["requests"] for run in runs for n in run["nodes"] if n["node"] == label) for label in NODES}
    total = sum(counts.values())
    return {
        "policy": policy,
        "rounds": len(runs),
        "throughput_rps": median([r["throughput_rps"] for r in reps]),
        "p50_ms": median([r["latency_ms"]["p50"] for r in reps]),
        "p90_ms": median([r["latency_ms"]["p90"] for r in reps]),
        "p99_ms": median([r["latency_ms"]["p99"] for r in reps]),
        "mean_ms": median([r["latency_ms"]["mean"] for r in reps]),
        "errors": sum(r["errors"] for r in reps),
        **{f"share_{label}": counts[label] / total if total else None for label in NODES},
        "p99_ms_each": [r["latency_ms"]["p99"] for r in reps],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'policy':<20} | {'req/s':>7} | {'mean ms':>7} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | "
        + " | ".join(f"{'share ' + label:>12}" for label in NODES)
        + f" | {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['policy']:<20} | {num(r['throughput_rps'], '7.1f')} | {num(r['mean_ms'], '7.2f')} | "
            f"{num(r['p50_ms'], '7.2f')} | {num(r['p90_ms'], '7.2f')} | {num(r['p99_ms'], '7.2f')} | "
            + " | ".join(f"{num(r[f'share_{label}'], '12.3f')}" for label in NODES)
            + f" | {r['errors']:>6}"
        )
    return "\n".join(lines)


def report_text(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"balancer bench: c={cfg['concurrency']}, {cfg['rounds']} x {cfg['duration_s']:g} s per policy (each after "
        f"{cfg['warmup_s']:g} s warm-up), delays fast {cfg['delay_ms']:g} ms / slow {cfg['slow_delay_ms']:.1f} ms",
        "",
        format_table(result["summary"]),
        "",
    ]
    for name, value in result["ratios"].items():
        lines.append(f"{name}: {num(value, '.2f')}")
    probes = result["calibration"]["probes"]
    if probes:
        fast = [p["p50_ms"] for p in probes if p["node"] != "slow"]
        slow = [p["p50_ms"] for p in probes if p["node"] == "slow"]
        ratio = slow[0] / (sum(fast) / len(fast)) if fast and slow else None
        lines.append(
            "nodes unloaded (c=1 through their proxy): "
            + ", ".join(f"{p['node']} p50 {p['p50_ms']:.2f} ms" for p in probes)
            + f"; slow/fast {num(ratio, '.2f')}x"
        )
    lines.append("")
    lines.append(
        f"{'per node':<24} | {'node':<6} | {'requests':>8} | {'node ok':>8} | {'ewma ms':>8} | {'failures':>8} | "
        f"{'retries':>7}"
    )
    for run in result["runs"]:
        name = run["policy"] if cfg["rounds"] == 1 else f"{run['policy']} r{run['round']}"
        for n in run["nodes"]:
            lines.append(
                f"{name:<24} | {n['node']:<6} | {n['requests']:>8} | {num(n['node_successes'], '>8')} | "
                f"{num(n['latency_ewma_ms'], '8.2f')} | {n['failures']:>8} | {n['retries']:>7}"
            )
        c = run["balancer_counters"]
        if any(c.values()):
            lines.append(f"{name:<24} | balancer counters during the run: {c}")
    load = result["machine"]["loadavg_start"][0]
    lines.append(f"(1-min load average {load:.2f} at start, {result['machine']['loadavg_end'][0]:.2f} at end)")
    if load > BUSY_LOADAVG:
        lines.append("WARNING: the machine was busy when the bench started; numbers are noisy, rerun when idle")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# driver


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from dl_inference.examples import make_example_repository

    make_example_repository(workdir / "all_examples")
    repo = workdir / "repo"
    repo.mkdir()
    shutil.copytree(workdir / "all_examples" / MODEL, repo / MODEL)

    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "policies": args.policies,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "delay_ms": args.delay_ms,
            "slow_delay_ms": args.slow_delay_ms,
            "slow_factor": args.slow_factor,
            "quick": args.quick,
            "model": MODEL,
            "protocol": "grpc",
            "nodes": list(NODES),
        },
        "calibration": {"probes": []},
        "runs": [],
    }
    servers: list[Server] = []
    try:
        nodes = [start_node(label, repo, workdir) for label in NODES]
        servers += nodes
        for node in nodes:
            took = wait_ready(node, args.ready_timeout)
            print(f"{node.name} ready in {took:.1f} s (gRPC {node.grpc_url}, pid {node.proc.pid})", flush=True)

        proxies = [start_proxy(label, n.grpc_url, args.delay_ms, workdir) for label, n in zip(NODES[:2], nodes[:2])]
        servers += proxies
        for proxy in proxies:
            wait_ready(proxy, args.ready_timeout)
        probes = result["calibration"]["probes"]
        probes.append(probe(NODES[0], proxies[0], args.probe))
        slow_delay = args.slow_delay_ms
        if slow_delay is None:
            # fast node answers in L = delay + own time; slow = slow_delay + own time = factor x L
            slow_delay = args.delay_ms + (args.slow_factor - 1.0) * probes[0]["p50_ms"]
            result["calibration"]["slow_delay_from"] = f"delay + ({args.slow_factor:g} - 1) x fast-1 unloaded p50"
        result["config"]["slow_delay_ms"] = slow_delay
        proxies.append(start_proxy(NODES[2], nodes[2].grpc_url, slow_delay, workdir))
        servers.append(proxies[2])
        wait_ready(proxies[2], args.ready_timeout)
        print(f"proxies: fast +{args.delay_ms:g} ms, slow +{slow_delay:.1f} ms", flush=True)
        probes.append(probe(NODES[1], proxies[1], args.probe))
        probes.append(probe(NODES[2], proxies[2], args.probe))

        for rnd in range(1, args.rounds + 1):
            order = args.policies if rnd % 2 else args.policies[::-1]  # alternate who goes first
            for policy in order:
                run = run_policy(policy, nodes, proxies, workdir, args)
                run["round"] = rnd
                result["runs"].append(run)
    finally:
        for server in reversed(servers):
            stop_server(server)

    rows = [summary_row(pol, [r for r in result["runs"] if r["policy"] == pol]) for pol in args.policies]
    result["summary"] = rows
    by_policy = {r["policy"]: r for r in rows}
    ratios: dict[str, float | None] = {}
    if set(POLICIES) <= set(by_policy):
        wrr, lr = by_policy["weighted_round_robin"], by_policy["least_request"]
        for key in ("throughput_rps", "mean_ms", "p90_ms", "p99_ms"):
            a, b = wrr[key], lr[key]
            label = key.rsplit("_", 1)[0]
            ratios[f"{label} weighted_round_robin / least_request"] = a / b if a is not None and b else None
    result["ratios"] = ratios
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _policies(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = set(names) - set(POLICIES)
    if bad or not names:
        raise argparse.ArgumentTypeError(f"policies are {', '.join(POLICIES)}; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.bench_balancer",
        description="gateway balancer over two fast nodes and a ~3x slower one: weighted_round_robin vs least_request",
    )
    p.add_argument("--duration", type=float, default=None, help="measured seconds per policy (default 10; quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per policy (default 2; quick 1)")
    p.add_argument("--probe", type=float, default=None, help="seconds of each node's c=1 probe (default 1.5; quick 1)")
    p.add_argument("--concurrency", "-c", type=int, default=16, help="closed-loop client workers (default 16)")
    p.add_argument("--delay-ms", type=float, default=5.0, help="delay the fast nodes' proxies add (default 5)")
    p.add_argument("--slow-delay-ms", type=float, default=None, help="the slow node's delay (default: calibrated)")
    p.add_argument("--slow-factor", type=float, default=3.0, help="calibrated slow/fast unloaded latency (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="runs per policy, order alternating; medians (default 1)")
    p.add_argument("--policies", type=_policies, default=list(POLICIES), help="comma list (default both)")
    p.add_argument("--quick", action="store_true", help="short runs: 3 s per policy, 1 s warm-up")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for each process")
    p.add_argument("--json", type=Path, default=RESULTS / "bench_balancer.json")
    p.add_argument("--txt", type=Path, default=RESULTS / "bench_balancer.txt", help="where the printed report goes")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the process logs (kept on errors)")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.probe is None:
        args.probe = 1.0 if args.quick else 1.5
    if (
        min(args.rounds, args.concurrency) < 1
        or min(args.duration, args.probe) <= 0
        or min(args.warmup, args.delay_ms) < 0
    ):
        p.error("rounds and concurrency must be >= 1, duration and probe > 0, warmup and delay-ms >= 0")

    result = run_in_workdir("bench_balancer", args.keep_logs, lambda workdir: bench(args, workdir))
    if result is None:
        return 2
    text = report_text(result)
    print(text)
    write_json(result, args.json)
    args.txt.parent.mkdir(parents=True, exist_ok=True)
    args.txt.write_text(text + "\n")
    print(f"wrote {args.txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
