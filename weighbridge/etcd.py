"""Connecting to etcd and reading/writing backend sets: the parts both planes and wbctl share.

Every aetcd error is wrapped into :class:`EtcdUnavailableError` (or a more precise
Weighbridge error) here, at the boundary, so callers never import aetcd's exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aetcd
import aetcd.exceptions
import grpc
import structlog
from aetcd import rpc, watcher

from weighbridge.errors import (
    DecodeError,
    EtcdCredentialsError,
    EtcdPermissionDeniedError,
    EtcdUnavailableError,
)
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


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """Where the files for TLS to etcd are; they are read again at every (re)connect.

    Each is a path rather than its content so that a rotated Secret (new files at the same
    paths) is used at the next reconnect without restarting the process.
    """

    cacert: Path | None
    """CA bundle that verifies etcd's serving certificate; None: the system's roots."""
    cert: Path | None
    """Client certificate; its CN is the etcd user when etcd runs --client-cert-auth."""
    key: Path | None
    """The client certificate's private key (given together with ``cert``)."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "--etcd-cert and --etcd-key go together: give both (a client certificate and "
                "its key) or neither"
            )

    def read(self) -> _TLSFiles:
        """The files' contents; raises EtcdCredentialsError naming the flag and path."""
        return _TLSFiles(
            cacert=_read_pem("--etcd-cacert", self.cacert),
            cert=_read_pem("--etcd-cert", self.cert),
            key=_read_pem("--etcd-key", self.key),
        )


@dataclass(frozen=True, slots=True)
class _TLSFiles:
    cacert: bytes | None
    cert: bytes | None
    key: bytes | None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.cacert, private_key=self.key, certificate_chain=self.cert
        )


