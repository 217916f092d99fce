"""Starting a model version's instances: a spawn that fails part-way leaves no worker running."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dl_inference.config import ServerSettings
from dl_inference.gateway.models import ModelVersion
from dl_inference.gateway.router import GatewayDataPlane
from dl_inference.gateway.workers import LoadFailed


class _Instance:
    def __init__(self, n: int) -> None:
        self.n = n
        self.stopping = False
        self.terminated = False

    async def terminate(self, grace: float) -> None:
        self.terminated = True


class _Pool:
    """Spawns ``ok`` instances, then fails as a real fork does when the machine is out of processes."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.spawned: list[_Instance] = []

    async def spawn(self, spec: Any) -> _Instance:
        if len(self.spawned) == self.ok:
            raise LoadFailed(f"worker {spec}: could not start: [Errno 11] Resource temporarily unavailable")
        inst = _Instance(len(self.spawned))
        self.spawned.append(inst)
        return inst


@pytest.mark.parametrize("ok", [0, 1, 2])
def test_a_failed_spawn_stops_the_instances_already_started(tmp_path: Path, ok: int) -> None:
    async def main() -> None:
        plane = GatewayDataPlane(ServerSettings(model_repository=str(tmp_path)))
        pool = _Pool(ok)
        plane.lifecycle.pool = pool  # type: ignore[assignment]
        mv = ModelVersion("m", 1, ["spec-0", "spec-1", "spec-2"])  # type: ignore[list-item]
        with pytest.raises(LoadFailed, match="Resource temporarily unavailable"):
            await plane.lifecycle._start_version(mv)
        assert len(pool.spawned) == ok
        assert all(i.stopping and i.terminated for i in pool.spawned)

    asyncio.run(main())
