"""Time source for the balancer, so ejection, slow start and budgets can be tested with a fake clock."""

from __future__ import annotations

import time


class Clock:
    def now(self) -> float:
        return time.monotonic()


class FakeClock(Clock):
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
