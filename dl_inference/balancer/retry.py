"""Retry budget: retries in flight may be at most a share of the requests in flight.

A budget, unlike a fixed retry count, cannot multiply load when every endpoint is failing: with 20%
and 100 requests in flight, at most 20 of them are retries at any moment (and never fewer than
``min_concurrency``, so a quiet server can still retry).
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, percent: float, min_concurrency: int) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active = 0  # requests in flight through the balancer
        self.retrying = 0  # of those, how many are on a retry
        self.denied = 0

    def allowed(self) -> int:
        return max(self.min_concurrency, int(self.active * self.percent / 100))

    def try_acquire(self) -> bool:
        if self.retrying < self.allowed():
            self.retrying += 1
            return True
        self.denied += 1
        return False

    def release(self) -> None:
        self.retrying -= 1
