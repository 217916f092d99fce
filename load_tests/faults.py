"""Fault and overload scenarios under open-loop load, with one results table.

Run from the repository root (``make faults``; ``--quick`` for a ~2-minute smoke run)::

    python -m load_tests.faults                      # every scenario, 200 req/s for 60 s each
    python -m load_tests.faults --quick              # 15 s per scenario
    python -m load_tests.faults --only stop_node,overload --rate 300 --duration 30

Scenarios (each starts its own processes on free ports, in a temp dir, and stops them afterwards):

``kill_worker``
    a gateway serving ``pair`` (2 local worker instances); one worker is SIGKILLed: nothing may be
    lost (what it held is re-sent to the other instance); time until the restarted worker serves again.
``stop_node``
    a gateway over two standalone worker nodes (``--node``); one node is SIGSTOPped, later SIGCONTed:
    time until requests stop going there, errors meanwhile, time until it gets traffic again.
``cut_node``
    the same, but the node is cut off by the network: it runs in a network namespace whose veth end
    is taken down (needs root and ``ip``), or else sits behind a TCP proxy that stops forwarding.
``sigterm_gateway``
    SIGTERM to the gateway under load: every request either succeeds or gets a clear error
    (UNAVAILABLE once the listeners are closed), none hangs; in-flight requests finish during the drain.
``overload``
    a model with a known service time (one instance) and ``dynamic_batching { default_queue_policy
    { max_queue_size: N } }``: capacity measured in a closed loop, then ``--overload-factor`` (2) x
    capacity sent open loop: the excess must be rejected with RESOURCE_EXHAUSTED / HTTP 429 at once
    (< 50 ms), accepted requests' p99 stays bounded, gateway and worker RSS stay flat.

Models: ``simple`` from :func:`dl_inference.examples.make_example_repository` (x FP32 [-1,16] -> y
FP32 [-1,4]), as is for the remote nodes; for ``pair`` and ``bounded`` with a ``handler.py`` whose
``infer`` sleeps (per batch and/or per row) before running it: a service time that is known and
costs no CPU, so requests really are in flight when a worker dies or the gateway stops, and the
capacity does not depend on what else the 2-core machine is doing.

Load: a small asyncio open-loop sender over gRPC (pre-serialized ModelInferRequest, identity
serializers, as ``load_tests.perf``), constant arrival (``lib.load.arrival_times``), latency measured from
each request's *intended* send time. It keeps every request's record (intended/sent/done time,
outcome, message) because the scenarios cut the run at the fault, which perf's windowed ``LoadRun``
cannot. Every request has a gRPC deadline (``--request-timeout``); one that reaches it without an
answer counts as **lost**, as does one still unanswered when the run ends.

Outcome of each scenario: one table row (scenario | sent | ok | failed by kind | lost | p99 |
time to eject | time to recover | notes), the distinct error messages, a verdict and the details
(per-second timeline, endpoint-state changes, events) in ``--json`` / ``--txt``
(default ``load_tests/results/faults.{json,txt}``).

``python -m load_tests.faults tcp-proxy --port P --target HOST:PORT`` is the TCP proxy ``cut_node``
falls back to: SIGUSR1 stops forwarding (bytes are held, new connections wait), SIGUSR2 resumes.
``python -m load_tests.faults grpc-stall [--max-pending N]`` stalls a bare grpc.aio echo server under
load: what gRPC itself does with calls that arrive while a server's event loop is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from load_tests.lib.load import arrival_times
from load_tests.lib.procs import child_pids, cpu_times, descendants, rss_bytes, tree_rss
from load_tests.lib.report import machine_info, percentile, to_json, write_json_and_text
from load_tests.lib.server import (
    REPO_ROOT,
    BenchError,
    Server,
    free_port,
    py_module,
    start_server,
    stop_server,
    wait_ready,
)
from load_tests.loadgen import (
    MAX_MESSAGE_BYTES,
    MODEL_INFER_PATH,
    LoadConfig,
    TensorSpec,
    build_workload,
    check_grpc_response,
    grpc_request_bytes,
    run_coroutine,
)

RESULTS = REPO_ROOT / "load_tests" / "results"
SCENARIOS = ("kill_worker", "stop_node", "cut_node", "sigterm_gateway", "overload", "sigterm_node")
clock = time.perf_counter

OK = "ok"
LOST = "LOST"
#: gRPC codes that are a clear answer from the server (a status with a message), not a hang or a bug.
CLEAR_KINDS = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "HTTP 429", "HTTP 503"})
REJECT_TARGET_MS = 50.0  # overload: a rejection must come back faster than this (p99)
RSS_FLAT_PCT = 10.0  # overload: gateway/worker RSS growth above this over the run is reported as growth


class FaultError(RuntimeError):
    """A scenario could not run (a process did not start, a fault could not be injected)."""


# ---------------------------------------------------------------------------------------------
# models

SLEEP_HANDLER = '''"""Sleeps before running the model: a known service time that costs no CPU (load_tests.faults)."""
import time

_PER_BATCH = 0.0
_PER_ROW = 0.0


def initialize(context):
    global _PER_BATCH, _PER_ROW
    _PER_BATCH = float(context.parameters.get("sleep_ms_per_batch", "0")) / 1000.0
    _PER_ROW = float(context.parameters.get("sleep_ms_per_row", "0")) / 1000.0


def infer(model, inputs):
    rows = next(iter(inputs.values())).shape[0]
    time.sleep(_PER_BATCH + _PER_ROW * rows)
    return model(inputs)
'''


def example_model_file(workdir: Path) -> Path:
    """The example ``simple`` model's ONNX file (written once under ``workdir``)."""
    from dl_inference.examples import make_example_repository

    path = workdir / "examples" / "simple" / "1" / "model.onnx"
    if not path.exists():
        make_example_repository(workdir / "examples")
    return path


def write_simple_model(
    repo: Path,
    name: str,
    onnx_file: Path,
    *,
    instances: int = 1,
    max_batch_size: int = 8,
    sleep_ms_per_batch: float = 0.0,
    sleep_ms_per_row: float = 0.0,
    max_queue_size: int | None = None,
    dynamic_batching: bool = True,
) -> Path:
    """``repo/name``: the example ``simple`` model (x FP32 [16] -> y FP32 [4]) with ``instances``
    KIND_CPU instances; a sleeping ``handler.py`` when a sleep is given; ``dynamic_batching`` (no
    delay) with ``default_queue_policy { max_queue_size }`` when a queue size is given."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, model_dir / "1" / "model.onnx")
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        'input [{ name: "x" data_type: TYPE_FP32 dims: [16] }]',
        'output [{ name: "y" data_type: TYPE_FP32 dims: [4] }]',
        f"instance_group [{{ count: {instances} kind: KIND_CPU }}]",
    ]
    if dynamic_batching or max_queue_size:
        policy = f" default_queue_policy {{ max_queue_size: {max_queue_size} }}" if max_queue_size else ""
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: 0{policy} }}")
    if sleep_ms_per_batch or sleep_ms_per_row:
        for key, value in (("sleep_ms_per_batch", sleep_ms_per_batch), ("sleep_ms_per_row", sleep_ms_per_row)):
            lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value:g}" }} }}')
        (model_dir / "handler.py").write_text(SLEEP_HANDLER)
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    return model_dir


def request_body(model: str, rows: int = 1, seed: int = 0) -> tuple[bytes, Callable[[bytes], str | None]]:
    """A serialized ModelInferRequest for the ``simple`` signature and a checker for its response."""
    cfg = LoadConfig(model=model, batch=rows, seed=seed)
    work = build_workload([TensorSpec("x", "FP32", [-1, 16])], [TensorSpec("y", "FP32", [-1, 4])], cfg)
    return grpc_request_bytes(cfg, work), lambda data: check_grpc_response(data, cfg, work)


def http_body(model: str) -> bytes:
    x = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    return json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [float(v) for v in x]}]}
    ).encode()


# ---------------------------------------------------------------------------------------------
# processes and /proc


def worker_label(pid: int) -> str | None:
    """The ``model:version#instance`` label the gateway gave a worker (its DL_INFERENCE_WORKER)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"DL_INFERENCE_WORKER="):
            return item.split(b"=", 1)[1].decode()
    return None


