"""The contract every strategy implements.

A strategy is a *builder*: given the eligible backends of one backend set, it returns a
:class:`Picker`, an immutable snapshot rebuilt on every update and swapped in with one
assignment. In-flight requests keep the picker they started with.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from weighbridge.errors import WeighbridgeError

B = TypeVar("B", bound="Weighted")
B_co = TypeVar("B_co", covariant=True)


class Weighted(Protocol):
    """What a picker needs to know of a backend."""

    @property
    def weight(self) -> int: ...


class NoBackendError(WeighbridgeError):
    """No backend can take the request; the message says why, for a human."""


@dataclass(frozen=True, slots=True)
class Explanation(Generic[B_co]):
    backend: B_co
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """A picker's arithmetic, done: what the native data path executes per request.

    ``cycle`` walks ``table`` (backend indices) from ``start``; ``uniform`` draws any backend;
    ``cumulative`` draws against cumulative weights ``table``; ``smooth`` runs smooth WRR over
    weights ``table``, ``start`` steps in; ``fail`` fails every pick with ``message``.
    """

    kind: str
    table: tuple[int, ...] = ()
    start: int = 0
    message: str = ""


class Picker(Protocol[B_co]):
    """Picks one backend per request.

    pick should not block and never does I/O; it is called on the event loop for every
    request. Pickers are not shared across threads.
    """

    def pick(self) -> B_co: ...

    def explain(self, cursor: int | None = None) -> Explanation[B_co]:
        """What the next pick would be and why, without changing the picker's state.

        ``cursor``: where the native data path's rotation stands (see :class:`Plan`), for
        pickers that rotate; others ignore it.
        """
        ...

    def plan(self) -> Plan:
        """The same picks, for the native data path."""
        ...


Builder = Callable[[Sequence[B], random.Random], Picker[B]]
"""builder(eligible_backends, rng) → picker; ``eligible_backends`` is never empty."""


class ErrorPicker(Generic[B]):
    """The picker of an empty set: every pick fails with the same clear message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def pick(self) -> B:
        raise NoBackendError(self.message)

    def explain(self, cursor: int | None = None) -> Explanation[B]:
        raise NoBackendError(self.message)

    def plan(self) -> Plan:
        return Plan("fail", message=self.message)
