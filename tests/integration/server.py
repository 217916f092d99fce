"""Start the real server (``dl-inference serve``) as a subprocess on free ports, for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this process (the kernel may give the same free
    port to two binds in a row: a server's gRPC and HTTP ports would then collide)."""
    while True:
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self, model: str | None = None) -> list[int]:
        """PIDs of this server's worker processes (optionally of one model), from /proc."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int((entry / "stat").read_text().split()[3]) != self.process.pid:
                    continue
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if b"worker" in cmd and (model is None or model.encode() in cmd):
                pids.append(int(entry.name))
        return pids


def wait_ready(http_port: int, timeout: float, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://localhost:{http_port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def run_server(
    repository: Path, log_path: Path, *extra: str, ready_timeout: float = 90, wait: bool = True
) -> Iterator[RunningServer]:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        sys.executable, "-m", "dl_inference", "serve",
        "--model-repository", str(repository),
        "--host", "127.0.0.1",
        "--http-port", str(http_port),
        "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        *extra,
    ]  # fmt: skip
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ))
    server = RunningServer(proc, http_port, grpc_port, metrics_port, log_path)
    try:
        if wait:
            wait_ready(http_port, ready_timeout, proc, log_path)
        yield server
    finally:
        stop_process(proc, 30)
        log_file.close()


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``proc`` if it still runs, and SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Process:
    """A helper process (a standalone worker node, a delay proxy) listening for gRPC on ``port``."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_grpc_ready(address: str, timeout: float, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if client.is_server_ready(client_timeout=1):
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def run_process(
    cmd: list[str], port: int, log_path: Path, ready_timeout: float = 60, host: str = "127.0.0.1"
) -> Iterator[Process]:
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        _wait_grpc_ready(f"{host}:{port}", ready_timeout, proc, log_path)
        yield Process(proc, port, log_path, host)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        stop_process(proc, 15)
        log_file.close()


def run_node(
    repository: Path, model: str, log_path: Path, *, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()
) -> contextlib.AbstractContextManager[Process]:
    """A standalone ``dl-inference worker`` serving V2 gRPC: a remote node for a gateway.

    ``prefix`` wraps the command (e.g. ``ip netns exec NS``) and ``host`` is where it listens.
    """
    port = free_port()
    cmd = [
        *prefix, sys.executable, "-m", "dl_inference", "worker", "--model-repository", str(repository),
        "--model", model, "--host", host, "--grpc-port", str(port),
    ]  # fmt: skip
    return run_process(cmd, port, log_path, host=host)


def run_delay_proxy(target: str, delay_ms: float, log_path: Path) -> contextlib.AbstractContextManager[Process]:
    """load_tests/delay_proxy.py in front of ``target``: every ModelInfer waits ``delay_ms`` first."""
    port = free_port()
    cmd = [sys.executable, "-m", "load_tests.delay_proxy", "--port", str(port), "--target", target,
           "--delay-ms", str(delay_ms)]  # fmt: skip
    return run_process(cmd, port, log_path)
