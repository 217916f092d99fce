"""The gateway's data plane: route V2 requests to model versions' worker instances; load/unload.

Model control modes (Triton's): ``none`` loads every model at start; ``explicit`` loads/unloads only
through the repository API (and ``--load-model`` at start); ``poll`` rescans the repository and
(re)loads what changed, leaving the old version serving when the new one fails to load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dl_inference.balancer.balancer import Balancer
from dl_inference.balancer.local import LocalEndpoint
from dl_inference.balancer.remote import ANY_VERSION
from dl_inference.config import ServerSettings
from dl_inference.dataplane import EXTENSIONS, DataPlane, decode_request_off_loop
from dl_inference.errors import (
    CODE_FROM_WIRE,
    Code,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerError,
    Unavailable,
    Unimplemented,
)
from dl_inference.gateway.models import Model, ModelVersion, State
from dl_inference.gateway.workers import LoadFailed, WorkerInstance, WorkerPool, WorkerSpec, worker_python
from dl_inference.metrics import render_balancer_metrics, render_frontend_metrics, render_metrics
from dl_inference.protocol.framing import Kind
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.model_info import model_metadata
from dl_inference.repository.config import instance_kinds
from dl_inference.repository.scan import ModelSource, scan_model, scan_repository, validate_model_name
from dl_inference.sharedmem.params import uses_shared_memory
from dl_inference.sharedmem.registry import Region, SharedMemoryRegistry
from dl_inference.stats import ModelStats, failure_reason

if TYPE_CHECKING:
    from dl_inference.gateway.frontend_processes import FrontendSupervisor

log = logging.getLogger(__name__)


class GatewayDataPlane(DataPlane):
    extensions = (*EXTENSIONS, "system_shared_memory", "cuda_shared_memory")

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.repository = Path(settings.model_repository).resolve()
        self.pool = WorkerPool(self._on_worker_exit, frontend_sockets=settings.frontends > 1)
        self.frontends: FrontendSupervisor | None = None  # serve --frontends N: the other frontends
        self.requests = 0  # inference requests taken up here, every model and transport
        self.models: dict[str, Model] = {}
        self.load_errors: dict[str, str] = {}
        self._failed_fingerprints: dict[str, str] = {}
        self._unloaded: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = False
        self._closing = False
        self._inflight = 0  # requests in this gateway right now, every model and transport
        self._tasks: set[asyncio.Task[None]] = set()
        self.balancer = Balancer(
            settings.balancer_settings(), settings.topology(),
            local_endpoints=self._local_endpoints, max_message_bytes=settings.max_request_bytes,
        )  # fmt: skip
        self._remote_stats: dict[tuple[str, str], ModelStats] = {}
        self.shared_memory = SharedMemoryRegistry(own_pids=self._worker_pids)
        self.shared_memory.on_forget = self._forget_regions

    def _local_endpoints(self) -> list[LocalEndpoint]:
        return [e for m in self.models.values() for mv in m.versions.values() for e in mv.endpoints]

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.start()
        await self.balancer.start()
        mode = self.settings.model_control_mode
        if mode == "explicit":
            names = list(self.settings.load_models)
            sources, errors = {}, {}
            for name in names:
                try:
                    sources[name] = await asyncio.to_thread(scan_model, self.repository, name)
                except ServerError as exc:
                    errors[name] = exc.message
        else:
            sources, errors = await asyncio.to_thread(scan_repository, self.repository)
        for name, reason in errors.items():
            log.error("model '%s' cannot be loaded: %s", name, reason)
            self.load_errors[name] = reason
        results = await asyncio.gather(*(self._load(s) for s in sources.values()), return_exceptions=True)
        for source, result in zip(sources.values(), results):
            if isinstance(result, BaseException):
                log.error("model '%s' failed to load: %s", source.name, result)
        self._started = True
        if mode == "poll":
            self._spawn_task(self._poll_loop())
        if self.settings.shared_memory_sweep_s:
            self._spawn_task(self._sweep_loop(self.settings.shared_memory_sweep_s))
        log.info("ready: %s", ", ".join(sorted(self.models)) or "no models")

    def stop_accepting(self) -> None:
        """Report not-ready and stop restarting workers: the first step of shutting down."""
        self._closing = True

    def inflight(self) -> int:
        return self._inflight

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._retire(m) for m in list(self.models.values())), return_exceptions=True)
        self.models.clear()
        await self.balancer.close()
        await self.pool.close()

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- loading --------------------------------------------------------------------------------
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _specs(self, source: ModelSource, version: int) -> list[WorkerSpec]:
        try:
            python = worker_python(source.name, source.config, self.settings.worker_environments)
        except InvalidArgument as exc:
            # Only this model fails, before any of its workers starts; recorded like a failed load.
            self.load_errors[source.name] = exc.message
            self._failed_fingerprints[source.name] = source.fingerprint
            raise
        specs = []
        for index, (kind, gpu) in enumerate(instance_kinds(source.config)):
            device = "gpu" if kind == "KIND_GPU" else "cpu"
            specs.append(
                WorkerSpec(
                    self.repository, source.name, version, index, device, gpu, python=python,
                    max_tensor_elements=self.settings.max_tensor_elements,
                    max_bytes_element=self.settings.max_bytes_element,
                )
            )  # fmt: skip
        return specs

    async def _start_version(self, mv: ModelVersion) -> None:
        start = time.monotonic()
        instances = mv.instances = []
        for spec in mv.specs:  # one by one; a spawn that fails stops the ones already started (below)
            try:
                instances.append(await self.pool.spawn(spec))
            except BaseException:
                await self._stop_instances(mv)
                raise
        mv.endpoints = [LocalEndpoint(i, self.settings.balancer_settings().local_weight, self.balancer.clock)
                        for i in instances]  # fmt: skip
        results = await asyncio.gather(
            *(self.pool.wait_ready(i, self.settings.load_timeout_s) for i in instances), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self._stop_instances(mv)
            raise LoadFailed(str(failures[0]))
        first = results[0]
        assert isinstance(first, mc.ModelConfig)
        mv.config = first
        mv.load_seconds = time.monotonic() - start
        mv.state = State.READY

    async def _load(self, source: ModelSource) -> None:
        name = source.name
        async with self._lock(name):
            old = self.models.get(name)
            versions = {v: ModelVersion(name, v, self._specs(source, v)) for v in source.versions}
            if not versions:
                raise InvalidArgument(f"model '{name}' has no version to load")
            results = await asyncio.gather(
                *(self._start_version(mv) for mv in versions.values()), return_exceptions=True
            )
            failed = [(mv, r) for mv, r in zip(versions.values(), results) if isinstance(r, BaseException)]
            if failed:
                for mv in versions.values():
                    await self._stop_instances(mv)
                reason = "; ".join(f"version {mv.version}: {r}" for mv, r in failed)
                self.load_errors[name] = reason
                self._failed_fingerprints[name] = source.fingerprint
                if old is not None:
                    log.error("new files of model '%s' failed to load; the loaded one keeps serving: %s", name, reason)
                raise InvalidArgument(f"failed to load model '{name}': {reason}")
            self.models[name] = Model(name, source.fingerprint, versions)
            self.load_errors.pop(name, None)
            self._failed_fingerprints.pop(name, None)
            self._unloaded.discard(name)
            log.info("model '%s' version(s) %s ready", name, ", ".join(map(str, sorted(versions))))
        if old is not None:
            self._spawn_task(self._retire(old))

    async def _stop_instances(self, mv: ModelVersion) -> None:
        for inst in mv.instances:
            inst.stopping = True
        await asyncio.gather(*(i.terminate(self.settings.stop_grace_s) for i in mv.instances))

    async def _retire(self, model: Model) -> None:
        """Stop routing to ``model``'s versions, let their in-flight requests finish, stop workers."""
        for mv in model.versions.values():
            mv.state = State.UNLOADING
            for inst in mv.instances:
                inst.stopping = True
        deadline = time.monotonic() + self.settings.stop_grace_s
        while time.monotonic() < deadline and any(i.inflight for mv in model.versions.values() for i in mv.instances):
            await asyncio.sleep(0.05)
        await asyncio.gather(*(self._stop_instances(mv) for mv in model.versions.values()))

    def _owner(self, inst: WorkerInstance) -> ModelVersion | None:
        model = self.models.get(inst.spec.model)
        mv = model.versions.get(inst.spec.version) if model else None
        return mv if mv is not None and inst in mv.instances else None

    def _on_worker_exit(self, inst: WorkerInstance, code: int) -> None:
        if inst.stopping or self._closing:
            return
        mv = self._owner(inst)
        if mv is None or mv.state is not State.READY:
            return
        log.error("worker %s died (exit %s); restarting it", inst.spec.label, code)
        self._spawn_task(self._restart(mv, inst))

    async def _restart(self, mv: ModelVersion, dead: WorkerInstance) -> None:
        delay = 0.1
        while not self._closing and mv.state is State.READY and dead in mv.instances:
            if time.monotonic() - dead.started_at < 1.0:
                await asyncio.sleep(delay)
            try:  # spawn fails too when the worker environment's interpreter has gone
                new = await self.pool.spawn(dead.spec)
                await self.pool.wait_ready(new, self.settings.load_timeout_s)
            except LoadFailed as exc:
                log.error("restart of worker %s failed: %s; retrying in %.1f s", dead.spec.label, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if mv.state is State.READY and dead in mv.instances:
                index = mv.instances.index(dead)
                mv.instances[index] = new
                mv.endpoints[index].attach(new)
                log.info("worker %s is back", new.spec.label)
            else:
                new.stopping = True
                await new.terminate(self.settings.stop_grace_s)
            return

    # -- repository API -------------------------------------------------------------------------
    async def load_model(self, name: str, parameters: Mapping[str, object]) -> None:
        if self.settings.model_control_mode != "explicit":
            raise InvalidArgument(
                f"explicit model load/unload is not allowed in model control mode "
                f"'{self.settings.model_control_mode}' (start the server with --model-control-mode explicit)"
            )
        validate_model_name(name)
        if parameters:
            raise Unimplemented(
                f"load parameters ({', '.join(sorted(parameters))}) are not supported: this server loads "
                f"models only from the files in its repository"
            )
        source = await asyncio.to_thread(scan_model, self.repository, name)
        try:
            await self._load(source)
        finally:
            await self._announce()

    async def unload_model(self, name: str) -> None:
        if self.settings.model_control_mode != "explicit":
            raise InvalidArgument(
                f"explicit model load/unload is not allowed in model control mode '{self.settings.model_control_mode}'"
            )
        async with self._lock(name):
            model = self.models.pop(name, None)
            if model is None:
                if name in self.load_errors or (self.repository / name).is_dir():
                    return
                raise NotFound(f"unknown model '{name}'")
            self._unloaded.add(name)
        try:
            await self._retire(model)
        finally:
            await self._announce()

    async def _announce(self) -> None:
        """After a load or unload: every frontend process uses the new model table before it returns."""
        if self.frontends is not None:
            await self.frontends.sync()

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        names = await asyncio.to_thread(self._repository_names)
        out = pb.RepositoryIndexResponse()
        for name in sorted(set(names) | set(self.models)):
            model = self.models.get(name)
            if model is not None:
                for v in sorted(model.versions):
                    mv = model.versions[v]
                    state = "READY" if mv.ready else "UNAVAILABLE" if mv.state is State.READY else mv.state.value
                    if ready_only and state != "READY":
                        continue
                    reason = "" if state == "READY" else mv.reason or "no ready instance"
                    out.models.add(name=name, version=str(v), state=state, reason=reason)
            elif not ready_only:
                if name in self.load_errors:
                    out.models.add(name=name, state="UNAVAILABLE", reason=self.load_errors[name])
                elif name in self._unloaded:
                    out.models.add(name=name, state="UNAVAILABLE", reason="unloaded")
                else:
                    out.models.add(name=name)
        self._remote_index(out, ready_only)
        return out

    def _remote_index(self, out: pb.RepositoryIndexResponse, ready_only: bool) -> None:
        now = self.balancer.clock.now()
        for name, versions in sorted(self.balancer.remote_models().items()):
            if name in self.models:
                continue
            for v in sorted(versions):
                label = "" if v == ANY_VERSION else v
                up = any(n.available(now) for n in self.balancer.remote_for(name, label))
                if up or not ready_only:
                    reason = "" if up else "no remote node serving it is available"
                    out.models.add(name=name, version=label, state="READY" if up else "UNAVAILABLE", reason=reason)

    def _repository_names(self) -> list[str]:
        try:
            return [p.name for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return []

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        sources, errors = await asyncio.to_thread(scan_repository, self.repository)
        for name, reason in errors.items():
            if self.load_errors.get(name) != reason:
                log.error("model '%s' cannot be loaded: %s", name, reason)
            self.load_errors[name] = reason
        for name, source in sources.items():
            current = self.models.get(name)
            if current is not None and current.fingerprint == source.fingerprint:
                continue
            if self._failed_fingerprints.get(name) == source.fingerprint:
                continue
            try:
                await self._load(source)
            except ServerError as exc:
                log.error("%s", exc.message)
        for name in [n for n in self.models if n not in sources and n not in errors]:
            log.info("model '%s' left the repository; unloading", name)
            async with self._lock(name):
                model = self.models.pop(name, None)
            if model is not None:
                await self._retire(model)

    # -- health ---------------------------------------------------------------------------------
    def ready(self) -> bool:
        if not self._started or self._closing:
            return False
        if not self.models:
            if self.balancer.nodes:
                now = self.balancer.clock.now()
                return any(n.available(now) and n.models for n in self.balancer.nodes.values())
            return self.settings.model_control_mode == "explicit"
        return all(m.latest_ready() is not None for m in self.models.values())

    def model_ready(self, name: str, version: str) -> bool:
        if name not in self.models and self.balancer.nodes:
            now = self.balancer.clock.now()
            return any(n.available(now) for n in self.balancer.remote_for(name, version))
        try:
            return self._route(name, version).ready
        except ServerError:
            return False

    # -- routing --------------------------------------------------------------------------------
    def _model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            if name in self.load_errors:
                raise Unavailable(f"model '{name}' is not available: {self.load_errors[name]}")
            raise NotFound(f"unknown model '{name}'" if name else "no model name given")
        return model

    def _version(self, model: Model, version: str) -> ModelVersion:
        if not version:
            mv = model.latest_ready()
            if mv is None:
                mv = max(model.versions.values(), key=lambda v: v.version)
            return mv
        try:
            number = int(version)
        except ValueError:
            raise NotFound(f"model '{model.name}' has no version '{version}'") from None
        mv = model.versions.get(number)
        if mv is None:
            loaded = ", ".join(map(str, sorted(model.versions)))
            raise NotFound(f"model '{model.name}' has no version {version} loaded (loaded: {loaded})")
        return mv

    def _route(self, name: str, version: str) -> ModelVersion:
        return self._version(self._model(name), version)

    async def infer(
        self, payload: bytes, name: str, version: str, deadline: float | None = None, local_only: bool = False
    ) -> bytes:
        start = time.monotonic_ns()
        self.requests += 1
        model = self.models.get(name)
        if model is None and local_only:
            self._model(name)  # NOT_FOUND when nobody serves it
            raise InvalidArgument(
                f"model '{name}' has no instance on this host: shared-memory tensors need one (remote nodes "
                "cannot read this host's memory); send the tensors in the request instead"
            )
        if model is not None:
            mv = self._version(model, version)
            stats = mv.stats
            key: object = (name, mv.version)
            what = f"model '{name}' version {mv.version}"
            endpoints: list[Any] = mv.endpoints
            if self.balancer.nodes and not local_only:
                remote = self.balancer.remote_for(name, str(mv.version))
                if remote:
                    endpoints = endpoints + remote
        else:
            endpoints = self._remote_endpoints(name, version)
            stats = self._remote_stats.setdefault((name, version), ModelStats())
            key = (name, version, "remote")
            what = f"model '{name}'" + (f" version {version}" if version else "")
        self.check_accepting(stats)
        limit = self.settings.max_inflight_requests
        if limit and self._inflight >= limit:
            busy = ResourceExhausted(
                f"server busy: {self._inflight} requests in flight (max_inflight_requests {limit}); retry later"
            )
            stats.record_failure(0, failure_reason(busy))
            raise busy
        stats.pending += 1
        self._inflight += 1
        try:
            kind, code, exec_stats, body = await self.balancer.call(key, endpoints, payload, deadline, what)
            if kind is Kind.ERROR:
                raise ServerError(body.decode(errors="replace"), CODE_FROM_WIRE.get(code, Code.INTERNAL))
        except ServerError as exc:
            stats.record_failure(time.monotonic_ns() - start, failure_reason(exc))
            raise
        except asyncio.CancelledError:
            stats.record_failure(time.monotonic_ns() - start, "CANCELED")
            raise
        finally:
            stats.pending -= 1
            self._inflight -= 1
        stats.record_success(time.monotonic_ns() - start, exec_stats)
        return body

    # -- shared memory ------------------------------------------------------------------------------
    async def infer_shared(self, payload: bytes, name: str, version: str, deadline: float | None = None) -> bytes:
        request, payload = await decode_request_off_loop(payload)
        name, version = request.model_name, request.model_version  # the full decode's word, not the peek's
        if not uses_shared_memory(request):
            return await self.infer(payload, name, version, deadline)
        extra, pinned = self.shared_memory.attach(request)
        try:
            return await self.infer(payload + extra, name, version, deadline, local_only=True)
        finally:
            self.shared_memory.release(pinned)

    async def register_system_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shared_memory.register_system(name, key, offset, byte_size)

    async def register_cuda_shared_memory(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.shared_memory.register_cuda(name, raw_handle, device_id, byte_size)

    async def unregister_shared_memory(self, kind: str, name: str) -> None:
        self.shared_memory.unregister(kind, name)

    async def shared_memory_status(self, kind: str, name: str) -> list[Region]:
        return self.shared_memory.status(kind, name)

    def _worker_pids(self) -> list[int]:
        return [e.instance.process.pid for e in self._local_endpoints() if e.instance.process is not None]

    def _forget_regions(self, generations: list[int]) -> None:
        """Tell every local worker to unmap regions that are gone (they map them lazily, per use)."""
        payload = json.dumps(generations).encode()
        for endpoint in self._local_endpoints():
            proto = endpoint.instance.proto
            if proto is not None:
                proto.send(Kind.FORGET_REGIONS, 0, payload)

    async def _sweep_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                held = await asyncio.to_thread(self.shared_memory.holders)
                self.shared_memory.sweep(held)
            except Exception:  # a bug here must not end the sweeping
                log.exception("shared-memory sweep failed")

    def _remote_endpoints(self, name: str, version: str) -> list[Any]:
        """Remote nodes for a model this gateway does not hold itself (NotFound if none serves it)."""
        nodes = self.balancer.remote_for(name, version)
        if nodes:
            return list(nodes)
        versions = self.balancer.remote_models().get(name)
        if versions:
            listed = ", ".join(sorted(v for v in versions if v != ANY_VERSION))
            raise NotFound(f"model '{name}' has no version {version} on any node (versions: {listed})")
        # Not NOT_FOUND while a node that may serve it cannot be asked (unreachable, or refusing us).
        unknown = [n for n in self.balancer.nodes.values() if n.models_unknown]
        if name and unknown and name not in self.load_errors:
            why = "; ".join(f"node {n.name} {n.last_error or 'has not listed its models yet'}" for n in unknown)
            raise Unavailable(f"model '{name}' is unknown here but may be on a node whose models are unknown: {why}")
        self._model(name)  # raises the usual NotFound / Unavailable
        raise NotFound(f"unknown model '{name}'")

    # -- metadata -------------------------------------------------------------------------------
    def _remote_info(self, name: str, version: str) -> tuple[mc.ModelConfig, pb.ModelMetadataResponse] | None:
        if name in self.models or not self._remote_endpoints(name, version):
            return None
        node = self.balancer.remote_config(name)
        if node is None:
            raise Unavailable(f"model '{name}' is served by remote nodes that have not sent its config yet")
        return node.configs[name]

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        remote = self._remote_info(name, version)
        if remote is not None:
            return remote[1]
        model = self._model(name)
        mv = self._version(model, version)
        if mv.config is None:
            raise Unavailable(f"model '{name}' version {mv.version} is not loaded yet")
        versions = [str(v) for v in sorted(model.versions)] if not version else [str(mv.version)]
        return model_metadata(mv.config, versions)

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        remote = self._remote_info(name, version)
        if remote is not None:
            return remote[0]
        mv = self._route(name, version)
        if mv.config is None:
            raise Unavailable(f"model '{name}' version {mv.version} is not loaded yet")
        return mv.config

    def _selected(self, name: str, version: str) -> list[ModelVersion]:
        if not name:
            return [mv for m in self.models.values() for mv in m.versions.values()]
        model = self._model(name)
        if not version:
            return list(model.versions.values())
        return [self._version(model, version)]

    async def _counted(self) -> tuple[Callable[[ModelVersion], ModelVersion], dict[tuple[str, str], ModelStats]]:
        """Model versions and remote-model counters with every frontend's share added (one frontend:
        these are this process's own)."""
        if self.frontends is None:
            return (lambda mv: mv), self._remote_stats
        from dl_inference.gateway.frontend_processes import merged_view

        return merged_view(self, await self.frontends.collect())

    async def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        view, remote_stats = await self._counted()
        out = pb.ModelStatisticsResponse()
        remote = sorted((k, v) for k, v in remote_stats.items() if not name or k[0] == name)
        if not (name and remote and name not in self.models):
            for mv in sorted(self._selected(name, version), key=lambda m: (m.name, m.version)):
                out.model_stats.append(view(mv).stats.to_proto(mv.name, str(mv.version)))
        for (model_name, model_version), stats in remote:
            if not version or model_version == version:
                out.model_stats.append(stats.to_proto(model_name, model_version))
        return out

    async def metrics_text(self) -> str:
        view, _ = await self._counted()
        versions = [view(mv) for m in self.models.values() for mv in m.versions.values()]
        text = render_metrics(versions) + render_balancer_metrics(self.balancer, self._endpoint_sets())
        if self.frontends is not None:
            text += render_frontend_metrics(self.frontends.describe(self.requests))
        return text

    def _endpoint_sets(self) -> dict[str, list[Any]]:
        """Model (name:version) -> its endpoints, local and remote."""
        sets: dict[str, list[Any]] = {}
        for model in self.models.values():
            for mv in model.versions.values():
                sets[f"{model.name}:{mv.version}"] = [
                    *mv.endpoints,
                    *self.balancer.remote_for(model.name, str(mv.version)),
                ]
        for name, versions in self.balancer.remote_models().items():
            if name not in self.models:
                for v in sorted(versions):
                    label = "" if v == ANY_VERSION else v
                    sets[f"{name}:{label or '*'}"] = list(self.balancer.remote_for(name, label))
        return sets

    async def endpoint_table(self) -> dict[str, Any]:
        if self.frontends is not None:
            await self.frontends.collect()  # the frontends' request counts, fresh
        sets = self._endpoint_sets()
        seen: dict[str, Any] = {}
        for endpoints in [*sets.values(), self.balancer.nodes.values()]:  # nodes serving nothing (yet) too
            for ep in endpoints:
                seen.setdefault(ep.name, ep)
        return {
            "policy": self.balancer.s.policy,
            "endpoints": [self.balancer.describe(ep) for ep in seen.values()],
            "models": {label: [ep.name for ep in eps] for label, eps in sets.items()},
            "counters": self.balancer.counters(),
            # Endpoint rows are this process's balancer; each frontend balances its own connections.
            "frontends": self.frontends.describe(self.requests) if self.frontends is not None else [],
        }
