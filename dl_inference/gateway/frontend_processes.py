"""Several frontend processes on the same ports: ``serve --frontends N``.

One Python process tops out near one core of protocol work (HTTP/2, JSON, protobuf, the byte hop), so
the gateway can run N frontends. The process ``serve`` starts is the supervisor and also frontend 0:
it owns the repository, model control, the workers and the other frontends, and serves clients like
any frontend. Frontends 1..N-1 are processes of their own (``dl-inference frontend``, started and
restarted here) listening on the same gRPC and HTTP ports with SO_REUSEPORT, so the kernel spreads
*connections* over them. One connection stays on one frontend: one HTTP/2 channel (a tritonclient
gRPC client) is served by one process, as with any proxy; many clients or channels spread. The
metrics and model-control ports are the supervisor's alone.

A frontend routes inference itself, with no hop through the supervisor: it has its own connection to
every local worker (each worker also listens on a private socket, ``worker --listen``, and checks the
frontend's token), its own balancer (health pings to its worker connections; remote nodes probed
from each frontend) and its own counters. What must be server-wide goes through the supervisor over
a control connection (frames of :mod:`dl_inference.protocol.framing`, pickled payloads; a private
0700 directory and a token keep others out):

* the model table (``SNAPSHOT``): pushed to every frontend whenever it changes (checked every
  :data:`PUBLISH_EVERY_S`), with each worker's socket and token; readiness follows it;
* repository index, load and unload, shared-memory registration and status, and requests that use
  shared memory (``CALL``): answered by the supervisor (a shared-memory request takes one more local
  hop when it lands on another frontend);
* statistics, Prometheus metrics and the endpoint table (``CALL``): the supervisor pulls every
  frontend's counters (``COLLECT``) and answers with the sums, so every frontend gives the same
  numbers. A frontend that dies is restarted; what it counted until its last collection is kept.

SIGTERM drains every frontend as ``serve`` drains (the supervisor passes it on), and the workers stop
only after the last frontend has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import secrets
import signal
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from dl_inference.config import ServerSettings
from dl_inference.dataplane import Phase, decode_request_off_loop
from dl_inference.errors import InternalError, ServerError, Unavailable
from dl_inference.gateway.local_endpoint import LocalEndpoint
from dl_inference.gateway.models import Model, ModelVersion, State, drain_versions
from dl_inference.gateway.router import GatewayDataPlane, RoutingDataPlane
from dl_inference.gateway.workers import WorkerInstance, WorkerSpec
from dl_inference.protocol.framing import ExecStats, FrameProtocol, Kind, pack_token, unpack_token
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.sharedmem.params import uses_shared_memory
from dl_inference.stats import ModelStats

log = logging.getLogger(__name__)

FRONTEND_TOKEN_ENV = "DL_INFERENCE_FRONTEND_TOKEN"
PUBLISH_EVERY_S = 0.1  # how often the supervisor looks for a changed model table
COLLECT_TIMEOUT_S = 2.0  # a frontend that does not hand over its counters this fast is left out once
SYNC_TIMEOUT_S = 10.0  # how long a load or unload waits for every frontend to apply the new model table
RESTART_BACKOFF_S = (0.2, 10.0)  # first delay, doubling per death in a row, up to the second
STEADY_S = 60.0  # a frontend that served this long before dying restarts after the first delay again

# What a frontend may ask of the supervisor's data plane (CALL); nothing else is executed.
CALLS = frozenset(
    {
        "load_model", "unload_model", "repository_index", "model_statistics", "metrics_text", "endpoint_table",
        "register_system_shared_memory", "register_cuda_shared_memory", "unregister_shared_memory",
        "shared_memory_status", "infer_shared",
    }
)  # fmt: skip

StatsKey = tuple[str, Any, int]  # (model, version, the supervisor's model serial; 0 for remote-node models)


@dataclass
class Counters:
    """One frontend's share of the server-wide counters (what COLLECT answers)."""

    models: dict[StatsKey, ModelStats]
    requests: int  # inference requests this frontend answered (or failed), every model


@dataclass(frozen=True)
class RegionView:
    """A shared-memory region's status as it crosses to a frontend (the Region itself holds mappings)."""

    name: str
    fields: dict[str, Any]

    def status(self) -> dict[str, Any]:
        return self.fields


