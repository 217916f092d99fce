"""Passive outlier ejection and panic mode.

After ``consecutive_failures`` failures in a row an endpoint is ejected for ``base_ejection_s`` x
its ejection streak (capped at ``max_ejection_s``), unless that would eject more than
``max_ejection_percent`` of its set (one ejection is always allowed). The streak resets once the
endpoint has stayed in for ``max_ejection_s``. When fewer than ``panic_threshold_percent`` of a set's
endpoints are available, health is ignored and every usable endpoint takes traffic (better some
requests on a doubtful endpoint than all on the few that are left).
"""

from __future__ import annotations

from collections.abc import Sequence

from dl_inference.balancer.endpoint import Endpoint
from dl_inference.balancer.settings import BalancerSettings


class OutlierDetector:
    def __init__(self, settings: BalancerSettings) -> None:
        self.s = settings
        self.panics = 0

    def on_failure(self, ep: Endpoint, peers: Sequence[Endpoint], now: float) -> bool:
        """Record a failure; return True when it got ``ep`` ejected."""
        ep.record_failure()
        if ep.consecutive_failures < self.s.consecutive_failures or ep.ejected(now):
            return False
        ejected = sum(1 for p in peers if p is not ep and p.ejected(now))
        if ejected and (ejected + 1) * 100 > self.s.max_ejection_percent * len(peers):
            return False
        if now - ep.ejected_until > self.s.max_ejection_s:
            ep.ejection_streak = 0
        ep.ejection_streak += 1
        ep.ejections += 1
        ep.ejected_until = now + min(self.s.base_ejection_s * ep.ejection_streak, self.s.max_ejection_s)
        ep.returned_at = ep.ejected_until  # slow start begins when the ejection ends
        ep.consecutive_failures = 0
        return True

    def candidates(self, endpoints: Sequence[Endpoint], now: float, exclude: Sequence[Endpoint]) -> list[Endpoint]:
        """Endpoints to pick from: the available ones, or in panic every usable one."""
        available = [e for e in endpoints if e.available(now)]
        if len(available) * 100 < self.s.panic_threshold_percent * len(endpoints):
            usable = [e for e in endpoints if e.usable()]
            if len(usable) > len(available):
                self.panics += 1
                available = usable
        if exclude:
            available = [e for e in available if e not in exclude]
        return available
