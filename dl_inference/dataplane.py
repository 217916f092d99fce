"""The one object both frontends (gRPC and HTTP) call. Frontends only convert data and map errors.

The gateway implements it by routing to worker processes and remote nodes; a standalone worker
implements it for its single model, so a worker, a gateway and a foreign V2 server are
interchangeable endpoints.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from collections.abc import Mapping
from typing import Any

from dl_inference import __version__, offload
from dl_inference.errors import Unavailable, Unimplemented
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.tensors import decode_request, known_fields_only
from dl_inference.sharedmem.params import uses_shared_memory
from dl_inference.sharedmem.registry import Region
from dl_inference.stats import ModelStats, failure_reason

EXTENSIONS = ("binary_tensor_data", "statistics", "model_configuration", "model_repository", "schedule_policy")


class Phase(enum.IntEnum):
    """Where a server is in its life; it only ever moves forward (:meth:`DataPlane.advance`)."""

    STARTING = 0  # listeners up (live), models loading: not ready
    SERVING = 1  # ready
    DRAINING = 2  # shutting down: not ready (load balancers notice), requests still served
    REFUSING = 3  # new inference requests get UNAVAILABLE "shutting down"; those in flight finish
    CLOSED = 4  # workers and connections gone


class DataPlane(abc.ABC):
    """Server operations, transport-free. Version ``""`` means the model's latest ready version."""

    server_name = "dl_inference"
    extensions: tuple[str, ...] = EXTENSIONS
    phase = Phase.SERVING  # a gateway starts in STARTING; a worker's data plane exists once it can serve

    def advance(self, phase: Phase) -> bool:
        """Move to ``phase`` if it is ahead of the current one (True); never back (False)."""
        if phase <= self.phase:
            return False
        self.phase = phase
        return True

    @property
    def stopping(self) -> bool:
        """Shutting down (draining, refusing or closed): nothing new is started or restarted."""
        return self.phase >= Phase.DRAINING

    def live(self) -> bool:
        return True

    def inflight(self) -> int:
        """Inference requests being served right now."""
        return 0

    def refuse_new_requests(self) -> None:
        """From now on inference requests get UNAVAILABLE "shutting down" (a clear, retryable error),
        while the listeners stay open and the requests in flight go on."""
        self.advance(Phase.REFUSING)

    def check_accepting(self, stats: ModelStats) -> None:
        """Raise UNAVAILABLE "shutting down" while refusing, counted as a failure in ``stats``."""
        if self.phase >= Phase.REFUSING:
            gone = Unavailable("server is shutting down: send the request to another server")
            stats.record_failure(0, failure_reason(gone))
            raise gone

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference request is in flight (True), or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        while self.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.inflight()

    @abc.abstractmethod
    def ready(self) -> bool: ...

    @abc.abstractmethod
    def model_ready(self, name: str, version: str) -> bool: ...

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=__version__, extensions=list(self.extensions))

    @abc.abstractmethod
    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse: ...

    @abc.abstractmethod
    def model_config(self, name: str, version: str) -> mc.ModelConfig: ...

    @abc.abstractmethod
    async def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse: ...

    @abc.abstractmethod
    async def infer(self, payload: bytes, name: str, version: str, deadline: float | None = None) -> bytes:
        """Run one serialized ModelInferRequest; return the serialized ModelInferResponse.

        ``deadline`` is the client's, on the ``time.monotonic()`` clock (None: no deadline).
        """

    async def infer_shared(self, payload: bytes, name: str, version: str, deadline: float | None = None) -> bytes:
        """:meth:`infer` for a request that may name shared-memory regions, or was too long to peek at
        (``peek_request`` said so): decoded in full, its own name and version count, not the peek's.

        Here (a standalone worker): such a request is refused, since this endpoint keeps no regions.
        """
        request, payload = await decode_request_off_loop(payload)
        if uses_shared_memory(request):
            raise Unimplemented(
                "shared-memory tensors are not served by this endpoint: register regions with the gateway "
                "on the same host and send the request there"
            )
        return await self.infer(payload, request.model_name, request.model_version, deadline)

    # -- Triton's shared-memory extensions (kind "system" or "cuda"; name "" = every region) ---------
    async def register_system_shared_memory(self, name: str, key: str, offset: int, byte_size: int) -> None:
        raise Unimplemented("this endpoint does not serve shared memory")

    async def register_cuda_shared_memory(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        raise Unimplemented("this endpoint does not serve shared memory")

    async def unregister_shared_memory(self, kind: str, name: str) -> None:
        raise Unimplemented("this endpoint does not serve shared memory")

    async def shared_memory_status(self, kind: str, name: str) -> list[Region]:
        raise Unimplemented("this endpoint does not serve shared memory")

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        raise Unimplemented("this endpoint has no model repository")

    async def load_model(self, name: str, parameters: Mapping[str, object]) -> None:
        raise Unimplemented("this endpoint cannot load models")

    async def unload_model(self, name: str) -> None:
        raise Unimplemented("this endpoint cannot unload models")

    async def metrics_text(self) -> str:
        return ""

    async def endpoint_table(self) -> dict[str, Any]:
        raise Unimplemented("this endpoint does not balance across endpoints")


async def decode_request_off_loop(payload: bytes) -> tuple[pb.ModelInferRequest, bytes]:
    """:func:`~dl_inference.protocol.tensors.decode_request`, and the bytes to forward.

    A large request is first cleaned of unknown fields in a helper process (:mod:`dl_inference.offload`),
    so what is parsed here is memcpy-fast and what is forwarded is the cleaned request.
    """
    if len(payload) >= offload.OFFLOAD_BYTES:  # in a helper; what comes back has only known fields
        payload, _ = await offload.call(known_fields_only, payload)
    return decode_request(payload), payload
