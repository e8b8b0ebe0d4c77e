"""A fake of dataplane.engine.Engine: remembers what it was told, reports what a test sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dataplane.engine import (
    LATENCY_BOUNDS,
    BackendStats,
    EndpointEvent,
    EngineCounters,
    FailoverCount,
    NoBackendError,
    NoRouteError,
    ThreadStats,
)
from dataplane.strategies import RouteConfig
from weighbridge.keys import ServiceKey


def stats_row(
    service: str,
    hostport: str,
    *,
    state: str = "healthy",
    reason: str = "",
    since: float = 0.0,
    ejections: int = 0,
    requests: int = 0,
) -> BackendStats:
    return BackendStats(
        service=ServiceKey(service),
        hostport=hostport,
        requests=requests,
        errors=0,
        in_flight=0,
        latency_sum=0.0,
        buckets=(0,) * (len(LATENCY_BOUNDS) + 1),
        connected=state == "healthy",
        last_error=reason if state == "connect_failing" else "",
        state=state,
        state_reason=reason,
        state_since_unix=since,
        ejections=ejections,
    )


@dataclass
class FakeEngine:
    routes: dict[ServiceKey, RouteConfig] = field(default_factory=dict)
    grpc_services: dict[str, ServiceKey] = field(default_factory=dict)
    rows: list[BackendStats] = field(default_factory=list)
    failover: list[FailoverCount] = field(default_factory=list)
    queued: list[EndpointEvent] = field(default_factory=list)
    events_dropped: int = 0
    closed: bool = False
    proxy_zones: dict[str, int] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return 1

    def apply(self, key: ServiceKey, route: RouteConfig) -> None:
        self.routes[key] = route

    def remove(self, key: ServiceKey) -> None:
        self.routes.pop(key, None)

    def set_grpc_services(self, table: Mapping[str, ServiceKey]) -> None:
        self.grpc_services = dict(table)

    def set_proxy_zones(self, proxies: Mapping[str, int]) -> None:
        self.proxy_zones = dict(proxies)

    def zone_plan(self, key: ServiceKey) -> str | None:
        return None

    def route(self, authority: str, path: str) -> tuple[ServiceKey, str]:
        name, _, rest = authority.partition(".")
        key = ServiceKey(f"{rest.split('.')[0].split(':')[0]}/{name}")
        if key not in self.routes:
            raise NoRouteError(f"no backend set for Service {key}")
        return key, "authority"

    def explain(self, key: ServiceKey, headers: Mapping[str, str] | None = None) -> tuple[str, str]:
        route = self.routes.get(key)
        if route is None or not route.endpoints:
            raise NoBackendError(f"Service {key} has no backend that can take requests")
        return route.endpoints[0].hostport, f"{route.strategy}: the first"

    def stats(self, key: ServiceKey | None = None) -> list[BackendStats]:
        return [r for r in self.rows if key is None or r.service == key]

    def counters(self) -> EngineCounters:
        return EngineCounters(0, 0, {})

    def failover_counters(self) -> list[FailoverCount]:
        return list(self.failover)

    def tls_failures(self) -> dict[str, int]:
        return {}

    def client_limits(self) -> dict[str, int]:
        return {}

    @property
    def client_connections(self) -> int:
        return 0

    def events(self) -> list[EndpointEvent]:
        if self.closed:
            raise RuntimeError("the engine is closed")
        events, self.queued = self.queued, []
        return events

    def thread_stats(self) -> list[ThreadStats]:
        return [ThreadStats(0, 0, 0)]

    def goaway(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
