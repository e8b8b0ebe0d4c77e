"""Command-line options every Weighbridge command shares, defined once."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from weighbridge.etcd import DEFAULT_ENDPOINT, EtcdTLS
from weighbridge.keys import DEFAULT_PREFIX


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a listen option; an empty host means all interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """``--etcd``, ``--prefix`` and the etcd TLS files, defaulting to $WEIGHBRIDGE_ETCD,
    $WEIGHBRIDGE_PREFIX, $WEIGHBRIDGE_ETCD_CACERT, $WEIGHBRIDGE_ETCD_CERT, $WEIGHBRIDGE_ETCD_KEY."""
    parser.add_argument(
        "--etcd",
        default=os.environ.get("WEIGHBRIDGE_ETCD", DEFAULT_ENDPOINT),
        help="etcd endpoints HOST:PORT[,HOST:PORT] (default: $WEIGHBRIDGE_ETCD or %(default)s)",
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get("WEIGHBRIDGE_PREFIX", DEFAULT_PREFIX),
        help="etcd key prefix (default: $WEIGHBRIDGE_PREFIX or %(default)s)",
    )
    for flag, env, what in _ETCD_TLS_FLAGS:
        parser.add_argument(
            flag,
            default=os.environ.get(env) or None,
            metavar="PATH",
            help=f"{what} (default: ${env}); re-read at every reconnect to etcd",
        )


_ETCD_TLS_FLAGS = (
    (
        "--etcd-cacert",
        "WEIGHBRIDGE_ETCD_CACERT",
        "CA bundle that verifies etcd's serving certificate; turns TLS to etcd on",
    ),
    (
        "--etcd-cert",
        "WEIGHBRIDGE_ETCD_CERT",
        "client certificate for etcd (TLS on); its CN is the etcd user under client-cert auth",
    ),
    ("--etcd-key", "WEIGHBRIDGE_ETCD_KEY", "the --etcd-cert's private key"),
)


def etcd_tls(args: argparse.Namespace) -> EtcdTLS | None:
    """The etcd TLS settings from ``add_etcd_arguments``' flags; None when none is given
    (plaintext). Raises ValueError for a certificate without its key or the reverse."""
    paths = [args.etcd_cacert, args.etcd_cert, args.etcd_key]
    if not any(paths):
        return None
    cacert, cert, key = (Path(p) if p else None for p in paths)
    return EtcdTLS(cacert=cacert, cert=cert, key=key)


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=("auto", "json", "console"),
        help="JSON lines, or readable console output (auto: console on a terminal)",
    )
