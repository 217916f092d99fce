"""One place a request can go (a local worker instance or a remote node), with its load and health.

An endpoint is *available* when its transport is up (:meth:`Endpoint.usable`), its active health
check passes and it is not ejected. Its *effective weight* is the configured weight, scaled by
dl_inference's failure penalty (halved on each failure, restored by a tenth on each success) and by
the slow-start ramp after it returns (10% → 100% over ``slow_start_s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dl_inference.balancer.clock import Clock
from dl_inference.errors import CODE_FROM_WIRE, WIRE_CODE, Code, ServerError
from dl_inference.protocol.framing import ExecStats


@dataclass(frozen=True, slots=True)
class Reply:
    """What an endpoint answered: a result (``code`` 0, ``body`` the serialized response) or an error
    (``code`` its wire code, :data:`~dl_inference.errors.WIRE_CODE`; ``body`` its message)."""

    body: bytes
    stats: ExecStats = field(default_factory=ExecStats)
    code: int = 0

    @classmethod
    def error(cls, code: Code, message: str) -> Reply:
        return cls(message.encode(), ExecStats(), WIRE_CODE[code])

    @property
    def failed(self) -> bool:
        return self.code != 0

    def message(self) -> str:
        return self.body.decode(errors="replace")

    def result(self) -> bytes:
        """The response body, or the error raised as the :class:`ServerError` it names."""
        if self.code:
            raise ServerError(self.message(), CODE_FROM_WIRE.get(self.code, Code.INTERNAL))
        return self.body


EWMA_ALPHA = 0.3
# An endpoint without fresh samples looks faster over time, so it gets tried again: its estimate stays
# as it is for EWMA_FRESH_S, then fades with time constant EWMA_DECAY_S. One outlier (a 27 ms answer
# among 1.3 ms ones, in load_tests.faults) lifts an endpoint's EWMA ~7x; with two endpoints least_request
# compares the same pair every time, so the other took every request until the estimate faded back to
# within 1.25x: over 15 s with the old 10 s constant (a healthy node starved for 3 s in a real run), 2.2 s
# now (tests/unit/test_balancer.py simulates both). A 5x slower endpoint gets a probe about every 1.2 s.
EWMA_FRESH_S = 0.5
EWMA_DECAY_S = 1.0
MIN_PENALTY = 0.05
SLOW_START_FLOOR = 0.1


class EndpointFailed(Exception):
    """The endpoint gave no answer: unreachable, died, answered UNAVAILABLE, or was abandoned.

    ``resend`` marks failures where the endpoint is known to be gone (its process died, or it was
    ejected / failed its health check while the request was in flight): re-sending cannot add load
    to a struggling endpoint, so it is not charged to the retry budget.
    """

    def __init__(self, message: str, *, resend: bool = False) -> None:
        super().__init__(message)
        self.resend = resend


class Endpoint:
    kind = "endpoint"

    def __init__(self, name: str, weight: float, clock: Clock, *, slow_start: bool = False) -> None:
        self.name = name
        self.weight = weight
        self.clock = clock
        self.inflight = 0
        self.ewma_s = 0.0  # 0: no sample yet
        self.ewma_at = 0.0  # when the last sample came in
        self.requests = 0
        self.failures = 0
        self.retries = 0  # retries of requests that failed here
        self.ejections = 0
        self.ejection_streak = 0  # ejection time = base x streak; reset after a quiet spell
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.healthy = True  # active health check verdict
        self.checks_passed = 0
        self.checks_failed = 0
        self.last_error = ""
        self.penalty = 1.0
        self.returned_at = clock.now() if slow_start else -math.inf

    # -- state --------------------------------------------------------------------------------------
    def usable(self) -> bool:
        """Whether a request can be sent at all (connection or process up)."""
        return True

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and self.usable()

    def state(self, now: float) -> str:
        if not self.usable():
            return "down"
        if not self.healthy:
            return "unhealthy"
        if self.ejected(now):
            return "ejected"
        return "healthy"

    def effective_weight(self, now: float, slow_start_s: float) -> float:
        w = self.weight * self.penalty
        since = now - self.returned_at
        if slow_start_s > 0 and since < slow_start_s:
            w *= max(SLOW_START_FLOOR, since / slow_start_s)
        return w

    # -- outcomes -----------------------------------------------------------------------------------
    def latency(self, now: float) -> float:
        """Latency EWMA, decayed by the time since its last sample (a stale estimate fades)."""
        idle = now - self.ewma_at
        return self.ewma_s * math.exp(-(idle - EWMA_FRESH_S) / EWMA_DECAY_S) if idle > EWMA_FRESH_S else self.ewma_s

    def record_success(self, latency_s: float) -> None:
        self.consecutive_failures = 0
        current = self.latency(self.clock.now())
        self.ewma_s = latency_s if current == 0.0 else current + EWMA_ALPHA * (latency_s - current)
        self.ewma_at = self.clock.now()
        if self.penalty < 1.0:
            self.penalty = min(1.0, self.penalty + 0.1)

    def record_failure(self) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.penalty = max(MIN_PENALTY, self.penalty / 2)

    def record_check(self, ok: bool, why: str, healthy_threshold: int, unhealthy_threshold: int) -> bool:
        """Count one active health check; return True when the verdict flipped."""
        if not ok:
            self.checks_passed = 0
            self.checks_failed += 1
            self.last_error = f"failed its health check: {why}"
            if self.healthy and self.checks_failed >= unhealthy_threshold:
                self.healthy = False
                self.went_down(self.last_error)
                return True
            return False
        self.checks_failed = 0
        self.checks_passed += 1
        if not self.healthy and self.checks_passed >= healthy_threshold:
            self.healthy = True
            self.last_error = ""
            self.returned()
            return True
        return False

    def went_down(self, why: str) -> None:
        """Health check failed or ejected: give up on what is in flight here so it can go elsewhere."""

    def returned(self) -> None:
        """Back in rotation: start slow start."""
        self.returned_at = self.clock.now()

    # -- transport ----------------------------------------------------------------------------------
    async def infer(self, payload: bytes, timeout: float | None) -> Reply:
        """Send one serialized ModelInferRequest. Raises EndpointFailed or TimeoutError."""
        raise NotImplementedError

    def describe(self, now: float, slow_start_s: float) -> dict[str, object]:
        return {
            "endpoint": self.name,
            "kind": self.kind,
            "state": self.state(now),
            "weight": self.weight,
            "effective_weight": round(self.effective_weight(now, slow_start_s), 4),
            "inflight": self.inflight,
            "latency_ewma_ms": round(self.ewma_s * 1e3, 3),
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "ejections": self.ejections,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "retries": self.retries,
        }
