"""weighbridge-controller: annotated Kubernetes Services → weighted backend sets in etcd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from typing import get_args

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from controlplane.kube import Kube
from controlplane.metrics import Metrics
from controlplane.reconciling import Controller
from controlplane.settings import DEFAULTS, ControllerSettings, Source
from weighbridge import etcd as store
from weighbridge.cli import add_etcd_arguments, add_log_arguments, etcd_tls, split_hostport
from weighbridge.errors import EtcdCredentialsError
from weighbridge.keys import KeyScheme
from weighbridge.logs import configure

log = structlog.get_logger("controlplane")


def build_parser() -> argparse.ArgumentParser:
    """The flags; every tunable's default comes from :data:`controlplane.settings.DEFAULTS`."""
    env = os.environ.get
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="weighbridge-controller",
        description="Watch annotated Kubernetes Services and publish their weighted backend "
        "sets to etcd. Run two or more replicas: one leads and writes, the others stand by.",
    )
    p.add_argument(
        "--kubeconfig",
        default=env("KUBECONFIG"),
        help="kubeconfig path (default: $KUBECONFIG, else in-cluster config)",
    )
    p.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    p.add_argument(
        "--source",
        choices=get_args(Source),
        default=d.source,
        help="where endpoints come from: discovery.k8s.io/v1 EndpointSlices "
        "or the deprecated v1 Endpoints (default: %(default)s)",
    )
    p.add_argument(
        "--id",
        default=env("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}",
        help="this replica's identity in leader election (default: $POD_NAME or host-random)",
    )
    p.add_argument(
        "--lease-ttl",
        type=int,
        default=d.lease_ttl,
        help="leader lease TTL, seconds: failover time after a leader dies (default: %(default)s)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=d.resync_interval,
        help="seconds between full resyncs that also remove stale keys (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="Services reconciled concurrently; never two for one Service (default: %(default)s)",
    )
    p.add_argument(
        "--admin-listen",
        default=d.admin_listen,
        help="gRPC reflection and health for grpcurl through kubectl port-forward; "
        "'' to disable (default: %(default)s)",
    )
    p.add_argument(
        "--health-listen",
        default=d.health_listen,
        help="gRPC health (grpc.health.v1) for the kubelet's probes; '' to disable "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default=d.metrics_listen,
        help="Prometheus metrics over HTTP at /metrics (default: %(default)s)",
    )
    p.add_argument(
        "--grpc-service-namespaces",
        default=",".join(d.grpc_service_namespaces),
        metavar="NAMESPACES",
        help="comma-separated namespaces whose Services may route by gRPC service name "
        "(weighbridge.io/grpc-services); '*' every namespace, '' none: routing by name off "
        "(default: %(default)s)",
    )
    add_etcd_arguments(p)
    add_log_arguments(p)
    return p


def namespaces_of(text: str) -> tuple[str, ...]:
    """``--grpc-service-namespaces``: ``a, b`` → ``("a", "b")``; ``""`` → ``()``."""
    return tuple(ns.strip() for ns in text.split(",") if ns.strip())


def settings_of(args: argparse.Namespace) -> ControllerSettings:
    """The settings the parsed flags ask for; ValueError names a value out of range."""
    return ControllerSettings(
        source=args.source,
        lease_ttl=args.lease_ttl,
        resync_interval=args.resync,
        workers=args.workers,
        admin_listen=args.admin_listen or None,
        health_listen=args.health_listen or None,
        metrics_listen=args.metrics_listen,
        grpc_service_namespaces=namespaces_of(args.grpc_service_namespaces),
    )


async def grpc_server(
    listen: str, health: health_aio.HealthServicer, *, reflect: bool
) -> grpc.aio.Server:
    """A started gRPC server with the health service on ``listen``; with ``reflect`` (the
    loopback admin port) also server reflection, so grpcurl works through a port-forward."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflect:
        reflection.enable_server_reflection(
            (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    server.add_insecure_port(listen)
    await server.start()
    return server


async def run(args: argparse.Namespace, settings: ControllerSettings) -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry)
    host, port = split_hostport(settings.metrics_listen)
    metrics_server, metrics_thread = start_http_server(port, addr=host, registry=registry)

    health_servicer = health_aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servers = [
        await grpc_server(listen, health_servicer, reflect=reflect)
        for listen, reflect in ((settings.admin_listen, True), (settings.health_listen, False))
        if listen
    ]

    kube = await Kube.connect(args.kubeconfig, args.context)
    etcd = store.client(args.etcd, tls=etcd_tls(args))
    controller = Controller(
        kube=kube,
        etcd=etcd,
        scheme=KeyScheme(args.prefix),
        identity=args.id,
        metrics=metrics,
        settings=settings,
    )
    structlog.contextvars.bind_contextvars(component="controller", identity=args.id)
    log.info(
        "starting",
        etcd=args.etcd,
        prefix=args.prefix,
        source=settings.source,
        admin=settings.admin_listen,
        health=settings.health_listen,
        metrics=settings.metrics_listen,
        grpc_service_namespaces=",".join(settings.grpc_service_namespaces),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(controller.run())

    async def mark_serving() -> None:
        await controller.synced.wait()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    ready = asyncio.create_task(mark_serving())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    await health_servicer.enter_graceful_shutdown()
    for t in (task, ready, stopper):
        t.cancel()
    for t in (task, ready, stopper):
        with contextlib.suppress(asyncio.CancelledError):
            await t
    for server in servers:
        await server.stop(grace=2)
    await store.close(etcd)
    await kube.close()
    metrics_server.shutdown()
    metrics_server.server_close()
    metrics_thread.join(timeout=2)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_of(args)
        tls = etcd_tls(args)
        if tls is not None:
            tls.read()  # a missing or unreadable file is a usage error, not a traceback
    except (ValueError, EtcdCredentialsError) as exc:
        parser.error(str(exc))
    configure(level=args.log_level, fmt=args.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args, settings))
    sys.exit(0)


if __name__ == "__main__":
    main()
