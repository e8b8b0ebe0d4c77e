"""weighted_random, the configuration side (the executor's tests are in native/src/strategy/)."""

from __future__ import annotations

from dataplane.strategies import configure
from dataplane.strategies.weightedrandom import STRATEGY
from weighbridge.model import BackendSet, Endpoint


def test_weighted_random_passes_the_weights() -> None:
    """weighted_random passes each endpoint's weight to the engine."""
    assert STRATEGY.name == "weighted_random"
    assert STRATEGY.weighted is True
    endpoints = tuple(Endpoint("10.0.0.1", 80 + i, weight=w) for i, w in enumerate((5, 3, 2)))
    route = configure(BackendSet("ns", "svc", "weighted_random", endpoints))
    assert route.strategy == "weighted_random"
    assert tuple(e.weight for e in route.endpoints) == (5, 3, 2)


def test_weighted_random_only_hands_over_eligible_endpoints() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, weight=2),
        Endpoint("10.0.0.2", 80, weight=2, terminating=True),
        Endpoint("10.0.0.3", 80, weight=2, serving=False),
        Endpoint("10.0.0.4", 80, weight=0),
    )
    route = configure(BackendSet("ns", "svc", "weighted_random", endpoints))
    assert [e.hostport for e in route.endpoints] == ["10.0.0.1:80"]
    assert route.total == 4
