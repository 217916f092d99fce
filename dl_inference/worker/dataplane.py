"""Data plane of a standalone worker: one model, served over V2 gRPC as a node of another gateway."""

from __future__ import annotations

import asyncio
import itertools
import time

from dl_inference.dataplane import DataPlane, Phase
from dl_inference.errors import NotFound, ServerError
from dl_inference.protocol.framing import ExecStats
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.model_info import model_metadata
from dl_inference.stats import ModelStats, failure_reason
from dl_inference.worker.executor import InstanceExecutor
from dl_inference.worker.loader import LoadedModel


class WorkerDataPlane(DataPlane):
    extensions = ("binary_tensor_data", "statistics", "model_configuration", "model_repository")

    def __init__(self, loaded: LoadedModel, executor: InstanceExecutor) -> None:
        self.loaded = loaded
        self.executor = executor
        self.name = loaded.config.name
        self.version = str(loaded.version)
        self.stats = ModelStats()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[bytes | None, ExecStats, ServerError | None]]] = {}

    def _check(self, name: str, version: str) -> None:
        if name != self.name or version not in ("", self.version):
            raise NotFound(
                f"unknown model '{name}'"
                + (f" version {version}" if version else "")
                + f"; this worker serves '{self.name}' version {self.version}"
            )

    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    def inflight(self) -> int:
        return len(self._pending)

    def model_ready(self, name: str, version: str) -> bool:
        return name == self.name and version in ("", self.version)

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        self._check(name, version)
        return model_metadata(self.loaded.config, [self.version])

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        self._check(name, version)
        return self.loaded.config

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        """The one model this worker serves (so a gateway can learn what this node offers)."""
        out = pb.RepositoryIndexResponse()
        out.models.add(name=self.name, version=self.version, state="READY")
        return out

    async def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        if name:
            self._check(name, version)
        return pb.ModelStatisticsResponse(model_stats=[self.stats.to_proto(self.name, self.version)])

    def _done(self, rid: int, body: bytes | None, stats: ExecStats, error: ServerError | None) -> None:
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result((body, stats, error))

    async def infer(self, payload: bytes, name: str, version: str, deadline: float | None = None) -> bytes:
        start = time.monotonic_ns()
        self._check(name, version)
        self.check_accepting(self.stats)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.stats.pending += 1
        try:
            self.executor.submit(rid, payload, self._done)
            body, stats, error = await fut
        except asyncio.CancelledError:
            self._pending.pop(rid, None)
            self.executor.cancel(rid)
            raise
        finally:
            self.stats.pending -= 1
        elapsed = time.monotonic_ns() - start
        if error is not None:
            self.stats.record_failure(elapsed, failure_reason(error))
            raise error
        self.stats.record_success(elapsed, stats)
        assert body is not None
        return body
