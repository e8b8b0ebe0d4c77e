"""round_robin, the configuration side (the executor's tests are in native/src/strategy/)."""

from __future__ import annotations

from dataplane.strategies import configure
from dataplane.strategies.roundrobin import STRATEGY
from weighbridge.model import BackendSet, Endpoint


def test_round_robin_ignores_the_weights() -> None:
    """round_robin gives every endpoint the same weight: P_i = 1/N."""
    assert STRATEGY.name == "round_robin"
    assert STRATEGY.weighted is False
    endpoints = tuple(Endpoint("10.0.0.1", 80 + i, weight=w) for i, w in enumerate((5, 3, 2)))
    route = configure(BackendSet("ns", "svc", "round_robin", endpoints))
    assert route.strategy == "round_robin"
    assert tuple(e.weight for e in route.endpoints) == (1, 1, 1)


def test_round_robin_only_hands_over_eligible_endpoints() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, weight=2),
        Endpoint("10.0.0.2", 80, weight=2, terminating=True),
        Endpoint("10.0.0.3", 80, weight=2, serving=False),
        Endpoint("10.0.0.4", 80, weight=0),
    )
    route = configure(BackendSet("ns", "svc", "round_robin", endpoints))
    assert [e.hostport for e in route.endpoints] == ["10.0.0.1:80"]
    assert route.total == 4
