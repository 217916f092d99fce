"""The gateway's balancer: remote nodes, picking, outlier ejection, retries, hedging, health loops.

``call(key, endpoints, payload, deadline)`` sends one request to the best available endpoint of a
set (a model version's local instances plus the remote nodes serving it). A request that fails
because its endpoint is unreachable, died, answered UNAVAILABLE, timed out on a per-try timeout or
was abandoned when the endpoint went down is sent again to a *different* endpoint, at most
``max_retries`` times, within the client's deadline and under the retry budget. Errors about the
request itself (bad input, unknown tensor) are answers, not failures: they are never retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

from dl_inference.balancer.clock import Clock
from dl_inference.balancer.discovery import DnsNodes, NodeFile, Resolver, resolve
from dl_inference.balancer.endpoint import Endpoint, EndpointFailed, Reply
from dl_inference.balancer.outlier import OutlierDetector
from dl_inference.balancer.policies import Policy, make_policy
from dl_inference.balancer.remote import ANY_VERSION, RemoteNode
from dl_inference.balancer.retry import RetryBudget
from dl_inference.balancer.settings import BalancerSettings, NodeSpec, Topology
from dl_inference.errors import WIRE_CODE, Code, ServerError, Unavailable

log = logging.getLogger(__name__)

# Answers that count against an endpoint's health; only UNAVAILABLE is also retried.
_FAILURE_CODES = frozenset({WIRE_CODE[Code.UNAVAILABLE], WIRE_CODE[Code.INTERNAL]})
_UNAVAILABLE = WIRE_CODE[Code.UNAVAILABLE]


class DeadlineExceeded(ServerError):
    code = Code.DEADLINE_EXCEEDED


class PingedEndpoint(Protocol):
    """A local endpoint (a worker process): health-checked by the balancer's ping loop."""

    name: str
    healthy: bool
    last_error: str

    async def check_once(self, timeout: float, healthy_threshold: int, unhealthy_threshold: int) -> bool: ...


