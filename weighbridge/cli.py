"""Command-line options every Weighbridge command shares, defined once."""

from __future__ import annotations

import argparse
import os

from weighbridge.etcd import DEFAULT_ENDPOINT
from weighbridge.keys import DEFAULT_PREFIX


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a listen option; an empty host means all interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """``--etcd`` and ``--prefix``, defaulting to $WEIGHBRIDGE_ETCD and $WEIGHBRIDGE_PREFIX."""
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
