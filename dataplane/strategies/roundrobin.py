"""round_robin: strict rotation over the eligible backends, P_i = 1/N.

The rotation starts at a random index so that many proxies (or workers) that rebuilt their
pickers at the same moment do not all send their next request to the same backend.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic

from dataplane.strategies.base import B, Explanation, Plan

NAME = "round_robin"


class RoundRobinPicker(Generic[B]):
    __slots__ = ("_backends", "_n", "_next")

    def __init__(self, backends: Sequence[B], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._n = len(self._backends)
        self._next = rng.randrange(self._n)

    def pick(self) -> B:
        i = self._next
        self._next = i + 1 if i + 1 < self._n else 0
        return self._backends[i]

    def explain(self, cursor: int | None = None) -> Explanation[B]:
        at = self._next if cursor is None else cursor % self._n
        return Explanation(
            self._backends[at],
            f"round_robin: next in the rotation (position {at + 1} of {self._n})",
        )

    def plan(self) -> Plan:
        return Plan("cycle", tuple(range(self._n)), self._next)


def build(backends: Sequence[B], rng: random.Random) -> RoundRobinPicker[B]:
    return RoundRobinPicker(backends, rng)
