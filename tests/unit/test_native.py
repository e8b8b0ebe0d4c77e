"""The Rust engine's Python face (weighbridge_native.Engine), without traffic: every
strategy's plan fits it, misfits are refused, routing and cursors answer as documented."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import weighbridge_native

from dataplane.native import LATENCY_BOUNDS_NS
from dataplane.routing import LATENCY_BOUNDS
from dataplane.strategies import REGISTRY, build_picker


@dataclass(frozen=True)
class B:
    weight: int


@pytest.fixture
def engine() -> Iterator[weighbridge_native.Engine]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        e = weighbridge_native.Engine(
            sock.fileno(),
            max_message_bytes=1 << 20,
            eager=False,  # no connections: nothing listens on these endpoints
            latency_bounds_ns=LATENCY_BOUNDS_NS,
        )
    yield e
    e.close()


ENDPOINTS = [(f"127.0.0.1:{p}", f"pod-{p}") for p in (1, 2, 3)]


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
@pytest.mark.parametrize("weights", [[1, 1, 1], [5, 3, 2], [40_000, 30_001, 1]])
def test_every_strategys_plan_fits_the_engine(
    engine: weighbridge_native.Engine, strategy: str, weights: list[int]
) -> None:
    picker = build_picker(strategy, [B(w) for w in weights], random.Random(3), empty_message="")
    plan = picker.plan()
    engine.apply("ns/svc", ENDPOINTS, plan.kind, list(plan.table), plan.start, plan.message)
    assert engine.route("svc.ns.svc.cluster.local:443", "/x.Y/Z") == ("ns/svc", "authority")
    if plan.kind == "cycle":  # the engine's rotation starts where the Python picker's does
        assert engine.cursor("ns/svc") == plan.start
        assert picker.explain(engine.cursor("ns/svc")) == picker.explain()
    else:
        assert engine.cursor("ns/svc") is None


def test_plans_that_do_not_fit_are_refused(engine: weighbridge_native.Engine) -> None:
    for plan, table in (("uniform", []), ("cycle", [3]), ("cumulative", [1, 2]), ("smooth", [1])):
        endpoints = [] if plan == "uniform" else ENDPOINTS
        with pytest.raises(ValueError, match="does not fit"):
            engine.apply("ns/svc", endpoints, plan, table, 0, "")
    with pytest.raises(ValueError, match="bad pick plan"):
        engine.apply("ns/svc", ENDPOINTS, "teleport", [1], 0, "")
    with pytest.raises(LookupError, match="no backend set for Service ns/svc"):
        engine.route("svc.ns", "/x.Y/Z")


def test_grpc_service_routes_counters_and_removal(engine: weighbridge_native.Engine) -> None:
    engine.apply("ns/a", ENDPOINTS[:1], "cycle", [0], 0, "")
    engine.apply("ns/b", ENDPOINTS[1:], "uniform", [], 0, "")
    engine.set_grpc_services({"pkg.Svc": "ns/b"})
    assert engine.route("proxy.example:8080", "/pkg.Svc/Get") == ("ns/b", "grpc-service")
    assert engine.route("a.ns", "/pkg.Svc/Get") == ("ns/a", "authority")
    rows = engine.stats("ns/b")
    assert sorted(r[1] for r in rows) == ["127.0.0.1:2", "127.0.0.1:3"]
    assert all(r[2:5] == (0, 0, 0) and len(r[6]) == len(LATENCY_BOUNDS) + 1 for r in rows)
    assert {h for h, _, _ in engine.backends("ns/a")} == {"127.0.0.1:1"}
    engine.remove("ns/b")
    assert engine.stats("ns/b") == []
    with pytest.raises(LookupError, match="no backend set for Service example/proxy"):
        engine.route("proxy.example:8080", "/pkg.Svc/Get")
    with pytest.raises(LookupError, match="no route for authority 'localhost:8080'"):
        engine.route("localhost:8080", "/pkg.Svc/Get")
    assert engine.counters() == (0, 0, [])
