"""Local worker processes as seen from the gateway: spawn, connect, forward, notice death, restart.

Each :class:`WorkerInstance` is one process hosting one model instance. The gateway listens on a
Unix socket; a spawned worker loads its model, connects, and introduces itself with HELLO and its
token. Death is noticed from the process exit (``proc.wait()``) and from the socket closing,
whichever comes first; every request the worker held is failed with :class:`WorkerGone` so the
router can re-send it elsewhere or answer UNAVAILABLE. Nothing is left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dl_inference.balancer.endpoint import Reply
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.framing import WORKER_TOKEN_ENV, ExecStats, FrameProtocol, Kind, unpack_token
from dl_inference.protocol.generated import model_config_pb2 as mc

log = logging.getLogger(__name__)

#: Model config parameter naming the worker environment (server setting ``worker_environments``).
WORKER_ENVIRONMENT_PARAMETER = "worker_environment"


def worker_python(model: str, config: mc.ModelConfig, environments: Mapping[str, str]) -> str:
    """The interpreter for ``model``'s workers: its ``worker_environment``'s, else the gateway's own.

    Raises InvalidArgument, naming the model, the environment and the interpreter, when the
    environment is not configured or its interpreter is not an executable file.
    """
    param = config.parameters.get(WORKER_ENVIRONMENT_PARAMETER)
    name = param.string_value.strip() if param is not None else ""
    if not name:
        return sys.executable
    python = environments.get(name)
    if python is None:
        known = ", ".join(sorted(environments)) or "none"
        raise InvalidArgument(
            f"model '{model}' asks for worker environment '{name}', which this server does not have "
            f"(configured: {known}); add --worker-environment {name}=/path/to/python or worker_environments "
            "in the server config"
        )
    # abspath, not resolve(): a venv's python is a symlink, and following it would leave the venv.
    path = os.path.abspath(os.path.expanduser(python))
    problem = (
        "does not exist" if not os.path.exists(path)
        else "is not a file" if not os.path.isfile(path)
        else "is not executable" if not os.access(path, os.X_OK)
        else ""
    )  # fmt: skip
    if problem:
        raise InvalidArgument(f"model '{model}': worker environment '{name}' has interpreter {path}, which {problem}")
    return path


class WorkerGone(Exception):
    """The worker holding a request went away before answering."""


@dataclass(frozen=True)
class WorkerSpec:
    """What to start: one instance of one model version."""

    repository: Path
    model: str
    version: int
    index: int
    device: str = "cpu"
    device_id: int | None = None
    python: str = sys.executable
    max_tensor_elements: int = 0  # 0: only the request size bounds them
    max_bytes_element: int = 0
    auto_complete: bool = True  # False: --disable-auto-complete-config

    @property
    def label(self) -> str:
        return f"{self.model}:{self.version}#{self.index}"


class WorkerInstance:
    """One worker process and its framed connection."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.token = secrets.token_hex(8)
        self.process: asyncio.subprocess.Process | None = None
        self.proto: FrameProtocol | None = None
        self.config: mc.ModelConfig | None = None
        self.ready = False
        self.stopping = False  # set when the gateway stops it on purpose: no restart
        self.started_at = time.monotonic()
        self.exited = asyncio.Event()
        self.hello = asyncio.get_running_loop().create_future()  # -> config, or LoadFailed
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.listen_path = ""  # the worker's socket for the other frontends ("" when there are none)
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)

    @property
    def inflight(self) -> int:
        return len(self.pending)

    # -- data path ----------------------------------------------------------------------------
    async def infer(self, payload: bytes) -> Reply:
        proto = self.proto
        if proto is None or not self.ready:
            raise WorkerGone(f"worker {self.spec.label} is not ready")
        rid = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        if not proto.send(Kind.INFER, rid, payload, urgent=len(self.pending) == 1):
            del self.pending[rid]
            raise WorkerGone(f"worker {self.spec.label} connection is closed")
        try:
            return await fut
        except asyncio.CancelledError:
            if self.pending.pop(rid, None) is not None:
                proto.send(Kind.CANCEL, rid, b"")
            raise

    def on_frame(self, kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes) -> None:
        if kind is Kind.PONG:
            ping = self._pings.pop(rid, None)
            if ping is not None and not ping.done():
                ping.set_result(None)
            return
        fut = self.pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(Reply(payload, stats or ExecStats(), code if kind is Kind.ERROR else 0))

    async def ping(self, timeout: float) -> bool:
        """True when the worker answers a PING within ``timeout`` seconds, or its link moved meanwhile."""
        proto = self.proto
        if proto is None or not self.ready:
            return False
        rid = next(self._ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[rid] = fut
        received, taken, backlog = proto.progress()
        try:
            if not proto.send(Kind.PING, rid, b"", urgent=True):
                return False
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            # The PONG may be queued behind a large frame in either direction: a link that moved
            # while we waited is a busy worker, not a hung one.
            received2, taken2, _ = proto.progress()
            return received2 > received or (backlog > 0 and taken2 > taken)
        except WorkerGone:
            return False
        finally:
            self._pings.pop(rid, None)

    def abandon(self, why: str) -> None:
        """Fail everything in flight (the worker stays connected; late answers are dropped)."""
        pending, self.pending = self.pending, {}
        for rid, fut in pending.items():
            if not fut.done():
                fut.set_exception(WorkerGone(f"worker {self.spec.label} {why}"))
            if self.proto is not None:
                self.proto.send(Kind.CANCEL, rid, b"")

    def mark_gone(self, why: str) -> None:
        """Fail everything in flight; idempotent."""
        self.ready = False
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(f"worker {self.spec.label} {why}"))
        for ping in self._pings.values():
            if not ping.done():
                ping.set_exception(WorkerGone(why))
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()

    # -- lifecycle ----------------------------------------------------------------------------
    async def terminate(self, grace: float) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await self.exited.wait()


