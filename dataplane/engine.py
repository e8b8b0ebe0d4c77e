"""The engine's Python face: the one object through which Python configures and reads the data
path (the Rust engine in ``native/``, module ``weighbridge_native``).

Everything per call happens in the engine: routing, the strategy's pick, forwarding, limits,
counters and the errors it answers with. Python hands it each Service's route when a backend
set changes and reads snapshots of its state for the admin API, Explain and metrics.
:class:`Engine` is that contract; :class:`NativeEngine` is the engine, and unit tests may use a
fake of their own.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import weighbridge_native

from dataplane.settings import ProxySettings
from dataplane.strategies import RouteConfig
from weighbridge.errors import WeighbridgeError
from weighbridge.keys import ServiceKey

LATENCY_BOUNDS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)
"""Latency histogram bucket upper bounds, seconds (the last bucket is open); the engine counts
calls into them and metrics publish them."""

HEALTHY: Final = "healthy"
DRAINING: Final = "draining"
UNHEALTHY: Final = "unhealthy"
ENDPOINT_STATES: Final = (HEALTHY, "connect_failing", "ejected", UNHEALTHY, DRAINING)
"""What an endpoint of a Service is doing. The engine reports the first four for the endpoints
it may pick (``connect_failing``: its connections fail; ``ejected``: outlier detection took it
out for a while; ``unhealthy``: it fails active health checks); ``draining`` is Python's, for
the endpoints the set keeps from new calls (terminating, not serving, weight 0)."""

FAILOVER_COUNTERS: Final = (
    "transparent_retries",
    "retries",
    "retry_budget_exhausted",
    "ejections",
    "health_checks_passed",
    "health_checks_failed",
    "debug_metadata",
    "endpoint_overrides",
)
"""The engine's counters per Service (see :meth:`Engine.failover_counters`): failover, and the
calls that got debug metadata or went to the pod their ``x-weighbridge-endpoint`` named."""


class NoBackendError(WeighbridgeError):
    """No backend can take the call; the message (the engine's) says why, for a human."""


class NoRouteError(NoBackendError):
    """No backend set matches the call."""


@dataclass(frozen=True, slots=True)
class BackendStats:
    """A snapshot of one endpoint's counters within one Service."""

    service: ServiceKey
    hostport: str
    requests: int
    errors: int
    in_flight: int
    latency_sum: float
    """Seconds, over finished calls."""
    buckets: tuple[int, ...]
    """Finished calls per bucket of :data:`LATENCY_BOUNDS` (and one open bucket)."""
    connected: bool
    last_error: str
    state: str
    """One of :data:`ENDPOINT_STATES` but ``draining`` (which the engine never reports)."""
    state_reason: str
    """Why, for a human: the last connection error, the failures that ejected it, the health
    check's answer; "" when healthy."""
    state_since_unix: float
    """When the endpoint entered ``state``, in Unix seconds."""
    ejections: int
    """Times outlier detection ejected this endpoint."""

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (seconds), 0 without data."""
        total = sum(self.buckets)
        if not total:
            return 0.0
        rank, seen = q * total, 0
        for bound, n in zip((*LATENCY_BOUNDS, float("inf")), self.buckets, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")


@dataclass(frozen=True, slots=True)
class ThreadStats:
    """What one engine thread has carried."""

    connections: int
    """Client connections accepted."""
    open: int
    """Client connections open now."""
    calls: int


@dataclass(frozen=True, slots=True)
class EngineCounters:
    calls: int
    in_flight: int
    local_errors: Mapping[str, int]
    """Calls the proxy ended itself, by reason (no_route, connect_failed, …)."""


@dataclass(frozen=True, slots=True)
class FailoverCount:
    """One failover counter of one Service (ever increasing)."""

    service: ServiceKey
    counter: str
    """One of :data:`FAILOVER_COUNTERS`."""
    value: int


@dataclass(frozen=True, slots=True)
class EndpointEvent:
    """A state change of an endpoint, or of a backend connection, in the engine."""

    unix: float
    """When it happened, in Unix seconds."""
    service: ServiceKey | None
    """The Service whose endpoint changed; None for a change of a backend connection (shared by
    every Service with that endpoint)."""
    endpoint: str
    """HOST:PORT."""
    state: str
    """One of :data:`ENDPOINT_STATES`, or ``connection_lost``; ``draining`` here means a backend
    connection got GOAWAY."""
    reason: str


class Engine(Protocol):
    """What Python asks of the data path. Every method is quick and never waits on a call."""

    @property
    def threads(self) -> int: ...

    def apply(self, key: ServiceKey, route: RouteConfig) -> None:
        """Install or replace Service ``key``'s route and failover policies in one swap; calls
        in flight keep theirs."""

    def remove(self, key: ServiceKey) -> None: ...

    def set_proxy_zones(self, proxies: Mapping[str, int]) -> None:
        """How many live proxies run in each zone, this one included: zone plans follow."""

    def zone_plan(self, key: ServiceKey) -> str | None:
        """Service ``key``'s zone plan in words (which zones its calls go to, and why); None
        when it has no route or its zone-aware routing is off."""
        ...

    def set_grpc_services(self, table: Mapping[str, ServiceKey]) -> None:
        """gRPC service name → the Service that serves calls for it by name."""

    def route(self, authority: str, path: str) -> tuple[ServiceKey, str]:
        """The Service a call would reach and how it matched; raises :class:`NoRouteError`."""
        ...

    def explain(self, key: ServiceKey, headers: Mapping[str, str] | None = None) -> tuple[str, str]:
        """HOST:PORT of the endpoint the next call of ``key`` with request ``headers``
        (lower-case names) would get, and why, without picking; the engine reads in them what a
        call's headers tell it (ring_hash's key, ``x-weighbridge-endpoint``); raises
        :class:`NoBackendError`, also when the Service refuses the pod."""
        ...

    def stats(self, key: ServiceKey | None = None) -> list[BackendStats]: ...

    def simulate(self, key: ServiceKey, calls: int) -> dict[str, int]:
        """HOST:PORT → how many of ``calls`` picks of ``key`` went to each endpoint, picked as
        calls would be but with nothing sent and no counter changed (the strategy's state moves
        on: an engine of its own, see :mod:`dataplane.simulating`); raises
        :class:`NoBackendError`."""
        ...

    def counters(self) -> EngineCounters: ...

    def failover_counters(self) -> list[FailoverCount]:
        """Every Service's retries, ejections and health checks so far."""
        ...

    def events(self) -> list[EndpointEvent]:
        """The state changes since the last call, oldest first (the engine keeps a bounded
        queue: when nobody asks, the oldest are dropped)."""
        ...

    @property
    def events_dropped(self) -> int:
        """State changes dropped from the engine's bounded queue because nobody read them."""
        ...

    def tls_failures(self) -> dict[str, int]:
        """Client connections refused at TLS, by reason: ``plaintext`` on a TLS-only port,
        ``no_handshake`` in time, ``handshake_failed`` (a refused client certificate among
        them)."""
        ...

    def client_limits(self) -> dict[str, int]:
        """How often client connections hit each limit (``handshake_timeout``,
        ``max_connections``, ``idle_timeout``, ``rapid_reset``, …: docs/proxy.md)."""
        ...

    @property
    def client_connections(self) -> int:
        """Client connections open now."""
        ...

    def thread_stats(self) -> list[ThreadStats]: ...

    def goaway(self) -> None:
        """Stop accepting and send GOAWAY on every connection; calls in flight go on."""

    def close(self) -> None:
        """End everything at once."""


