"""The configuration side of each strategy (each executor's own tests are beside it in
native/src/strategy/): what the engine is handed for a backend set."""

from __future__ import annotations

import pytest
import weighbridge_native

from dataplane.strategies import REGISTRY, configure
from weighbridge.model import STRATEGIES, BackendSet, Endpoint

WEIGHTED = {
    "weighted_round_robin": True,
    "weighted_random": True,
    "least_request": True,
    "peak_ewma": True,
    "ring_hash": True,
}


def test_the_model_the_configuration_and_the_engine_know_the_same_strategies() -> None:
    assert set(REGISTRY) == set(STRATEGIES) == set(weighbridge_native.STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_weighted_strategies_pass_weights_and_the_others_give_each_1_over_n(name: str) -> None:
    strategy = REGISTRY[name]
    assert strategy.weighted is WEIGHTED.get(name, False)
    endpoints = tuple(Endpoint("10.0.0.1", 80 + i, weight=w) for i, w in enumerate((5, 3, 2)))
    route = configure(BackendSet("ns", "svc", name, endpoints))
    assert route.strategy == name
    expected = (5, 3, 2) if strategy.weighted else (1, 1, 1)
    assert tuple(e.weight for e in route.endpoints) == expected


@pytest.mark.parametrize("name", STRATEGIES)
def test_only_eligible_endpoints_are_handed_over(name: str) -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, weight=2, pod="p1"),
        Endpoint("10.0.0.2", 80, weight=2, terminating=True),
        Endpoint("10.0.0.3", 80, weight=2, serving=False),
        Endpoint("10.0.0.4", 80, weight=0),
    )
    route = configure(BackendSet("ns", "svc", name, endpoints))
    assert [(e.hostport, e.pod) for e in route.endpoints] == [("10.0.0.1:80", "p1")]
    assert route.total == 4
