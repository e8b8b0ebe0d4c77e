"""One proxy process: etcd subscription → routes → the engine, plus admin, health, metrics."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import aetcd
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from dataplane.admin import AdminService
from dataplane.engine import DRAINING, HEALTHY, Engine, NativeEngine
from dataplane.health import follow_sync
from dataplane.metrics import ProxyCollector
from dataplane.routing import Routes
from dataplane.settings import ProxySettings
from dataplane.subscription import StatusPublisher, Subscription
from weighbridge.cli import split_hostport
from weighbridge.errors import EtcdUnavailableError
from weighbridge.etcd import count_proxy_zones
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from dataplane.xds.server import XdsServer

log = structlog.get_logger(__name__)

EVENTS_INTERVAL: Final = 0.5
"""Seconds between drains of the engine's state changes: soon enough to read as live, while the
engine's queue holds far more than half a second of changes."""


def log_engine_events(engine: Engine, logger: structlog.typing.FilteringBoundLogger = log) -> int:
    """Log each state change the engine queued since the last call as one line, event
    ``endpoint state`` with its service (null for a backend connection), endpoint, state and
    reason bound; a warning when an endpoint stops taking calls. Returns how many."""
    events = engine.events()
    for e in events:
        bound = logger.bind(service=e.service, endpoint=e.endpoint, state=e.state, reason=e.reason)
        emit = bound.info if e.state in (HEALTHY, DRAINING) else bound.warning
        emit("endpoint state", at=datetime.fromtimestamp(e.unix, UTC).isoformat())
    return len(events)


async def follow_engine_events(
    engine: Engine,
    *,
    interval: float = EVENTS_INTERVAL,
    on_events: Callable[[], None] | None = None,
) -> None:
    """Log the engine's state changes every ``interval`` seconds, until cancelled; after a
    batch, call ``on_events`` (the xDS server publishes active health checks' verdicts)."""
    while True:
        if log_engine_events(engine) and on_events is not None:
            on_events()
        await asyncio.sleep(interval)


