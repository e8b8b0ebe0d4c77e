"""weighbridge-proxy: a gRPC proxy that applies each Service's strategy to every request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import structlog

from dataplane.app import ENGINES, Proxy, ProxyConfig
from weighbridge import etcd as store
from weighbridge.cli import add_etcd_arguments, add_log_arguments, split_hostport
from weighbridge.keys import KeyScheme
from weighbridge.logs import configure

log = structlog.get_logger("dataplane")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="weighbridge-proxy",
        description="Proxy gRPC calls to the backends of Kubernetes Services, picking one per "
        "request with the Service's strategy (backend sets come from etcd).",
    )
    p.add_argument(
        "--listen", default="0.0.0.0:8080", help="client port, gRPC over h2c (default: %(default)s)"
    )
    p.add_argument(
        "--admin-listen",
        default="0.0.0.0:9501",
        help="admin gRPC API, health, reflection; worker k uses port+k (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default="0.0.0.0:9502",
        help="Prometheus /metrics; worker k uses port+k (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the client port via SO_REUSEPORT, each with its own "
        "etcd subscription (default: %(default)s)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=16 << 20,
        help="largest gRPC message in either direction (default: %(default)s = 16 MiB)",
    )
    p.add_argument(
        "--id",
        default=env("POD_NAME") or socket.gethostname(),
        help="proxy identity in its etcd status key (default: $POD_NAME or host name)",
    )
    p.add_argument(
        "--lazy-connect",
        action="store_true",
        help="connect to an endpoint on its first call instead of when it appears "
        "(for very large, mostly idle sets)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="native",
        help="what carries calls: the Rust engine, or the pure-Python HTTP/2 path "
        "(slower; the reference) (default: %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds calls in flight may take to finish on shutdown (default: %(default)s)",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    add_etcd_arguments(p)
    add_log_arguments(p)
    return p


def _offset(hostport: str, k: int) -> str:
    host, port = split_hostport(hostport)
    return f"{host}:{port + k if port else 0}"


async def serve(args: argparse.Namespace, index: int) -> None:
    proxy_id = args.id if args.workers == 1 else f"{args.id}-w{index}"
    structlog.contextvars.bind_contextvars(component="proxy", proxy_id=proxy_id)
    etcd = store.client(args.etcd)
    proxy = Proxy(
        etcd=etcd,
        scheme=KeyScheme(args.prefix),
        proxy_id=proxy_id,
        config=ProxyConfig(
            listen=args.listen,
            admin_listen=_offset(args.admin_listen, index) if args.admin_listen else None,
            metrics_listen=_offset(args.metrics_listen, index) if args.metrics_listen else None,
            reuse_port=True,
            max_message_bytes=args.max_message_bytes,
            eager_connections=not args.lazy_connect,
            engine=args.engine,
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    await stop.wait()
    log.info("stopping", grace=args.grace)
    await proxy.stop(args.grace)
    await store.close(etcd)


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``--workers`` copies of this command and stop them together."""
    children = [
        subprocess.Popen([sys.executable, "-m", "dataplane.main", *argv, "--worker-index", str(k)])
        for k in range(args.workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    return max(codes, default=0)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure(level=args.log_level, fmt=args.log_format)
    if args.workers > 1 and args.worker_index is None:
        sys.exit(supervise(args, argv))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args, args.worker_index or 0))
    sys.exit(0)


if __name__ == "__main__":
    main()
