"""A local worker instance as a balancer endpoint (the gateway's adapter: the balancer knows only endpoints).

The endpoint outlives worker restarts: when the supervisor replaces a dead worker, the new process
is attached to the same endpoint (keeping its weight and counters) and slow start begins. Active
health is the worker process itself (its exit or closed socket is noticed at once) plus a PING frame
every ``local_ping_interval_s``; a worker that stops answering (hung, SIGSTOPped) is taken out of
rotation and what it held is re-sent elsewhere.
"""

from __future__ import annotations

import asyncio

from dl_inference.balancer.clock import Clock
from dl_inference.balancer.endpoint import Endpoint, EndpointFailed, Reply
from dl_inference.gateway.workers import WorkerGone, WorkerInstance


class LocalEndpoint(Endpoint):
    kind = "local"

    def __init__(self, instance: WorkerInstance, weight: float, clock: Clock) -> None:
        super().__init__(f"local:{instance.spec.label}", weight, clock)
        self.instance = instance

    def attach(self, instance: WorkerInstance) -> None:
        """A restarted worker takes over this endpoint."""
        self.instance = instance
        self.healthy = True
        self.checks_failed = 0
        self.consecutive_failures = 0
        self.penalty = 1.0  # a new process: the old one's abandoned requests say nothing about it
        self.ejected_until = 0.0  # nor does an ejection they caused
        self.returned()

    def usable(self) -> bool:
        return self.instance.ready

    async def infer(self, payload: bytes, timeout: float | None) -> Reply:
        try:
            if timeout is None:
                return await self.instance.infer(payload)
            async with asyncio.timeout(timeout):
                return await self.instance.infer(payload)
        except WorkerGone as exc:
            raise EndpointFailed(str(exc), resend=True) from None

    def went_down(self, why: str) -> None:
        self.instance.abandon(why)

    async def check_once(self, timeout: float, healthy_threshold: int, unhealthy_threshold: int) -> bool:
        """Ping the worker; return True when its health verdict flipped."""
        if not self.instance.ready:
            return False
        ok = await self.instance.ping(timeout)
        return self.record_check(
            ok, f"no answer to a ping within {timeout:g} s", healthy_threshold, unhealthy_threshold
        )
