"""weighted_round_robin: smooth interleaving, P_i = w_i / sum(w), exact per window.

The schedule is nginx's smooth weighted round robin: each step adds w_i to every backend's
credit and picks the backend with the most credit, which then pays sum(w). The sequence is
periodic with period sum(w) and holds each backend exactly w_i times per period, so *any*
window of sum(w) consecutive picks gives backend i exactly w_i of them, while heavy backends
are spread out instead of picked in bursts.

The schedule math happens at build time: weights are reduced by their gcd, and a schedule of
up to MAX_SCHEDULE picks is precomputed so that a pick is one index step. Larger totals use
the same algorithm online (O(N) per pick). Equal weights fall back to plain rotation.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from typing import Final, Generic

from dataplane.strategies.base import B, Explanation, Plan
from dataplane.strategies.roundrobin import RoundRobinPicker

NAME = "weighted_round_robin"
MAX_SCHEDULE: Final = 1 << 16


def smooth_schedule(weights: Sequence[int]) -> array[int]:
    """One period of the smooth WRR sequence, as backend indices."""
    total = sum(weights)
    credit = [0] * len(weights)
    out = array("I")
    for _ in range(total):
        best = 0
        for i, w in enumerate(weights):
            credit[i] += w
            if credit[i] > credit[best]:
                best = i
        credit[best] -= total
        out.append(best)
    return out


class ScheduledPicker(Generic[B]):
    __slots__ = ("_backends", "_next", "_period", "_schedule")

    def __init__(self, backends: Sequence[B], weights: Sequence[int], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._schedule = smooth_schedule(weights)
        self._period = len(self._schedule)
        self._next = rng.randrange(self._period)

    def pick(self) -> B:
        i = self._next
        self._next = i + 1 if i + 1 < self._period else 0
        return self._backends[self._schedule[i]]

    def explain(self, cursor: int | None = None) -> Explanation[B]:
        at = self._next if cursor is None else cursor % self._period
        b = self._backends[self._schedule[at]]
        return Explanation(
            b,
            f"weighted_round_robin: step {at + 1} of a {self._period}-pick schedule "
            f"in which this backend has {b.weight} picks",
        )

    def plan(self) -> Plan:
        return Plan("cycle", tuple(self._schedule), self._next)


class OnlineSmoothPicker(Generic[B]):
    __slots__ = ("_backends", "_credit", "_skipped", "_total", "_weights")

    def __init__(self, backends: Sequence[B], weights: Sequence[int], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._weights = tuple(weights)
        self._total = sum(weights)
        self._credit = [0] * len(weights)
        self._skipped = rng.randrange(min(self._total, 4 * len(weights)))
        for _ in range(self._skipped):
            self._step()

    def _step(self) -> int:
        credit, best = self._credit, 0
        for i, w in enumerate(self._weights):
            credit[i] += w
            if credit[i] > credit[best]:
                best = i
        credit[best] -= self._total
        return best

    def pick(self) -> B:
        return self._backends[self._step()]

    def plan(self) -> Plan:
        return Plan("smooth", self._weights, self._skipped)

    def explain(self, cursor: int | None = None) -> Explanation[B]:
        credit = [c + w for c, w in zip(self._credit, self._weights, strict=True)]
        b = self._backends[max(range(len(credit)), key=credit.__getitem__)]
        return Explanation(
            b, f"weighted_round_robin: most credit (weight {b.weight} of {self._total})"
        )


def build(
    backends: Sequence[B], rng: random.Random
) -> ScheduledPicker[B] | OnlineSmoothPicker[B] | RoundRobinPicker[B]:
    weights = [b.weight for b in backends]
    if len(set(weights)) == 1:
        return RoundRobinPicker(backends, rng)
    g = math.gcd(*weights)
    reduced = [w // g for w in weights]
    if sum(reduced) <= MAX_SCHEDULE:
        return ScheduledPicker(backends, reduced, rng)
    return OnlineSmoothPicker(backends, reduced, rng)
