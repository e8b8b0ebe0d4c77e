"""The xDS resources of a backend set: what a gRPC client's shares, health and failover follow."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from google.protobuf import any_pb2

from dataplane.xds.resources import (
    LOCALITY_PER_ENDPOINT,
    ONE_LOCALITY,
    layout,
    pack,
    translate,
)
from weighbridge.model import BackendSet, Endpoint
from weighbridge.policy import (
    HASH,
    OUTLIER_DETECTION,
    RETRY,
    HashKey,
    OutlierDetection,
    RetryPolicy,
    format_hash,
    format_outlier_detection,
    format_retry,
)


def a_set(strategy: str, *weights: int, **kw: object) -> BackendSet:
    endpoints = tuple(
        Endpoint(f"10.0.0.{i + 1}", 50051, weight=w, pod=f"p{i}", zone="z1")
        for i, w in enumerate(weights)
    )
    return BackendSet("shop", "cart", strategy, endpoints=endpoints, **kw)  # type: ignore[arg-type]


def shares(backend_set: BackendSet) -> dict[str, int]:
    """Locality weight per address (what wrr_locality draws by)."""
    cla = translate(backend_set).load_assignment
    return {
        lb.endpoint.address.socket_address.address: loc.load_balancing_weight.value
        for loc in cla.endpoints
        for lb in loc.lb_endpoints
    }


def test_a_weighted_set_puts_each_endpoint_in_a_locality_of_its_weight() -> None:
    s = a_set("weighted_round_robin", 30, 30, 30, 10)
    xds = translate(s)
    assert layout(s) == LOCALITY_PER_ENDPOINT
    assert xds.cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert shares(s) == {"10.0.0.1": 30, "10.0.0.2": 30, "10.0.0.3": 30, "10.0.0.4": 10}
    subzones = [loc.locality.sub_zone for loc in xds.load_assignment.endpoints]
    assert subzones == [e.hostport for e in s.endpoints]  # unique: a locality per endpoint
    for loc in xds.load_assignment.endpoints:
        assert not loc.lb_endpoints[0].HasField("load_balancing_weight")  # never squared


@pytest.mark.parametrize(
    "strategy", ["weighted_random", "peak_ewma", "least_request", "weighted_round_robin"]
)
def test_every_strategy_that_follows_weights_gets_them_in_localities(strategy: str) -> None:
    assert shares(a_set(strategy, 3, 1)) == {"10.0.0.1": 3, "10.0.0.2": 1}


@pytest.mark.parametrize("strategy", ["round_robin", "random"])
def test_unweighted_strategies_are_one_locality_whatever_the_weights(strategy: str) -> None:
    s = a_set(strategy, 5, 1, 2)
    cla = translate(s).load_assignment
    assert layout(s) == ONE_LOCALITY
    assert len(cla.endpoints) == 1 and cla.endpoints[0].load_balancing_weight.value == 1
    assert len(cla.endpoints[0].lb_endpoints) == 3
    assert translate(s).cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


def test_equal_weights_are_one_locality_a_rotation() -> None:
    assert layout(a_set("weighted_random", 4, 4)) == ONE_LOCALITY


def test_ring_hash_puts_the_weights_on_the_endpoints_of_one_locality_and_hashes_the_header() -> (
    None
):
    s = a_set("ring_hash", 3, 1, options={HASH: format_hash(HashKey(header="x-user"))})
    xds = translate(s)
    assert xds.cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert (
        xds.cluster.ring_hash_lb_config.hash_function
        == cluster_pb2.Cluster.RingHashLbConfig.XX_HASH
    )
    (loc,) = xds.load_assignment.endpoints
    assert loc.load_balancing_weight.value == 1
    assert [lb.load_balancing_weight.value for lb in loc.lb_endpoints] == [3, 1]
    (policy,) = xds.route.virtual_hosts[0].routes[0].route.hash_policy
    assert policy.header.header_name == "x-user"


def test_ring_hash_without_a_key_hashes_nothing() -> None:
    xds = translate(a_set("ring_hash", 1, 1))
    assert not xds.route.virtual_hosts[0].routes[0].route.hash_policy


def test_least_request_with_equal_weights_asks_for_least_request_then_round_robin() -> None:
    xds = translate(a_set("least_request", 1, 1, 1))
    first, second = xds.cluster.load_balancing_policy.policies
    least = least_request_pb2.LeastRequest()
    assert first.typed_extension_config.typed_config.Unpack(least)
    assert least.choice_count.value == 2
    wrr = wrr_locality_pb2.WrrLocality()
    assert second.typed_extension_config.typed_config.Unpack(wrr)
    assert xds.cluster.lb_policy == 0  # grpc-go reads the enum first: it must stay ROUND_ROBIN


def test_health_draining_unhealthy_and_weight_0_left_out() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 1, weight=2),
        Endpoint("10.0.0.2", 1, weight=1, terminating=True),
        Endpoint("10.0.0.3", 1, weight=1, serving=False),
        Endpoint("10.0.0.4", 1, weight=0),
    )
    cla = translate(
        BackendSet("shop", "cart", "weighted_random", endpoints=endpoints)
    ).load_assignment
    statuses = {
        lb.endpoint.address.socket_address.address: lb.health_status
        for loc in cla.endpoints
        for lb in loc.lb_endpoints
    }
    assert statuses == {
        "10.0.0.1": health_check_pb2.HEALTHY,
        "10.0.0.2": health_check_pb2.DRAINING,
        "10.0.0.3": health_check_pb2.UNHEALTHY,
    }
    assert all(loc.load_balancing_weight.value > 0 for loc in cla.endpoints)


def test_an_endpoint_the_proxys_health_checks_find_unhealthy_is_unhealthy() -> None:
    s = a_set("weighted_random", 2, 1)
    cla = translate(s, unhealthy=frozenset({"10.0.0.2:50051"})).load_assignment
    assert [loc.lb_endpoints[0].health_status for loc in cla.endpoints] == [
        health_check_pb2.HEALTHY,
        health_check_pb2.UNHEALTHY,
    ]


def test_an_empty_set_has_no_endpoints() -> None:
    assert not translate(a_set("round_robin")).load_assignment.endpoints


def test_retries_keep_the_statuses_grpc_retries_on() -> None:
    policy = RetryPolicy(on=(5, 14), attempts=3, backoff_base_ms=50, backoff_max_ms=1500)
    route = translate(a_set("round_robin", 1, options={RETRY: format_retry(policy)})).route
    retry = route.virtual_hosts[0].routes[0].route.retry_policy
    assert retry.retry_on == "unavailable"  # not-found (5) is not one gRPC retries on
    assert retry.num_retries.value == 2
    assert retry.retry_back_off.base_interval.ToMilliseconds() == 50
    assert retry.retry_back_off.max_interval.ToMilliseconds() == 1500


def test_retries_on_statuses_grpc_never_retries_are_left_out() -> None:
    options = {RETRY: format_retry(RetryPolicy(on=(5,)))}
    route = translate(a_set("round_robin", 1, options=options)).route
    assert not route.virtual_hosts[0].routes[0].route.HasField("retry_policy")


def test_outlier_detection_is_failure_percentage_with_the_proxys_ejection_times() -> None:
    policy = OutlierDetection(
        consecutive_failures=7, base_ejection_ms=10_000, max_ejection_ms=60_000
    )
    options = {OUTLIER_DETECTION: format_outlier_detection(policy)}
    od = translate(a_set("round_robin", 1, options=options)).cluster.outlier_detection
    assert od.failure_percentage_request_volume.value == 7
    assert od.enforcing_failure_percentage.value == 100
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert od.base_ejection_time.seconds == 10 and od.max_ejection_time.seconds == 60
    assert od.max_ejection_percent.value == 10
    assert od.failure_percentage_minimum_hosts.value == 1


def test_outlier_detection_off_sends_none() -> None:
    options = {OUTLIER_DETECTION: format_outlier_detection(None)}
    cluster = translate(a_set("round_robin", 1, options=options)).cluster
    assert not cluster.HasField("outlier_detection")


def test_the_listener_carries_its_route_inline_to_the_cluster_by_name() -> None:
    xds = translate(a_set("round_robin", 1))
    listener = xds.listener("cart.shop.svc.cluster.local:50051")
    assert listener.name == "cart.shop.svc.cluster.local:50051"
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(hcm)
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"
    assert hcm.route_config.virtual_hosts[0].routes[0].route.cluster == "shop/cart"
    assert xds.cluster.name == xds.load_assignment.cluster_name == "shop/cart"
    assert xds.cluster.eds_cluster_config.eds_config.HasField("ads")


def test_every_resource_round_trips_through_any() -> None:
    xds = translate(a_set("weighted_random", 2, 1))
    for message in (xds.listener("cart.shop"), xds.route, xds.cluster, xds.load_assignment):
        packed = pack(message)
        assert isinstance(packed, any_pb2.Any)
        back = type(message)()
        assert packed.Unpack(back) and back == message
    assert isinstance(xds.listener("x"), listener_pb2.Listener)
