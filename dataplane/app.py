"""One proxy process: etcd subscription → routing table → HTTP/2 forwarding, plus admin."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from dataclasses import dataclass

import aetcd
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from dataplane.admin import AdminService
from dataplane.backends import Pool
from dataplane.metrics import ProxyCollector
from dataplane.native import NativeBackends, NativeDataPath
from dataplane.proxying import FrontConnection, ProxyCounters, ProxySettings
from dataplane.routing import Router
from dataplane.subscription import StatusPublisher, Subscription
from weighbridge.cli import split_hostport
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

log = structlog.get_logger(__name__)
ENGINES = ("native", "python")


def listening_socket(hostport: str, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; SO_REUSEPORT lets several workers share the port."""
    host, port = split_hostport(hostport)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    listen: str = "0.0.0.0:8080"
    """Where clients connect (h2c: gRPC without TLS)."""
    admin_listen: str | None = "0.0.0.0:9501"
    """Admin gRPC service, health and reflection; None to disable."""
    metrics_listen: str | None = "0.0.0.0:9502"
    """Prometheus /metrics over HTTP; None to disable."""
    reuse_port: bool = True
    """Share the listening port with other workers (SO_REUSEPORT)."""
    publish_status: bool = True
    """Publish the lease-bound status key <prefix>proxies/<id>."""
    max_message_bytes: int = 16 << 20
    eager_connections: bool = True
    """Connect to endpoints when they appear (first calls pay no connection set-up); off for
    very large sets that mostly idle."""
    engine: str = "native"
    """What carries calls: "native" (the Rust engine, weighbridge_native) or "python" (the
    pure-Python HTTP/2 path, slower; kept as the reference)."""


class Proxy:
    """A running proxy; ``start()`` then ``stop()``."""

    def __init__(
        self,
        *,
        etcd: aetcd.Client,
        scheme: KeyScheme,
        proxy_id: str,
        config: ProxyConfig,
        rng: random.Random | None = None,
    ) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.proxy_id = proxy_id
        self.config = config
        if config.engine not in ENGINES:
            raise ValueError(f"unknown engine {config.engine!r} (one of {', '.join(ENGINES)})")
        self.pool: Pool | NativeBackends = (
            NativeBackends() if config.engine == "native" else Pool(eager=config.eager_connections)
        )
        self.native: NativeDataPath | None = None
        self.router = Router(self.pool, rng)
        self.counters = ProxyCounters()
        self.settings = ProxySettings(max_message_bytes=config.max_message_bytes)
        self.subscription = Subscription(etcd, scheme, self.router.apply)
        self.fronts: set[FrontConnection] = set()
        self.port = 0
        self.admin_port = 0
        self.metrics_port = 0
        self._server: asyncio.Server | None = None
        self._admin: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._metrics: tuple[object, threading.Thread] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = listening_socket(self.config.listen, reuse_port=self.config.reuse_port)
        self.port = sock.getsockname()[1]
        if isinstance(self.pool, NativeBackends):
            with sock:  # the engine serves a duplicate of it
                self.native = NativeDataPath(
                    sock,
                    self.pool,
                    max_message_bytes=self.config.max_message_bytes,
                    eager=self.config.eager_connections,
                )
            self.router.listener = self.native
        else:
            self._server = await loop.create_server(self._front, sock=sock)
        self._tasks.append(loop.create_task(self.subscription.run(), name="subscription"))
        if self.config.publish_status:
            status = StatusPublisher(
                self.etcd,
                self.scheme,
                self.proxy_id,
                self.subscription,
                lambda: len(self.router.services),
            )
            self._tasks.append(loop.create_task(status.run(), name="status"))
        if self.config.admin_listen:
            await self._start_admin(self.config.admin_listen)
        if self.config.metrics_listen:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(
                ProxyCollector(self.router, self.counters, self.subscription, self.refresh)
            )
            host, port = split_hostport(self.config.metrics_listen)
            server, thread = start_http_server(port, addr=host, registry=registry)
            self.metrics_port = server.server_port
            self._metrics = (server, thread)
        self._tasks.append(loop.create_task(self._mark_serving(), name="health"))
        log.info(
            "proxy_started",
            listen=self.port,
            admin=self.admin_port,
            metrics=self.metrics_port,
            proxy_id=self.proxy_id,
            engine=self.config.engine,
        )

    def refresh(self, key: ServiceKey | None = None) -> None:
        """Bring the routing model's counters up to date, of every Service or of ``key`` (the
        native engine keeps its own)."""
        if self.native is not None:
            self.native.refresh(self.router, self.counters, key)

    @property
    def calls_in_flight(self) -> int:
        if self.native is not None:
            return self.native.in_flight
        return sum(len(f.calls) for f in self.fronts)

    def _front(self) -> FrontConnection:
        front = FrontConnection(self.router, self.settings, self.counters, self.fronts.discard)
        self.fronts.add(front)
        return front

    async def _start_admin(self, listen: str) -> None:
        server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
            AdminService(self.proxy_id, self.router, self.subscription, self.refresh, self.native),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.admin_port = server.add_insecure_port(listen)
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._admin = server

    async def _mark_serving(self) -> None:
        await self.subscription.listed.wait()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let calls in flight finish (up to ``grace`` s), then close."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.close()
        for front in list(self.fronts):
            front.goaway()
        if self.native is not None:
            self.native.goaway()
        deadline = asyncio.get_running_loop().time() + grace
        while self.calls_in_flight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for front in list(self.fronts):
            front.close()
        if self.native is not None:
            self.native.close()
        for t in self._tasks:
            t.cancel()
        done, stuck = await asyncio.wait(self._tasks, timeout=5)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                log.error("task_failed", task=t.get_name(), error=repr(t.exception()))
        if stuck:
            log.warning("tasks_did_not_stop", tasks=sorted(t.get_name() for t in stuck))
        if isinstance(self.pool, Pool):
            self.pool.close()
        if self._admin is not None:
            await self._admin.stop(grace=1)
        if self._metrics is not None:
            server, thread = self._metrics
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            thread.join(timeout=2)
        log.info("proxy_stopped", proxy_id=self.proxy_id)
