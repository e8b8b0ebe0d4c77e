"""The controller's settings: one frozen dataclass, the one home of every default.

``weighbridge-controller``'s flags take their defaults from :data:`DEFAULTS`, and
:class:`~controlplane.reconciling.Controller` takes a :class:`ControllerSettings`; the Helm
chart passes a tunable only when its value is set (``source`` aside: its RBAC depends on it),
so a default is never written twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from weighbridge.keys import ALL_NAMESPACES, check_namespaces, namespace_listed

Source = Literal["endpointslices", "endpoints"]
"""Where a Service's endpoints come from."""


MIN_LEASE_TTL = 2
"""etcd grants no lease shorter than 1.5 election timeouts (2 s with its defaults) and
silently lengthens shorter ones, so a smaller TTL would not mean what it says."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerSettings:
    """What the controller can be tuned with; each field says why its default is what it is.
    Out-of-range values raise ValueError naming the value."""

    source: Source = "endpointslices"
    """Where endpoints come from: discovery.k8s.io/v1 EndpointSlices, which Kubernetes keeps
    for every Service and which scale past the 1000 addresses a v1 Endpoints object holds;
    "endpoints" (core/v1, deprecated since Kubernetes 1.33) for tools that write only those."""
    lease_ttl: int = 10
    """Leader lease TTL, seconds: the longest a dead leader blocks writes before a follower
    takes over. Long enough that a GC pause or a slow etcd (the leader renews every TTL/3)
    causes no needless failover; short enough that a crash delays routing changes by seconds
    only (the proxies keep serving the last published sets meanwhile)."""
    resync_interval: float = 300.0
    """Seconds between full resyncs, which re-read etcd, re-queue every Service and remove
    stale keys. Watches carry every change within milliseconds; the resync only repairs what
    they cannot see (keys changed behind the controller's back), so minutes suffice and a
    large etcd is read in full rarely."""
    workers: int = 4
    """Services reconciled at once (never one Service by two workers). A sync mostly
    waits on one etcd transaction, so a few keep a burst (a rollout touching many Services)
    moving without flooding etcd or the API server."""
    admin_listen: str | None = "127.0.0.1:9401"
    """gRPC server reflection and health for ``grpcurl``; None to disable. Loopback: reached
    by entering the pod (``kubectl port-forward``), never from the network, like the proxy's."""
    health_listen: str | None = "0.0.0.0:9403"
    """gRPC health (grpc.health.v1 only) for the kubelet's gRPC probes; None to disable. Every
    interface, since the kubelet connects to the pod's IP; its own port, so probes never wait
    behind metrics scrapes."""
    metrics_listen: str = "0.0.0.0:9402"
    """Prometheus /metrics over HTTP: every interface, since Prometheus scrapes the pod's
    IP."""
    grpc_service_namespaces: tuple[str, ...] = (ALL_NAMESPACES,)
    """Namespaces whose Services may route by gRPC service name
    (``weighbridge.io/grpc-services``): ``("*",)`` every namespace, ``()`` none (routing by
    name off; the ``:authority`` still reaches every Service). Every namespace by default, so
    the annotation works as documented without a second step; in a cluster shared by teams
    that do not trust each other, list the namespaces allowed to claim names, since a name is
    global to the proxies (the oldest claim wins, wherever it comes from)."""

    def __post_init__(self) -> None:
        if self.lease_ttl < MIN_LEASE_TTL:
            raise ValueError(f"lease TTL must be at least {MIN_LEASE_TTL} s, not {self.lease_ttl}")
        if not (self.resync_interval > 0 and math.isfinite(self.resync_interval)):
            raise ValueError(f"resync interval must be > 0 s, not {self.resync_interval}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        check_namespaces("gRPC service namespaces", self.grpc_service_namespaces)

    def routes_names_in(self, namespace: str) -> bool:
        """Whether Services in ``namespace`` may route by gRPC service name."""
        return namespace_listed(namespace, self.grpc_service_namespaces)


DEFAULTS = ControllerSettings()
"""Every default, for the flags to show and for callers that override a few fields."""
