"""weighbridge-proxy: a gRPC proxy that applies each Service's strategy to every request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

import structlog

from dataplane.app import Proxy
from dataplane.settings import DEFAULTS, ProxySettings, available_cpus
from weighbridge import etcd as store
from weighbridge.cli import add_etcd_arguments, add_log_arguments, etcd_tls
from weighbridge.errors import EtcdCredentialsError
from weighbridge.keys import KeyScheme
from weighbridge.logs import configure

log = structlog.get_logger("dataplane")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The flags; every default comes from :data:`dataplane.settings.DEFAULTS`."""
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="weighbridge-proxy",
        description="Proxy gRPC calls to the backends of Kubernetes Services, picking one per "
        "request with the Service's strategy (backend sets come from etcd).",
    )
    p.add_argument("--listen", default=d.listen, help="client port, gRPC over h2c (%(default)s)")
    p.add_argument(
        "--admin-listen",
        default=d.admin_listen,
        help="admin gRPC API and reflection, reached with kubectl port-forward; "
        "'' to disable (%(default)s)",
    )
    p.add_argument(
        "--health-listen",
        default=d.health_listen,
        help="gRPC health (grpc.health.v1) for the kubelet's probes; '' to disable (%(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default=d.metrics_listen,
        help="Prometheus /metrics; '' to disable (%(default)s)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=d.threads,
        help="engine threads carrying calls (default: the CPUs this process may use, from "
        f"its affinity and cgroup quota: {available_cpus()} here)",
    )
    p.add_argument(
        "--max-connection-age",
        type=float,
        default=d.max_connection_age,
        metavar="SECONDS",
        help="send GOAWAY to a client connection after this long (±10%%) so clients "
        "reconnect and spread over threads and proxies; 0: never (%(default)s)",
    )
    p.add_argument(
        "--max-backend-connections",
        type=positive_int,
        default=d.max_backend_connections,
        help="connections per backend endpoint and thread; another opens only while all "
        "have as many calls as the backend allows at once (%(default)s)",
    )
    p.add_argument(
        "--backend-handshake-timeout",
        type=float,
        default=d.handshake_timeout_s,
        metavar="SECONDS",
        help="time a new backend connection has for its HTTP/2 handshake and a PING round "
        "trip (%(default)s)",
    )
    p.add_argument(
        "--backend-keepalive-time",
        type=float,
        default=d.keepalive_time_s,
        metavar="SECONDS",
        help="PING a backend connection with calls open after this long without a frame; "
        "0: never (%(default)s)",
    )
    p.add_argument(
        "--backend-keepalive-timeout",
        type=float,
        default=d.keepalive_timeout_s,
        metavar="SECONDS",
        help="a backend connection whose PING is unanswered this long is dead (%(default)s)",
    )
    p.add_argument(
        "--retry-buffer-bytes",
        type=positive_int,
        default=d.retry_buffer_bytes,
        help="request bytes kept per call so that a retry can resend them; a call that sent "
        "more is not retried (%(default)s = 256 KiB)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="PATH",
        help="serve TLS (ALPN h2) on --listen with this PEM certificate chain; re-read when it "
        "changes (default: h2c only)",
    )
    p.add_argument("--tls-key", metavar="PATH", help="the certificate's PEM private key")
    p.add_argument(
        "--tls-client-ca",
        metavar="PATH",
        help="require client certificates signed by this PEM CA bundle (mTLS)",
    )
    p.add_argument(
        "--tls-allowed-identities",
        default="",
        metavar="LIST",
        help="with mTLS, the client identities let in, comma-separated: SAN DNS names, SAN URIs "
        "(spiffe://…) or CN (default: any certificate the CA signed)",
    )
    p.add_argument(
        "--allow-h2c",
        action="store_true",
        help="with --tls-cert, also accept plaintext h2c on the same port",
    )
    p.add_argument(
        "--backend-ca",
        metavar="PATH",
        help="PEM CA bundle of backends' certificates, for weighbridge.io/backend-tls without ca",
    )
    p.add_argument(
        "--backend-ca-dir",
        metavar="DIR",
        help="named CA bundles DIR/NAME/ca.crt, for 'ca: NAME' in weighbridge.io/backend-tls",
    )
    p.add_argument(
        "--backend-client-cert",
        metavar="PATH",
        help="PEM certificate presented to backends that require one (client-certificate: on)",
    )
    p.add_argument("--backend-client-key", metavar="PATH", help="its PEM private key")
    p.add_argument(
        "--client-handshake-timeout",
        type=float,
        default=d.client_handshake_timeout_s,
        metavar="SECONDS",
        help="a client connection's time from accept to its TLS handshake and HTTP/2 preface "
        "(%(default)s)",
    )
    p.add_argument(
        "--client-idle-timeout",
        type=float,
        default=d.client_idle_timeout_s,
        metavar="SECONDS",
        help="GOAWAY to a client connection without calls this long; 0: never (%(default)s)",
    )
    p.add_argument(
        "--max-client-connections",
        type=positive_int,
        default=d.max_client_connections,
        help="client connections open at once; beyond, new ones are closed (%(default)s)",
    )
    p.add_argument(
        "--client-max-concurrent-streams",
        type=positive_int,
        default=d.client_max_concurrent_streams,
        help="calls open at once per client connection, advertised and enforced (%(default)s)",
    )
    p.add_argument(
        "--client-max-header-list-size",
        type=positive_int,
        default=d.client_max_header_list_size,
        metavar="BYTES",
        help="largest request header list, advertised and enforced (%(default)s = 64 KiB)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=d.stream_idle_timeout_s,
        metavar="SECONDS",
        help="end a call on which no frame moved this long; 0: never; per Service with "
        "weighbridge.io/stream-idle-timeout (%(default)s)",
    )
    p.add_argument(
        "--client-keepalive-time",
        type=float,
        default=d.client_keepalive_time_s,
        metavar="SECONDS",
        help="PING each client connection this often; 0: never (%(default)s)",
    )
    p.add_argument(
        "--client-keepalive-timeout",
        type=float,
        default=d.client_keepalive_timeout_s,
        metavar="SECONDS",
        help="close a client connection whose PING is unanswered this long (%(default)s)",
    )
    p.add_argument(
        "--backend-stream-wait",
        type=float,
        default=d.backend_stream_wait_s,
        metavar="SECONDS",
        help="how long a call waits for a free stream on a saturated endpoint before trying "
        "another (%(default)s)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=d.max_message_bytes,
        help="largest gRPC message in either direction (%(default)s = 16 MiB)",
    )
    p.add_argument(
        "--zone",
        default=d.zone,
        help="this proxy's zone, for zone-aware routing and EndpointSlice hints (default: "
        "unknown; the chart passes the pod's topology.kubernetes.io/zone label)",
    )
    p.add_argument(
        "--node",
        default=d.node,
        help="this proxy's node name, for EndpointSlice node hints (default: unknown; the chart "
        "passes spec.nodeName)",
    )
    p.add_argument(
        "--proxy-zones-refresh",
        type=float,
        default=d.proxy_zones_refresh_s,
        metavar="SECONDS",
        help="how often the proxies are counted per zone, for zone-aware routing (%(default)s)",
    )
    p.add_argument(
        "--xds-listen",
        default=d.xds_listen,
        metavar="HOST:PORT",
        help="serve xDS (ADS) for proxyless gRPC clients here, with the client port's TLS "
        "settings (default: off; docs/xds.md)",
    )
    p.add_argument(
        "--xds-namespaces",
        default=",".join(d.xds_namespaces),
        metavar="LIST",
        help="namespaces whose Services every xDS client may see, comma-separated; '*' all "
        "(default: none; an mTLS client also sees its SPIFFE ID's namespace)",
    )
    p.add_argument(
        "--xds-max-streams",
        type=positive_int,
        default=d.xds_max_streams,
        help="xDS streams open at once; beyond, new ones are refused (%(default)s)",
    )
    p.add_argument(
        "--id",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="proxy identity in its etcd status key (default: $POD_NAME or host name)",
    )
    p.add_argument(
        "--lazy-connect",
        action="store_true",
        help="connect to an endpoint on its first call instead of when it appears "
        "(for very large, mostly idle sets)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=d.grace,
        help="seconds calls in flight may take to finish on shutdown (%(default)s)",
    )
    add_etcd_arguments(p)
    add_log_arguments(p)
    return p


