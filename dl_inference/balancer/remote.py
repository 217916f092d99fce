"""A remote node: any V2 gRPC endpoint (a standalone worker, another gateway, Triton).

Requests are forwarded as the client's ModelInferRequest bytes (identity serializers), with the
remaining deadline as the gRPC timeout. A background task checks the node's health every
``health_interval_s`` (grpc.health.v1 ``Check``, falling back to V2 ``ServerReady`` on nodes without
it; or, with ``health_check: model_ready``, V2 ``ModelReady`` of each of its models)
and, unless the node's models are configured, re-reads its repository index to learn which models
and versions it serves, with their config and metadata for this gateway's metadata endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from dl_inference.balancer.clock import Clock
from dl_inference.balancer.endpoint import Endpoint, EndpointFailed, Reply
from dl_inference.balancer.settings import BalancerSettings, NodeSpec
from dl_inference.errors import WIRE_CODE, Code
from dl_inference.protocol.framing import ExecStats, Kind
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
ANY_VERSION = "*"
_EMPTY = ExecStats()


class RemoteNode(Endpoint):
    kind = "remote"

    def __init__(
        self,
        spec: NodeSpec,
        settings: BalancerSettings,
        clock: Clock,
        on_change: Callable[[], None],
        *,
        max_message_bytes: int = 96 * 1024 * 1024,
        slow_start: bool = False,
    ) -> None:
        super().__init__(spec.address, spec.weight, clock, slow_start=slow_start)
        self.spec = spec
        self.s = settings
        self.on_change = on_change
        self.healthy = False  # until the first check passes
        self.closed = False
        self._seen_healthy = False
        self._boot = not slow_start
        self.models: set[tuple[str, str]] = {(m, ANY_VERSION) for m in spec.models}
        self.configs: dict[str, tuple[mc.ModelConfig, pb.ModelMetadataResponse]] = {}
        self._use_health_service = settings.health_check == "grpc_health"
        self._calls: set[grpc.aio.Call] = set()
        self._abandoned: set[grpc.aio.Call] = set()
        options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.channel = grpc.aio.insecure_channel(spec.address, options=options)
        self._infer = self.channel.unary_unary(SERVICE + "ModelInfer")
        self._task: asyncio.Task[None] | None = None
        self._refreshed_at = -float("inf")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._check_loop())

    async def close(self, grace: float = 0.0) -> None:
        """Stop checking; let in-flight calls finish for up to ``grace`` seconds; close the channel."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        deadline = self.clock.now() + grace
        while self.inflight and self.clock.now() < deadline:
            await asyncio.sleep(0.05)
        await self.channel.close()

    def usable(self) -> bool:
        return not self.closed

    def serves(self, name: str, version: str) -> bool:
        """Whether this node serves ``name`` at ``version`` ("" = whichever version it likes)."""
        if not version:
            return any(n == name for n, _ in self.models)
        return (name, version) in self.models or (name, ANY_VERSION) in self.models

    # -- data path ----------------------------------------------------------------------------------
    async def infer(self, payload: bytes, timeout: float | None) -> Reply:
        call = self._infer(payload, timeout=timeout)
        self._calls.add(call)
        try:
            body: bytes = await call
            return Kind.RESULT, 0, _EMPTY, body
        except asyncio.CancelledError:
            if call in self._abandoned:
                raise EndpointFailed(f"node {self.name} {self.last_error or 'went down'}", resend=True) from None
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            detail = exc.details() or code.name
            if code is grpc.StatusCode.UNAVAILABLE:
                raise EndpointFailed(f"node {self.name}: {detail}") from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(detail) from None
            if code is grpc.StatusCode.CANCELLED and call in self._abandoned:
                raise EndpointFailed(f"node {self.name} {self.last_error or 'went down'}", resend=True) from None
            ours = Code.__members__.get(code.name, Code.INTERNAL)
            return Kind.ERROR, WIRE_CODE[ours], _EMPTY, detail.encode()
        finally:
            self._calls.discard(call)
            self._abandoned.discard(call)

    def went_down(self, why: str) -> None:
        self.last_error = why
        for call in list(self._calls):
            self._abandoned.add(call)
            call.cancel()

    # -- health -------------------------------------------------------------------------------------
    async def _probe(self) -> None:
        """One health check; raises on failure."""
        timeout = self.s.health_timeout_s
        if self.s.health_check == "model_ready":
            names = sorted(set(self.spec.models) or {n for n, _ in self.models})
            if names:
                await self._probe_models(names, timeout)
                return
        if self._use_health_service:
            check = self.channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                resp = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("node %s has no grpc.health.v1; checking it with ServerReady", self.name)
                self._use_health_service = False
            else:
                if resp.status != health_pb2.HealthCheckResponse.SERVING:
                    raise RuntimeError(
                        f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
                    )
                return
        ready = await self._call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, timeout)
        if not getattr(ready, "ready", False):
            raise RuntimeError("ServerReady says not ready")

    async def _probe_models(self, names: list[str], timeout: float) -> None:
        """V2 ModelReady for each model: the node is healthy while one is ready. A configured model
        list shrinks to the ready ones (learned lists follow the repository index instead)."""
        answers = await asyncio.gather(
            *(self._call("ModelReady", pb.ModelReadyRequest(name=n), pb.ModelReadyResponse, timeout) for n in names)
        )
        ready = {n for n, a in zip(names, answers) if getattr(a, "ready", False)}
        if self.spec.models:
            models = {(n, ANY_VERSION) for n in ready}
            if models != self.models:
                self.models = models
                self.on_change()
        if not ready:
            raise RuntimeError(f"ModelReady is false for {', '.join(names)}")

    async def _call(self, method: str, request: object, response: Any, timeout: float) -> object:
        stub = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        return await stub(request, timeout=timeout)

    async def check_once(self) -> None:
        try:
            await self._probe()
        except (grpc.aio.AioRpcError, RuntimeError, asyncio.TimeoutError) as exc:
            why = (exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)) or "no answer"
            if self.record_check(False, why, self.s.healthy_threshold, self.s.unhealthy_threshold):
                log.warning("node %s is unhealthy: %s", self.name, why)
                self.on_change()
            return
        # A node starts unhealthy; its first passed check brings it in (with no slow start at boot).
        first = not self._seen_healthy
        threshold = 1 if first else self.s.healthy_threshold
        if self.record_check(True, "", threshold, self.s.unhealthy_threshold):
            self._seen_healthy = True
            if first and self._boot:
                self.returned_at = -float("inf")
            log.info("node %s is healthy", self.name)
            self.on_change()

    async def refresh_models(self) -> None:
        """Learn the node's ready models (and their config) from its repository index."""
        if self.spec.models:
            names = set(self.spec.models)
        else:
            try:
                index = await self._call(
                    "RepositoryIndex",
                    pb.RepositoryIndexRequest(ready=True),
                    pb.RepositoryIndexResponse,
                    self.s.health_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    log.error("node %s has no repository index; list its models in the node config", self.name)
                return
            assert isinstance(index, pb.RepositoryIndexResponse)
            models = {(m.name, m.version or ANY_VERSION) for m in index.models if m.state in ("", "READY")}
            if models != self.models:
                log.info("node %s serves %s", self.name, ", ".join(sorted(f"{n}:{v}" for n, v in models)) or "nothing")
                self.models = models
                self.on_change()
            names = {n for n, _ in models}
        for name in names - set(self.configs):
            with contextlib.suppress(grpc.aio.AioRpcError):
                cfg = await self._call(
                    "ModelConfig", pb.ModelConfigRequest(name=name), pb.ModelConfigResponse, self.s.health_timeout_s
                )
                meta = await self._call(
                    "ModelMetadata",
                    pb.ModelMetadataRequest(name=name),
                    pb.ModelMetadataResponse,
                    self.s.health_timeout_s,
                )
                assert isinstance(cfg, pb.ModelConfigResponse) and isinstance(meta, pb.ModelMetadataResponse)
                self.configs[name] = (cfg.config, meta)

    async def first_check(self) -> None:
        """The check at start-up, so readiness and the model list are known before serving."""
        await self.check_once()
        if self.healthy:
            await self.refresh_models()
        self._refreshed_at = self.clock.now()

    async def _check_loop(self) -> None:
        next_refresh = self._refreshed_at + self.s.index_refresh_s
        while not self.closed:
            started = self.clock.now()
            await self.check_once()
            if self.healthy and started >= next_refresh:
                try:
                    await self.refresh_models()
                except Exception:  # a broken node must not stop its own health checks
                    log.exception("reading the model list of node %s failed", self.name)
                next_refresh = started + self.s.index_refresh_s
            await asyncio.sleep(max(0.0, self.s.health_interval_s - (self.clock.now() - started)))

    def describe(self, now: float, slow_start_s: float) -> dict[str, object]:
        out = super().describe(now, slow_start_s)
        out["models"] = sorted(f"{n}:{v}" for n, v in self.models)
        out["source"] = self.spec.source
        if self.last_error:
            out["last_error"] = self.last_error
        return out