def client_limits(settings: ProxySettings) -> weighbridge_native.ClientLimits:
    """The engine's limits against hostile or broken clients, from ``settings``."""
    return weighbridge_native.ClientLimits(
        handshake_timeout_s=settings.client_handshake_timeout_s,
        idle_timeout_s=settings.client_idle_timeout_s,
        max_connections=settings.max_client_connections,
        max_concurrent_streams=settings.client_max_concurrent_streams,
        max_header_list_size=settings.client_max_header_list_size,
        keepalive_time_s=settings.client_keepalive_time_s,
        keepalive_timeout_s=settings.client_keepalive_timeout_s,
        backend_stream_wait_s=settings.backend_stream_wait_s,
    )


class NativeEngine:
    """The Rust engine serving a listening socket on its own threads."""

    def __init__(
        self, sock: socket.socket, settings: ProxySettings, *, seed: int | None = None
    ) -> None:
        self._settings = settings
        self._engine = weighbridge_native.Engine(
            sock.fileno(),
            threads=settings.engine_threads,
            max_message_bytes=settings.max_message_bytes,
            eager=settings.eager_connections,
            latency_bounds_ns=[round(b * 1e9) for b in LATENCY_BOUNDS],
            max_connection_age_s=settings.max_connection_age,
            max_backend_connections=settings.max_backend_connections,
            handshake_timeout_s=settings.handshake_timeout_s,
            keepalive_time_s=settings.keepalive_time_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            retry_buffer_bytes=settings.retry_buffer_bytes,
            limits=client_limits(settings),
            tls=settings.engine_tls,
            seed=seed,
            zone=settings.zone,
            node=settings.node,
        )

    @property
    def threads(self) -> int:
        return self._engine.threads

    def apply(self, key: ServiceKey, route: RouteConfig) -> None:
        failover = route.failover
        self._engine.apply(
            key,
            route.strategy,
            [(e.hostport, e.pod, e.weight) for e in route.endpoints],
            route.total,
            retry=failover.retry.engine_args() if failover.retry else None,
            outlier=(
                failover.outlier_detection.engine_args() if failover.outlier_detection else None
            ),
            health_check=failover.health_check.engine_args() if failover.health_check else None,
            panic_threshold=failover.panic_threshold.engine_args(),
            debug=failover.debug.engine_args(),
            generation=route.generation,
            revision=route.revision,
            slow_start=failover.slow_start.engine_args() if failover.slow_start else None,
            hash=failover.hash.engine_args() if failover.hash else None,
            stream_idle_timeout_s=(
                self._settings.stream_idle_timeout_s
                if failover.stream_idle_timeout_ms is None
                else failover.stream_idle_timeout_ms / 1000
            ),
            tls=(
                self._settings.backend_tls(key, failover.backend_tls)
                if failover.backend_tls
                else None
            ),
            zone_aware=failover.zone_aware.engine_args(),
            places=[(e.zone, list(e.hint_zones), list(e.hint_nodes)) for e in route.endpoints],
        )

    def set_proxy_zones(self, proxies: Mapping[str, int]) -> None:
        self._engine.set_proxy_zones(dict(proxies))

    def zone_plan(self, key: ServiceKey) -> str | None:
        return self._engine.zone_plan(key)

    def remove(self, key: ServiceKey) -> None:
        self._engine.remove(key)

    def set_grpc_services(self, table: Mapping[str, ServiceKey]) -> None:
        self._engine.set_grpc_services(dict(table))

    def route(self, authority: str, path: str) -> tuple[ServiceKey, str]:
        try:
            key, matched = self._engine.route(authority, path)
        except LookupError as exc:
            raise NoRouteError(str(exc)) from None
        return ServiceKey(key), matched

    def explain(self, key: ServiceKey, headers: Mapping[str, str] | None = None) -> tuple[str, str]:
        try:
            return self._engine.explain(key, dict(headers or {}))
        except LookupError as exc:
            raise NoBackendError(str(exc)) from None

    def simulate(self, key: ServiceKey, calls: int) -> dict[str, int]:
        try:
            return dict(self._engine.simulate(key, calls))
        except LookupError as exc:
            raise NoBackendError(str(exc)) from None

    def stats(self, key: ServiceKey | None = None) -> list[BackendStats]:
        # A row ends in one nested (state, why, since, ejections): pyo3 converts tuples of at
        # most 12 items.
        out = []
        for row in self._engine.stats(key):
            k, h, r, e, f, s, b, c, why, state = row
            out.append(BackendStats(ServiceKey(k), h, r, e, f, s, tuple(b), c, why, *state))
        return out

    def counters(self) -> EngineCounters:
        calls, in_flight, local = self._engine.counters()
        return EngineCounters(calls, in_flight, dict(local))

    def failover_counters(self) -> list[FailoverCount]:
        rows = self._engine.failover_counters()
        return [FailoverCount(ServiceKey(k), c, n) for k, c, n in rows]

    def events(self) -> list[EndpointEvent]:
        return [
            EndpointEvent(unix, ServiceKey(k) if k else None, hostport, state, reason)
            for unix, k, hostport, state, reason in self._engine.events()
        ]

    @property
    def events_dropped(self) -> int:
        return self._engine.events_dropped

    def tls_failures(self) -> dict[str, int]:
        return dict(self._engine.tls_failures())

    def client_limits(self) -> dict[str, int]:
        return dict(self._engine.client_limits())

    @property
    def client_connections(self) -> int:
        return self._engine.client_connections

    def thread_stats(self) -> list[ThreadStats]:
        return [ThreadStats(*row) for row in self._engine.thread_counters()]

    def goaway(self) -> None:
        self._engine.goaway()

    def close(self) -> None:
        self._engine.close()
