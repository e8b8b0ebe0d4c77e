"""weighted_random: backend i is chosen with P_i = w_i / sum(w), independently per request."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Generic

from dataplane.strategies.base import B, Explanation, Plan

NAME = "weighted_random"


class WeightedRandomPicker(Generic[B]):
    __slots__ = ("_backends", "_cumulative", "_random", "_total")

    def __init__(self, backends: Sequence[B], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._cumulative = tuple(itertools.accumulate(b.weight for b in self._backends))
        self._total = self._cumulative[-1]
        self._random = rng.random

    def pick(self) -> B:
        # bisect_right on [0, total): the backend whose cumulative range holds the draw.
        return self._backends[bisect.bisect_right(self._cumulative, self._random() * self._total)]

    def explain(self, cursor: int | None = None) -> Explanation[B]:
        i = bisect.bisect_right(self._cumulative, random.random() * self._total)
        b = self._backends[i]
        return Explanation(b, f"weighted_random: drawn with P = {b.weight}/{self._total}")

    def plan(self) -> Plan:
        return Plan("cumulative", self._cumulative)


def build(backends: Sequence[B], rng: random.Random) -> WeightedRandomPicker[B]:
    return WeightedRandomPicker(backends, rng)