def worker_pids(gateway_pid: int, model: str | None = None) -> dict[int, str]:
    """pid -> label of the gateway's worker processes (of ``model`` only, when given)."""
    out = {}
    for pid in child_pids(gateway_pid):
        label = worker_label(pid)
        if label and (model is None or label.split(":", 1)[0] == model):
            out[pid] = label
    return out


def start_gateway(
    workdir: Path, name: str, repo: Path, models: Sequence[str], *, nodes: Sequence[str] = (),
    config: dict[str, Any] | None = None, ready_timeout: float = 120.0,
) -> Server:  # fmt: skip
    grpc_port, http_port = free_port(), free_port()
    cmd = py_module("dl_inference", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
             "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0")  # fmt: skip
    for node in nodes:
        cmd += ["--node", node]
    if config:
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--config", str(path)]
    server = start_server(name, cmd, workdir / f"{name}.log", f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}")
    try:
        wait_ready(server, ready_timeout, tuple(models))
    except BaseException:
        stop_server(server)
        raise
    return server


def start_node(
    workdir: Path,
    name: str,
    repo: Path,
    model: str,
    *,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    port: int | None = None,
) -> Server:
    port = port or free_port()
    cmd = [*prefix, *py_module("dl_inference", "worker", "--model-repository", str(repo), "--model", model,
                        "--host", host, "--grpc-port", str(port))]  # fmt: skip
    server = start_server(name, cmd, workdir / f"{name}.log", f"{host}:{port}")
    try:
        wait_ready(server, 120.0, (model,))
    except BaseException:
        stop_server(server)
        raise
    return server


@contextlib.contextmanager
def processes() -> Iterator[Callable[[Server], Server]]:
    """Stop every registered server (and any worker left behind by a gateway) on the way out."""
    started: list[Server] = []
    seen_workers: set[int] = set()

    def register(server: Server) -> Server:
        started.append(server)
        return server

    try:
        yield register
    finally:
        for server in reversed(started):
            seen_workers.update(descendants(server.proc.pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.proc.pid, signal.SIGCONT)  # a scenario may have stopped it
            stop_server(server)
        for pid in seen_workers:  # workers live in sessions of their own; none may outlive a scenario
            if worker_label(pid) is not None:  # still one of those workers (not a reused pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# the open-loop sender


@dataclasses.dataclass(slots=True)
class Rec:
    """One request: intended send time, actual send time, end time (perf_counter s), outcome, message."""

    intended: float
    sent: float
    done: float
    outcome: str  # "ok", a gRPC status name, "HTTP <code>", "LOST", "BAD_RESPONSE" or an exception name
    message: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.done - self.intended) * 1000.0


Sink = Callable[[float, float, float, str, str], None]  # (intended, sent, done, outcome, message)
SendFn = Callable[[int], Awaitable[tuple[str, str]]]  # request number -> (outcome, message)


class GrpcSender:
    """ModelInfer with a pre-serialized body; a deadline reached without an answer is LOST."""

    def __init__(
        self, target: str, body: bytes, timeout: float, check: Callable[[bytes], str | None] | None = None,
        check_every: int = 50,
    ) -> None:  # fmt: skip
        self.target, self.body, self.timeout = target, body, timeout
        self.check, self.check_every = check, check_every
        self.channel: Any = None

    async def open(self) -> None:
        import grpc

        self._grpc = grpc
        self.channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.call = self.channel.unary_unary(MODEL_INFER_PATH)

    async def __call__(self, n: int) -> tuple[str, str]:
        t = clock()
        try:
            data = await self.call(self.body, timeout=self.timeout)
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code().name
            details = exc.details() or ""
            if code == "DEADLINE_EXCEEDED" and clock() - t >= self.timeout * 0.98:
                return LOST, f"no answer within the {self.timeout:g} s deadline ({details})"
            return code, details
        if self.check is not None and n % self.check_every == 0:
            problem = self.check(data)
            if problem:
                return "BAD_RESPONSE", problem
        return OK, ""

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class HttpSender:
    """POST /v2/models/{model}/infer with a JSON body; outcome ``HTTP <code>`` unless 200."""

    def __init__(self, http_url: str, model: str, timeout: float) -> None:
        self.url = f"http://{http_url}/v2/models/{model}/infer"
        self.body = http_body(model)
        self.timeout = timeout
        self.session: Any = None

    async def open(self) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def __call__(self, n: int) -> tuple[str, str]:
        try:
            async with self.session.post(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            ) as resp:
                payload = await resp.read()
                if resp.status == 200:
                    return OK, ""
                return f"HTTP {resp.status}", payload[:300].decode("utf-8", "replace")
        except TimeoutError:
            return LOST, f"no answer within {self.timeout:g} s"
        except self._aiohttp.ClientError as exc:
            return type(exc).__name__, str(exc)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class OpenLoop:
    """Sends at ``rate`` requests/s on a fixed schedule, whether or not earlier ones have returned.

    ``sink(intended, sent, done, outcome, message)`` gets every request once it ended; by default
    they are kept in ``records``. ``max_outstanding`` (default: enough for the whole deadline at
    this rate, i.e. never reached unless requests hang) caps requests in flight; a request held
    back by it counts in ``delayed`` (its latency still runs from its intended time).
    """

    def __init__(
        self, send: SendFn, rate: float, *, timeout: float, sink: Sink | None = None,
        max_outstanding: int | None = None, arrival: str = "constant", seed: int = 0,
    ) -> None:  # fmt: skip
        self.send = send
        self.rate = rate
        self.timeout = timeout
        self.records: list[Rec] = []
        self.sink: Sink = sink or self._keep
        self.max_outstanding = max_outstanding or int(rate * (timeout + 2)) + 64
        self.arrival = arrival
        self.rng = np.random.default_rng(seed)
        self.sent = 0
        self.delayed = 0
        self.inflight: dict[int, tuple[float, float]] = {}  # request number -> (intended, sent)
        self.peak_inflight = 0  # most in flight at once since the last reset (soak samples read and reset it)
        self.t0 = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._stopped_at: float | None = None

    def _keep(self, intended: float, sent: float, done: float, outcome: str, message: str) -> None:
        self.records.append(Rec(intended, sent, done, outcome, message))

    async def _one(self, n: int, intended: float) -> None:
        sent = clock()
        self.inflight[n] = (intended, sent)
        if len(self.inflight) > self.peak_inflight:
            self.peak_inflight = len(self.inflight)
        try:
            outcome, message = await self.send(n)
        except asyncio.CancelledError:
            self.inflight.pop(n, None)
            self.sink(intended, sent, clock(), LOST, "no answer when the run ended")
            raise
        except Exception as exc:  # an unforeseen client error counts; it never stops the run
            outcome, message = type(exc).__name__, str(exc)
        self.inflight.pop(n, None)
        self.sink(intended, sent, clock(), outcome, message)
        self._slot.set()

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        for intended in arrival_times(self.rate, self.arrival, self.t0, self.rng):
            now = clock()
            if intended > now:
                await asyncio.sleep(intended - now)
            if len(self.inflight) >= self.max_outstanding:
                self.delayed += 1
                while len(self.inflight) >= self.max_outstanding:
                    self._slot.clear()
                    await self._slot.wait()
            n = self.sent
            self.sent += 1
            task = loop.create_task(self._one(n, intended))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def start(self, t0: float | None = None) -> float:
        self.t0 = clock() if t0 is None else t0
        self._driver = asyncio.get_running_loop().create_task(self._schedule())
        return self.t0

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop sending; wait for what is in flight (up to the deadline + 2 s); the rest is LOST."""
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        self._stopped_at = clock()
        pending = list(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.timeout + 2.0 if drain_s is None else drain_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)


async def closed_loop(send: SendFn, concurrency: int, duration: float, warmup: float = 1.0) -> dict[str, Any]:
    """``concurrency`` workers back to back for ``warmup`` + ``duration`` s: throughput and latency."""
    lat: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    t_start = clock() + warmup
    t_end = t_start + duration
    counter = iter(range(10**12))

    async def worker() -> None:
        while True:
            t = clock()
            if t >= t_end:
                return
            outcome, _ = await send(next(counter))
            done = clock()
            if t >= t_start and done <= t_end:
                if outcome == OK:
                    lat.append((done - t) * 1000.0)
                else:
                    errors[outcome] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "throughput_rps": len(lat) / duration,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "errors": dict(errors),
    }


# ---------------------------------------------------------------------------------------------
# watching the gateway: /v2/endpoints, RSS


class EndpointPoller:
    """GET /v2/endpoints every ``interval`` s: samples of (t, {endpoint: row}), and state changes."""

    def __init__(self, http_url: str, interval: float = 0.05) -> None:
        self.url = f"http://{http_url}/v2/endpoints"
        self.interval = interval
        self.samples: list[tuple[float, dict[str, dict[str, Any]]]] = []
        self.counters: dict[str, Any] = {}
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while True:
                t = clock()
                try:
                    async with session.get(self.url) as resp:
                        data = await resp.json()
                    self.samples.append((t, {e["endpoint"]: e for e in data["endpoints"]}))
                    self.counters = data.get("counters", {})
                except Exception:  # the gateway may be stopping; keep polling until told to stop
                    self.errors += 1
                await asyncio.sleep(max(0.0, self.interval - (clock() - t)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for(self, predicate: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> float | None:
        """Wait until a new sample satisfies ``predicate``; its time, or None after ``timeout``."""
        start = len(self.samples)
        deadline = clock() + timeout
        while clock() < deadline:
            for t, rows in self.samples[start:]:
                if predicate(rows):
                    return t
            start = len(self.samples)
            await asyncio.sleep(self.interval / 2)
        return None


Samples = Sequence[tuple[float, dict[str, dict[str, Any]]]]


def first_state(samples: Samples, endpoint: str, t_from: float, healthy: bool) -> float | None:
    """First sample at or after ``t_from`` where ``endpoint`` is (not) healthy."""
    for t, rows in samples:
        row = rows.get(endpoint)
        if t >= t_from and row is not None and (row["state"] == "healthy") == healthy:
            return t
    return None


def dispatch_times(samples: Samples, endpoint: str) -> list[float]:
    """Times of the samples at which ``endpoint``'s request counter had grown since the previous one."""
    out, prev = [], None
    for t, rows in samples:
        row = rows.get(endpoint)
        if row is None:
            continue
        if prev is not None and row["requests"] > prev:
            out.append(t)
        prev = row["requests"]
    return out


