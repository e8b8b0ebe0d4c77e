"""Who routes by a gRPC service name: one Service per name, the oldest claim wins.

A proxy routes a call whose ``:authority`` names no Service by the gRPC service in its path
(``/helloworld.Greeter/SayHello``) to the one set that lists ``helloworld.Greeter``. Any
Service may list any name in ``weighbridge.io/grpc-services``, so the controller decides:
among the Services that claim a name, the one created first (``metadata.creationTimestamp``,
then namespace, then name) gets it, and only its published set lists it.

:class:`Claims` is the index the controller keeps of every claim in its Service cache, kept
current by the Service informer's events; it answers who wins a name and whom a change
concerns. Single event loop; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from weighbridge.keys import ServiceKey

NEVER: Final = "9999-12-31T23:59:59Z"
"""The creation time of a Service that has none (never from an API server): it loses every
tie, rather than win one by an accident."""


@dataclass(frozen=True, slots=True)
class Claim:
    """The gRPC service names one Service claims, and how old its claim is."""

    key: ServiceKey
    created: str
    """``metadata.creationTimestamp`` as the API server writes it (RFC 3339, UTC, whole
    seconds), so that comparing the text compares the times."""
    names: frozenset[str]

    @property
    def rank(self) -> tuple[str, str, str]:
        """Lower ranks win: older first, then by namespace and name."""
        namespace, _, name = self.key.partition("/")
        return (self.created, namespace, name)


class Claims:
    """Every Service's claim, by Service and by name."""

    def __init__(self) -> None:
        self._by_key: dict[ServiceKey, Claim] = {}
        self._by_name: dict[str, dict[ServiceKey, Claim]] = {}
        self._taken = 0

    def update(self, key: ServiceKey, claim: Claim | None) -> frozenset[str]:
        """Record ``key``'s claim (None: it claims nothing); returns the names whose claimants
        or ranks changed, i.e. the names whose winner may have changed."""
        old = self._by_key.pop(key, None)
        if claim is not None and claim.names:
            self._by_key[key] = claim
        else:
            claim = None
        if old == claim:
            return frozenset()
        for name in old.names if old is not None else ():
            claimants = self._by_name[name]
            del claimants[key]
            if claimants:
                self._taken -= 1
            else:
                del self._by_name[name]
        if claim is not None:
            for name in claim.names:
                claimants = self._by_name.setdefault(name, {})
                if claimants:
                    self._taken += 1
                claimants[key] = claim
        if old is None or claim is None or old.rank != claim.rank:
            return (old.names if old else frozenset()) | (claim.names if claim else frozenset())
        return old.names ^ claim.names

    def winner(self, name: str) -> Claim | None:
        """The claim that gets ``name``, or None when no Service claims it."""
        claimants = self._by_name.get(name)
        if not claimants:
            return None
        return min(claimants.values(), key=lambda c: c.rank)

    def claimants(self, names: Iterable[str]) -> set[ServiceKey]:
        """Every Service that claims one of ``names``."""
        return {key for name in names for key in self._by_name.get(name, ())}

    @property
    def taken(self) -> int:
        """Claims that lose: one per (name, Service) whose name an older Service gets."""
        return self._taken

    def __len__(self) -> int:
        return len(self._by_key)