def listening_socket(hostport: str) -> socket.socket:
    """A bound, listening TCP socket (the engine's threads all accept from it)."""
    host, port = split_hostport(hostport)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Proxy:
    """A running proxy: the engine serves the client port from construction; ``start()`` follows
    etcd and opens admin and metrics; ``stop()`` drains and closes."""

    def __init__(
        self,
        *,
        etcd: aetcd.Client,
        scheme: KeyScheme,
        proxy_id: str,
        settings: ProxySettings,
        seed: int | None = None,
    ) -> None:
        """``seed`` makes where rotations start repeatable (tests)."""
        self.etcd = etcd
        self.scheme = scheme
        self.proxy_id = proxy_id
        self.settings = settings
        with listening_socket(settings.listen) as sock:  # the engine serves duplicates of it
            self.port: int = sock.getsockname()[1]
            self.engine: Engine = NativeEngine(sock, settings, seed=seed)
        self.routes = Routes(self.engine)
        self.subscription = Subscription(etcd, scheme, self._apply)
        self.xds: XdsServer | None = None
        if settings.xds_listen:
            # Imported here only: a proxy serving no xDS loads none of envoy's protobufs (1.5 MB).
            from dataplane.xds.server import XdsServer

            self.xds = XdsServer(
                self.routes,
                self.subscription,
                namespaces=settings.xds_namespaces,
                max_streams=settings.xds_max_streams,
            )
        self.xds_port = 0
        self._xds_server: grpc.aio.Server | None = None
        self.admin_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._admin: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._metrics: tuple[object, threading.Thread] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._events: asyncio.Task[None] | None = None
        self.proxy_zones: dict[str, int] = {}
        """Live proxies per zone at the last count (empty: not counted; this proxy's zone is
        unknown)."""

    def _apply(self, key: ServiceKey, backend_set: BackendSet | None, mod_revision: int) -> bool:
        """One change to the engine, then to the xDS streams (which push when they next run)."""
        applied = self.routes.apply(key, backend_set, mod_revision)
        if applied and self.xds is not None:
            self.xds.changed()
        return applied

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.subscription.run(), name="subscription"))
        self._events = loop.create_task(
            follow_engine_events(
                self.engine, on_events=self.xds.changed if self.xds is not None else None
            ),
            name="engine-events",
        )
        if self.settings.backend_tls_files():
            self._tasks.append(
                loop.create_task(self._follow_backend_tls_files(), name="backend-tls-files")
            )
        self._tasks.append(self._events)
        if self.settings.publish_status:
            status = StatusPublisher(
                self.etcd,
                self.scheme,
                self.proxy_id,
                self.subscription,
                lambda: len(self.routes.services),
                zone=self.settings.zone,
            )
            self._tasks.append(loop.create_task(status.run(), name="status"))
        if self.settings.zone:
            self._tasks.append(loop.create_task(self._count_proxy_zones(), name="proxy-zones"))
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.admin_listen:
            await self._start_admin(self.settings.admin_listen)
        if self.settings.health_listen:
            await self._start_health(self.settings.health_listen)
        if self.xds is not None and self.settings.xds_listen:
            await self._start_xds(self.xds, self.settings.xds_listen)
        if self.settings.metrics_listen:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(
                ProxyCollector(self.engine, self.routes, self.subscription, loop=loop, xds=self.xds)
            )
            host, port = split_hostport(self.settings.metrics_listen)
            server, thread = start_http_server(port, addr=host, registry=registry)
            self.metrics_port = server.server_port
            self._metrics = (server, thread)
        self._tasks.append(loop.create_task(self._mark_serving(), name="health"))
        self._tasks.append(
            loop.create_task(
                follow_sync(self._health, self.subscription, self.routes), name="sync-health"
            )
        )
        log.info(
            "proxy_started",
            listen=self.port,
            admin=self.admin_port,
            health=self.health_port,
            metrics=self.metrics_port,
            xds=self.xds_port,
            threads=self.engine.threads,
            max_connection_age=self.settings.max_connection_age,
        )

    async def _start_admin(self, listen: str) -> None:
        server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
            AdminService(self.proxy_id, self.routes, self.engine, self.subscription), server
        )
        reflection.enable_server_reflection(
            (admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name, reflection.SERVICE_NAME),
            server,
        )
        self.admin_port = server.add_insecure_port(listen)
        await server.start()
        self._admin = server

    async def _start_health(self, listen: str) -> None:
        """grpc.health.v1 alone (no reflection, no admin): what the kubelet's gRPC probes ask,
        on every interface, telling nothing about the backends."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.health_port = server.add_insecure_port(listen)
        await server.start()
        self._health_server = server

    async def _start_xds(self, xds: XdsServer, listen: str) -> None:
        """The aggregated discovery service alone, with the client port's TLS settings."""
        self._xds_server, self.xds_port = await xds.serve(listen, self.settings)

    async def _follow_backend_tls_files(self) -> None:
        """Mounted Secrets change by a symlink swap: read the backend TLS files now and then,
        and when they changed, apply again the sets that use them (their endpoints get new
        connections with the new files; calls in flight finish on the old ones)."""
        seen = await asyncio.to_thread(self.settings.backend_tls_fingerprint)
        while True:
            await asyncio.sleep(self.settings.tls_reload_interval_s)
            now = await asyncio.to_thread(self.settings.backend_tls_fingerprint)
            if now != seen:
                seen = now
                again = self.routes.reapply_backend_tls()
                log.info("backend_tls_files_changed", services_reapplied=again)

    async def _count_proxy_zones(self) -> None:
        """Counts the live proxies per zone now and then (their status keys), and hands the
        count to the engine when it changed: zone-aware routing weighs each zone's endpoints
        against its share of the proxies. This proxy counts itself before its status shows.
        While etcd is unreachable the last count stands."""
        zone, last = self.settings.zone, None
        while True:
            try:
                counts = await count_proxy_zones(self.etcd, self.scheme)
            except EtcdUnavailableError as exc:
                log.debug("proxy_zones_not_counted", error=str(exc))
            else:
                counts[zone] = max(counts.get(zone, 0), 1)
                if counts != last:
                    self.engine.set_proxy_zones(counts)
                    log.info("proxy_zones", zone=zone, proxies=counts)
                    last = counts
                    self.proxy_zones = counts
            await asyncio.sleep(self.settings.proxy_zones_refresh_s)

    async def _mark_serving(self) -> None:
        await self.subscription.listed.wait()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let calls in flight finish (up to ``grace`` s, by default the
        settings'), then close."""
        grace = self.settings.grace if grace is None else grace
        await self._health.enter_graceful_shutdown()
        self.engine.goaway()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.engine.counters().in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._events is not None:
            self._events.cancel()
            await asyncio.wait([self._events])
        log_engine_events(self.engine)  # the last changes, while the engine can tell them
        self.engine.close()
        for t in self._tasks:
            t.cancel()
        done, stuck = await asyncio.wait(self._tasks, timeout=5) if self._tasks else (set(), set())
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                log.error("task_failed", task=t.get_name(), error=repr(t.exception()))
        if stuck:
            log.warning("tasks_did_not_stop", tasks=sorted(t.get_name() for t in stuck))
        for grpc_server in (self._admin, self._health_server, self._xds_server):
            if grpc_server is not None:
                await grpc_server.stop(grace=1)
        if self._metrics is not None:
            server, thread = self._metrics
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            thread.join(timeout=2)
        log.info("proxy_stopped", proxy_id=self.proxy_id)