class LoadFailed(Exception):
    """A worker reported (or showed, by dying) that its model could not load."""


class WorkerPool:
    """Spawns workers and matches their connections; owns the gateway's Unix socket."""

    def __init__(self, on_exit: Callable[[WorkerInstance, int], None], frontend_sockets: bool = False) -> None:
        self._dir = tempfile.mkdtemp(prefix="dl_inference-")  # 0700: only this user reaches the sockets
        self.socket_path = os.path.join(self._dir, "gateway.sock")
        self.frontend_sockets = frontend_sockets  # each worker also listens for the other frontends
        self._serial = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._by_token: dict[str, WorkerInstance] = {}
        self._on_exit = on_exit

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, self.socket_path)

    def _accept(self) -> FrameProtocol:
        proto = FrameProtocol(lambda *a: None, lambda exc: None)

        def first_frame(kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes) -> None:
            token, body = unpack_token(payload)
            inst = self._by_token.get(token)
            if inst is None or kind not in (Kind.HELLO, Kind.LOAD_FAILED):
                log.warning("unknown worker connection (kind %s); closing", kind)
                if proto.transport is not None:
                    proto.transport.close()
                return
            if kind is Kind.LOAD_FAILED:
                if not inst.hello.done():
                    inst.hello.set_exception(LoadFailed(body.decode(errors="replace")))
                return
            config = mc.ModelConfig.FromString(body)
            inst.proto = proto
            inst.config = config
            proto.on_frame = inst.on_frame
            proto.on_lost = lambda exc: inst.mark_gone("closed its connection")
            inst.ready = True
            if not inst.hello.done():
                inst.hello.set_result(config)

        proto.on_frame = first_frame
        return proto

    async def spawn(self, spec: WorkerSpec) -> WorkerInstance:
        inst = WorkerInstance(spec)
        self._by_token[inst.token] = inst
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # the gateway's, for every worker
        cmd = [
            spec.python, "-m", "dl_inference", "--log-level", str(level), "worker",
            "--model-repository", str(spec.repository),
            "--model", spec.model,
            "--version", str(spec.version),
            "--device", spec.device,
            "--connect", self.socket_path,
        ]  # fmt: skip
        if self.frontend_sockets:
            inst.listen_path = os.path.join(self._dir, f"w{next(self._serial)}.sock")
            cmd += ["--listen", inst.listen_path]
        if spec.device_id is not None:
            cmd += ["--device-id", str(spec.device_id)]
        if spec.max_tensor_elements:
            cmd += ["--max-tensor-elements", str(spec.max_tensor_elements)]
        if spec.max_bytes_element:
            cmd += ["--max-bytes-element", str(spec.max_bytes_element)]
        if not spec.auto_complete:
            cmd.append("--disable-auto-complete-config")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["DL_INFERENCE_WORKER"] = spec.label
        env[WORKER_TOKEN_ENV] = inst.token  # not on the command line, which every local user can read (ps)
        # A session of its own: a terminal's Ctrl-C reaches the gateway only, which then stops the
        # workers in order; if the gateway dies outright, workers exit when its socket closes.
        try:
            inst.process = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:  # the interpreter vanished or cannot run
            self._by_token.pop(inst.token, None)
            raise LoadFailed(f"worker {spec.label} could not start {spec.python}: {exc}") from None
        other = "" if spec.python == sys.executable else f", python {spec.python}"
        log.info("spawned worker %s (pid %d%s)", spec.label, inst.process.pid, other)
        asyncio.get_running_loop().create_task(self._watch(inst))
        return inst

    async def _watch(self, inst: WorkerInstance) -> None:
        assert inst.process is not None
        code = await inst.process.wait()
        self._by_token.pop(inst.token, None)
        how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        inst.mark_gone(how)
        if not inst.hello.done():
            inst.hello.set_exception(LoadFailed(f"worker {inst.spec.label} {how} while loading"))
        inst.exited.set()
        self._on_exit(inst, code)

    async def wait_ready(self, inst: WorkerInstance, timeout: float) -> mc.ModelConfig:
        """Wait for HELLO; raise LoadFailed on failure, death or timeout (the worker is then stopped)."""
        try:
            return await asyncio.wait_for(asyncio.shield(inst.hello), timeout)
        except TimeoutError:
            await inst.terminate(grace=2)
            raise LoadFailed(f"worker {inst.spec.label} did not load within {timeout:.0f} s") from None
        except LoadFailed:
            await inst.terminate(grace=5)
            raise

    @property
    def directory(self) -> str:
        """The private directory of this gateway's sockets."""
        return self._dir

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)