@dataclass(frozen=True)
class _Message:
    """A V2 protobuf message crossing the control connection (the generated classes do not pickle)."""

    name: str  # in grpc_service.proto
    data: bytes

    def message(self) -> Any:
        return getattr(pb, self.name).FromString(self.data)


def _dump(value: Any) -> bytes:
    if isinstance(value, Message):
        value = _Message(type(value).__name__, value.SerializeToString())
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _load(data: bytes) -> Any:
    value = pickle.loads(data)
    return value.message() if isinstance(value, _Message) else value


def _error_payload(exc: BaseException) -> bytes:
    if not isinstance(exc, ServerError):
        exc = InternalError(f"{type(exc).__name__}: {exc}")
    return _dump(exc)


# -- the supervisor's side -------------------------------------------------------------------------
class _Follower:
    """A frontend process as the supervisor sees it: its process, control connection and counters."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.proto: FrameProtocol | None = None
        self.pid = 0
        self.last: Counters = Counters({}, 0)  # as of the last collection
        self.waiting: dict[int, asyncio.Future[Any]] = {}  # COLLECT and acknowledged SNAPSHOT, by rid
        self.starts = 0
        self.started_at = 0.0
        self.failures = 0  # deaths in a row, each within STEADY_S of its start (the restart backoff)


class FrontendSupervisor:
    """Starts frontends 1..N-1, keeps them running, and serves their control connections."""

    def __init__(self, dp: GatewayDataPlane, settings: ServerSettings) -> None:
        self.dp = dp
        self.settings = settings
        self.path = os.path.join(dp.pool.directory, "control.sock")
        self.token = secrets.token_hex(16)
        self.followers = {i: _Follower(i) for i in range(1, settings.frontends)}
        self.departed = Counters({}, 0)  # counted by frontend processes that have since died
        self._server: asyncio.AbstractServer | None = None
        self._snapshot = b""
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, self.path)
        for follower in self.followers.values():
            await self._start(follower)
        self._spawn_task(self._publish_loop())
        log.info("%d frontend processes share the gRPC and HTTP ports", self.settings.frontends)

    async def _start(self, follower: _Follower) -> None:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cmd = [
            sys.executable, "-m", "dl_inference", "--log-level", str(level), "frontend",
            "--control", self.path, "--index", str(follower.index),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", DL_INFERENCE_FRONTEND=str(follower.index))
        env[FRONTEND_TOKEN_ENV] = self.token  # not on the command line, which every local user can read
        follower.process = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        follower.pid = follower.process.pid
        follower.starts += 1
        follower.started_at = time.monotonic()
        log.info("started frontend %d (pid %d)", follower.index, follower.pid)
        self._spawn_task(self._watch(follower, follower.process))

    async def _watch(self, follower: _Follower, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if follower.process is not process:
            return
        self._forget(follower)
        if self._closing:
            return
        how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        if time.monotonic() - follower.started_at > STEADY_S:  # it had been serving: not a crash loop
            follower.failures = 0
        follower.failures += 1
        delay = min(RESTART_BACKOFF_S[0] * 2 ** min(follower.failures - 1, 6), RESTART_BACKOFF_S[1])
        log.error("frontend %d %s; restarting it in %.1f s", follower.index, how, delay)
        await asyncio.sleep(delay)
        if not self._closing:
            await self._start(follower)

    def _forget(self, follower: _Follower) -> None:
        """A frontend is gone: keep what it counted, fail what we asked of it."""
        self.departed = _add(self.departed, follower.last)
        follower.last = Counters({}, 0)
        follower.proto = None
        for fut in follower.waiting.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"frontend {follower.index} went away"))
        follower.waiting.clear()

    def _accept(self) -> FrameProtocol:
        proto = FrameProtocol(lambda *a: None, lambda exc: None)

        def first(kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes) -> None:
            # Nothing is unpickled before the token matched: HELLO is token + the index as text.
            try:
                token, body = unpack_token(payload) if kind is Kind.HELLO else ("", b"")
                follower = self.followers.get(int(body.decode()))
            except (ValueError, struct.error):  # not even a well-formed hello
                token, follower = "", None
            if follower is None or not secrets.compare_digest(token.encode(), self.token.encode()):
                log.warning("a connection to the control socket did not say hello properly; closing it")
                if proto.transport is not None:
                    proto.transport.close()
                return
            follower.proto = proto
            proto.on_frame = lambda *frame: self._on_frame(follower, *frame)
            proto.on_lost = lambda exc: self._lost(follower, proto)
            proto.send(Kind.ANSWER, 0, _dump(self.settings))
            if self._snapshot:
                proto.send(Kind.SNAPSHOT, 0, self._snapshot)

        proto.on_frame = first
        return proto

    def _lost(self, follower: _Follower, proto: FrameProtocol) -> None:
        if follower.proto is proto:
            follower.proto = None

    def _on_frame(
        self, follower: _Follower, kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes
    ) -> None:
        if kind is Kind.CALL:
            self._spawn_task(self._answer(follower, rid, payload))
        elif kind is Kind.ANSWER:
            fut = follower.waiting.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(pickle.loads(payload))
        else:
            log.warning("unexpected frame kind %s from frontend %d", kind, follower.index)

    async def _answer(self, follower: _Follower, rid: int, payload: bytes) -> None:
        try:
            method, args = pickle.loads(payload)
            if method not in CALLS:
                raise InternalError(f"frontend asked for '{method}', which is not served")
            if method == "shared_memory_status":
                regions = await self.dp.shared_memory_status(*args)
                result: Any = [RegionView(r.name, r.status()) for r in regions]
            else:
                result = await getattr(self.dp, method)(*args)
            body, code = _dump(result), 0
        except BaseException as exc:  # every failure goes back to the frontend that asked
            if isinstance(exc, asyncio.CancelledError):
                raise
            body, code = _error_payload(exc), 1
        if follower.proto is not None:
            follower.proto.send(Kind.ANSWER, rid, body, code=code)

    # -- the model table ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        dp = self.dp
        models = {}
        for name, model in dp.models.items():
            versions = {}
            for v, mv in model.versions.items():
                instances = [(i.spec.index, i.listen_path, i.token, i.ready) for i in mv.instances]
                config = mv.config.SerializeToString() if mv.config is not None else b""
                versions[v] = (mv.state.value, mv.reason, config, mv.load_seconds, instances)
            models[name] = (id(model), versions)
        return {"ready": dp.ready(), "models": models, "load_errors": dict(dp.load_errors)}

    async def _publish_loop(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # a bug here must not stop the table from flowing later
                log.exception("publishing the model table to the frontends failed")
            await asyncio.sleep(PUBLISH_EVERY_S)

    def publish(self) -> None:
        data = _dump(self.snapshot())
        if data == self._snapshot:
            return
        self._snapshot = data
        for follower in self.followers.values():
            if follower.proto is not None:
                follower.proto.send(Kind.SNAPSHOT, 0, data)

    async def sync(self) -> None:
        """Publish the model table now and wait until every live frontend has applied it (and opened
        its connections to ready workers): after a load or unload returns, whichever frontend the
        client's next request lands on sees the change."""
        data = _dump(self.snapshot())
        self._snapshot = data

        async def one(follower: _Follower) -> None:
            if await self._ask(follower, Kind.SNAPSHOT, data, SYNC_TIMEOUT_S) is None:
                log.warning("frontend %d did not confirm the new model table in %.0f s", follower.index, SYNC_TIMEOUT_S)

        await asyncio.gather(*(one(f) for f in self.followers.values()))

    async def _ask(self, follower: _Follower, kind: Kind, payload: bytes, timeout: float) -> Any:
        """Send a frame that the frontend answers; its answer, or None when it has none in time."""
        proto = follower.proto
        if proto is None:
            return None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        follower.waiting[rid] = fut
        proto.send(kind, rid, payload)
        try:
            return await asyncio.wait_for(fut, timeout)
        except (TimeoutError, ServerError):
            return None
        finally:
            follower.waiting.pop(rid, None)

    # -- server-wide counters -------------------------------------------------------------------
    async def collect(self) -> Counters:
        """Every live frontend's counters now, plus what departed ones had counted."""

        async def one(follower: _Follower) -> None:
            counters = await self._ask(follower, Kind.COLLECT, b"", COLLECT_TIMEOUT_S)
            if counters is None:
                log.warning("frontend %d did not hand over its counters; its last ones are used", follower.index)
            else:
                follower.last = counters

        await asyncio.gather(*(one(f) for f in self.followers.values()))
        total = self.departed
        for follower in self.followers.values():
            total = _add(total, follower.last)
        return total

    def describe(self, own_requests: int) -> list[dict[str, Any]]:
        """One entry per frontend (0 is this process) for the endpoint table and metrics."""
        rows = [{"frontend": 0, "pid": os.getpid(), "up": True, "requests": own_requests, "starts": 1}]
        for f in self.followers.values():
            rows.append(
                {"frontend": f.index, "pid": f.pid, "up": f.proto is not None, "requests": f.last.requests,
                 "starts": f.starts}
            )  # fmt: skip
        return rows

    # -- shutdown -------------------------------------------------------------------------------
    def stop_frontends(self) -> None:
        """SIGTERM every frontend: each drains as ``serve`` does."""
        self._closing = True
        for follower in self.followers.values():
            if follower.process is not None and follower.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    follower.process.send_signal(signal.SIGTERM)

    async def wait_stopped(self, timeout: float) -> None:
        """Wait for every frontend to exit (killing what is left after ``timeout``), then close."""
        procs = [f.process for f in self.followers.values() if f.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.warning("frontend (pid %d) did not stop within %.0f s; killing it", proc.pid, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


def _merge_stats(into: dict[Any, ModelStats], more: Mapping[Any, ModelStats]) -> dict[Any, ModelStats]:
    """``into`` (a copy) with ``more``'s counters added key by key."""
    out = dict(into)
    for key, stats in more.items():
        out[key] = out[key].merged([stats]) if key in out else stats
    return out


def _add(a: Counters, b: Counters) -> Counters:
    return Counters(_merge_stats(a.models, b.models), a.requests + b.requests)


# -- a frontend's side -----------------------------------------------------------------------------
class ControlClient:
    """A frontend's control connection to its supervisor."""

    def __init__(self) -> None:
        self.proto = FrameProtocol(self._on_frame, self._on_lost)
        self.settings: asyncio.Future[ServerSettings] = asyncio.get_running_loop().create_future()
        self.lost = asyncio.Event()
        self.dp: FrontendDataPlane | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._early_snapshot: bytes | None = None

    async def connect(self, path: str, index: int, token: str) -> ServerSettings:
        await asyncio.get_running_loop().create_unix_connection(lambda: self.proto, path)
        self.proto.send(Kind.HELLO, 0, pack_token(token, str(index).encode()))
        return await asyncio.wait_for(self.settings, 30)

    def _on_frame(self, kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes) -> None:
        if kind is Kind.ANSWER:
            if rid == 0:
                if not self.settings.done():
                    self.settings.set_result(pickle.loads(payload))
                return
            fut = self._calls.pop(rid, None)
            if fut is not None and not fut.done():
                value = _load(payload)
                if code:
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        elif kind is Kind.SNAPSHOT:
            if self.dp is None:
                self._early_snapshot = payload
                if rid:
                    self.proto.send(Kind.ANSWER, rid, _dump(True))
            else:
                self.dp.apply(pickle.loads(payload))
                if rid:  # the supervisor waits for this table to be in use here
                    asyncio.get_running_loop().create_task(self._confirm(self.dp, rid))
        elif kind is Kind.COLLECT:
            counters = self.dp.counters() if self.dp is not None else Counters({}, 0)
            self.proto.send(Kind.ANSWER, rid, _dump(counters))
        else:
            log.warning("unexpected frame kind %s from the supervisor", kind)

    async def _confirm(self, dp: FrontendDataPlane, rid: int) -> None:
        await dp.settled()
        self.proto.send(Kind.ANSWER, rid, _dump(True))

    def attach(self, dp: FrontendDataPlane) -> None:
        self.dp = dp
        if self._early_snapshot is not None:
            dp.apply(pickle.loads(self._early_snapshot))
            self._early_snapshot = None

    def _on_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(Unavailable("this frontend lost its supervisor (the server is stopping)"))
        self._calls.clear()

    async def call(self, method: str, *args: Any) -> Any:
        if self.lost.is_set():
            raise Unavailable("this frontend lost its supervisor (the server is stopping)")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[rid] = fut
        self.proto.send(Kind.CALL, rid, _dump((method, args)))
        return await fut


class FrontendDataPlane(RoutingDataPlane):
    """Frontend 1..N-1: routes inference to the workers itself; the rest is the supervisor's."""

    def __init__(self, settings: ServerSettings, control: ControlClient, index: int) -> None:
        super().__init__(settings)
        self.control = control
        self.index = index
        self._table_ready = False
        self._first_table = asyncio.Event()
        self._serials: dict[str, int] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}  # by id() of the instance: connections being opened
        self._local_weight = settings.balancer_settings().local_weight

    async def start(self) -> None:
        await self.balancer.start()
        await self._first_table.wait()
        self.advance(Phase.SERVING)

    def models_ready(self) -> bool:
        return self._table_ready and not self.control.lost.is_set()  # the supervisor's word

    # -- the model table ------------------------------------------------------------------------
    def apply(self, table: dict[str, Any]) -> None:
        """Make this frontend's model table the supervisor's (connecting to new workers)."""
        self._table_ready = bool(table["ready"])
        self.load_errors = table["load_errors"]
        names = set(table["models"])
        for name in [n for n in self.models if n not in names]:
            self._spawn_task(self._retire(self.models.pop(name)))
        for name, (serial, versions) in table["models"].items():
            model = self.models.get(name)
            if model is None or self._serials.get(name) != serial:
                if model is not None:
                    self._spawn_task(self._retire(model))
                model = self.models[name] = Model(name, "")
                self._serials[name] = serial
            for v in [v for v in model.versions if v not in versions]:
                model.versions.pop(v)
            for v, (state, reason, config, load_seconds, instances) in versions.items():
                self._apply_version(model, v, State(state), reason, config, load_seconds, instances)
        self._first_table.set()

    def _apply_version(
        self, model: Model, v: int, state: State, reason: str, config: bytes, load_seconds: float,
        instances: list[tuple[int, str, str, bool]],
    ) -> None:  # fmt: skip
        mv = model.versions.get(v)
        if mv is None:
            repo = Path(self.settings.model_repository)
            mv = model.versions[v] = ModelVersion(
                model.name, v, [WorkerSpec(repo, model.name, v, i[0]) for i in instances]
            )
        mv.state, mv.reason, mv.load_seconds = state, reason, load_seconds
        if config and (mv.config is None or mv.config.SerializeToString() != config):
            mv.config = mc.ModelConfig.FromString(config)
        weight = self._local_weight
        for index, path, token, ready in instances:
            while len(mv.instances) <= index:  # placeholders until their worker is known
                spec = WorkerSpec(Path(self.settings.model_repository), model.name, v, len(mv.instances))
                mv.instances.append(WorkerInstance(spec))
            inst = mv.instances[index]
            if inst.listen_path != path or inst.token != token:  # a new worker (first, or restarted)
                inst.mark_gone("was replaced")
                inst = WorkerInstance(inst.spec)
                inst.listen_path, inst.token = path, token
                mv.instances[index] = inst
                if index < len(mv.endpoints):
                    mv.endpoints[index].attach(inst)
                    inst.ready = False  # attach() marks it ready; it is once connected
                else:
                    mv.endpoints.append(LocalEndpoint(inst, weight, self.balancer.clock))
            # The worker listens from the moment the supervisor heard its HELLO (ready), not before.
            if ready and path and inst.proto is None and id(inst) not in self._connecting:
                self._connecting[id(inst)] = asyncio.get_running_loop().create_task(self._connect(inst, mv))

    async def settled(self) -> None:
        """Once the connections the model table asked for are open (or failed)."""
        while self._connecting:
            await asyncio.wait(list(self._connecting.values()))

    async def _connect(self, inst: WorkerInstance, mv: ModelVersion) -> None:
        try:
            _, proto = await asyncio.get_running_loop().create_unix_connection(
                lambda: FrameProtocol(inst.on_frame, lambda exc: inst.mark_gone("closed its connection")),
                inst.listen_path,
            )
        except OSError as exc:  # it died meanwhile: its restart brings a new socket
            log.warning("frontend %d cannot reach worker %s: %s", self.index, inst.spec.label, exc)
            return
        finally:
            self._connecting.pop(id(inst), None)
        if mv.instances[inst.spec.index] is not inst:  # replaced while connecting
            proto.transport.close()  # type: ignore[union-attr]
            return
        proto.send(Kind.ATTACH, 0, inst.token.encode(), urgent=True)
        inst.proto, inst.config, inst.ready = proto, mv.config, True

    async def _retire(self, model: Model) -> None:
        await drain_versions(model, self.settings.stop_grace_s)
        for mv in model.versions.values():
            for inst in mv.instances:
                inst.mark_gone("was unloaded")

    # -- inference: here; the rest: the supervisor's ----------------------------------------------
    async def infer_shared(self, payload: bytes, name: str, version: str, deadline: float | None = None) -> bytes:
        request, payload = await decode_request_off_loop(payload)
        if not uses_shared_memory(request):
            return await self.infer(payload, request.model_name, request.model_version, deadline)
        return await self.control.call("infer_shared", payload, name, version, deadline)  # type: ignore[no-any-return]

    def counters(self) -> Counters:
        models: dict[StatsKey, ModelStats] = {}
        for name, model in self.models.items():
            for v, mv in model.versions.items():
                models[(name, v, self._serials.get(name, 0))] = mv.stats
        for (name, version), stats in self._remote_stats.items():
            models[(name, version, 0)] = stats
        return Counters(models, self.requests)

    async def load_model(self, name: str, parameters: Mapping[str, object]) -> None:
        await self.control.call("load_model", name, dict(parameters))

    async def unload_model(self, name: str) -> None:
        await self.control.call("unload_model", name)

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        return await self.control.call("repository_index", ready_only)  # type: ignore[no-any-return]

    async def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        return await self.control.call("model_statistics", name, version)  # type: ignore[no-any-return]

    async def metrics_text(self) -> str:
        return await self.control.call("metrics_text")  # type: ignore[no-any-return]

    async def endpoint_table(self) -> dict[str, Any]:
        return await self.control.call("endpoint_table")  # type: ignore[no-any-return]

    async def register_system_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> None:
        await self.control.call("register_system_shared_memory", name, key, offset, byte_size)

    async def register_cuda_shared_memory(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        await self.control.call("register_cuda_shared_memory", name, raw_handle, device_id, byte_size)

    async def unregister_shared_memory(self, kind: str, name: str) -> None:
        await self.control.call("unregister_shared_memory", kind, name)

    async def shared_memory_status(self, kind: str, name: str) -> list[Any]:
        return await self.control.call("shared_memory_status", kind, name)  # type: ignore[no-any-return]


def merged_view(
    dp: RoutingDataPlane, counters: Counters
) -> tuple[Callable[[ModelVersion], ModelVersion], dict[tuple[str, str], ModelStats]]:
    """The supervisor's model versions, and its remote-model counters, with every frontend's counters
    added (for statistics and metrics). Remote-model counters are keyed with serial 0."""

    def view(mv: ModelVersion) -> ModelVersion:
        model = dp.models.get(mv.name)
        extra = counters.models.get((mv.name, mv.version, id(model)))
        return replace(mv, stats=mv.stats.merged([extra])) if extra is not None else mv

    remote = {(name, version): stats for (name, version, serial), stats in counters.models.items() if serial == 0}
    return view, _merge_stats(dp._remote_stats, remote)


async def run_frontend(control_path: str, index: int) -> int:
    """``dl-inference frontend``: started by a supervisor (``serve --frontends N``), never by hand."""
    from dl_inference.gateway.server import run_listeners

    token = os.environ.pop(FRONTEND_TOKEN_ENV, "")
    control = ControlClient()
    try:
        settings = await control.connect(control_path, index, token)
    except (OSError, TimeoutError) as exc:
        log.error("frontend %d cannot reach its supervisor at %s: %s", index, control_path, exc)
        return 2
    dp = FrontendDataPlane(settings, control, index)
    control.attach(dp)
    started = time.monotonic()
    code = await run_listeners(dp, settings, frontend=index, stop_also=control.lost)
    log.info("frontend %d stopped after %.0f s", index, time.monotonic() - started)
    return code
