"""Picking policies: which available endpoint gets the next request.

``weighted_round_robin`` is smooth weighted round robin: every pick, each candidate's running score
grows by its effective weight; the highest score wins and pays back the total. Weights {5, 1, 1}
give a, a, b, a, c, a, a — spread out, not in bursts.

``least_request`` is the power of two choices: two distinct random candidates, the one with the
lower cost wins, cost = (in-flight + 1) x latency EWMA / effective weight. The +1 lets an idle
endpoint's latency count; an endpoint without a latency sample yet is tried first. The EWMA fades
(time constant 10 s) while an endpoint gets no traffic, so one that was slow once is tried again.
Costs within ``COMPARABLE`` of each other are a draw, settled at random in proportion to weight:
two equally fast endpoints' EWMAs differ only by noise, and letting the lower one win every time
sent all traffic to one of them for seconds (the other's EWMA goes stale, then the shares flip).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from dl_inference.balancer.endpoint import Endpoint

COMPARABLE = 1.25  # least_request: costs within this factor of each other count as equal


class Policy:
    def pick(self, candidates: Sequence[Endpoint], weights: Sequence[float], now: float = -math.inf) -> Endpoint:
        raise NotImplementedError


class SmoothWeightedRoundRobin(Policy):
    def __init__(self) -> None:
        self.scores: dict[Endpoint, float] = {}

    def pick(self, candidates: Sequence[Endpoint], weights: Sequence[float], now: float = -math.inf) -> Endpoint:
        if len(self.scores) > 2 * len(candidates) + 8:  # endpoints came and went: forget the departed
            keep = set(candidates)
            self.scores = {e: s for e, s in self.scores.items() if e in keep}
        scores = self.scores
        total = 0.0
        best = candidates[0]
        best_score = -float("inf")
        for ep, w in zip(candidates, weights):
            score = scores.get(ep, 0.0) + w
            scores[ep] = score
            total += w
            if score > best_score:
                best, best_score = ep, score
        scores[best] = best_score - total
        return best


class LeastRequest(Policy):
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    @staticmethod
    def cost(ep: Endpoint, weight: float, now: float = -math.inf) -> float:
        return (ep.inflight + 1) * ep.latency(now) / weight

    def pick(self, candidates: Sequence[Endpoint], weights: Sequence[float], now: float = -math.inf) -> Endpoint:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        cost_a, cost_b = self.cost(a, weights[i], now), self.cost(b, weights[j], now)
        low, high = min(cost_a, cost_b), max(cost_a, cost_b)
        if low > 0 and high <= low * COMPARABLE:
            return a if self.rng.random() * (weights[i] + weights[j]) < weights[i] else b
        return a if cost_a <= cost_b else b


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    return SmoothWeightedRoundRobin() if name == "weighted_round_robin" else LeastRequest(rng)
