"""One backend set as the xDS resources a proxyless gRPC client asks for.

A client of ``xds:///shop.default`` asks for the Listener ``shop.default`` (any name the proxy's
engine routes to the Service: ``NAME.NAMESPACE[.svc[.cluster.local]][:PORT]``), then the Cluster
and the ClusterLoadAssignment its route names, both called ``NAMESPACE/NAME``. The route is
inline in the Listener (no RDS).

Shares. gRPC's round_robin ignores endpoint weights (gRFCs A27, A48); under ``wrr_locality``
(what ``lb_policy: ROUND_ROBIN`` becomes) a client picks a *locality* by weighted random draw.
So a set whose picks follow weights puts each endpoint in a locality of its own whose weight is
the endpoint's, which makes a real client's share w_i/Σw; ring_hash honours endpoint weights and
gets one locality with the weights on the endpoints (weights in both places would be squared).
Strategy by strategy (:func:`layout`; docs/xds.md has the table):

- round_robin, random, and any strategy whose eligible weights are all equal: one locality,
  ROUND_ROBIN: 1/N in rotation (gRPC has no random policy);
- weighted_round_robin, weighted_random, peak_ewma, least_request (unequal weights): a
  locality per endpoint, ROUND_ROBIN: w_i/Σw by weighted random draw (gRPC has no EWMA, and its
  least_request ignores weights);
- least_request with equal weights: one locality, ``load_balancing_policy`` [LeastRequest
  (two choices), WrrLocality(RoundRobin)]: load-aware where the client has least_request (Go,
  Java), round robin where it has not (C-core: Python, C++);
- ring_hash: RING_HASH (xxHash) over one locality with endpoint weights; the route hashes the
  header of ``weighbridge.io/hash`` (none: every call a random draw).

Health: eligible endpoints are HEALTHY; a terminating one DRAINING, one not serving UNHEALTHY
(clients send neither new calls), and so is one the proxy's active health checks
(``weighbridge.io/health-check``) find unhealthy; weight 0 is left out, as xDS forbids it.
Failover: configured retries map to the route's retry policy (the statuses gRPC retries on:
cancelled, deadline-exceeded, internal, resource-exhausted, unavailable; no budget, no per-try
timeout); outlier detection to gRPC's failure-percentage ejection. Slow start, the panic
threshold, zone awareness, backend TLS and ring_hash's load bound have no xDS field a gRPC
client reads.

Nothing here checks what clients check: a set they refuse (two endpoints at one address, which
only a hand-written set has) is sent as it is, refused (NACK), logged and counted by the server,
and clients keep the resources they had.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from dataplane.strategies import REGISTRY
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint
from weighbridge.policy import Failover, OutlierDetection, RetryPolicy, failover_from_options

_PREFIX: Final = "type.googleapis.com/"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINTS: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES: Final = {LISTENER: "listener", ROUTE: "route", CLUSTER: "cluster", ENDPOINTS: "endpoints"}
"""Type URL → the short name in logs and metric labels."""

ONE_LOCALITY: Final = "one_locality"
"""Layout: every endpoint in one locality of weight 1 (endpoint weights, if any, on them)."""
LOCALITY_PER_ENDPOINT: Final = "locality_per_endpoint"
"""Layout: a locality per endpoint, of the endpoint's weight."""

RETRY_ON: Final = {
    1: "cancelled",
    4: "deadline-exceeded",
    8: "resource-exhausted",
    13: "internal",
    14: "unavailable",
}
"""gRPC status code → its ``retry_on`` name, for the statuses gRPC clients retry on (A44)."""

OUTLIER_INTERVAL_S: Final = 1
"""Seconds between a client's outlier detection sweeps: the proxy ejects on the failure itself,
and a sweep a second keeps a client close to that at the cost of a timer per Service."""
FAILURE_THRESHOLD_PERCENT: Final = 85
"""A swept endpoint is ejected when at least this share of its calls failed (Envoy's default
for failure-percentage ejection): an endpoint failing ``consecutive-failures`` calls in a row
passes it, an unlucky one does not."""


