"""The native data path: calls carried by the Rust engine in ``native/`` (weighbridge_native).

Python keeps everything that is not per request: the etcd subscription, the routing model and
its pickers (whose arithmetic becomes a :class:`~dataplane.strategies.base.Plan`), the admin
API and metrics. Each applied set is handed to the engine in one call; counters are read back
at scrape time. No request touches Python or waits for the GIL.
"""

from __future__ import annotations

import socket

import weighbridge_native

from dataplane.proxying import ProxyCounters
from dataplane.routing import LATENCY_BOUNDS, BackendStats, NoRouteError, Router, ServiceState
from weighbridge.keys import ServiceKey
from weighbridge.model import join_hostport

LATENCY_BOUNDS_NS = [round(b * 1e9) for b in LATENCY_BOUNDS]
"""The routing model's latency buckets, in the engine's unit."""


class NativeBackend:
    """The admin API's view of one endpoint the engine connects to."""

    __slots__ = ("connected", "hostport", "last_error", "refs")

    def __init__(self, hostport: str) -> None:
        self.hostport = hostport
        self.connected = False
        self.last_error = ""
        self.refs = 0


class NativeBackends:
    """Bookkeeping of endpoints for the routing model; the engine holds the connections."""

    def __init__(self) -> None:
        self.backends: dict[str, NativeBackend] = {}

    def acquire(self, address: str, port: int) -> NativeBackend:
        hostport = join_hostport(address, port)
        backend = self.backends.setdefault(hostport, NativeBackend(hostport))
        backend.refs += 1
        return backend

    def release(self, handle: object) -> None:
        assert isinstance(handle, NativeBackend)
        handle.refs -= 1
        if handle.refs <= 0:
            self.backends.pop(handle.hostport, None)


class NativeDataPath:
    """Owns the engine serving ``sock``; a :class:`~dataplane.routing.RouteListener`."""

    def __init__(
        self,
        sock: socket.socket,
        backends: NativeBackends,
        *,
        max_message_bytes: int,
        eager: bool,
    ) -> None:
        self.engine = weighbridge_native.Engine(
            sock.fileno(),
            max_message_bytes=max_message_bytes,
            eager=eager,
            latency_bounds_ns=LATENCY_BOUNDS_NS,
        )
        self.backends = backends

    def route_changed(self, key: ServiceKey, state: ServiceState | None) -> None:
        if state is None:
            self.engine.remove(key)
            return
        plan = state.picker.plan()
        self.engine.apply(
            key,
            [(t.backend.hostport, t.endpoint.pod) for t in state.targets],
            plan.kind,
            list(plan.table),
            plan.start,
            plan.message,
        )

    def grpc_services_changed(self, table: dict[str, ServiceKey]) -> None:
        self.engine.set_grpc_services(dict(table))

    def cursor(self, key: ServiceKey) -> int | None:
        return self.engine.cursor(key)

    def route(self, authority: str, path: str) -> tuple[ServiceKey, str]:
        """The Service the engine routes a call to and how it matched; raises NoRouteError."""
        try:
            key, matched = self.engine.route(authority, path)
        except LookupError as exc:
            raise NoRouteError(str(exc)) from None
        return ServiceKey(key), matched

    def refresh(
        self, router: Router, counters: ProxyCounters, key: ServiceKey | None = None
    ) -> None:
        """Copy the engine's counters into the routing model, for the admin API and metrics:
        of every Service, or of ``key`` only (the cost is that of what is asked)."""
        rows = self.engine.stats(key)
        for service, hostport, requests, errors, in_flight, latency, buckets in rows:
            state = router.services.get(ServiceKey(service))
            if state is None:
                continue
            stats = state.stats.setdefault(hostport, BackendStats())
            stats.requests, stats.errors, stats.in_flight = requests, errors, in_flight
            stats.latency_sum, stats.buckets = latency, buckets
        for hostport, connected, last_error in self.engine.backends(key):
            backend = self.backends.backends.get(hostport)
            if backend is not None:
                backend.connected, backend.last_error = connected, last_error
        calls, _, local = self.engine.counters()
        counters.calls = calls
        counters.local_errors = dict(local)

    @property
    def in_flight(self) -> int:
        return self.engine.counters()[1]

    def goaway(self) -> None:
        self.engine.goaway()

    def close(self) -> None:
        self.engine.close()
