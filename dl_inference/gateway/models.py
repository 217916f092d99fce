"""What the gateway knows about each loaded model version: its config, instances, state, stats."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from dl_inference.gateway.local_endpoint import LocalEndpoint
from dl_inference.gateway.workers import WorkerInstance, WorkerSpec
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.stats import ModelStats


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class ModelVersion:
    name: str
    version: int
    specs: list[WorkerSpec]
    config: mc.ModelConfig | None = None
    instances: list[WorkerInstance] = field(default_factory=list)
    endpoints: list[LocalEndpoint] = field(default_factory=list)  # one per instance, kept across restarts
    state: State = State.LOADING
    reason: str = ""
    stats: ModelStats = field(default_factory=ModelStats)
    load_seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state is State.READY and any(i.ready for i in self.instances)


@dataclass
class Model:
    name: str
    fingerprint: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)

    def latest_ready(self) -> ModelVersion | None:
        ready = [v for v in self.versions.values() if v.ready]
        return max(ready, key=lambda v: v.version) if ready else None


async def drain_versions(model: Model, grace: float) -> None:
    """Mark ``model``'s versions UNLOADING (no new request is routed to them) and wait up to ``grace``
    seconds for the requests their instances hold."""
    for mv in model.versions.values():
        mv.state = State.UNLOADING
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(i.inflight for mv in model.versions.values() for i in mv.instances):
        await asyncio.sleep(0.05)
