"""Kubernetes Events on Services: how the controller tells users about bad annotations."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Final

import structlog

from controlplane.kube import Kube, KubeError, Obj

log = structlog.get_logger(__name__)

COMPONENT: Final = "weighbridge-controller"
REPEAT_AFTER: Final = 600.0
"""An identical Event for the same Service is posted again only after this many seconds, so a
Service stuck with a bad annotation is not flooded on every resync."""


class EventRecorder:
    """Posts core/v1 Events (what ``kubectl describe service`` shows)."""

    def __init__(self, kube: Kube, identity: str) -> None:
        self.kube = kube
        self.identity = identity
        self._last: dict[tuple[str, str, str, str], float] = {}

    async def record(self, obj: Obj, *, type_: str, reason: str, message: str) -> None:
        """Post an Event about ``obj``; failures are logged, never raised."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        dedup = (meta.get("uid", ""), type_, reason, message)
        now = time.monotonic()
        if now - self._last.get(dedup, -REPEAT_AFTER) < REPEAT_AFTER:
            return
        self._last[dedup] = now
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
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": "weighbridge.io/controller",
            "reportingInstance": self.identity[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.kube.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)
        except KubeError as exc:
            log.warning(
                "event_not_recorded", service=f"{namespace}/{name}", reason=reason, error=str(exc)
            )

    def forget(self, uid: str) -> None:
        """Drop dedup memory for an object (it was fixed or deleted)."""
        for key in [k for k in self._last if k[0] == uid]:
            del self._last[key]
