"""Kubernetes Events on Services: how the controller tells users about bad annotations.

Reconciles never wait for the API server to accept an Event: :meth:`EventRecorder.post` only
queues it (a bounded queue, so a stuck API server cannot grow the controller's memory), and
:meth:`EventRecorder.run`, a task of its own, posts what is queued one at a time. An Event
that does not fit is dropped and counted; being deduplicated only once posted, it is queued
again the next time a reconcile reports the same problem.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from controlplane.kube import Kube, KubeError, Obj
from controlplane.metrics import Metrics

log = structlog.get_logger(__name__)

COMPONENT: Final = "weighbridge-controller"
REPEAT_AFTER: Final = 600.0
"""An identical Event for the same Service is posted again only after this many seconds, so a
Service stuck with a bad annotation is not flooded on every resync."""
MAX_QUEUED: Final = 1000
"""Events waiting to be posted, at most: a burst of bad annotations across many Services fits,
and a few hundred kilobytes at worst while the API server does not answer."""
POST_TIMEOUT: Final = 10.0
"""Seconds one Event post may take; an API server slower than this drops the Event (counted as
failed), so the ones behind it are not held for the default 30 s."""

Dedup = tuple[str, str, str, str]


class EventRecorder:
    """Posts core/v1 Events (what ``kubectl describe service`` shows), off the reconcile path.

    ``post`` queues and never blocks; ``run`` must run for anything to be posted."""

    def __init__(
        self, kube: Kube, identity: str, metrics: Metrics, *, max_queued: int = MAX_QUEUED
    ) -> None:
        self.kube = kube
        self.identity = identity
        self.metrics = metrics
        self._queue: asyncio.Queue[tuple[Dedup, dict[str, Any]]] = asyncio.Queue(max_queued)
        self._last: dict[Dedup, float] = {}

    def post(self, obj: Obj, *, type_: str, reason: str, message: str) -> None:
        """Queue an Event about ``obj``, unless the same one was posted in the last
        :data:`REPEAT_AFTER` seconds; a full queue drops it (counted, logged)."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        message = message[:1024]
        dedup = (meta.get("uid", ""), type_, reason, message)
        now = time.monotonic()
        if now - self._last.get(dedup, -REPEAT_AFTER) < REPEAT_AFTER:
            return
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": obj.get("kind", "Service"),
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": "weighbridge.io/controller",
            "reportingInstance": self.identity[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._queue.put_nowait((dedup, event))
        except asyncio.QueueFull:
            self.metrics.events.labels("dropped").inc()
            log.warning(
                "event_dropped",
                service=f"{namespace}/{name}",
                reason=reason,
                queued=self._queue.qsize(),
            )
            return
        self._last[dedup] = now
        self.metrics.event_queue.set(self._queue.qsize())

    async def run(self) -> None:
        """Post queued Events one at a time, until cancelled."""
        while True:
            dedup, event = await self._queue.get()
            self.metrics.event_queue.set(self._queue.qsize())
            involved = event["involvedObject"]
            try:
                await self.kube.request(
                    "POST",
                    f"/api/v1/namespaces/{involved['namespace']}/events",
                    body=event,
                    timeout=POST_TIMEOUT,
                )
            except Exception as exc:  # KubeError, or a reply it could not read: never stop
                self.metrics.events.labels("failed").inc()
                self._last.pop(dedup, None)  # the next report of it tries again
                log.warning(
                    "event_not_recorded",
                    service=f"{involved['namespace']}/{involved['name']}",
                    reason=event["reason"],
                    error=repr(exc) if not isinstance(exc, KubeError) else str(exc),
                )
            else:
                self.metrics.events.labels("posted").inc()

    def forget(self, uid: str, *, keep: Collection[tuple[str, str]] = ()) -> None:
        """Drop dedup memory for an object (it was fixed or deleted), except for the
        ``(reason, message)`` pairs in ``keep``: problems it still has."""
        kept = {(reason, message[:1024]) for reason, message in keep}
        for key in [k for k in self._last if k[0] == uid and (k[2], k[3]) not in kept]:
            del self._last[key]

    @property
    def queued(self) -> int:
        return self._queue.qsize()
