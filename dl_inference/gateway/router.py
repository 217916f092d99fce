"""The gateway's data plane: route V2 requests to model versions' worker instances and remote nodes.

:class:`RoutingDataPlane` is what every frontend process does (route, count, describe);
:class:`GatewayDataPlane` adds the supervisor's part: the models' life on this host
(:mod:`dl_inference.gateway.lifecycle`), the repository API and the shared-memory registry. Its life
is one :class:`~dl_inference.dataplane.Phase` state machine: starting, serving, draining, refusing, closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from dl_inference.balancer.balancer import Balancer
from dl_inference.balancer.remote import ANY_VERSION
from dl_inference.config import ServerSettings
from dl_inference.dataplane import EXTENSIONS, DataPlane, Phase, decode_request_off_loop
from dl_inference.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerError,
    Unavailable,
)
from dl_inference.gateway.lifecycle import ModelLifecycle
from dl_inference.gateway.local_endpoint import LocalEndpoint
from dl_inference.gateway.models import Model, ModelVersion
from dl_inference.metrics import render_balancer_metrics, render_frontend_metrics, render_metrics
from dl_inference.protocol.framing import Kind
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.model_info import model_metadata
from dl_inference.sharedmem.params import uses_shared_memory
from dl_inference.sharedmem.registry import Region, SharedMemoryRegistry
from dl_inference.stats import ModelStats, failure_reason

if TYPE_CHECKING:
    from dl_inference.gateway.frontend_processes import FrontendSupervisor

log = logging.getLogger(__name__)


class StartupFailed(Exception):
    """The server cannot start as configured (e.g. a model failed to load and exit_on_error is on)."""


class RoutingDataPlane(DataPlane):
    """Routing, counting and describing over a table of models (``models``) and the balancer's remote
    nodes. Who fills the table, and the repository and shared-memory operations, are the subclass's."""

    extensions = (*EXTENSIONS, "system_shared_memory", "cuda_shared_memory")

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.phase = Phase.STARTING
        self.frontends: FrontendSupervisor | None = None  # serve --frontends N: the other frontends
        self.requests = 0  # inference requests taken up here, every model and transport
        self.models: dict[str, Model] = {}
        self.load_errors: dict[str, str] = {}  # models that failed to load: why
        self._inflight = 0  # requests in this process right now, every model and transport
        self._tasks: set[asyncio.Task[None]] = set()
        self.balancer = Balancer(
            settings.balancer_settings(), settings.topology(),
            local_endpoints=self._local_endpoints, max_message_bytes=settings.max_request_bytes,
        )  # fmt: skip
        self._remote_stats: dict[tuple[str, str], ModelStats] = {}

    def _local_endpoints(self) -> list[LocalEndpoint]:
        return [e for m in self.models.values() for mv in m.versions.values() for e in mv.endpoints]

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Fill the model table and move to SERVING (the listeners are up meanwhile)."""
        raise NotImplementedError

    def stop_accepting(self) -> None:
        """Report not-ready and stop restarting workers: the first step of shutting down."""
        self.advance(Phase.DRAINING)

    def inflight(self) -> int:
        return self._inflight

    async def close(self) -> None:
        self.advance(Phase.CLOSED)
        for task in list(self._tasks):
            task.cancel()
        await self._stop_models()
        await self.balancer.close()

    async def _stop_models(self) -> None:
        """Stop what serves this process's models (a frontend's connections close with it)."""

    def ready(self) -> bool:
        return self.phase is Phase.SERVING and self.models_ready()

    def models_ready(self) -> bool:
        """Whether the models let this server be ready (the subclass knows which models count)."""
        raise NotImplementedError

    # -- routing --------------------------------------------------------------------------------
    def model_ready(self, name: str, version: str) -> bool:
        if name not in self.models and self.balancer.nodes:
            now = self.balancer.clock.now()
            return any(n.available(now) for n in self.balancer.remote_for(name, version))
        try:
            return self._route(name, version).ready
        except ServerError:
            return False

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
            reply = await self.balancer.call(key, endpoints, payload, deadline, what)
            body = reply.result()
        except ServerError as exc:
            stats.record_failure(time.monotonic_ns() - start, failure_reason(exc))
            raise
        except asyncio.CancelledError:
            stats.record_failure(time.monotonic_ns() - start, "CANCELED")
            raise
        finally:
            stats.pending -= 1
            self._inflight -= 1
        stats.record_success(time.monotonic_ns() - start, reply.stats)
        return body

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


class GatewayDataPlane(RoutingDataPlane):
    """``dl-inference serve``: routing plus the models' life on this host (the supervisor's part)."""

    def __init__(self, settings: ServerSettings) -> None:
        super().__init__(settings)
        self.lifecycle = ModelLifecycle(settings, self.models, self.balancer, lambda: self.stopping)
        self.pool = self.lifecycle.pool
        self.load_errors = self.lifecycle.load_errors
        self.shared_memory = SharedMemoryRegistry(own_pids=self._worker_pids)
        self.shared_memory.on_forget = self._forget_regions

    def models_ready(self) -> bool:
        """Every model this server holds has a ready version (or, with none, a remote node serves), and
        none failed to load; always true without strict readiness."""
        if not self.settings.strict_readiness:
            return True
        # Failed loads count, but not those a caller of the load API was told about, nor those whose
        # previous files still serve.
        if set(self.load_errors) - self.lifecycle.api_failures - set(self.models):
            return False
        if not self.models:
            if self.balancer.nodes:
                now = self.balancer.clock.now()
                return any(n.available(now) and n.models for n in self.balancer.nodes.values())
            return self.settings.model_control_mode == "explicit"
        return all(m.latest_ready() is not None for m in self.models.values())

    async def start(self) -> None:
        await self.pool.start()
        await self.balancer.start()
        await self.lifecycle.start()
        failed = sorted(self.lifecycle.load_errors)
        if failed and self.settings.exit_on_error:
            raise StartupFailed(
                f"model(s) {', '.join(failed)} failed to load at start; exiting (exit_on_error; start with "
                "--exit-on-error=false to serve the models that did load)"
            )
        self.advance(Phase.SERVING)
        if self.settings.shared_memory_sweep_s:
            self._spawn_task(self._sweep_loop(self.settings.shared_memory_sweep_s))
        log.info("ready: %s", ", ".join(sorted(self.models)) or "no models")

    async def _stop_models(self) -> None:
        await self.lifecycle.close()

    # -- repository API -------------------------------------------------------------------------
    async def load_model(self, name: str, parameters: Mapping[str, object]) -> None:
        try:
            await self.lifecycle.load(name, parameters)
        finally:
            await self._announce()

    async def unload_model(self, name: str) -> None:
        try:
            await self.lifecycle.unload(name)
        finally:
            await self._announce()

    async def _announce(self) -> None:
        """After a load or unload: every frontend process uses the new model table before it returns."""
        if self.frontends is not None:
            await self.frontends.sync()

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        await self.lifecycle.index(out, ready_only)
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
