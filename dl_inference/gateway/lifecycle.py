"""The life of the repository's models on this host: load, restart, poll, unload — the supervisor's part
of the gateway (frontend processes only route to what it runs).

Model control modes (Triton's): ``none`` loads every model at start; ``explicit`` loads/unloads only
through the repository API (and ``--load-model`` at start); ``poll`` rescans the repository and
(re)loads what changed, leaving the old version serving when the new one fails to load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from dl_inference.balancer.balancer import Balancer
from dl_inference.config import ServerSettings
from dl_inference.errors import InvalidArgument, NotFound, ServerError, Unimplemented
from dl_inference.gateway.local_endpoint import LocalEndpoint
from dl_inference.gateway.models import Model, ModelVersion, State, drain_versions
from dl_inference.gateway.workers import LoadFailed, WorkerInstance, WorkerPool, WorkerSpec, worker_python
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository.config import instance_kinds
from dl_inference.repository.scan import ModelSource, scan_model, scan_repository, validate_model_name

log = logging.getLogger(__name__)


class ModelLifecycle:
    """Starts each model version's worker processes, restarts the ones that die, follows the repository
    (poll mode), and stops workers on unload. ``models`` is the routing table it fills (shared with the
    data plane); ``stopping`` says the server is shutting down (no restarts then)."""

    def __init__(
        self,
        settings: ServerSettings,
        models: dict[str, Model],
        balancer: Balancer,
        stopping: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.repository = Path(settings.model_repository).resolve()
        self.models = models
        self.balancer = balancer
        self._stopping = stopping
        self.pool = WorkerPool(self._on_worker_exit, frontend_sockets=settings.frontends > 1)
        self.load_errors: dict[str, str] = {}
        self.failed_fingerprints: dict[str, str] = {}
        self.unloaded: set[str] = set()
        # Failed loads asked for through the repository API: the caller has the error, and strict
        # readiness leaves them out (the server still serves all it did before).
        self.api_failures: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- start and stop -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load what the control mode says to load at start (failures are logged and recorded)."""
        mode = self.settings.model_control_mode
        if mode == "explicit":
            sources, errors = {}, {}
            for name in self.settings.load_models:
                try:
                    sources[name] = await asyncio.to_thread(scan_model, self.repository, name)
                except ServerError as exc:
                    errors[name] = exc.message
        else:
            sources, errors = await asyncio.to_thread(scan_repository, self.repository)
        for name, reason in errors.items():
            log.error("model '%s' cannot be loaded: %s", name, reason)
            self.load_errors[name] = reason
        results = await asyncio.gather(*(self.load_source(s) for s in sources.values()), return_exceptions=True)
        for source, result in zip(sources.values(), results):
            if isinstance(result, BaseException):
                log.error("model '%s' failed to load: %s", source.name, result)
        if mode == "poll":
            self._spawn_task(self._poll_loop())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self.retire(m) for m in list(self.models.values())), return_exceptions=True)
        self.models.clear()
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
            self.failed_fingerprints[source.name] = source.fingerprint
            raise
        specs = []
        for index, (kind, gpu) in enumerate(instance_kinds(source.config)):
            device = "gpu" if kind == "KIND_GPU" else "cpu"
            specs.append(
                WorkerSpec(
                    self.repository, source.name, version, index, device, gpu, python=python,
                    max_tensor_elements=self.settings.max_tensor_elements,
                    max_bytes_element=self.settings.max_bytes_element,
                    auto_complete=not self.settings.disable_auto_complete_config,
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

    async def load_source(self, source: ModelSource) -> None:
        """Start every version of ``source``; it replaces the loaded model only when all of them are
        ready (the old one keeps serving otherwise)."""
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
                self.failed_fingerprints[name] = source.fingerprint
                if old is not None:
                    log.error("new files of model '%s' failed to load; the loaded one keeps serving: %s", name, reason)
                raise InvalidArgument(f"failed to load model '{name}': {reason}")
            self.models[name] = Model(name, source.fingerprint, versions)
            self.load_errors.pop(name, None)
            self.failed_fingerprints.pop(name, None)
            self.unloaded.discard(name)
            log.info("model '%s' version(s) %s ready", name, ", ".join(map(str, sorted(versions))))
        if old is not None:
            self._spawn_task(self.retire(old))

    async def _stop_instances(self, mv: ModelVersion) -> None:
        for inst in mv.instances:
            inst.stopping = True
        await asyncio.gather(*(i.terminate(self.settings.stop_grace_s) for i in mv.instances))

    async def retire(self, model: Model) -> None:
        """Stop routing to ``model``'s versions, let their in-flight requests finish, stop workers."""
        for mv in model.versions.values():
            for inst in mv.instances:
                inst.stopping = True
        await drain_versions(model, self.settings.stop_grace_s)
        await asyncio.gather(*(self._stop_instances(mv) for mv in model.versions.values()))

    # -- restarts -------------------------------------------------------------------------------
    def _owner(self, inst: WorkerInstance) -> ModelVersion | None:
        model = self.models.get(inst.spec.model)
        mv = model.versions.get(inst.spec.version) if model else None
        return mv if mv is not None and inst in mv.instances else None

    def _on_worker_exit(self, inst: WorkerInstance, code: int) -> None:
        if inst.stopping or self._stopping():
            return
        mv = self._owner(inst)
        if mv is None or mv.state is not State.READY:
            return
        log.error("worker %s died (exit %s); restarting it", inst.spec.label, code)
        self._spawn_task(self._restart(mv, inst))

    async def _restart(self, mv: ModelVersion, dead: WorkerInstance) -> None:
        delay = 0.1
        while not self._stopping() and mv.state is State.READY and dead in mv.instances:
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

    # -- the repository API ---------------------------------------------------------------------
    async def load(self, name: str, parameters: Mapping[str, object]) -> None:
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
        try:
            source = await asyncio.to_thread(scan_model, self.repository, name)
            await self.load_source(source)
        except ServerError:
            self.api_failures.add(name)
            raise
        self.api_failures.discard(name)

    async def unload(self, name: str) -> None:
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
            self.unloaded.add(name)
        await self.retire(model)

    async def index(self, out: pb.RepositoryIndexResponse, ready_only: bool) -> None:
        """This host's models (loaded, failed, unloaded, or only in the repository) into ``out``."""
        names = await asyncio.to_thread(self._repository_names)
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
                elif name in self.unloaded:
                    out.models.add(name=name, state="UNAVAILABLE", reason="unloaded")
                else:
                    out.models.add(name=name)

    def _repository_names(self) -> list[str]:
        try:
            return [p.name for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return []

    # -- poll mode ------------------------------------------------------------------------------
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
            if self.failed_fingerprints.get(name) == source.fingerprint:
                continue
            try:
                await self.load_source(source)
            except ServerError as exc:
                log.error("%s", exc.message)
        for name in [n for n in self.models if n not in sources and n not in errors]:
            log.info("model '%s' left the repository; unloading", name)
            async with self._lock(name):
                model = self.models.pop(name, None)
            if model is not None:
                await self.retire(model)
