"""V2 gRPC frontend (``inference.GRPCInferenceService``) plus grpc.health.v1 and reflection.

ModelInfer is registered with identity (de)serializers: the request bytes go to the data plane
untouched and the worker's response bytes come back untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dl_inference.config import GRPC_MAX_PENDING_CALLS
from dl_inference.dataplane import DataPlane
from dl_inference.errors import ServerError
from dl_inference.frontends.grpc_calls import rate_limit, status_of, unary, unimplemented
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.wire import peek_request, stream_response
from dl_inference.security import (
    CONTROL_GRPC_METHODS,
    AccessPolicy,
    PermissionDenied,
    RateLimiter,
    Role,
    TlsSettings,
    grpc_role,
    token_from_headers,
)
from dl_inference.sharedmem.params import CUDA, SYSTEM

log = logging.getLogger(__name__)

GRPC_PICKUP_S = 0.1  # see GrpcServer.drain

SERVICE = "inference.GRPCInferenceService"


def build_handler(dp: DataPlane, limiter: RateLimiter | None = None) -> grpc.GenericRpcHandler:
    async def server_live(req: pb.ServerLiveRequest, ctx: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=dp.live())

    async def server_ready(req: pb.ServerReadyRequest, ctx: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=dp.ready())

    async def model_ready(req: pb.ModelReadyRequest, ctx: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=dp.model_ready(req.name, req.version))

    async def server_metadata(req: pb.ServerMetadataRequest, ctx: Any) -> pb.ServerMetadataResponse:
        return dp.server_metadata()

    async def model_metadata(req: pb.ModelMetadataRequest, ctx: Any) -> pb.ModelMetadataResponse:
        return dp.model_metadata(req.name, req.version)

    async def model_config(req: pb.ModelConfigRequest, ctx: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=dp.model_config(req.name, req.version))

    async def model_statistics(req: pb.ModelStatisticsRequest, ctx: Any) -> pb.ModelStatisticsResponse:
        return await dp.model_statistics(req.name, req.version)

    async def model_infer(payload: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        rate_limit(limiter, ctx)
        name, version, shared = peek_request(payload)
        remaining = ctx.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        if shared:
            return await dp.infer_shared(payload, name, version, deadline)
        return await dp.infer(payload, name, version, deadline)

    async def repository_index(req: pb.RepositoryIndexRequest, ctx: Any) -> pb.RepositoryIndexResponse:
        return await dp.repository_index(req.ready)

    async def repository_load(req: pb.RepositoryModelLoadRequest, ctx: Any) -> pb.RepositoryModelLoadResponse:
        params = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in req.parameters.items()}
        await dp.load_model(req.model_name, params)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(req: pb.RepositoryModelUnloadRequest, ctx: Any) -> pb.RepositoryModelUnloadResponse:
        await dp.unload_model(req.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def stream_infer(requests: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        async for payload in requests:
            try:
                rate_limit(limiter, ctx)
                name, version, shared = peek_request(payload)
                body = await (dp.infer_shared if shared else dp.infer)(payload, name, version)
                yield stream_response(body, "")
            except ServerError as exc:
                yield stream_response(None, exc.message)

    async def system_status(req: pb.SystemSharedMemoryStatusRequest, ctx: Any) -> pb.SystemSharedMemoryStatusResponse:
        out = pb.SystemSharedMemoryStatusResponse()
        for r in await dp.shared_memory_status(SYSTEM, req.name):
            out.regions[r.name].CopyFrom(out.RegionStatus(**r.status()))
        return out

    async def system_register(
        req: pb.SystemSharedMemoryRegisterRequest, ctx: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await dp.register_system_shared_memory(req.name, req.key, req.offset, req.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def system_unregister(
        req: pb.SystemSharedMemoryUnregisterRequest, ctx: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await dp.unregister_shared_memory(SYSTEM, req.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def cuda_status(req: pb.CudaSharedMemoryStatusRequest, ctx: Any) -> pb.CudaSharedMemoryStatusResponse:
        out = pb.CudaSharedMemoryStatusResponse()
        for r in await dp.shared_memory_status(CUDA, req.name):
            out.regions[r.name].CopyFrom(out.RegionStatus(**r.status()))
        return out

    async def cuda_register(req: pb.CudaSharedMemoryRegisterRequest, ctx: Any) -> pb.CudaSharedMemoryRegisterResponse:
        await dp.register_cuda_shared_memory(req.name, req.raw_handle, req.device_id, req.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    async def cuda_unregister(
        req: pb.CudaSharedMemoryUnregisterRequest, ctx: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await dp.unregister_shared_memory(CUDA, req.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    handlers: dict[str, grpc.RpcMethodHandler] = {
        "ServerLive": unary(server_live, pb.ServerLiveRequest),
        "ServerReady": unary(server_ready, pb.ServerReadyRequest),
        "ModelReady": unary(model_ready, pb.ModelReadyRequest),
        "ServerMetadata": unary(server_metadata, pb.ServerMetadataRequest),
        "ModelMetadata": unary(model_metadata, pb.ModelMetadataRequest),
        "ModelConfig": unary(model_config, pb.ModelConfigRequest),
        "ModelStatistics": unary(model_statistics, pb.ModelStatisticsRequest),
        "ModelInfer": unary(model_infer, None),
        "RepositoryIndex": unary(repository_index, pb.RepositoryIndexRequest),
        "RepositoryModelLoad": unary(repository_load, pb.RepositoryModelLoadRequest),
        "RepositoryModelUnload": unary(repository_unload, pb.RepositoryModelUnloadRequest),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream_infer),
        "SystemSharedMemoryStatus": unary(system_status, pb.SystemSharedMemoryStatusRequest),
        "SystemSharedMemoryRegister": unary(system_register, pb.SystemSharedMemoryRegisterRequest),
        "SystemSharedMemoryUnregister": unary(system_unregister, pb.SystemSharedMemoryUnregisterRequest),
        "CudaSharedMemoryStatus": unary(cuda_status, pb.CudaSharedMemoryStatusRequest),
        "CudaSharedMemoryRegister": unary(cuda_register, pb.CudaSharedMemoryRegisterRequest),
        "CudaSharedMemoryUnregister": unary(cuda_unregister, pb.CudaSharedMemoryUnregisterRequest),
    }
    for name in (
        "TraceSetting",
        "LogSettings",
    ):
        handlers[name] = unimplemented(name)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _rejecting(method: str, exc: ServerError) -> grpc.RpcMethodHandler:
    status = status_of(exc)

    if method.endswith("/ModelStreamInfer") or method.endswith("/Watch"):

        async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            await context.abort(status, exc.message)
            yield b""  # pragma: no cover - abort raises

        if method.endswith("/Watch"):
            return grpc.unary_stream_rpc_method_handler(reject_stream)
        return grpc.stream_stream_rpc_method_handler(reject_stream)

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(status, exc.message)
        return b""  # pragma: no cover - abort raises

    return grpc.unary_unary_rpc_method_handler(reject)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's token (metadata ``authorization: Bearer`` or ``x-api-key``) before the
    handler runs, and keeps the model-control RPCs off this port when they are served elsewhere."""

    def __init__(self, access: AccessPolicy, control: str) -> None:
        self.access = access
        self.control = control

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        try:
            role = grpc_role(method)
            if method in CONTROL_GRPC_METHODS and self.control in ("elsewhere", "disabled"):
                where = "only on the HTTP control port (setting control_port)" if self.control == "elsewhere" else ""
                raise PermissionDenied(
                    f"the model-control API is not served on this port{': it is served ' + where if where else ''}"
                )
            if role != Role.OPEN and self.access.enabled:
                md = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
                self.access.check(role, token_from_headers(md.get("authorization"), md.get("x-api-key")))
        except ServerError as exc:
            return _rejecting(method, exc)
        return await continuation(details)