def last_dispatch(samples: Samples, endpoint: str, t_from: float, t_to: float) -> float | None:
    """When requests stopped going to ``endpoint`` after a fault at ``t_from``: the last sample in
    (``t_from``, ``t_to``] that saw its counter grow, or ``t_from`` itself when none did."""
    grew = [t for t in dispatch_times(samples, endpoint) if t_from < t <= t_to]
    if not samples:
        return None
    return grew[-1] if grew else t_from


def first_dispatch(samples: Samples, endpoint: str, t_from: float) -> float | None:
    """First sample after ``t_from`` that saw ``endpoint``'s request counter grow (traffic again)."""
    return next((t for t in dispatch_times(samples, endpoint) if t > t_from), None)


SERIES_FIELDS = ("state", "requests", "inflight", "latency_ewma_ms", "effective_weight", "failures", "retries")


def endpoint_series(samples: Samples, endpoint: str, t0: float, step: float = 0.25) -> dict[str, Any]:
    """One endpoint's rows over time, compact: {"fields": [...], "rows": [[t, ...], ...]}: one sample
    every ``step`` seconds, plus every sample where its state changed."""
    rows: list[list[Any]] = []
    last_t, last_state = -1e9, None
    for t, table in samples:
        row = table.get(endpoint)
        if row is not None and (t - last_t >= step - 1e-6 or row.get("state") != last_state):
            rows.append([round(t - t0, 3), *(row.get(f) for f in SERIES_FIELDS)])
            last_t, last_state = t, row.get("state")
    return {"endpoint": endpoint, "step_s": step, "fields": ["t", *SERIES_FIELDS], "rows": rows}


def state_changes(samples: Samples, t0: float) -> list[dict[str, Any]]:
    """Every change of an endpoint's state, times relative to ``t0``."""
    out: list[dict[str, Any]] = []
    last: dict[str, str] = {}
    for t, rows in samples:
        for name, row in rows.items():
            if last.get(name) != row["state"]:
                out.append({"t": round(t - t0, 3), "endpoint": name, "state": row["state"]})
                last[name] = row["state"]
    return out


class RssSampler:
    """The gateway's and its workers' RSS every ``interval`` s (from /proc)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self.t0 = clock()

    def sample(self) -> dict[str, Any]:
        s = tree_rss(self.pid)
        s["t"] = round(clock() - self.t0, 3)
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.t0 = clock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()


class MachineWatch:
    """Noise on a shared machine: how busy all CPUs were during a scenario, and how late the load
    generator's own event loop woke up (a stalled client sends late and reads answers late)."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = cpu_times()
        self._load0 = os.getloadavg()[0]

    async def _run(self) -> None:
        while True:
            t = clock()
            await asyncio.sleep(self.tick)
            self.lags_ms.append(max(0.0, (clock() - t - self.tick) * 1000.0))

    def start(self) -> MachineWatch:
        self._cpu0 = cpu_times()
        self._load0 = os.getloadavg()[0]
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        busy1, total1 = cpu_times()
        busy0, total0 = self._cpu0
        lag = {"p99": _round(percentile(self.lags_ms, 99)), "max": _round(max(self.lags_ms, default=0.0))}
        return {
            "cpu_busy_pct": round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1),
            "loadavg_1min": [round(self._load0, 2), round(os.getloadavg()[0], 2)],
            "client_loop_lag_ms": lag,
        }


