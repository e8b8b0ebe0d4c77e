"""random: a uniform choice among the eligible backends, P_i = 1/N."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic

from dataplane.strategies.base import B, Explanation, Plan

NAME = "random"


class RandomPicker(Generic[B]):
    __slots__ = ("_backends", "_n", "_random")

    def __init__(self, backends: Sequence[B], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._n = len(self._backends)
        self._random = rng.random

    def pick(self) -> B:
        return self._backends[int(self._random() * self._n)]

    def explain(self, cursor: int | None = None) -> Explanation[B]:
        backend = self._backends[int(random.random() * self._n)]
        return Explanation(
            backend, f"random: uniform choice, each of {self._n} has P = 1/{self._n}"
        )

    def plan(self) -> Plan:
        return Plan("uniform")


def build(backends: Sequence[B], rng: random.Random) -> RandomPicker[B]:
    return RandomPicker(backends, rng)
