"""Connecting to etcd and reading/writing backend sets: the parts both planes and wbctl share.

Every aetcd error is wrapped into :class:`EtcdUnavailableError` (or a more precise
Weighbridge error) here, at the boundary, so callers never import aetcd's exceptions.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Final

import aetcd
import aetcd.exceptions
import structlog

from weighbridge.errors import DecodeError, EtcdUnavailableError
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, decode, encode, join_hostport
from weighbridge.v1 import backend_set_pb2 as pb

log = structlog.get_logger(__name__)

DEFAULT_ENDPOINT: Final = "127.0.0.1:2379"

_CHANNEL_OPTIONS: Final = {
    # A black-holed etcd (no RST, no FIN) must be noticed within seconds: ping every 10 s
    # (etcd's default enforcement minimum is 5 s) and give up on a ping after 5 s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # grpc-core times a ping out by this one (default 60 s), not only by the keepalive timeout.
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
    # Reconnect quickly after an etcd restart instead of backing off up to 120 s.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}

CLIENT_ERRORS: Final = (aetcd.exceptions.ClientError,)
"""What aetcd raises; wrap it, don't leak it."""


@dataclass(frozen=True, slots=True)
class StoredSet:
    """A backend set as read from etcd, with the revision that last modified it."""

    key: ServiceKey
    mod_revision: int
    backend_set: BackendSet | None
    error: DecodeError | None = None


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """Parse ``host:port[,host:port…]`` (an ``http://`` scheme is tolerated)."""
    out: list[tuple[str, int]] = []
    for raw in text.split(","):
        item = raw.strip().removeprefix("http://")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {raw!r} is not HOST:PORT")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


def client(endpoints: str, *, timeout: float = 5.0) -> aetcd.Client:
    """An aetcd client for ``endpoints`` (connects lazily).

    Several endpoints are joined into one gRPC ``ipv4:``/``ipv6:`` target when they are
    IP literals, so the channel fails over between members; with host names only the first
    is used (point it at a Service that spreads over the members).
    """
    eps = parse_endpoints(endpoints)
    host, port = eps[0]
    if len(eps) > 1 and all(_is_ip(h) for h, _ in eps):
        family = "ipv6" if ":" in eps[0][0] else "ipv4"
        joined = ",".join(join_hostport(h, p) for h, p in eps[:-1])
        last_host, port = eps[-1]
        host = f"{family}:{joined},{f'[{last_host}]' if ':' in last_host else last_host}"
    return aetcd.Client(host=host, port=port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))


async def close(etcd: aetcd.Client, *, timeout: float = 3.0) -> None:
    """Close ``etcd`` within ``timeout`` s. aetcd's own close waits for its watcher to shut
    down, which never happens when the watch stream broke under it (etcd restarted): a
    process must still stop, so past the timeout the channel is closed directly."""
    try:
        await asyncio.wait_for(etcd.close(), timeout)
    except TimeoutError:
        log.warning("etcd_close_timed_out", timeout=timeout)
        channel = etcd.channel
        if channel is not None:
            await channel.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def list_sets(etcd: aetcd.Client, scheme: KeyScheme) -> tuple[int, list[StoredSet]]:
    """Every backend set under the prefix, and the revision the listing was taken at."""
    try:
        result = await etcd.get_prefix(scheme.services_prefix)
    except CLIENT_ERRORS as exc:
        raise EtcdUnavailableError(f"listing {scheme.services_prefix!r}: {exc}") from exc
    out = []
    for kv in result.kvs:
        try:
            key = scheme.service_key_of(kv.key)
        except ValueError:
            continue
        out.append(stored(key, kv.mod_revision, kv.value))
    return result.header.revision, out


def stored(key: ServiceKey, mod_revision: int, value: bytes) -> StoredSet:
    """Decode one stored value, keeping a decode failure as data rather than raising."""
    try:
        return StoredSet(key, mod_revision, decode(value))
    except DecodeError as exc:
        return StoredSet(key, mod_revision, None, exc)


async def get_set(etcd: aetcd.Client, scheme: KeyScheme, key: ServiceKey) -> StoredSet | None:
    try:
        kv = await etcd.get(scheme.service(key))
    except CLIENT_ERRORS as exc:
        raise EtcdUnavailableError(f"reading {key}: {exc}") from exc
    return None if kv is None else stored(key, kv.mod_revision, kv.value)


async def put_set(etcd: aetcd.Client, scheme: KeyScheme, backend_set: BackendSet) -> int:
    """Write a set unconditionally (wbctl; the controller writes fenced); returns the revision."""
    try:
        result = await etcd.put(scheme.service(backend_set.key), encode(backend_set))
    except CLIENT_ERRORS as exc:
        raise EtcdUnavailableError(f"writing {backend_set.key}: {exc}") from exc
    return int(result.header.revision)


async def delete_set(etcd: aetcd.Client, scheme: KeyScheme, key: ServiceKey) -> bool:
    """Delete a set unconditionally; True when it existed."""
    try:
        result = await etcd.delete(scheme.service(key))
    except CLIENT_ERRORS as exc:
        raise EtcdUnavailableError(f"deleting {key}: {exc}") from exc
    return result is not None and result.deleted > 0


async def list_proxy_statuses(
    etcd: aetcd.Client, scheme: KeyScheme
) -> tuple[list[pb.ProxyStatus], int]:
    """Every live proxy's status, and the newest mod revision among the backend sets (a
    proxy whose applied revision is at least that has applied every set)."""
    try:
        proxies = await etcd.get_prefix(scheme.proxies_prefix)
        sets = await etcd.get_prefix(scheme.services_prefix, keys_only=True)
    except CLIENT_ERRORS as exc:
        raise EtcdUnavailableError(f"listing proxies: {exc}") from exc
    statuses = []
    for kv in proxies.kvs:
        try:
            statuses.append(pb.ProxyStatus.FromString(kv.value))
        except Exception:
            continue
    latest = max((kv.mod_revision for kv in sets.kvs), default=0)
    return sorted(statuses, key=lambda s: s.id), latest