def _read_pem(flag: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EtcdCredentialsError(f"cannot read {flag} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise EtcdCredentialsError(f"cannot read {flag} {path}: not a PEM file")
    return data


def client(endpoints: str, *, tls: EtcdTLS | None = None, timeout: float = 5.0) -> aetcd.Client:
    """An aetcd client for ``endpoints`` (connects lazily); over TLS when ``tls`` is given.

    Several endpoints are joined into one gRPC ``ipv4:``/``ipv6:`` target when they are
    IP literals, so the channel fails over between members; with host names only the first
    is used (point it at a Service that spreads over the members). With ``tls`` the files
    are read here once, so a missing or unreadable one fails at start-up with its flag named.
    """
    eps = parse_endpoints(endpoints)
    host, port = eps[0]
    options: dict[str, Any] = dict(_CHANNEL_OPTIONS)
    if len(eps) > 1 and all(_is_ip(h) for h, _ in eps):
        family = "ipv6" if ":" in eps[0][0] else "ipv4"
        joined = ",".join(join_hostport(h, p) for h, p in eps[:-1])
        last_host, port = eps[-1]
        host = f"{family}:{joined},{f'[{last_host}]' if ':' in last_host else last_host}"
        # Such a target has no host name to verify: every member's certificate must then
        # name the first endpoint's address (one certificate for all members usually does).
        options["grpc.ssl_target_name_override"] = eps[0][0]
    if tls is not None:
        return TLSClient(tls=tls, host=host, port=port, timeout=timeout, options=options)
    return aetcd.Client(host=host, port=port, timeout=timeout, options=options)


class TLSClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's Client over a TLS channel whose files are read again at every (re)connect.

    aetcd 1.0.0 only opens insecure channels, so :meth:`connect` is replaced; everything
    else (stubs, watcher, error mapping) is aetcd's. gRPC reconnects a channel by itself with
    the credentials it was made with, so a changed certificate needs a new channel: whenever
    the channel is not READY (etcd restarted, a handshake was refused, the connection went
    idle) the next call re-reads the files, at most once a second, and if they changed swaps
    in a new channel. A READY connection is kept: etcd checks a client certificate only at the
    handshake. Calls in flight on the old channel fail and are retried by their callers; a
    watch on it ends, which the proxy's subscription answers with a fresh list.
    """

    _RECHECK_S: Final = 1.0

    def __init__(self, *, tls: EtcdTLS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls = tls
        self._files = tls.read()
        self._checked = 0.0

    async def connect(self) -> None:
        """Open the channel (re-reading the files), or replace it if they changed while it
        was not connected. Never awaits before the swap, so concurrent callers see either
        the old channel or the new one, never none."""
        if self.channel is None:
            self._files = self.tls.read()
            self._open()
            return
        old = self._rotated()
        if old is None:
            return
        old_channel, old_watcher = old
        log.info(
            "etcd_tls_reloaded",
            cacert=str(self.tls.cacert),
            cert=str(self.tls.cert),
            key=str(self.tls.key),
        )
        if old_watcher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old_watcher.shutdown(), 2)
        await old_channel.close(None)

    def _rotated(self) -> tuple[grpc.aio.Channel, watcher.Watcher | None] | None:
        """If the channel is not READY and the files changed, open a new channel and return
        the old channel and watcher for closing; else None."""
        if self.channel.get_state(try_to_connect=False) is grpc.ChannelConnectivity.READY:
            return None
        now = time.monotonic()
        if now - self._checked < self._RECHECK_S:
            return None
        self._checked = now
        try:
            files = self.tls.read()
        except EtcdCredentialsError as exc:
            log.warning("etcd_tls_unreadable", error=str(exc))
            return None
        if files == self._files:
            return None
        old = (self.channel, self._watcher)
        self._files = files
        self._open()
        return old

    def _open(self) -> None:
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}",
            self._files.credentials(),
            options=list(self._options.items()),
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.auth_stub = rpc.AuthStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def wrap_error(what: str, exc: BaseException) -> EtcdUnavailableError:
    """The Weighbridge error for an aetcd error while doing ``what``: permission denied (the
    certificate's user lacks a role) is told apart from an unreachable etcd."""
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError) and (
        cause.code() is grpc.StatusCode.PERMISSION_DENIED
    ):
        return EtcdPermissionDeniedError(
            f"{what}: etcd denied it ({cause.details()}): the etcd user of this client "
            "certificate (its CN) has no role allowing it; see docs/etcd-security.md"
        )
    hint = ""
    if "TSI_" in str(exc) or "SSL" in str(exc) or "handshake" in str(exc).lower():
        hint = (
            " (the TLS handshake with etcd failed: does --etcd-cacert verify etcd's certificate,"
            " and does etcd trust the --etcd-cert given, if any?)"
        )
    return EtcdUnavailableError(f"{what}: {exc}{hint}")


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
        raise wrap_error(f"listing {scheme.services_prefix!r}", exc) from exc
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
        raise wrap_error(f"reading {key}", exc) from exc
    return None if kv is None else stored(key, kv.mod_revision, kv.value)


async def put_set(etcd: aetcd.Client, scheme: KeyScheme, backend_set: BackendSet) -> int:
    """Write a set unconditionally (wbctl; the controller writes fenced); returns the revision."""
    try:
        result = await etcd.put(scheme.service(backend_set.key), encode(backend_set))
    except CLIENT_ERRORS as exc:
        raise wrap_error(f"writing {backend_set.key}", exc) from exc
    return int(result.header.revision)


async def delete_set(etcd: aetcd.Client, scheme: KeyScheme, key: ServiceKey) -> bool:
    """Delete a set unconditionally; True when it existed."""
    try:
        result = await etcd.delete(scheme.service(key))
    except CLIENT_ERRORS as exc:
        raise wrap_error(f"deleting {key}", exc) from exc
    return result is not None and result.deleted > 0


async def count_proxy_zones(etcd: aetcd.Client, scheme: KeyScheme) -> dict[str, int]:
    """Live proxies per zone, from their status keys (proxies of unknown zone not counted)."""
    try:
        proxies = await etcd.get_prefix(scheme.proxies_prefix)
    except CLIENT_ERRORS as exc:
        raise wrap_error("counting proxies per zone", exc) from exc
    zones: dict[str, int] = {}
    for kv in proxies.kvs:
        try:
            zone = pb.ProxyStatus.FromString(kv.value).zone
        except Exception:
            continue
        if zone:
            zones[zone] = zones.get(zone, 0) + 1
    return zones


async def list_proxy_statuses(
    etcd: aetcd.Client, scheme: KeyScheme
) -> tuple[list[pb.ProxyStatus], int]:
    """Every live proxy's status, and the newest mod revision among the backend sets (a
    proxy whose applied revision is at least that has applied every set)."""
    try:
        proxies = await etcd.get_prefix(scheme.proxies_prefix)
        sets = await etcd.get_prefix(scheme.services_prefix, keys_only=True)
    except CLIENT_ERRORS as exc:
        raise wrap_error("listing proxies", exc) from exc
    statuses = []
    for kv in proxies.kvs:
        try:
            statuses.append(pb.ProxyStatus.FromString(kv.value))
        except Exception:
            continue
    latest = max((kv.mod_revision for kv in sets.kvs), default=0)
    return sorted(statuses, key=lambda s: s.id), latest