class Balancer:
    def __init__(
        self,
        settings: BalancerSettings,
        topology: Topology,
        *,
        local_endpoints: Callable[[], Iterable[PingedEndpoint]] = lambda: (),
        clock: Clock | None = None,
        rng: random.Random | None = None,
        resolver: Resolver = resolve,
        max_message_bytes: int = 96 * 1024 * 1024,
    ) -> None:
        self.s = settings
        self.topology = topology
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.local_endpoints = local_endpoints
        self.max_message_bytes = max_message_bytes
        self.outlier = OutlierDetector(settings)
        self.budget = RetryBudget(settings.retry_budget_percent, settings.min_retry_concurrency)
        self.nodes: dict[str, RemoteNode] = {}
        self.node_file = NodeFile(topology.node_file) if topology.node_file else None
        self.dns = [DnsNodes(d, resolver) for d in topology.dns]
        self.retries = 0
        self.hedges = 0
        self._policies: dict[object, Policy] = {}
        self._remote_cache: dict[tuple[str, str], list[RemoteNode]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.node_file is not None:
            self.node_file.poll()
        for d in self.dns:
            await d.refresh()
        self._sync_nodes(initial=True)
        await asyncio.gather(*(n.first_check() for n in self.nodes.values()), return_exceptions=True)
        for node in self.nodes.values():
            node.start()
        if self.node_file is not None or self.dns:
            self._spawn(self._discovery_loop())
        self._spawn(self._ping_loop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(n.close() for n in self.nodes.values()), return_exceptions=True)
        self.nodes.clear()

    # -- remote nodes -------------------------------------------------------------------------------
    def _desired(self) -> dict[str, NodeSpec]:
        out: dict[str, NodeSpec] = {}
        lists = [self.topology.nodes, self.node_file.nodes if self.node_file else [], *(d.nodes for d in self.dns)]
        for nodes in lists:
            for spec in nodes:
                out.setdefault(spec.address, spec)
        return out

    def _sync_nodes(self, initial: bool = False) -> None:
        desired = self._desired()
        for address, spec in desired.items():
            node = self.nodes.get(address)
            if node is None:
                node = RemoteNode(
                    spec, self.s, self.clock, self._models_changed,
                    max_message_bytes=self.max_message_bytes, slow_start=not initial,
                )  # fmt: skip
                self.nodes[address] = node
                log.info("node %s added (weight %g, from %s)", address, spec.weight, spec.source)
                if not initial:
                    node.start()
            elif node.spec != spec:
                log.info("node %s: weight %g, models %s", address, spec.weight, ", ".join(spec.models) or "learned")
                node.weight = spec.weight
                if spec.models or node.spec.models:
                    node.models = {(m, ANY_VERSION) for m in spec.models}
                node.spec = spec
        for address in [a for a in self.nodes if a not in desired]:
            node = self.nodes.pop(address)
            log.info("node %s removed; its in-flight requests may finish", address)
            self._spawn(node.close(grace=30.0))
        self._models_changed()

    def _models_changed(self) -> None:
        self._remote_cache.clear()

    async def _discovery_loop(self) -> None:
        next_dns = self.clock.now() + self.s.dns_refresh_s
        while True:
            await asyncio.sleep(self.s.node_file_poll_s if self.node_file else self.s.dns_refresh_s)
            changed = self.node_file.poll() if self.node_file else False
            if self.dns and self.clock.now() >= next_dns:
                results = await asyncio.gather(*(d.refresh() for d in self.dns))
                changed = changed or any(results)
                next_dns = self.clock.now() + self.s.dns_refresh_s
            if changed:
                self._sync_nodes()

    def remote_for(self, name: str, version: str) -> list[RemoteNode]:
        """Remote nodes serving ``name`` at ``version`` ("" = any version)."""
        key = (name, version)
        nodes = self._remote_cache.get(key)
        if nodes is None:
            nodes = [n for n in self.nodes.values() if n.serves(name, version)]
            self._remote_cache[key] = nodes
        return nodes

    def remote_models(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for node in self.nodes.values():
            for name, version in node.models:
                out.setdefault(name, set()).add(version)
        return out

    def remote_config(self, name: str) -> RemoteNode | None:
        """A node that has told us ``name``'s config and metadata (preferring available ones)."""
        now = self.clock.now()
        found = [n for n in self.remote_for(name, "") if name in n.configs]
        found.sort(key=lambda n: not n.available(now))
        return found[0] if found else None

    # -- local health -------------------------------------------------------------------------------
    async def _ping_loop(self) -> None:
        s = self.s
        while True:
            await asyncio.sleep(s.local_ping_interval_s)
            endpoints = list(self.local_endpoints())
            flips = await asyncio.gather(
                *(e.check_once(s.health_timeout_s, s.healthy_threshold, s.unhealthy_threshold) for e in endpoints)
            )
            for ep, flipped in zip(endpoints, flips):
                if flipped:
                    log.warning(
                        "worker %s is %s", ep.name, "back" if ep.healthy else f"not answering ({ep.last_error})"
                    )

    # -- picking ------------------------------------------------------------------------------------
    def pick(self, key: object, endpoints: Sequence[Endpoint], exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        now = self.clock.now()
        candidates = self.outlier.candidates(endpoints, now, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = make_policy(self.s.policy, self.rng)
        slow = self.s.slow_start_s
        return policy.pick(candidates, [e.effective_weight(now, slow) for e in candidates], now)

    def _failed(self, ep: Endpoint, peers: Sequence[Endpoint]) -> None:
        if self.outlier.on_failure(ep, peers, self.clock.now()):
            why = f"was ejected after {self.s.consecutive_failures} consecutive failures"
            log.warning("endpoint %s %s (for %.1f s)", ep.name, why, ep.ejected_until - self.clock.now())
            ep.went_down(why)

    async def _attempt(self, ep: Endpoint, peers: Sequence[Endpoint], payload: bytes, timeout: float | None) -> Reply:
        ep.inflight += 1
        ep.requests += 1
        start = self.clock.now()
        try:
            reply = await ep.infer(payload, timeout)
        except EndpointFailed as exc:
            if exc.resend:  # known gone (died, failed its health check): already out; ejecting adds nothing
                ep.record_failure()  # but would keep its replacement out for base_ejection_s
            else:
                self._failed(ep, peers)
            raise
        finally:
            ep.inflight -= 1
        if reply.code in _FAILURE_CODES:
            self._failed(ep, peers)
            if reply.code == _UNAVAILABLE:
                raise EndpointFailed(f"{ep.name} answered UNAVAILABLE: {reply.message()}")
        elif reply.failed:
            ep.consecutive_failures = 0
        else:
            ep.record_success(self.clock.now() - start)
        return reply

    async def _hedged(
        self, key: object, ep: Endpoint, peers: Sequence[Endpoint], payload: bytes, timeout: float | None,
        tried: list[Endpoint],
    ) -> Reply:  # fmt: skip
        """First attempt; if it has not answered after ``hedge_delay_s``, race a second elsewhere.

        The second endpoint is added to ``tried`` so a retry after both fail goes to a third.
        """
        first = asyncio.ensure_future(self._attempt(ep, peers, payload, timeout))
        pending = {first}
        try:
            done, _ = await asyncio.wait(pending, timeout=self.s.hedge_delay_s)
            if done:
                return first.result()
            other = self.pick(key, peers, [ep, *tried])
            if other is None or not self.budget.try_acquire():
                return await first
            try:
                self.hedges += 1
                tried.append(other)
                pending.add(asyncio.ensure_future(self._attempt(other, peers, payload, timeout)))
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if task.exception() is None:
                            return task.result()
                return first.result()  # both failed: raise the first attempt's error
            finally:
                self.budget.release()
        finally:
            for task in pending:
                task.cancel()

    async def call(
        self, key: object, endpoints: Sequence[Endpoint], payload: bytes, deadline: float | None, what: str
    ) -> Reply:
        """Send ``payload`` to one of ``endpoints``; retry elsewhere on endpoint failure."""
        s = self.s
        budget = self.budget
        budget.active += 1
        tried: list[Endpoint] = []
        on_budget = False
        failure: Exception | None = None
        ep = self.pick(key, endpoints)
        try:
            for attempt in range(s.max_retries + 1):
                if ep is None:
                    break
                timeout = None
                if deadline is not None:
                    timeout = deadline - self.clock.now()
                    if timeout <= 0:
                        raise DeadlineExceeded(f"{what}: deadline exceeded" + (f" after: {failure}" if failure else ""))
                per_try = s.per_try_timeout_s > 0 and (timeout is None or s.per_try_timeout_s < timeout)
                if per_try:
                    timeout = s.per_try_timeout_s
                try:
                    if attempt == 0 and s.hedge_delay_s > 0:
                        return await self._hedged(key, ep, endpoints, payload, timeout, tried)
                    return await self._attempt(ep, endpoints, payload, timeout)
                except EndpointFailed as exc:
                    failure = exc
                except TimeoutError:
                    if not per_try:
                        raise DeadlineExceeded(f"{what}: deadline exceeded while waiting for {ep.name}") from None
                    failure = EndpointFailed(f"{ep.name} did not answer within {s.per_try_timeout_s:g} s")
                    self._failed(ep, endpoints)
                tried.append(ep)
                if attempt == s.max_retries:
                    break
                following = self.pick(key, endpoints, tried)
                if following is None:
                    break  # nowhere else to go: not a retry
                resend = isinstance(failure, EndpointFailed) and failure.resend
                if not resend and not on_budget:
                    if not budget.try_acquire():
                        raise Unavailable(f"{what}: {failure} (not retried: retry budget exhausted)")
                    on_budget = True
                ep.retries += 1
                self.retries += 1
                if resend:
                    log.warning("re-sending a request of %s to another endpoint: %s", what, failure)
                else:
                    log.debug("retrying a request of %s on another endpoint: %s", what, failure)
                ep = following
        finally:
            budget.active -= 1
            if on_budget:
                budget.release()
        if failure is None:
            raise Unavailable(f"{what} has no ready instance")
        if len(tried) > 1:
            raise Unavailable(f"{what}: all {len(tried)} attempts failed; last: {failure}")
        raise Unavailable(f"{what}: {failure}")

    # -- observability ------------------------------------------------------------------------------
    def describe(self, ep: Endpoint) -> dict[str, object]:
        return ep.describe(self.clock.now(), self.s.slow_start_s)

    def counters(self) -> dict[str, int]:
        return {
            "retries": self.retries,
            "hedges": self.hedges,
            "retry_budget_denied": self.budget.denied,
            "panics": self.outlier.panics,
        }
