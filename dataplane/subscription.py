"""Following etcd: list the prefix, watch from the list's revision + 1, re-list when needed.

The proxy keeps serving the last sets it applied whenever etcd is unreachable; a compacted
revision or a lost watch stream triggers a fresh list, and the difference (including
deletions) is applied, so nothing is missed. A black-holed connection is noticed by gRPC
keepalive on the etcd channel (see weighbridge.etcd) within about 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import aetcd
import structlog

from weighbridge.errors import EtcdUnavailableError
from weighbridge.etcd import CLIENT_ERRORS, list_sets, stored
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet
from weighbridge.v1 import backend_set_pb2 as pb

log = structlog.get_logger(__name__)

Apply = Callable[[ServiceKey, BackendSet | None, int], None]


class Subscription:
    """Keeps ``apply(key, set_or_None, mod_revision)`` fed with every change under the prefix."""

    def __init__(self, etcd: aetcd.Client, scheme: KeyScheme, apply: Apply) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.apply = apply
        self.applied_revision = 0
        """The etcd revision whose sets this proxy has applied (list revision or last event)."""
        self.applied_at = 0.0
        self.relists = 0
        self.connected = False
        self.last_error = ""
        self.listed = asyncio.Event()
        self.changed = asyncio.Event()
        self._keys: set[ServiceKey] = set()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                revision = await self._list()
                backoff = 0.1
                await self._watch(revision + 1)
            except (EtcdUnavailableError, *CLIENT_ERRORS) as exc:
                self.connected = False
                self.last_error = str(exc) or type(exc).__name__
                compacted = isinstance(exc, aetcd.exceptions.RevisionCompactedError)
                log.warning(
                    "etcd_watch_lost",
                    error=self.last_error,
                    compacted=compacted,
                    applied_revision=self.applied_revision,
                )
                if not compacted:
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 3.0)
            self.relists += 1

    async def _list(self) -> int:
        revision, sets = await list_sets(self.etcd, self.scheme)
        seen: set[ServiceKey] = set()
        for s in sets:
            seen.add(s.key)
            if s.backend_set is None:
                log.error("backend_set_undecodable", service=s.key, error=str(s.error))
                continue
            self.apply(s.key, s.backend_set, s.mod_revision)
        for gone in self._keys - seen:
            self.apply(gone, None, revision)
        self._keys = seen
        self._applied(revision)
        self.connected = True
        self.listed.set()
        log.info("etcd_listed", revision=revision, sets=len(seen))
        return revision

    async def _watch(self, start: int) -> None:
        try:
            # aetcd can wait without a deadline for a watch to be created on a broken stream.
            watch = await asyncio.wait_for(
                self.etcd.watch_prefix(self.scheme.services_prefix, start_revision=start), 10
            )
        except TimeoutError as exc:
            raise EtcdUnavailableError("creating the etcd watch timed out") from exc
        try:
            async for event in watch:
                kv = event.kv
                try:
                    key = self.scheme.service_key_of(kv.key)
                except ValueError:
                    continue
                if event.kind == "DELETE":
                    self._keys.discard(key)
                    self.apply(key, None, kv.mod_revision)
                else:
                    item = stored(key, kv.mod_revision, kv.value)
                    if item.backend_set is None:
                        log.error("backend_set_undecodable", service=key, error=str(item.error))
                    else:
                        self._keys.add(key)
                        self.apply(key, item.backend_set, kv.mod_revision)
                self._applied(kv.mod_revision)
        finally:
            # Bounded too: on a stream that broke under it (etcd restarted), aetcd's cancel can
            # wait forever, and the proxy would never finish stopping.
            with contextlib.suppress(*CLIENT_ERRORS, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(watch.cancel(), 2)
        raise EtcdUnavailableError("watch stream ended")

    def _applied(self, revision: int) -> None:
        self.applied_revision = max(self.applied_revision, revision)
        self.applied_at = time.time()
        self.changed.set()


class StatusPublisher:
    """Publishes ``<prefix>proxies/<id>`` (a ProxyStatus) bound to a lease, so `wbctl` can show
    which proxies are in sync; the key vanishes within ``ttl`` seconds of the proxy dying."""

    def __init__(
        self,
        etcd: aetcd.Client,
        scheme: KeyScheme,
        proxy_id: str,
        subscription: Subscription,
        count: Callable[[], int],
        *,
        ttl: int = 10,
    ) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.proxy_id = proxy_id
        self.subscription = subscription
        self.count = count
        self.ttl = ttl

    async def run(self) -> None:
        lease_id: int | None = None
        try:
            while True:
                try:
                    if lease_id is None:
                        lease_id = int((await self.etcd.lease(self.ttl)).id)
                    await self._publish(lease_id)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.subscription.changed.wait(), self.ttl / 3)
                    await asyncio.sleep(0.2)  # coalesce bursts of changes into one write
                    reply = await self.etcd.refresh_lease(lease_id)
                    if reply is None or reply.TTL <= 0:
                        lease_id = None
                except CLIENT_ERRORS as exc:
                    log.debug("status_not_published", error=str(exc))
                    lease_id = None
                    await asyncio.sleep(1.0)
        finally:
            if lease_id is not None:
                with contextlib.suppress(*CLIENT_ERRORS, TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(self.etcd.revoke_lease(lease_id), 2)

    async def _publish(self, lease_id: int) -> None:
        self.subscription.changed.clear()
        status = pb.ProxyStatus(
            id=self.proxy_id,
            applied_revision=self.subscription.applied_revision,
            updated_unix_nanos=time.time_ns(),
            backend_sets=self.count(),
        )
        await self.etcd.put(
            self.scheme.proxy(self.proxy_id), status.SerializeToString(), lease=lease_id
        )