class GrpcServer:
    """A grpc.aio server for one data plane, with health tracking the data plane's readiness."""

    def __init__(
        self,
        dp: DataPlane,
        host: str,
        port: int,
        max_message_bytes: int,
        access: AccessPolicy | None = None,
        control: str = "here",
        tls: TlsSettings | None = None,
        rate_limiter: RateLimiter | None = None,
        max_pending_calls: int = GRPC_MAX_PENDING_CALLS,
        reuse_port: bool = False,
    ) -> None:
        self.dp = dp
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),  # on only for several frontends on one port
            # Calls wait in gRPC core until the event loop takes them up; above this many it drops new ones
            # as CANCELLED, which the client did not cause. Overload is the model queues' job
            # (RESOURCE_EXHAUSTED, with a message), so keep gRPC's own queue out of the way.
            ("grpc.server.max_pending_requests", max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", max_pending_calls),
        ]
        interceptors = []
        if (access is not None and access.enabled) or control != "here":
            interceptors.append(AccessInterceptor(access or AccessPolicy(), control))
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self.server.add_generic_rpc_handlers((build_handler(dp, rate_limiter),))
        # TF-Serving's PredictionService/ModelService; imported here because it builds on this module.
        from dl_inference.frontends.tfserving_grpc import tfserving_handlers

        self.server.add_generic_rpc_handlers(tfserving_handlers(dp, rate_limiter, max_message_bytes))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.address = f"{host}:{port}"
        try:
            if tls is not None and tls.enabled:
                self.port = self.server.add_secure_port(self.address, tls.grpc_credentials())
            else:
                self.port = self.server.add_insecure_port(self.address)
        except RuntimeError:
            raise OSError(f"cannot listen for gRPC on {self.address}: address in use or not available") from None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._track_health())
        log.info("gRPC listening on %s", self.address)

    async def _track_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        last = None
        while True:
            status = serving if self.dp.ready() else not_serving
            if status != last:
                await self.health.set("", status)
                await self.health.set(SERVICE, status)
                last = status
            await asyncio.sleep(0.25)

    async def set_not_serving(self) -> None:
        """Tell health watchers this server is going away (it still answers until stop())."""
        if self._watch:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()

    async def drain(self, grace: float) -> float:
        """Refuse new inference requests with UNAVAILABLE while the ones in flight finish (at most
        ``grace`` s), then idle GRPC_PICKUP_S; returns what is left of ``grace`` for :meth:`stop`.

        The listener stays open meanwhile on purpose: when a gRPC server stops, gRPC core drops the
        calls it has received but the event loop has not taken up yet (busy finishing requests) as a
        bare CANCELLED, which a client cannot tell from its own cancellation; refused, they get a clear
        error that gateways and clients retry elsewhere. What remains is a call arriving in the
        millisecond the listener closes (load_tests/README.md, sigterm_gateway / sigterm_node).
        """
        await self.set_not_serving()
        self.dp.refuse_new_requests()
        began = time.monotonic()
        if not await self.dp.wait_idle(grace):
            left = self.dp.inflight()
            log.warning("shutting down: %d request(s) still in flight after %g s are cancelled", left, grace)
        await asyncio.sleep(GRPC_PICKUP_S)  # an idle loop takes up (and refuses) calls still queued in gRPC core
        return max(0.0, grace - (time.monotonic() - began))

    async def stop(self, grace: float) -> None:
        await self.set_not_serving()
        await self.server.stop(grace)