@dataclass(frozen=True, slots=True)
class XdsService:
    """One Service's resources (immutable; rebuilt when its set changes)."""

    key: ServiceKey
    route: route_pb2.RouteConfiguration
    cluster: cluster_pb2.Cluster
    load_assignment: endpoint_pb2.ClusterLoadAssignment

    def listener(self, name: str) -> listener_pb2.Listener:
        """The Listener a client asked for by ``name`` (an authority that routes here)."""
        hcm = hcm_pb2.HttpConnectionManager(
            route_config=self.route,
            http_filters=[
                hcm_pb2.HttpFilter(
                    name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
                )
            ],
        )
        return listener_pb2.Listener(
            name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm))
        )


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def cluster_name(key: ServiceKey) -> str:
    """The Cluster's and the ClusterLoadAssignment's name: ``NAMESPACE/NAME``."""
    return str(key)


def layout(backend_set: BackendSet) -> str:
    """:data:`ONE_LOCALITY` or :data:`LOCALITY_PER_ENDPOINT` (see the module's docstring)."""
    strategy = REGISTRY[backend_set.strategy]
    if strategy.name == "ring_hash":
        return ONE_LOCALITY
    weights = set(strategy.weights(backend_set.eligible))
    return ONE_LOCALITY if len(weights) <= 1 else LOCALITY_PER_ENDPOINT


def translate(backend_set: BackendSet, unhealthy: AbstractSet[str] = frozenset()) -> XdsService:
    """The xDS resources of ``backend_set`` (its failover options read as the proxy reads them;
    an invalid one, already logged when the set was applied, keeps its default); the endpoints
    in ``unhealthy`` (HOST:PORT) failed the proxy's active health checks."""
    failover, _ = failover_from_options(backend_set.options)
    key = backend_set.key
    name = cluster_name(key)
    return XdsService(
        key=key,
        route=_route(name, backend_set, failover),
        cluster=_cluster(name, backend_set, failover),
        load_assignment=_load_assignment(name, backend_set, unhealthy),
    )


def _route(name: str, backend_set: BackendSet, failover: Failover) -> route_pb2.RouteConfiguration:
    action = rc_pb2.RouteAction(cluster=name)
    if failover.retry is not None:
        retry = retry_policy(failover.retry)
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
    if backend_set.strategy == "ring_hash" and failover.hash is not None:
        action.hash_policy.add().header.header_name = failover.hash.header
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            rc_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[rc_pb2.Route(match=rc_pb2.RouteMatch(prefix=""), route=action)],
            )
        ],
    )


def retry_policy(policy: RetryPolicy) -> rc_pb2.RetryPolicy | None:
    """The route's retry policy: the statuses gRPC retries on among ``policy.on`` (None when
    there are none), its attempts and backoff."""
    on = [RETRY_ON[code] for code in policy.on if code in RETRY_ON]
    if not on:
        return None
    retry = rc_pb2.RetryPolicy(
        retry_on=",".join(on), num_retries=wrappers_pb2.UInt32Value(value=policy.attempts - 1)
    )
    retry.retry_back_off.base_interval.CopyFrom(_duration_ms(policy.backoff_base_ms))
    retry.retry_back_off.max_interval.CopyFrom(_duration_ms(policy.backoff_max_ms))
    return retry


def _cluster(name: str, backend_set: BackendSet, failover: Failover) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    if backend_set.strategy == "ring_hash":
        cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
        cluster.ring_hash_lb_config.hash_function = cluster_pb2.Cluster.RingHashLbConfig.XX_HASH
    elif backend_set.strategy == "least_request" and layout(backend_set) == ONE_LOCALITY:
        policies = cluster.load_balancing_policy.policies
        least = policies.add().typed_extension_config
        least.name = "least_request"
        least.typed_config.CopyFrom(
            pack(least_request_pb2.LeastRequest(choice_count=wrappers_pb2.UInt32Value(value=2)))
        )
        fallback = policies.add().typed_extension_config
        fallback.name = "wrr_locality"
        fallback.typed_config.CopyFrom(pack(_wrr_locality_round_robin()))
    else:
        cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    if failover.outlier_detection is not None:
        cluster.outlier_detection.CopyFrom(outlier_detection(failover.outlier_detection))
    return cluster


