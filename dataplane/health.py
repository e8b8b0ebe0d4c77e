"""What the proxy's gRPC health service (``--health-listen``) says, by service name.

- ``""``, the whole proxy: what the kubelet's readiness and liveness probes ask. NOT_SERVING
  until the first etcd listing is applied, SERVING from then on, NOT_SERVING again while
  draining (set by :class:`dataplane.app.Proxy`).
- :data:`SYNC`: whether this proxy is in sync with etcd, i.e. its watch is up and every set it
  read is applied. NOT_SERVING while etcd is unreachable, while the subscription starts over
  after a failure, and while some set cannot be applied (see :mod:`dataplane.routing`).

A set that cannot be applied is deliberately not a readiness failure: every proxy reads the
same set and fails on it the same way, so a readiness probe on it would take every proxy out
of the client Service at once, one Service's bad set becoming an outage of all of them, and a
liveness probe would restart every proxy without fixing anything. Each proxy keeps serving the
last sets it applied and says so on :data:`SYNC`, in its metrics and in its logs.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

import structlog
from grpc_health.v1 import health_pb2

from dataplane.routing import Routes
from dataplane.subscription import Subscription

log = structlog.get_logger(__name__)

SYNC: Final = "weighbridge.sync"
"""The health service name that tells whether the proxy is in sync with etcd:
``grpc_health_probe -addr POD:9503 -service weighbridge.sync``."""

SYNC_INTERVAL: Final = 0.5
"""Seconds between checks of :func:`in_sync`: far more often than any probe asks."""


class HealthServicer(Protocol):
    """The part of grpc_health's aio HealthServicer this module uses."""

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Set ``service``'s status (a no-op once the servicer is shutting down)."""


def in_sync(subscription: Subscription, routes: Routes) -> bool:
    """The watch is up and every set read from etcd is applied."""
    return subscription.connected and not routes.unapplied


async def follow_sync(
    health: HealthServicer,
    subscription: Subscription,
    routes: Routes,
    *,
    interval: float = SYNC_INTERVAL,
) -> None:
    """Keeps :data:`SYNC`'s status at :func:`in_sync` until cancelled, logging each change
    (``proxy_sync_changed``, a warning when the proxy falls out of sync)."""
    serving: bool | None = None
    while True:
        now = in_sync(subscription, routes)
        if now != serving:
            status = health_pb2.HealthCheckResponse
            await health.set(SYNC, status.SERVING if now else status.NOT_SERVING)
            if serving is not None or now:  # not before the first listing: that is starting
                emit = log.info if now else log.warning
                emit(
                    "proxy_sync_changed",
                    in_sync=now,
                    etcd_connected=subscription.connected,
                    etcd_last_error=None if subscription.connected else subscription.last_error,
                    unapplied=sorted(routes.unapplied),
                )
            serving = now
        await asyncio.sleep(interval)
