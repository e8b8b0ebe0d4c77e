"""Routes: which backend set a call belongs to, and the picker that chooses its backend.

A call reaches Service NAMESPACE/NAME when its ``:authority`` (any port) is ``NAME.NAMESPACE``,
``NAME.NAMESPACE.svc`` or ``NAME.NAMESPACE.svc.cluster.local``; failing that, when the gRPC
service in its path (``/pkg.Service/Method``) is one the set declares in ``grpc_services``.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

from dataplane.strategies import NoBackendError, Picker, build_picker
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint

log = structlog.get_logger(__name__)

LATENCY_BOUNDS: Final = tuple(
    b / 1e6
    for b in (
        100,
        250,
        500,
        1_000,
        2_500,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        1_000_000,
        5_000_000,
    )
)
"""Latency histogram bucket upper bounds, seconds (the last bucket is open)."""


class BackendHandle(Protocol):
    """What routing and the admin API need of a backend, whichever data path carries calls."""

    @property
    def hostport(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str: ...


class BackendPool(Protocol):
    def acquire(self, address: str, port: int) -> BackendHandle: ...

    def release(self, backend: BackendHandle) -> None: ...


class RouteListener(Protocol):
    """Told of every change to the routing table (the native data path keeps its own copy)."""

    def route_changed(self, key: ServiceKey, state: ServiceState | None) -> None: ...

    def grpc_services_changed(self, table: dict[str, ServiceKey]) -> None: ...


class NoRouteError(NoBackendError):
    """No backend set matches the call."""


@dataclass(slots=True)
class BackendStats:
    """Counters of one endpoint within one Service; they survive set updates."""

    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))

    def observe(self, seconds: float, ok: bool) -> None:
        self.latency_sum += seconds
        self.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        if not ok:
            self.errors += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (seconds), 0 without data."""
        total = sum(self.buckets)
        if not total:
            return 0.0
        rank, seen = q * total, 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else float("inf")
        return float("inf")


class Target:
    """What a picker hands out: a backend, its weight in this set, and its counters."""

    __slots__ = ("backend", "endpoint", "service", "stats", "weight")

    def __init__(
        self,
        service: ServiceKey,
        endpoint: Endpoint,
        backend: BackendHandle,
        stats: BackendStats,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self.backend = backend
        self.stats = stats
        self.weight = endpoint.weight


class ServiceState:
    """One applied backend set with its picker: immutable once built, replaced on update."""

    __slots__ = ("backend_set", "key", "mod_revision", "picker", "stats", "targets")

    def __init__(
        self,
        backend_set: BackendSet,
        mod_revision: int,
        pool: BackendPool,
        stats: dict[str, BackendStats],
        rng: random.Random,
    ) -> None:
        self.key = backend_set.key
        self.backend_set = backend_set
        self.mod_revision = mod_revision
        self.stats = stats
        self.targets = tuple(
            Target(
                self.key,
                e,
                pool.acquire(e.address, e.port),
                stats.setdefault(e.hostport, BackendStats()),
            )
            for e in backend_set.eligible
        )
        n = len(backend_set.endpoints)
        why = (
            f"{n} endpoints, none serving, not terminating and of weight > 0"
            if n
            else "no endpoints"
        )
        self.picker: Picker[Target] = build_picker(
            backend_set.strategy,
            self.targets,
            rng,
            empty_message=f"Service {self.key} has no backend that can take requests ({why})",
        )

    def release(self, pool: BackendPool) -> None:
        for t in self.targets:
            pool.release(t.backend)


def normalize_authority(authority: str) -> str | None:
    """``NAME.NAMESPACE`` from any accepted authority form, or None."""
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    host = host.lower().rstrip(".")
    for suffix in (".svc.cluster.local", ".svc"):
        if host.endswith(suffix):
            host = host[: -len(suffix)]
            break
    parts = host.split(".")
    return f"{parts[1]}/{parts[0]}" if len(parts) == 2 else None


class Router:
    """The routing table; rebuilt piecewise as backend sets arrive from etcd."""

    def __init__(
        self,
        pool: BackendPool,
        rng: random.Random | None = None,
        listener: RouteListener | None = None,
    ) -> None:
        self.pool = pool
        self.rng = rng or random.Random()
        self.listener = listener
        self.services: dict[ServiceKey, ServiceState] = {}
        self.by_grpc_service: dict[str, ServiceKey] = {}
        """gRPC service name → the Service that declares it (looked up in ``services``, so a
        replaced ServiceState is never served stale)."""
        self._authority_cache: dict[bytes, ServiceKey | None] = {}
        self._stats: dict[ServiceKey, dict[str, BackendStats]] = {}

    def apply(self, key: ServiceKey, backend_set: BackendSet | None, mod_revision: int) -> None:
        """Install (or, with None, remove) one Service's set: a single swap per Service."""
        old = self.services.get(key)
        if backend_set is None:
            if old is not None:
                del self.services[key]
                old.release(self.pool)
                self._stats.pop(key, None)
        else:
            stats = self._stats.setdefault(key, {})
            new = ServiceState(backend_set, mod_revision, self.pool, stats, self.rng)
            self.services[key] = new
            if old is not None:
                old.release(self.pool)
            live = {e.hostport for e in backend_set.endpoints}
            for hostport in [h for h, s in stats.items() if h not in live and not s.in_flight]:
                del stats[hostport]
        if self.listener is not None:
            self.listener.route_changed(key, self.services.get(key))
        old_names = old.backend_set.grpc_services if old is not None else ()
        new_names = backend_set.grpc_services if backend_set is not None else ()
        if old_names != new_names:  # O(Services), so only when the names change
            self._rebuild_grpc_services()
            if self.listener is not None:
                self.listener.grpc_services_changed(self.by_grpc_service)

    def _rebuild_grpc_services(self) -> None:
        table: dict[str, ServiceKey] = {}
        for key in sorted(self.services):
            for name in self.services[key].backend_set.grpc_services:
                if name in table:
                    log.warning(
                        "grpc_service_claimed_twice",
                        grpc_service=name,
                        kept=table[name],
                        ignored=key,
                    )
                    continue
                table[name] = key
        self.by_grpc_service = table

    def route(self, authority: bytes, path: bytes) -> tuple[ServiceState, str]:
        """The Service a call goes to and how it was matched; raises NoRouteError."""
        cache = self._authority_cache
        if authority in cache:
            key = cache[authority]
        else:
            key = _key_or_none(normalize_authority(authority.decode("ascii", "replace")))
            if len(cache) > 10_000:
                cache.clear()
            cache[authority] = key
        if key is not None:
            state = self.services.get(key)
            if state is not None:
                return state, "authority"
        service = (
            path[1 : path.rfind(b"/")].decode("ascii", "replace") if path.startswith(b"/") else ""
        )
        owner = self.by_grpc_service.get(service) if service else None
        state = self.services.get(owner) if owner is not None else None
        if state is not None:
            return state, "grpc-service"
        if key is not None:
            shown = authority.decode("ascii", "replace")
            raise NoRouteError(
                f"no backend set for Service {key} (authority {shown!r}); "
                "is the Service annotated with weighbridge.io/strategy?"
            )
        raise NoRouteError(
            f"no route for authority {authority.decode('ascii', 'replace')!r} and gRPC service "
            f"{service!r}: use NAME.NAMESPACE[.svc[.cluster.local]] as the authority, or list "
            f"the gRPC service in weighbridge.io/grpc-services"
        )


def _key_or_none(text: str | None) -> ServiceKey | None:
    return None if text is None else ServiceKey(text)