def _wrr_locality_round_robin() -> wrr_locality_pb2.WrrLocality:
    wrr = wrr_locality_pb2.WrrLocality()
    child = wrr.endpoint_picking_policy.policies.add().typed_extension_config
    child.name = "round_robin"
    child.typed_config.CopyFrom(pack(round_robin_pb2.RoundRobin()))
    return wrr


def outlier_detection(policy: OutlierDetection) -> outlier_detection_pb2.OutlierDetection:
    """gRPC's failure-percentage ejection (it ignores consecutive-failure ejection, A50): an
    endpoint with ``consecutive_failures`` calls in a sweep of which at least
    :data:`FAILURE_THRESHOLD_PERCENT` failed is ejected, for the proxy's ejection times and
    share. Success-rate ejection is off (explicitly: C-core turns on what is present)."""
    return outlier_detection_pb2.OutlierDetection(
        interval=duration_pb2.Duration(seconds=OUTLIER_INTERVAL_S),
        base_ejection_time=_duration_ms(policy.base_ejection_ms),
        max_ejection_time=_duration_ms(policy.max_ejection_ms),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=policy.max_ejected_percent),
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        enforcing_failure_percentage=wrappers_pb2.UInt32Value(value=100),
        failure_percentage_threshold=wrappers_pb2.UInt32Value(value=FAILURE_THRESHOLD_PERCENT),
        failure_percentage_minimum_hosts=wrappers_pb2.UInt32Value(value=1),
        failure_percentage_request_volume=wrappers_pb2.UInt32Value(
            value=policy.consecutive_failures
        ),
    )


def health_status(endpoint: Endpoint, unhealthy: AbstractSet[str] = frozenset()) -> int:
    """HEALTHY when it takes new calls; DRAINING when terminating; UNHEALTHY when not serving
    or in ``unhealthy``."""
    if endpoint.eligible:
        if endpoint.hostport in unhealthy:
            return int(health_check_pb2.UNHEALTHY)
        return int(health_check_pb2.HEALTHY)
    return int(health_check_pb2.DRAINING if endpoint.terminating else health_check_pb2.UNHEALTHY)


def _load_assignment(
    name: str, backend_set: BackendSet, unhealthy: AbstractSet[str]
) -> endpoint_pb2.ClusterLoadAssignment:
    strategy = REGISTRY[backend_set.strategy]
    sent = [e for e in backend_set.endpoints if e.weight > 0]
    weights = strategy.weights(sent)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if layout(backend_set) == LOCALITY_PER_ENDPOINT:
        for e, w in zip(sent, weights, strict=True):
            cla.endpoints.append(
                _locality(e.zone, e.hostport, w, [_lb_endpoint(e, None, unhealthy)])
            )
    elif sent:
        endpoint_weights: Sequence[int | None] = (
            weights if strategy.name == "ring_hash" else [None] * len(sent)
        )
        members = [
            _lb_endpoint(e, w, unhealthy) for e, w in zip(sent, endpoint_weights, strict=True)
        ]
        cla.endpoints.append(_locality("", "", 1, members))
    return cla


def _locality(
    zone: str, sub_zone: str, weight: int, members: list[ep_pb2.LbEndpoint]
) -> ep_pb2.LocalityLbEndpoints:
    return ep_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(zone=zone, sub_zone=sub_zone),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
        lb_endpoints=members,
    )


def _lb_endpoint(
    endpoint: Endpoint, weight: int | None, unhealthy: AbstractSet[str]
) -> ep_pb2.LbEndpoint:
    lb = ep_pb2.LbEndpoint(
        endpoint=ep_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=endpoint.address, port_value=endpoint.port
                )
            ),
            hostname=endpoint.pod,
        ),
        health_status=health_status(endpoint, unhealthy),
    )
    if weight is not None:
        lb.load_balancing_weight.value = weight
    return lb


def _duration_ms(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