def rss_summary(samples: Sequence[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """first / last / max (MiB) of one RSS series and growth % last vs first."""
    values = [s[key] for s in samples if s.get(key)]
    if not values:
        return None
    first, last = values[0], values[-1]
    return {
        "first_mib": round(first / 2**20, 1),
        "last_mib": round(last / 2**20, 1),
        "max_mib": round(max(values) / 2**20, 1),
        "growth_pct": round((last - first) / first * 100.0, 2),
    }


# ---------------------------------------------------------------------------------------------
# summaries (pure: tests/tools/test_faults_report.py)


def summarize(records: Sequence[Rec], max_messages: int = 8) -> dict[str, Any]:
    """Counts, latency of successful requests (from intended send time) and the distinct messages."""
    outcomes = collections.Counter(r.outcome for r in records)
    ok_lat = [r.latency_ms for r in records if r.outcome == OK]
    messages: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in records:
        if r.outcome != OK:
            messages[r.outcome][r.message[:300]] += 1
    failed = {k: v for k, v in sorted(outcomes.items()) if k not in (OK, LOST)}
    return {
        "sent": len(records),
        "ok": outcomes.get(OK, 0),
        "failed": sum(failed.values()),
        "failed_by_kind": failed,
        "lost": outcomes.get(LOST, 0),
        "latency_ms": {
            "p50": percentile(ok_lat, 50),
            "p99": percentile(ok_lat, 99),
            "max": max(ok_lat) if ok_lat else None,
        },
        "messages": {kind: _top_messages(counter, max_messages) for kind, counter in sorted(messages.items())},
    }


def _top_messages(counter: collections.Counter[str], n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"message": m, "count": c} for m, c in counter.most_common(n)]
    if len(counter) > n:
        out.append({"message": f"... {len(counter) - n} more distinct messages", "count": 0})
    return out


def timeline(records: Sequence[Rec], t0: float, step: float = 1.0) -> list[dict[str, Any]]:
    """Per ``step`` seconds of intended send time: sent, ok, failed, lost, p99 of the successful."""
    buckets: dict[int, list[Rec]] = collections.defaultdict(list)
    for r in records:
        buckets[int((r.intended - t0) // step)].append(r)
    out = []
    for i in sorted(buckets):
        rs = buckets[i]
        out.append(
            {
                "t": round(i * step, 3),
                "sent": len(rs),
                "ok": sum(r.outcome == OK for r in rs),
                "failed": sum(r.outcome not in (OK, LOST) for r in rs),
                "lost": sum(r.outcome == LOST for r in rs),
                "p99_ms": _round(percentile((r.latency_ms for r in rs if r.outcome == OK), 99)),
            }
        )
    return out


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def secs(a: float | None, b: float | None) -> float | None:
    """``a - b`` in seconds (rounded), None when either is unknown."""
    return None if a is None or b is None else round(a - b, 3)


def verdict(result: dict[str, Any]) -> list[str]:
    """What is wrong with a scenario's result (empty: it passed). Rules common to every scenario:
    nothing lost, every failure a clear error of an allowed kind with a message."""
    problems = []
    if result["lost"]:
        problems.append(f"{result['lost']} request(s) lost (no answer within the deadline)")
    allowed = set(result.get("allowed_failures", ()))
    for kind, count in result["failed_by_kind"].items():
        if kind not in allowed:
            problems.append(f"{count} unexpected {kind}")
    for kind, msgs in result.get("messages", {}).items():
        if kind != LOST and any(not m["message"].strip() for m in msgs):
            problems.append(f"{kind} without a message")
    problems.extend(result.get("problems", []))
    return problems


# ---------------------------------------------------------------------------------------------
# the table

COLUMNS = ("scenario", "sent", "ok", "failed (by kind)", "lost", "p99 ms", "time to eject", "time to recover", "notes")


def _failed_cell(result: dict[str, Any]) -> str:
    kinds = result["failed_by_kind"]
    if not kinds:
        return "0"
    return f"{result['failed']} (" + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ")"


def _secs_cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def table_row(result: dict[str, Any]) -> list[str]:
    p99 = result["latency_ms"]["p99"]
    notes = "; ".join(result.get("notes", []))
    status = "PASS" if not result.get("problems_all") else "FAIL: " + "; ".join(result["problems_all"])
    return [
        result["scenario"],
        str(result["sent"]),
        str(result["ok"]),
        _failed_cell(result),
        str(result["lost"]),
        "-" if p99 is None else f"{p99:.1f}",
        _secs_cell(result.get("time_to_eject_s")),
        _secs_cell(result.get("time_to_recover_s")),
        f"{status}. {notes}" if notes else status,
    ]


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per scenario."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in table_row(r)) + " |")
    return "\n".join(lines)


def format_messages(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        for kind, msgs in r.get("messages", {}).items():
            for m in msgs:
                lines.append(f"  {r['scenario']}: {kind} x{m['count']}: {m['message']}")
    return "\n".join(lines) if lines else "  (none)"


def report_text(report: dict[str, Any]) -> str:
    cfg = report["config"]
    head = (
        f"load_tests.faults: {cfg['rate']:g} req/s open loop, {cfg['duration_s']:g} s per scenario, "
        f"deadline {cfg['request_timeout_s']:g} s ({report['machine'].get('cpu_count')} CPUs, "
        f"load average {report['machine'].get('loadavg_start')} at start)"
    )
    parts = [head, "", format_table(report["results"]), "", "Distinct error messages:",
             format_messages(report["results"])]  # fmt: skip
    for r in report["results"]:
        if r.get("error"):
            parts.append(f"\n{r['scenario']}: could not run: {r['error']}")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# scenarios


@dataclasses.dataclass
class Options:
    rate: float = 200.0
    duration: float = 60.0
    request_timeout: float = 10.0
    fast_checks: bool = False
    cut_method: str = "auto"  # auto | netns | proxy
    service_ms: float = 10.0  # overload: per-row sleep of the one instance
    queue_size: int = 16  # overload: max_queue_size
    overload_factor: float = 2.0
    batch_sleep_ms: float = 20.0  # kill_worker / sigterm_gateway: per-batch sleep
    node_policy: str = "weighted_round_robin"  # stop_node / cut_node: the victim carries half the load
    quick: bool = False


FAST_CHECKS = {"health_interval_s": 0.2, "health_timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 2}


def balancer_config(opts: Options, policy: str | None = None) -> dict[str, Any] | None:
    balancer: dict[str, Any] = dict(FAST_CHECKS) if opts.fast_checks else {}
    if policy:
        balancer["policy"] = policy
    return {"balancer": balancer} if balancer else None


async def finish(
    scenario: str, description: str, loop: OpenLoop, t0: float, watch: MachineWatch, *,
    allowed: Iterable[str] = (), notes: list[str], problems: list[str], **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    machine = await watch.stop()
    lag = machine["client_loop_lag_ms"]
    notes.append(
        f"machine CPU busy {machine['cpu_busy_pct']:.0f}%, client loop lag p99 {lag['p99'] or 0:.0f} / "
        f"max {lag['max'] or 0:.0f} ms"
    )
    result: dict[str, Any] = {"scenario": scenario, "description": description, "machine": machine}
    result.update(summarize(loop.records))
    result["allowed_failures"] = sorted(allowed)
    result["problems"] = problems
    result["notes"] = notes
    result["delayed_by_cap"] = loop.delayed
    result.update(extra)
    if "CANCELLED" in result["failed_by_kind"]:
        notes.append(
            "CANCELLED: calls gRPC core dropped before the server picked them up (its pending-call backlog "
            "protector, or calls still unpicked at shutdown), see load_tests/README.md"
        )
    result["problems_all"] = verdict(result)
    unexpected = [r for r in loop.records if r.outcome != OK and r.outcome not in result["allowed_failures"]]
    result["unexpected_failures"] = [
        {"intended": round(r.intended - t0, 4), "sent": round(r.sent - t0, 4), "done": round(r.done - t0, 4),
         "outcome": r.outcome, "message": r.message}
        for r in unexpected[:20]
    ]  # fmt: skip
    result["timeline"] = timeline(loop.records, t0)
    return result


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - clock()))


def _count_in_log(server: Server, needle: str) -> int:
    try:
        return server.log.read_text(errors="replace").count(needle)
    except OSError:
        return 0


@dataclasses.dataclass
class Load:
    """Open-loop gRPC load on one model of a gateway, with its endpoint table polled."""

    sender: GrpcSender
    poller: EndpointPoller
    loop: OpenLoop
    watch: MachineWatch
    t0: float

    async def stop(self) -> None:
        await self.loop.stop()
        await self.poller.stop()
        await self.sender.close()

    def endpoint_report(self) -> dict[str, Any]:
        """What every node/worker scenario reports about the gateway's endpoints."""
        s, t0 = self.poller.samples, self.t0
        return {
            "endpoint_states": state_changes(s, t0),
            "counters": self.poller.counters,
            "series": [endpoint_series(s, name, t0) for name in sorted(s[-1][1])] if s else [],
        }


async def start_load(gw: Server, model: str, opts: Options) -> Load:
    body, check = request_body(model)
    sender = GrpcSender(gw.grpc_url, body, opts.request_timeout, check)
    await sender.open()
    assert gw.http_url is not None
    poller = EndpointPoller(gw.http_url)
    poller.start()
    loop = OpenLoop(sender, opts.rate, timeout=opts.request_timeout)
    watch = MachineWatch().start()
    return Load(sender, poller, loop, watch, loop.start())


def scenario_kill_worker(workdir: Path, opts: Options) -> dict[str, Any]:
    repo = workdir / "repo_pair"
    write_simple_model(repo, "pair", example_model_file(workdir), instances=2, sleep_ms_per_batch=opts.batch_sleep_ms)
    with processes() as reg:
        gw = reg(start_gateway(workdir, "gateway-kill", repo, ["pair"], config=balancer_config(opts)))
        return run_coroutine(_kill_worker(gw, opts))  # type: ignore[no-any-return]


async def _kill_worker(gw: Server, opts: Options) -> dict[str, Any]:
    load = await start_load(gw, "pair", opts)
    loop, poller, watch, t0, D = load.loop, load.poller, load.watch, load.t0, opts.duration
    notes: list[str] = []
    problems: list[str] = []
    await _sleep_until(t0 + 0.3 * D)
    workers = worker_pids(gw.proc.pid, "pair")
    if not workers:
        raise FaultError(f"no worker process of 'pair' under the gateway (pid {gw.proc.pid})")
    if len(workers) != 2:
        problems.append(f"expected 2 workers of 'pair', found {workers}")
    victim, label = sorted(workers.items())[0]
    endpoint = f"local:{label}"
    inflight_gw = (poller.samples[-1][1].get(endpoint) or {}).get("inflight") if poller.samples else None
    t_kill = clock()
    os.kill(victim, signal.SIGKILL)
    t_pid = None
    while clock() - t_kill < 60:
        if set(worker_pids(gw.proc.pid, "pair")) - set(workers):
            t_pid = clock()
            break
        await asyncio.sleep(0.05)
    t_back = None
    if first_state(poller.samples, endpoint, t_kill, healthy=False) is not None or await poller.wait_for(
        lambda rows: rows.get(endpoint, {}).get("state") != "healthy", 10
    ):
        t_back = await poller.wait_for(lambda rows: rows.get(endpoint, {}).get("state") == "healthy", 60)
        if t_back is None:
            t_back = first_state(poller.samples, endpoint, t_pid or t_kill, healthy=True)
    await _sleep_until(t0 + D)
    await load.stop()
    s = poller.samples
    t_down = first_state(s, endpoint, t_kill, healthy=False)
    t_traffic = first_dispatch(s, endpoint, t_back) if t_back is not None else None
    resent = _count_in_log(gw, "re-sending a request of model 'pair'")
    notes.append(f"killed {label} (pid {victim}) at {t_kill - t0:.1f} s, {inflight_gw} in flight there")
    notes.append(f"noticed (endpoint down) after {_secs_cell(secs(t_down, t_kill))}")
    notes.append(
        f"new process after {_secs_cell(secs(t_pid, t_kill))}, healthy after {_secs_cell(secs(t_back, t_kill))}"
    )
    notes.append(f"{resent} request(s) re-sent to the other instance")
    if t_back is None:
        problems.append("the killed worker did not come back within 60 s")
    return await finish(
        "kill_worker",
        f"SIGKILL one of 2 worker instances of 'pair' (simple + {opts.batch_sleep_ms:g} ms sleep per batch)",
        loop, t0, watch, allowed=(), notes=notes, problems=problems,
        time_to_eject_s=secs(t_down, t_kill), time_to_recover_s=secs(t_traffic, t_kill),
        events={"kill": secs(t_kill, t0), "new_pid": secs(t_pid, t0), "healthy": secs(t_back, t0),
                "traffic_again": secs(t_traffic, t0)},
        resent=resent, **load.endpoint_report(),
    )  # fmt: skip


class Cut:
    """How ``cut_node``/``stop_node`` take a node out and bring it back."""

    def __init__(self, what: str, down: Callable[[], None], up: Callable[[], None]) -> None:
        self.what, self.down, self.up = what, down, up


def run_cmd(*cmd: str) -> None:
    """Run a command (ip ...), raising on failure; output captured."""
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def netns_available() -> str | None:
    """None when a network namespace can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip"):
        return "no ip command"
    name = f"dlf{os.getpid() % 100000}t"
    try:
        run_cmd("ip", "netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns add failed: {exc}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


@contextlib.contextmanager
def network_namespace(prefix: str = "dlf", net: int = 202) -> Iterator[tuple[str, str, str]]:
    """(namespace, node-side veth, node address inside the namespace): a namespace joined to this
    one by a veth pair on 10.<net>.x.0/24; taking the node's end down cuts the node off.
    Also used by tests/integration/test_balancing_netns.py (with its own prefix and net)."""
    tag = f"{os.getpid() % 100000}"
    ns, host_if, node_if = f"{prefix}{tag}", f"{prefix}h{tag}", f"{prefix}n{tag}"
    subnet = 100 + os.getpid() % 100
    host_ip, node_ip = f"10.{net}.{subnet}.1", f"10.{net}.{subnet}.2"
    run_cmd("ip", "netns", "add", ns)
    try:
        run_cmd("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
        run_cmd("ip", "link", "set", node_if, "netns", ns)
        run_cmd("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        run_cmd("ip", "link", "set", host_if, "up")
        run_cmd("ip", "netns", "exec", ns, "ip", "addr", "add", f"{node_ip}/24", "dev", node_if)
        run_cmd("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up")
        run_cmd("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, node_if, node_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _two_nodes(
    workdir: Path, opts: Options, reg: Callable[[Server], Server], gateway_name: str
) -> tuple[Path, Server, Server]:
    """Two standalone worker nodes of `simple` behind a gateway; returns (repository, victim node, gateway)."""
    repo = workdir / "repo_simple"
    write_simple_model(repo, "simple", example_model_file(workdir), dynamic_batching=False)
    nodes = [reg(start_node(workdir, f"node{i}", repo, "simple")) for i in range(2)]
    config = balancer_config(opts, opts.node_policy)
    gw = reg(start_gateway(workdir, gateway_name, workdir / "empty", ["simple"],
                           nodes=[n.grpc_url for n in nodes], config=config))  # fmt: skip
    return repo, nodes[1], gw


def scenario_stop_node(workdir: Path, opts: Options) -> dict[str, Any]:
    with processes() as reg:
        _, victim, gw = _two_nodes(workdir, opts, reg, "gateway-stop")
        cut = Cut(
            f"SIGSTOP node {victim.grpc_url} (pid {victim.proc.pid})",
            lambda: os.kill(victim.proc.pid, signal.SIGSTOP),
            lambda: os.kill(victim.proc.pid, signal.SIGCONT),
        )
        try:
            return run_coroutine(_node_fault("stop_node", gw, victim.grpc_url, cut, opts))  # type: ignore[no-any-return]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.proc.pid, signal.SIGCONT)


def scenario_sigterm_node(workdir: Path, opts: Options) -> dict[str, Any]:
    """A rolling update of one worker node: SIGTERM it under load, later start a new one on its address."""
    with processes() as reg:
        repo, victim, gw = _two_nodes(workdir, opts, reg, "gateway-sigterm-node")
        port = int(victim.grpc_url.rsplit(":", 1)[1])

        def replace() -> None:
            victim.proc.wait(30)
            reg(start_node(workdir, "node1-new", repo, "simple", port=port))

        cut = Cut(
            f"SIGTERM node {victim.grpc_url} (pid {victim.proc.pid}), a new node started on its port later",
            lambda: victim.proc.send_signal(signal.SIGTERM),
            replace,
        )
        return run_coroutine(_node_fault("sigterm_node", gw, victim.grpc_url, cut, opts))  # type: ignore[no-any-return]


def scenario_cut_node(workdir: Path, opts: Options) -> dict[str, Any]:
    repo = workdir / "repo_simple"
    write_simple_model(repo, "simple", example_model_file(workdir), dynamic_batching=False)
    method = opts.cut_method
    why_not = None
    if method in ("auto", "netns"):
        why_not = netns_available()
        if why_not and method == "netns":
            raise FaultError(f"cannot use a network namespace: {why_not}")
        method = "proxy" if why_not else "netns"
    with contextlib.ExitStack() as stack, processes() as reg:  # processes stop before the namespace goes
        local = reg(start_node(workdir, "node0", repo, "simple"))
        if method == "netns":
            ns, node_if, node_ip = stack.enter_context(network_namespace())
            victim = reg(start_node(workdir, "node-ns", repo, "simple", host=node_ip,
                                    prefix=("ip", "netns", "exec", ns)))  # fmt: skip
            address = victim.grpc_url
            cut = Cut(
                f"veth link of node {address} (namespace {ns}) down",
                lambda: run_cmd("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "down"),
                lambda: run_cmd("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up"),
            )
            stack.callback(lambda: subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up"],
                                                  capture_output=True, timeout=10))  # fmt: skip
        else:
            behind = reg(start_node(workdir, "node1", repo, "simple"))
            port = free_port()
            proxy = reg(start_server("tcp proxy", py_module("load_tests.faults", "tcp-proxy", "--port", str(port),
                                                     "--target", behind.grpc_url),
                                     workdir / "tcp-proxy.log", f"127.0.0.1:{port}"))  # fmt: skip
            wait_ready(proxy, 30.0, ("simple",))
            address = proxy.grpc_url
            cut = Cut(
                f"TCP proxy in front of node {behind.grpc_url} stops forwarding"
                + (f" (no network namespace: {why_not})" if why_not else ""),
                lambda: os.kill(proxy.proc.pid, signal.SIGUSR1),
                lambda: os.kill(proxy.proc.pid, signal.SIGUSR2),
            )
        config = balancer_config(opts, opts.node_policy)
        gw = reg(start_gateway(workdir, "gateway-cut", workdir / "empty", ["simple"],
                               nodes=[local.grpc_url, address], config=config))  # fmt: skip
        result: dict[str, Any] = run_coroutine(_node_fault("cut_node", gw, address, cut, opts))
        result["cut_method"] = method
        return result


async def _node_fault(scenario: str, gw: Server, address: str, cut: Cut, opts: Options) -> dict[str, Any]:
    load = await start_load(gw, "simple", opts)
    loop, poller, watch, t0, D = load.loop, load.poller, load.watch, load.t0, opts.duration
    notes: list[str] = []
    problems: list[str] = []
    await _sleep_until(t0 + 0.25 * D)
    if not dispatch_times(poller.samples, address):
        problems.append(f"node {address} got no traffic before the fault")
    t_down = clock()
    await asyncio.to_thread(cut.down)
    await _sleep_until(t0 + 0.6 * D)
    t_up = clock()
    await asyncio.to_thread(cut.up)
    await _sleep_until(t0 + D)
    await load.stop()
    s = poller.samples
    t_unhealthy = first_state(s, address, t_down, healthy=False)
    t_stop = last_dispatch(s, address, t_down, t_up)
    t_healthy = first_state(s, address, t_up, healthy=True)
    t_traffic = first_dispatch(s, address, t_up)
    during = [r for r in loop.records if t_down <= r.intended < t_up]
    failed_during = sum(r.outcome not in (OK, LOST) for r in during)
    slow_during = percentile((r.latency_ms for r in during if r.outcome == OK), 100)
    notes.append(f"{cut.what} at {t_down - t0:.1f} s for {t_up - t_down:.1f} s")
    notes.append(
        f"marked unhealthy after {_secs_cell(secs(t_unhealthy, t_down))}; healthy again "
        f"{_secs_cell(secs(t_healthy, t_up))} after restore"
    )
    notes.append(f"while out: {len(during)} sent, {failed_during} failed, slowest ok {slow_during or 0:.0f} ms")
    resent = _count_in_log(gw, "re-sending a request of model 'simple'")
    notes.append(f"{resent} request(s) re-sent elsewhere")
    if t_unhealthy is None:
        problems.append("the node was never taken out")
    if t_traffic is None:
        problems.append("the node got no traffic again after it came back")
    return await finish(
        scenario, f"{cut.what}; gateway over 2 worker nodes of 'simple', policy {opts.node_policy}, "
        + ("fast health checks" if opts.fast_checks else "default health checks (1 s interval/timeout, 2 failures)"),
        loop, t0, watch, allowed=(), notes=notes, problems=problems,
        time_to_eject_s=secs(t_stop, t_down), time_to_recover_s=secs(t_traffic, t_up),
        events={"fault": secs(t_down, t0), "last_dispatch": secs(t_stop, t0), "unhealthy": secs(t_unhealthy, t0),
                "restore": secs(t_up, t0), "healthy": secs(t_healthy, t0), "traffic_again": secs(t_traffic, t0)},
        resent=resent, **load.endpoint_report(),
        during_fault={"sent": len(during), "failed": failed_during, "slowest_ok_ms": _round(slow_during)},
    )  # fmt: skip


def scenario_sigterm_gateway(workdir: Path, opts: Options) -> dict[str, Any]:
    repo = workdir / "repo_pair"
    write_simple_model(repo, "pair", example_model_file(workdir), instances=2, sleep_ms_per_batch=opts.batch_sleep_ms)
    with processes() as reg:
        gw = reg(start_gateway(workdir, "gateway-term", repo, ["pair"], config=balancer_config(opts)))
        return run_coroutine(_sigterm(gw, opts))  # type: ignore[no-any-return]


async def _sigterm(gw: Server, opts: Options) -> dict[str, Any]:
    body, check = request_body("pair")
    sender = GrpcSender(gw.grpc_url, body, opts.request_timeout, check)
    await sender.open()
    loop = OpenLoop(sender, opts.rate, timeout=opts.request_timeout)
    D = opts.duration
    watch = MachineWatch().start()
    t0 = loop.start()
    notes: list[str] = []
    problems: list[str] = []
    await _sleep_until(t0 + 0.5 * D)
    workers = worker_pids(gw.proc.pid)
    inflight_at_term = dict(loop.inflight)
    t_term = clock()
    gw.proc.send_signal(signal.SIGTERM)
    t_exit = None
    while clock() - t_term < 60:
        if gw.proc.poll() is not None:
            t_exit = clock()
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(3.0 if t_exit is not None else 0.0)  # keep sending at the closed port for 3 s
    await loop.stop()
    await sender.close()
    await asyncio.sleep(0.5)
    left = [pid for pid in workers if rss_bytes(pid) is not None]
    by_n = {(r.intended, r.sent): r for r in loop.records}
    held = [by_n.get(v) for v in inflight_at_term.values()]
    held_ok = sum(1 for r in held if r is not None and r.outcome == OK)
    after = [r for r in loop.records if r.sent >= t_term]
    served_after = sum(r.outcome == OK for r in after)
    last_ok = max((r.done for r in loop.records if r.outcome == OK), default=None)
    first_fail = min((r.done for r in after if r.outcome != OK), default=None)
    code = gw.proc.returncode
    notes.append(f"SIGTERM at {t_term - t0:.1f} s; exit code {code} after {_secs_cell(secs(t_exit, t_term))}")
    notes.append(f"{len(held)} in flight at SIGTERM, {held_ok} of them completed ok during the drain")
    notes.append(
        f"{served_after} of {len(after)} sent after SIGTERM served; first failure "
        f"{_secs_cell(secs(first_fail, t_term))} after it; worker processes left: {len(left)}"
    )
    cancelled = [r for r in loop.records if r.outcome == "CANCELLED"]
    if cancelled:
        notes.append(
            "CANCELLED ones sent at "
            + ", ".join(f"{(r.sent - t_term) * 1e3:+.1f} ms" for r in cancelled[:5])
            + " from SIGTERM, ended at "
            + ", ".join(f"{(r.done - t_term) * 1e3:+.1f} ms" for r in cancelled[:5])
            + (f" (exit at {(t_exit - t_term) * 1e3:+.0f} ms)" if t_exit is not None else "")
        )
    if t_exit is None:
        problems.append("the gateway did not exit within 60 s of SIGTERM")
    elif code != 0:
        problems.append(f"the gateway exited with code {code}")
    if held_ok != len(held):
        problems.append(f"{len(held) - held_ok} request(s) in flight at SIGTERM did not complete ok")
    if left:
        problems.append(f"worker process(es) {left} still running after the gateway exited")
    return await finish(
        "sigterm_gateway",
        f"SIGTERM to a gateway serving 'pair' (2 instances, {opts.batch_sleep_ms:g} ms sleep per batch), "
        "default drain settings",
        loop, t0, watch, allowed=("UNAVAILABLE",), notes=notes, problems=problems,
        events={"sigterm": secs(t_term, t0), "exit": secs(t_exit, t0), "last_ok": secs(last_ok, t0),
                "first_failure": secs(first_fail, t0)},
        inflight_at_sigterm=len(held), completed_during_drain=held_ok, served_after_sigterm=served_after,
        exit_code=code, workers_left=left,
    )  # fmt: skip


def scenario_overload(workdir: Path, opts: Options) -> dict[str, Any]:
    repo = workdir / "repo_bounded"
    write_simple_model(
        repo, "bounded", example_model_file(workdir), instances=1, sleep_ms_per_row=opts.service_ms,
        max_queue_size=opts.queue_size,
    )  # fmt: skip
    with processes() as reg:
        gw = reg(start_gateway(workdir, "gateway-overload", repo, ["bounded"]))
        return run_coroutine(_overload(gw, opts))  # type: ignore[no-any-return]


async def _overload(gw: Server, opts: Options) -> dict[str, Any]:
    body, check = request_body("bounded")
    sender = GrpcSender(gw.grpc_url, body, opts.request_timeout, check)
    await sender.open()
    notes: list[str] = []
    problems: list[str] = []
    # Capacity: closed loop with fewer clients than the queue holds, so nothing is rejected.
    cap = await closed_loop(sender, max(2, opts.queue_size // 2), 3.0 if opts.quick else 6.0)
    capacity = cap["throughput_rps"]
    if capacity <= 0:
        raise FaultError(f"capacity measurement failed: {cap}")
    # No overload: half the capacity, open loop.
    base_loop = OpenLoop(sender, capacity / 2, timeout=opts.request_timeout)
    base_s = 5.0 if opts.quick else min(15.0, opts.duration / 4)
    base_loop.start()
    await asyncio.sleep(base_s)
    await base_loop.stop()
    base = summarize(base_loop.records)
    # Overload: factor x capacity over gRPC, plus a trickle over HTTP to see the status code there.
    rate = capacity * opts.overload_factor
    assert gw.http_url is not None
    http = HttpSender(gw.http_url, "bounded", opts.request_timeout)
    await http.open()
    rss = RssSampler(gw.proc.pid, interval=1.0)
    rss.start()
    loop = OpenLoop(sender, rate, timeout=opts.request_timeout)
    http_loop = OpenLoop(http, max(2.0, rate * 0.05), timeout=opts.request_timeout)
    watch = MachineWatch().start()
    t0 = loop.start()
    http_loop.start(t0)
    await _sleep_until(t0 + opts.duration)
    await asyncio.gather(loop.stop(), http_loop.stop())
    await rss.stop()
    await http.close()
    await sender.close()
    rejected = [r for r in loop.records if r.outcome == "RESOURCE_EXHAUSTED"]
    reject_ms = [r.latency_ms for r in rejected]
    reject_sent_ms = [(r.done - r.sent) * 1000.0 for r in rejected]
    lag_ms = [(r.sent - r.intended) * 1000.0 for r in loop.records]
    res = summarize(loop.records)
    http_sum = summarize(http_loop.records)
    p99_ok, p99_base = res["latency_ms"]["p99"], base["latency_ms"]["p99"]
    bound_ms = (opts.queue_size + 8 + 1) * opts.service_ms  # queue + one batch of up to max_batch_size rows
    mem = {k: rss_summary(rss.samples, k) for k in ("gateway", "workers", "total")}
    rej_p50, rej_p99 = percentile(reject_ms, 50), percentile(reject_ms, 99)
    notes.append(
        f"capacity {capacity:.0f} req/s (closed loop c={cap['concurrency']}, service {opts.service_ms:g} ms/row, "
        f"max_queue_size {opts.queue_size}); sent {rate:.0f} req/s"
    )
    notes.append(
        f"{len(rejected)} rejected: time to reject p50 {_ms(rej_p50)} / p99 {_ms(rej_p99)} "
        f"(target < {REJECT_TARGET_MS:g} ms; from the send: p99 {_ms(percentile(reject_sent_ms, 99))})"
    )
    notes.append(
        f"accepted p99 {_ms(p99_ok)} vs {_ms(p99_base)} without overload ({capacity / 2:.0f} req/s); "
        f"bound (queue + batch) x service = {bound_ms:.0f} ms"
    )
    for key in ("gateway", "workers"):
        m = mem[key]
        if m:
            notes.append(
                f"{key} RSS {m['first_mib']} -> {m['last_mib']} MiB (max {m['max_mib']}, {m['growth_pct']:+.1f}%)"
            )
    http_codes = {k: v for k, v in sorted(collections.Counter(r.outcome for r in http_loop.records).items())}
    notes.append("HTTP side: " + ", ".join(f"{k} {v}" for k, v in http_codes.items()))
    if not rejected:
        problems.append("nothing was rejected at overload")
    if rej_p99 is not None and rej_p99 >= REJECT_TARGET_MS:
        stall = max(watch.lags_ms, default=0.0)
        noise = f" (the client's own event loop stalled up to {stall:.0f} ms)" if stall >= REJECT_TARGET_MS else ""
        problems.append(f"time to reject p99 {rej_p99:.1f} ms >= {REJECT_TARGET_MS:g} ms{noise}")
    if p99_ok is not None and p99_ok > 2 * bound_ms:
        problems.append(f"accepted p99 {p99_ok:.0f} ms is more than twice the queue bound {bound_ms:.0f} ms")
    for key in ("gateway", "workers"):
        m = mem[key]
        if m and m["growth_pct"] > RSS_FLAT_PCT:
            problems.append(f"{key} RSS grew {m['growth_pct']:.1f}% during the overload")
    bad_http = {k: v for k, v in http_codes.items() if k not in (OK, "HTTP 429")}
    if bad_http:
        problems.append(f"HTTP answers other than 200/429: {bad_http}")
    return await finish(
        "overload",
        f"{opts.overload_factor:g}x capacity to 'bounded' (simple + {opts.service_ms:g} ms sleep per row, "
        f"1 instance, max_queue_size {opts.queue_size})",
        loop, t0, watch, allowed=("RESOURCE_EXHAUSTED",), notes=notes, problems=problems,
        capacity=cap, rate_sent=rate, baseline={"rate": capacity / 2, "duration_s": base_s, **base},
        time_to_reject_ms={"p50": _round(rej_p50), "p99": _round(rej_p99), "max": _round(max(reject_ms, default=None)),
                           "p99_from_send": _round(percentile(reject_sent_ms, 99))},
        send_lag_ms={"p50": _round(percentile(lag_ms, 50)), "p99": _round(percentile(lag_ms, 99))},
        accepted_p99_ms=_round(p99_ok), baseline_p99_ms=_round(p99_base), queue_bound_ms=bound_ms,
        rss=mem, rss_samples=rss.samples, http=http_sum | {"codes": http_codes},
    )  # fmt: skip


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


RUNNERS: dict[str, Callable[[Path, Options], dict[str, Any]]] = {
    "kill_worker": scenario_kill_worker,
    "stop_node": scenario_stop_node,
    "cut_node": scenario_cut_node,
    "sigterm_gateway": scenario_sigterm_gateway,
    "overload": scenario_overload,
    "sigterm_node": scenario_sigterm_node,
}


def run_scenarios(names: Sequence[str], opts: Options, workdir: Path) -> list[dict[str, Any]]:
    (workdir / "empty").mkdir(exist_ok=True)
    results = []
    for name in names:
        print(f"[{name}] running ({opts.duration:g} s at {opts.rate:g} req/s) ...", flush=True)
        started = time.monotonic()
        try:
            result = RUNNERS[name](workdir, opts)
        except (FaultError, BenchError, OSError, subprocess.SubprocessError) as exc:
            result = {
                "scenario": name, "error": f"{type(exc).__name__}: {exc}", "sent": 0, "ok": 0, "failed": 0,
                "failed_by_kind": {}, "lost": 0, "latency_ms": {"p99": None}, "notes": [],
                "problems_all": [f"could not run: {exc}"],
            }  # fmt: skip
        result["wall_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        print(format_table([result]).splitlines()[-1], flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# TCP proxy (cut_node without network namespaces)


async def tcp_proxy(port: int, target: str, host: str = "127.0.0.1") -> None:
    """Forward TCP ``host:port`` -> ``target``; SIGUSR1 stops forwarding (a black hole: bytes are
    read and held, new connections are not connected onward), SIGUSR2 resumes (held bytes go on)."""
    t_host, t_port = target.rsplit(":", 1)
    flowing = asyncio.Event()
    flowing.set()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, flowing.clear)
    loop.add_signal_handler(signal.SIGUSR2, flowing.set)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(t_host, int(t_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(handle, host, port)
    print(f"tcp proxy {host}:{port} -> {target} (SIGUSR1 cuts, SIGUSR2 restores)", flush=True)
    async with server:
        await stop.wait()


def tcp_proxy_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.faults tcp-proxy")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", required=True)
    args = p.parse_args(argv)
    asyncio.run(tcp_proxy(args.port, args.target))
    return 0


# ---------------------------------------------------------------------------------------------
# a bare grpc.aio server under stalls: what gRPC itself does (no dl_inference code involved)


async def echo_server(port: int, max_pending: int) -> None:
    """A grpc.aio server answering every unary call with an empty message at once."""
    import grpc

    class Echo(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return b""

            return grpc.unary_unary_rpc_method_handler(handler)

    options = []
    if max_pending:
        options = [("grpc.server.max_pending_requests", max_pending),
                   ("grpc.server.max_pending_requests_hard_limit", 3 * max_pending)]  # fmt: skip
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((Echo(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


async def _grpc_stall(port: int, server_pid: int, rate: float, stalls: int, stall_s: float) -> dict[str, Any]:
    sender = GrpcSender(f"127.0.0.1:{port}", b"x" * 100, 10.0)
    await sender.open()
    loop = OpenLoop(sender, rate, timeout=10.0)
    loop.start()
    await asyncio.sleep(5.0)
    rss = [rss_bytes(server_pid)]
    for _ in range(stalls):
        os.kill(server_pid, signal.SIGSTOP)
        await asyncio.sleep(stall_s)
        os.kill(server_pid, signal.SIGCONT)
        await asyncio.sleep(6.0)
        rss.append(rss_bytes(server_pid))
    await loop.stop()
    await sender.close()
    outcomes = collections.Counter(f"{r.outcome}: {r.message}" if r.message else r.outcome for r in loop.records)
    return {"outcomes": dict(outcomes), "rss_mib_after_each_stall": [round((v or 0) / 2**20, 1) for v in rss]}


def grpc_stall_main(argv: list[str]) -> int:
    """``grpc-stall``: SIGSTOP a bare grpc.aio echo server for ``--stall-s`` several times under open-loop
    load and report how the calls ended and its RSS after each stall; ``--max-pending`` sets
    ``grpc.server.max_pending_requests`` (0: gRPC's default, 1000 with a hard limit of 3000)."""
    p = argparse.ArgumentParser(prog="python -m load_tests.faults grpc-stall")
    p.add_argument("--max-pending", type=int, default=0)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--stalls", type=int, default=6)
    p.add_argument("--stall-s", type=float, default=1.5)
    args = p.parse_args(argv)
    port = free_port()
    cmd = py_module("load_tests.faults", "echo-server", "--port", str(port), "--max-pending", str(args.max_pending))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        out = run_coroutine(_grpc_stall(port, proc.pid, args.rate, args.stalls, args.stall_s))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    print(json.dumps({"max_pending_requests": args.max_pending or "default (1000, hard limit 3000)", **out}))
    return 0


def echo_server_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.faults echo-server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-pending", type=int, default=0)
    args = p.parse_args(argv)
    asyncio.run(echo_server(args.port, args.max_pending))
    return 0


# ---------------------------------------------------------------------------------------------
# command line


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SCENARIOS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.faults",
        description="Fault and overload scenarios under open-loop load; one results table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--only", type=_names, default=list(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s (not overload's)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per scenario (default 60)")
    p.add_argument("--quick", action="store_true", help="15 s per scenario: a smoke run")
    p.add_argument("--request-timeout", type=float, default=10.0, help="each request's gRPC deadline, s")
    p.add_argument("--fast-checks", action="store_true",
                   help="health checks every 0.2 s (as the integration tests) instead of the defaults")  # fmt: skip
    p.add_argument(
        "--cut-method",
        choices=("auto", "netns", "proxy"),
        default="auto",
        help="cut_node: network namespace + veth down (root), or a TCP proxy that stops forwarding",
    )
    p.add_argument("--service-ms", type=float, default=10.0, help="overload: model service time per row")
    p.add_argument("--queue-size", type=int, default=16, help="overload: max_queue_size")
    p.add_argument("--overload-factor", type=float, default=2.0, help="overload: rate / measured capacity")
    p.add_argument("--batch-sleep-ms", type=float, default=20.0, help="kill_worker/sigterm_gateway: sleep per batch")
    p.add_argument("--node-policy", choices=("weighted_round_robin", "least_request"), default="weighted_round_robin",
                   help="stop_node/cut_node balancer policy (round robin: the victim has half the load)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="(default results/faults.json; faults_quick.json)")
    p.add_argument("--txt", type=Path, default=None, help="(default results/faults.txt; faults_quick.txt)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server logs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tcp-proxy"]:
        return tcp_proxy_main(argv[1:])
    if argv[:1] == ["grpc-stall"]:
        return grpc_stall_main(argv[1:])
    if argv[:1] == ["echo-server"]:
        return echo_server_main(argv[1:])
    args = build_parser().parse_args(argv)
    duration = args.duration if args.duration is not None else (15.0 if args.quick else 60.0)
    stem = "faults_quick" if args.quick else "faults"
    args.json = args.json or RESULTS / f"{stem}.json"
    args.txt = args.txt or RESULTS / f"{stem}.txt"
    opts = Options(
        rate=args.rate, duration=duration, request_timeout=args.request_timeout, fast_checks=args.fast_checks,
        cut_method=args.cut_method, service_ms=args.service_ms, queue_size=args.queue_size,
        overload_factor=args.overload_factor, batch_sleep_ms=args.batch_sleep_ms, quick=args.quick,
        node_policy=args.node_policy,
    )  # fmt: skip
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="dl_faults_"))
    try:
        results = run_scenarios(args.only, opts, workdir)
    except KeyboardInterrupt:
        print("faults: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep_logs:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    report = {
        "tool": "load_tests.faults",
        "config": {
            "rate": opts.rate,
            "duration_s": opts.duration,
            "request_timeout_s": opts.request_timeout,
            **{k: v for k, v in dataclasses.asdict(opts).items() if k not in ("rate", "duration")},
            "scenarios": args.only,
        },
        "machine": machine,
        "results": results,
    }
    text = report_text(report)
    print("\n" + text)
    write_json_and_text(args.json, to_json(report) + "\n", args.txt, text)
    return 0 if all(not r.get("problems_all") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
