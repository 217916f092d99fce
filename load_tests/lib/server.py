"""Servers as subprocesses: free ports, command lines, start / wait until ready / stop, the work
directory a bench runs in (servers stopped on Ctrl-C and SIGTERM, logs kept on failure), and the
gRPC statistics the benches read.

A server runs in a process group of its own, so that ``stop_server`` takes its worker processes
down with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_MODEL = "simple"  # the tiny example model (x FP32 [-1,16] -> y FP32 [-1,4]) most benches serve


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server failed to start, loadgen could not reach it...)."""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    grpc_url: str
    http_url: str | None = None
    started: float = 0.0  # time.monotonic() at launch


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port not handed out before by this process (two binds in a row may get the same one)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def start_server(
    name: str,
    cmd: list[str],
    log: Path,
    grpc_url: str,
    http_url: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    with log.open("wb") as out:
        # own process group, so stop_server can take the server's worker processes down with it
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, proc, log, grpc_url, http_url, time.monotonic())


def stop_server(server: Server, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it is still there after ``grace`` seconds."""
    proc = server.proc
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # workers may outlive the parent for a moment; make sure nothing of the group survives
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        print(f"bench: {server.name} (pid {proc.pid}) did not exit", file=sys.stderr)


def wait_ready(server: Server, timeout: float, models: tuple[str, ...] = (DEFAULT_MODEL,)) -> float:
    """Poll ServerReady and ModelReady of each model over gRPC; seconds since launch. BenchError on
    death/timeout.

    ``timeout`` counts from the moment this starts waiting."""
    import grpc

    from dl_inference.protocol.generated import grpc_service_pb2 as pb
    from dl_inference.protocol.generated import grpc_service_pb2_grpc as pb_grpc

    t0 = time.monotonic()
    last = "no answer yet"
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            code = server.proc.poll()
            if code is not None:
                raise BenchError(
                    f"{server.name} exited with status {code} before it was ready; its log "
                    f"({server.log}) ends with:\n{log_tail(server.log)}"
                )
            if time.monotonic() - t0 > timeout:
                raise BenchError(
                    f"{server.name} not ready after {timeout:.0f} s ({last}); its log ({server.log}) "
                    f"ends with:\n{log_tail(server.log)}"
                )
            try:
                if not stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                    last = "ServerReady false"
                else:
                    waiting = [
                        m for m in models if not stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=1.0).ready
                    ]
                    if not waiting:
                        return time.monotonic() - server.started
                    last = f"ModelReady false for {waiting}"
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            time.sleep(0.2)


def py_module(*args: str) -> list[str]:
    """``python -m ...`` with this interpreter."""
    return [sys.executable, "-m", *args]


def ours_command(repo: Path, grpc_port: int, http_port: int, metrics_port: int) -> list[str]:
    exe = Path(sys.executable).parent / "dl-inference"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "dl_inference"]
    return [
        *base,
        "serve",
        "--model-repository",
        str(repo),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
    ]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the cleanup in ``finally`` runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_workdir(prog: str, keep_logs: bool, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    """Run ``body(workdir)`` with servers stopped on SIGTERM/Ctrl-C; None (logs kept) on failure."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{prog}_"))
    keep = keep_logs
    try:
        with sigterm_as_interrupt():
            return body(workdir)
    except BenchError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        keep = True
        return None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if keep:
            print(f"{prog}: server logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def model_stats(url: str, model: str) -> dict[str, Any]:
    """The counters of gRPC ModelStatistics(model) this bench reads (all versions summed)."""
    import grpc

    from dl_inference.protocol.generated import grpc_service_pb2 as pb
    from dl_inference.protocol.generated import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            resp = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10.0)
        except grpc.RpcError as exc:
            why = f"{exc.code().name} {exc.details()}"  # type: ignore[attr-defined]
            raise BenchError(f"ModelStatistics('{model}') on {url}: {why}") from None
    out: dict[str, Any] = {
        "inference_count": 0,
        "execution_count": 0,
        "success_count": 0,
        "queue_count": 0,
        "queue_ns": 0,
        "compute_infer_count": 0,
        "compute_infer_ns": 0,
        "batch_executions": {},
    }
    for s in resp.model_stats:
        st = s.inference_stats
        out["inference_count"] += s.inference_count
        out["execution_count"] += s.execution_count
        out["success_count"] += st.success.count
        out["queue_count"] += st.queue.count
        out["queue_ns"] += st.queue.ns
        out["compute_infer_count"] += st.compute_infer.count
        out["compute_infer_ns"] += st.compute_infer.ns
        for b in s.batch_stats:
            key = str(b.batch_size)
            out["batch_executions"][key] = out["batch_executions"].get(key, 0) + b.compute_infer.count
    return out