def settings_of(args: argparse.Namespace) -> ProxySettings:
    return ProxySettings(
        listen=args.listen,
        admin_listen=args.admin_listen or None,
        health_listen=args.health_listen or None,
        metrics_listen=args.metrics_listen or None,
        threads=args.threads,
        max_connection_age=args.max_connection_age,
        max_backend_connections=args.max_backend_connections,
        handshake_timeout_s=args.backend_handshake_timeout,
        keepalive_time_s=args.backend_keepalive_time,
        keepalive_timeout_s=args.backend_keepalive_timeout,
        retry_buffer_bytes=args.retry_buffer_bytes,
        max_message_bytes=args.max_message_bytes,
        client_handshake_timeout_s=args.client_handshake_timeout,
        client_idle_timeout_s=args.client_idle_timeout,
        max_client_connections=args.max_client_connections,
        client_max_concurrent_streams=args.client_max_concurrent_streams,
        client_max_header_list_size=args.client_max_header_list_size,
        stream_idle_timeout_s=args.stream_idle_timeout,
        client_keepalive_time_s=args.client_keepalive_time,
        client_keepalive_timeout_s=args.client_keepalive_timeout,
        backend_stream_wait_s=args.backend_stream_wait,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        tls_allowed_identities=tuple(
            i.strip() for i in args.tls_allowed_identities.split(",") if i.strip()
        ),
        allow_h2c=args.allow_h2c,
        backend_ca=args.backend_ca,
        backend_ca_dir=args.backend_ca_dir,
        backend_client_cert=args.backend_client_cert,
        backend_client_key=args.backend_client_key,
        grace=args.grace,
        eager_connections=not args.lazy_connect,
        zone=args.zone,
        node=args.node,
        proxy_zones_refresh_s=args.proxy_zones_refresh,
        xds_listen=args.xds_listen or None,
        xds_namespaces=tuple(n.strip() for n in args.xds_namespaces.split(",") if n.strip()),
        xds_max_streams=args.xds_max_streams,
    )


async def serve(args: argparse.Namespace) -> None:
    structlog.contextvars.bind_contextvars(component="proxy", proxy_id=args.id)
    etcd = store.client(args.etcd, tls=etcd_tls(args))
    proxy = Proxy(
        etcd=etcd, scheme=KeyScheme(args.prefix), proxy_id=args.id, settings=settings_of(args)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    await stop.wait()
    log.info("stopping", grace=proxy.settings.grace)
    await proxy.stop()
    await store.close(etcd)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings_of(args)
        tls = etcd_tls(args)
        if tls is not None:
            tls.read()  # a missing or unreadable file is a usage error, not a traceback
    except (ValueError, EtcdCredentialsError) as exc:
        parser.error(str(exc))
    configure(level=args.log_level, fmt=args.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
