"""wbctl simulate without an API server: the engine's picks without calls, the controller's set
from Kubernetes objects with overridden annotations, the shares per pod and label group, and
the annotations file."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator

import pytest

from controlplane.annotations import parse_service
from controlplane.errors import AnnotationError
from dataplane.engine import NativeEngine, NoBackendError
from dataplane.settings import ProxySettings
from dataplane.simulating import simulate_picks
from dataplane.strategies import configure
from tests.integration import kubeobjects as k
from wbtools import simulating
from wbtools.cli import add_commands
from weighbridge import wbctl
from weighbridge.errors import WeighbridgeError
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint

CANARY = {
    "weighbridge.io/strategy": "weighted_round_robin",
    "weighbridge.io/weights": "version=v1: 90%\nversion=v2: 10%",
}


@pytest.fixture
def engine() -> Iterator[NativeEngine]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        e = NativeEngine(sock, ProxySettings(threads=1, eager_connections=False), seed=1)
    yield e
    e.close()


def three(strategy: str, *weights: int) -> BackendSet:
    endpoints = tuple(Endpoint(k.address(i), 50051, weight=w) for i, w in enumerate(weights))
    return BackendSet("ns", "svc", strategy, endpoints)


def test_engine_simulate_counts_its_real_picks_and_no_call(engine: NativeEngine) -> None:
    key = ServiceKey("ns/svc")
    engine.apply(key, configure(three("weighted_round_robin", 9, 9, 2)))
    assert engine.simulate(key, 2000) == {
        k.address(0) + ":50051": 900,
        k.address(1) + ":50051": 900,
        k.address(2) + ":50051": 200,
    }
    assert all(s.requests == 0 for s in engine.stats(key)), "picks are not calls"
    assert engine.counters().calls == 0
    with pytest.raises(NoBackendError, match="no backend set for Service ns/other"):
        engine.simulate(ServiceKey("ns/other"), 10)


def test_simulated_picks_need_no_connection_nor_certificate() -> None:
    backend_set = BackendSet(
        "ns",
        "svc",
        "round_robin",
        three("round_robin", 1, 1, 1).endpoints,
        options={
            "health-check": "service: x.Y",
            "backend-tls": "ca: /nonexistent/ca.pem",
        },
    )
    assert set(simulate_picks(backend_set, 300).values()) == {100}
    with pytest.raises(NoBackendError, match="has no backend that can take requests"):
        simulate_picks(BackendSet("ns", "svc", "random"), 1)


def live(annotations: dict[str, str] | None = None) -> simulating.Live:
    """A Service with 2 pods of version v1 and 1 of v2, and a terminating pod."""
    eps = [
        k.Ep(k.address(0), "v1-a"),
        k.Ep(k.address(1), "v1-b"),
        k.Ep(k.address(2), "v2-a"),
        k.Ep(k.address(3), "v1-old", serving=False, terminating=True),
    ]
    version = {"v1-a": "v1", "v1-b": "v1", "v2-a": "v2", "v1-old": "v1"}
    return simulating.Live(
        service=k.service("shop", "cart", CANARY if annotations is None else annotations),
        source="endpointslices",
        slices=(k.endpoint_slice("shop", "cart", "cart-1", eps),),
        pods={p: k.pod("shop", p, {"version": v}) for p, v in version.items()},
    )


def test_shares_of_a_canary_per_pod_and_per_group() -> None:
    sim = simulating.simulate(live(), {}, calls=2000, seed=1)
    by_pod = {e.pod: e.hostport for e in sim.backend_set.endpoints}
    assert {p: float(sim.expected.get(h, 0)) for p, h in by_pod.items()} == {
        "v1-a": 0.45,
        "v1-b": 0.45,
        "v2-a": 0.10,
        "v1-old": 0.0,
    }
    assert {p: sim.picks.get(h, 0) for p, h in by_pod.items()} == {
        "v1-a": 900,
        "v1-b": 900,
        "v2-a": 200,
        "v1-old": 0,
    }, "weighted_round_robin is exact over whole periods (9:9:2)"
    assert [(g.selector, g.pods, float(g.expected), g.picks) for g in sim.groups] == [
        ("version=v1", 2, 0.9, 1800),
        ("version=v2", 1, 0.1, 200),
    ]
    assert sim.problems == ()

    out = io.StringIO()
    simulating.print_simulation(sim, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "Service shop/cart: weighted_round_robin, 4 endpoints (3 take calls), "
        "from endpointslices; nothing written"
    )
    assert "  weighbridge.io/weights: version=v1: 90%; version=v2: 10%" in lines
    table = {line.split()[0]: line.split() for line in lines if line.startswith(("v1", "v2"))}
    assert table["v1-a"][2:] == ["9", "version=v1", "45.00%", "45.00%"]
    assert table["v2-a"][2:] == ["2", "version=v2", "10.00%", "10.00%"]
    assert table["v1-old"][2:] == ["0", "-", "-", "(takes", "no", "calls)", "-"]
    assert lines[-3].split() == ["GROUP", "PODS", "EXPECTED", "SIMULATED", "(2000", "picks)"]
    assert lines[-2].split() == ["version=v1", "2", "90.00%", "90.00%"]

    doc = simulating.to_json(sim)
    assert doc["calls"] == 2000
    assert doc["groups"][1] == {
        "selector": "version=v2",
        "pods": 1,
        "expectedShare": 0.1,
        "picks": 200,
        "simulatedShare": 0.1,
    }
    assert json.loads(json.dumps(doc)) == doc


def test_overrides_replace_add_and_remove_annotations() -> None:
    overrides = simulating.parse_overrides(
        "weighbridge.io/strategy: round_robin\n"
        "weighbridge.io/weights: null\n"
        "weighbridge.io/panic-threshold: 0%\n"
    )
    sim = simulating.simulate(live(), overrides, calls=300)
    assert sim.backend_set.strategy == "round_robin"
    assert sim.groups == ()
    assert sorted(sim.picks.values()) == [100, 100, 100]
    assert sim.annotations == {
        "weighbridge.io/strategy": "round_robin",
        "weighbridge.io/panic-threshold": "0%",
    }
    assert sim.backend_set.options == {"panic-threshold": "0%"}


def test_a_group_without_pods_gives_its_share_to_the_others() -> None:
    overrides = {"weighbridge.io/weights": "version=v1: 80%\nversion=v3: 20%"}
    sim = simulating.simulate(live(), overrides, calls=0)
    assert [(g.selector, g.pods, float(g.expected)) for g in sim.groups] == [
        ("version=v1", 2, 1.0),
        ("version=v3", 0, 0.0),
    ]
    assert sim.picks == {}


def test_invalid_annotations_fail_in_the_controllers_words() -> None:
    bad = {"weighbridge.io/weights": "version=v1: 90%\nversion=v2: 20%"}
    with pytest.raises(AnnotationError) as caught:
        simulating.simulate(live(), bad, calls=0)
    with pytest.raises(AnnotationError) as controller:
        parse_service({**CANARY, **bad})
    assert (caught.value.reason, caught.value.message) == (
        controller.value.reason,
        controller.value.message,
    )
    with pytest.raises(AnnotationError, match="Service has no port 'http'"):
        simulating.simulate(live(), {"weighbridge.io/port": "http"}, calls=0)
    with pytest.raises(WeighbridgeError, match=r"has no weighbridge\.io/strategy annotation"):
        simulating.simulate(live({}), {}, calls=0)


def test_bad_pod_weights_are_warnings_as_the_controller_posts_them() -> None:
    state = live()
    pods = dict(state.pods or {})
    pods["v2-a"] = k.pod("shop", "v2-a", {"version": "v2"}, {"weighbridge.io/weight": "lots"})
    sim = simulating.simulate(
        simulating.Live(state.service, state.source, state.slices, pods=pods), {}, calls=0
    )
    assert [p.reason for p in sim.problems] == ["InvalidPodWeight"]
    out = io.StringIO()
    simulating.print_simulation(sim, out)
    assert "warning: InvalidPodWeight: " in out.getvalue()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("- a\n- b\n", "expected a map of annotation: value, got list"),
        ("a: [1]\n", "a: a value must be text"),
        ("a: true\n", "a: a value must be text"),
        ("a: 'x\n", "not YAML or JSON"),
        ("1: x\n", "annotation name 1 is not a string"),
    ],
)
def test_annotation_files_are_checked(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        simulating.parse_overrides(text)


def test_annotation_files_are_yaml_or_json() -> None:
    assert simulating.parse_overrides('{"weighbridge.io/port": 50051}') == {
        "weighbridge.io/port": "50051"
    }
    assert simulating.parse_overrides("") == {}


def test_the_command_line() -> None:
    args = wbctl.build_parser(add_commands).parse_args(
        ["simulate", "shop/cart", "--annotations", "-", "--calls", "50", "-o", "json"]
    )
    assert (args.command, args.service, args.annotations, args.calls, args.output) == (
        "simulate",
        "shop/cart",
        "-",
        50,
        "json",
    )
    args = wbctl.build_parser(add_commands).parse_args(["spread", "shop/cart"])
    assert (args.admin, args.interval) == ([], 0.0)
