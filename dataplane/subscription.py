"""Following etcd: list the prefix, watch from the list's revision + 1, re-list when needed.

The proxy keeps serving the last sets it applied whenever etcd is unreachable; a compacted
revision or a lost watch stream triggers a fresh list, and the difference (including
deletions) is applied, so nothing is missed. A black-holed connection is noticed by gRPC
keepalive on the etcd channel (see weighbridge.etcd) within about 15 s.

The subscription is supervised. A set that cannot be applied is its applier's to report
(:meth:`dataplane.routing.Routes.apply` returns False); the watch goes on with the other sets
and later changes, and re-lists after a backoff (1 s doubling to 60 s) while any set read is
not applied, so a failure that passes (a file the set needs appears, a transient error) heals
without a change in etcd. Anything else the subscription raises is a failure of its own: it is
logged with its traceback, counted (:attr:`Subscription.failures`), and the subscription starts
over with a fresh list after the same backoff, the proxy serving its last sets meanwhile. A
re-list applies only the sets that changed or did not apply, so the Services that did not
change keep their pickers (a rotation's position, a weighted schedule's place).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable
from typing import Final

import aetcd
import structlog

from weighbridge.errors import EtcdUnavailableError
from weighbridge.etcd import CLIENT_ERRORS, list_sets, stored
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet
from weighbridge.v1 import backend_set_pb2 as pb

log = structlog.get_logger(__name__)

Apply = Callable[[ServiceKey, BackendSet | None, int], bool]
"""``apply(key, set_or_None, mod_revision)``: True when applied; False when it could not be,
having reported why (the subscription then retries it). Raising is a bug in the applier: the
subscription restarts."""

RETRY_FIRST: Final = 1.0
"""Seconds before the first retry (a re-list) after a failure: a transient failure heals
within about a second, and a persistent one costs etcd one list per proxy each time."""
RETRY_MAX: Final = 60.0
"""The longest wait between retries, doubling from :data:`RETRY_FIRST`: a set that can never be
applied costs one list a minute per proxy, while a fix still arrives through the watch at once."""


def _jitter(delay: float) -> float:
    """±50%, so proxies that failed together do not list together."""
    return delay * (0.5 + random.random())


class _RetryDue(Exception):
    """The watch ends so that the subscription re-lists, retrying the sets not applied."""


class Subscription:
    """Keeps ``apply(key, set_or_None, mod_revision)`` fed with every change under the prefix."""

    def __init__(
        self,
        etcd: aetcd.Client,
        scheme: KeyScheme,
        apply: Apply,
        *,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.apply = apply
        self.applied_revision = 0
        """The etcd revision whose sets this proxy has applied (list revision or last event):
        every change up to it is applied, so while a set does not apply this stays below its
        revision, and the proxy's status key shows it behind."""
        self.applied_at = 0.0
        self.relists = 0
        self.connected = False
        """True while the watch is up and the subscription itself has not failed since its
        last list."""
        self.last_error = ""
        self.failures = 0
        """Times the subscription failed (raised something other than etcd's errors) and
        started over."""
        self.retry_first = retry_first
        """Seconds before the first retry after a failure (±50%), doubling up to ``retry_max``."""
        self.retry_max = retry_max
        self.listed = asyncio.Event()
        self.changed = asyncio.Event()
        self._revision_of: dict[ServiceKey, int] = {}
        """The mod revision of each Service's set that applied (a re-list skips it unchanged)."""
        self._unapplied: dict[ServiceKey, int] = {}
        """Services whose latest set (or deletion) read did not apply, with its revision:
        retried by a re-list."""
        self._read_revision = 0
        self._retry_delay: float | None = None
        """The next retry's delay; None: ``retry_first``."""
        self._retry_at: float | None = None
        """Loop time of the next retry, while some set read did not apply."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        failure_delay, last_failure = self.retry_first, -math.inf
        task = asyncio.current_task()
        while True:
            # A stop request that something below swallowed (a timeout expiring at the same
            # moment, a library's cleanup) still ends the subscription.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            try:
                revision = await self._list()
                backoff = 0.1
                await self._watch(revision + 1)
            except _RetryDue:
                log.info("backend_sets_retried", services=sorted(self._unapplied))
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
            except Exception as exc:  # a failure of the subscription itself: start over
                self.connected = False
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if loop.time() - last_failure > 2 * self.retry_max:  # the first in a while
                    failure_delay = self.retry_first
                last_failure = loop.time()
                delay = _jitter(failure_delay)
                log.exception(
                    "subscription_failed",
                    error=self.last_error,
                    applied_revision=self.applied_revision,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                failure_delay = min(failure_delay * 2, self.retry_max)
            self.relists += 1

    def _apply(self, key: ServiceKey, backend_set: BackendSet | None, mod_revision: int) -> None:
        if self.apply(key, backend_set, mod_revision):
            if backend_set is None:
                self._revision_of.pop(key, None)
            else:
                self._revision_of[key] = mod_revision
            self._unapplied.pop(key, None)
        else:
            self._unapplied[key] = mod_revision
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        """A re-list after the backoff while some set did not apply; none once all did."""
        if not self._unapplied:
            self._retry_at = None
            self._retry_delay = None
        elif self._retry_at is None:
            delay = self._retry_delay or self.retry_first
            self._retry_at = asyncio.get_running_loop().time() + _jitter(delay)
            self._retry_delay = min(delay * 2, self.retry_max)

    async def _list(self) -> int:
        revision, sets = await list_sets(self.etcd, self.scheme)
        self._retry_at = None  # this list is the retry; a set it cannot apply schedules the next
        seen: set[ServiceKey] = set()
        for s in sets:
            seen.add(s.key)
            if s.backend_set is None:
                log.error("backend_set_undecodable", service=s.key, error=str(s.error))
                continue
            if self._revision_of.get(s.key) != s.mod_revision:  # new, changed, or not applied
                self._apply(s.key, s.backend_set, s.mod_revision)
        for gone in (self._revision_of.keys() | self._unapplied.keys()) - seen:
            self._apply(gone, None, revision)
        self._schedule_retry()
        self._applied(revision)
        self.connected = True
        self.listed.set()
        log.info("etcd_listed", revision=revision, sets=len(seen))
        return revision

    async def _watch(self, start: int) -> None:
        try:
            # aetcd can wait without a deadline for a watch to be created on a broken stream.
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation
            # that lands as the awaited call completes, and the task would then watch on.)
            async with asyncio.timeout(10):
                watch = await self.etcd.watch_prefix(
                    self.scheme.services_prefix, start_revision=start
                )
        except TimeoutError as exc:
            raise EtcdUnavailableError("creating the etcd watch timed out") from exc
        retry = asyncio.timeout_at(self._retry_at)
        try:
            async with retry:
                async for event in watch:
                    kv = event.kv
                    try:
                        key = self.scheme.service_key_of(kv.key)
                    except ValueError:
                        continue
                    if event.kind == "DELETE":
                        self._apply(key, None, kv.mod_revision)
                    else:
                        item = stored(key, kv.mod_revision, kv.value)
                        if item.backend_set is None:
                            log.error("backend_set_undecodable", service=key, error=str(item.error))
                        else:
                            self._apply(key, item.backend_set, kv.mod_revision)
                    self._applied(kv.mod_revision)
                    retry.reschedule(self._retry_at)
        except TimeoutError:
            if retry.expired():
                raise _RetryDue from None
            raise
        finally:
            # Bounded too: on a stream that broke under it (etcd restarted), aetcd's cancel can
            # wait forever, and the proxy would never finish stopping.
            try:
                async with asyncio.timeout(2):
                    await watch.cancel()
            except (*CLIENT_ERRORS, TimeoutError):
                pass
            except asyncio.CancelledError:
                # aetcd's own cleanup may raise it; this task being stopped must not be
                # swallowed, or a stop that lands here leaves the subscription running.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        raise EtcdUnavailableError("watch stream ended")

    def _applied(self, revision: int) -> None:
        """Everything up to ``revision`` was read: applied, but for the sets that did not."""
        self._read_revision = max(self._read_revision, revision)
        first_unapplied = min(self._unapplied.values(), default=None)
        self.applied_revision = (
            self._read_revision if first_unapplied is None else first_unapplied - 1
        )
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
        zone: str = "",
        ttl: int = 10,
    ) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.proxy_id = proxy_id
        self.subscription = subscription
        self.count = count
        self.zone = zone
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
            zone=self.zone,
        )
        await self.etcd.put(
            self.scheme.proxy(self.proxy_id), status.SerializeToString(), lease=lease_id
        )
