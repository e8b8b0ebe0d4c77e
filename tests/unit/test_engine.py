"""The engine's Python face (dataplane.engine.NativeEngine over weighbridge_native), without
traffic: routes applied and removed, routing answers and misses, Explain, counters, refusals."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import weighbridge_native

from dataplane.engine import (
    FAILOVER_COUNTERS,
    NativeEngine,
    NoBackendError,
    NoRouteError,
    client_limits,
)
from dataplane.settings import ProxySettings
from dataplane.strategies import configure
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint

NO_FAILOVER = {
    "retry": None,
    "outlier": None,
    "health_check": None,
    "panic_threshold": 0,
    "stream_idle_timeout_s": 0.0,
    "debug": (True, False),
}


@pytest.fixture
def engine() -> Iterator[NativeEngine]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        # No connections: nothing listens on the endpoints below.
        e = NativeEngine(sock, ProxySettings(threads=2, eager_connections=False), seed=1)
    yield e
    e.close()


def backend_set(strategy: str, *weights: int, name: str = "svc", **kw: object) -> BackendSet:
    endpoints = tuple(
        Endpoint("127.0.0.1", 1 + i, weight=w, pod=f"pod-{i}") for i, w in enumerate(weights)
    )
    return BackendSet(namespace="ns", name=name, strategy=strategy, endpoints=endpoints, **kw)  # type: ignore[arg-type]


KEY = ServiceKey("ns/svc")


def test_routes_by_every_authority_form_and_explains_misses(engine: NativeEngine) -> None:
    engine.apply(KEY, configure(backend_set("round_robin", 1, 1)))
    for authority in ("svc.ns", "svc.ns:8080", "SVC.ns.svc", "svc.ns.svc.cluster.local.:443"):
        assert engine.route(authority, "/x.Y/Z") == (KEY, "authority")
    with pytest.raises(NoRouteError, match=r"no backend set for Service ns/other"):
        engine.route("other.ns", "/x.Y/Z")
    with pytest.raises(NoRouteError, match=r"no route for authority 'localhost:8080'"):
        engine.route("localhost:8080", "/x.Y/Z")


def test_grpc_service_routes_follow_the_table_and_removal(engine: NativeEngine) -> None:
    engine.apply(ServiceKey("ns/a"), configure(backend_set("round_robin", 1, name="a")))
    engine.apply(ServiceKey("ns/b"), configure(backend_set("random", 1, 1, name="b")))
    engine.set_grpc_services({"pkg.Svc": ServiceKey("ns/b")})
    assert engine.route("proxy.example:8080", "/pkg.Svc/Get") == ("ns/b", "grpc-service")
    assert engine.route("a.ns", "/pkg.Svc/Get") == ("ns/a", "authority"), "authority wins"
    assert {s.hostport for s in engine.stats(ServiceKey("ns/b"))} == {
        "127.0.0.1:1",
        "127.0.0.1:2",
    }
    engine.remove(ServiceKey("ns/b"))
    assert engine.stats(ServiceKey("ns/b")) == []
    with pytest.raises(NoRouteError):
        engine.route("proxy.example:8080", "/pkg.Svc/Get")


def test_explain_names_an_endpoint_of_the_set_and_why(engine: NativeEngine) -> None:
    engine.apply(KEY, configure(backend_set("weighted_round_robin", 3, 1)))
    hostport, why = engine.explain(KEY)
    assert hostport in ("127.0.0.1:1", "127.0.0.1:2")
    assert why.startswith("weighted_round_robin: step ") and "4-pick schedule" in why
    assert engine.explain(KEY) == (hostport, why), "explaining does not pick"


def test_an_empty_set_explains_itself(engine: NativeEngine) -> None:
    engine.apply(KEY, configure(backend_set("round_robin", 0, 0)))
    with pytest.raises(NoBackendError) as info:
        engine.explain(KEY)
    assert str(info.value) == (
        "Service ns/svc has no backend that can take requests "
        "(2 endpoints, none serving, not terminating and of weight > 0)"
    )
    engine.apply(KEY, configure(backend_set("round_robin")))
    with pytest.raises(NoBackendError, match=r"\(no endpoints\)"):
        engine.explain(KEY)
    with pytest.raises(NoBackendError, match="no backend set for Service ns/nope"):
        engine.explain(ServiceKey("ns/nope"))


def test_the_engine_refuses_what_it_cannot_execute(engine: NativeEngine) -> None:
    raw = engine._engine
    with pytest.raises(ValueError, match='unknown strategy "teleport"'):
        raw.apply("ns/svc", "teleport", [("127.0.0.1:1", "", 1)], 1, **NO_FAILOVER)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight 0"):
        raw.apply("ns/svc", "random", [("127.0.0.1:1", "", 0)], 1, **NO_FAILOVER)  # type: ignore[arg-type]


def test_failover_policies_are_applied_and_reported(engine: NativeEngine) -> None:
    """Health checks of endpoints nobody listens on fail: the engine reports them unhealthy
    (rows, events, counters) and Explain says the next endpoint is skipped."""
    options = {
        "retry": "on: unavailable; attempts: 3; per-try-timeout: 1s",
        "outlier-detection": "consecutive-failures: 3",
        "health-check": "interval: 100ms; unhealthy-threshold: 1",
        "panic-threshold": "0%",
    }
    engine.apply(KEY, configure(backend_set("round_robin", 1, 1, options=options)))
    for _ in range(100):
        rows = engine.stats(KEY)
        if all(r.state == "unhealthy" for r in rows):
            break
        time.sleep(0.05)
    assert {(r.hostport, r.state, r.ejections) for r in rows} == {
        ("127.0.0.1:1", "unhealthy", 0),
        ("127.0.0.1:2", "unhealthy", 0),
    }
    assert all("refused" in r.state_reason and r.state_since_unix > 0 for r in rows), rows
    events = engine.events()
    assert {(e.service, e.endpoint, e.state) for e in events} == {
        (KEY, "127.0.0.1:1", "unhealthy"),
        (KEY, "127.0.0.1:2", "unhealthy"),
    }
    counters = {c.counter: c.value for c in engine.failover_counters() if c.service == KEY}
    assert set(counters) == set(FAILOVER_COUNTERS)
    assert counters["health_checks_failed"] >= 2 and counters["health_checks_passed"] == 0
    assert engine.events_dropped == 0
    _, why = engine.explain(KEY)
    assert "is unhealthy" in why, why


def test_counters_and_threads_start_at_zero(engine: NativeEngine) -> None:
    counters = engine.counters()
    assert (counters.calls, counters.in_flight, dict(counters.local_errors)) == (0, 0, {})
    assert engine.threads == 2
    assert [(t.connections, t.open, t.calls) for t in engine.thread_stats()] == [(0, 0, 0)] * 2


def test_bad_engine_settings_are_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        common = {
            "max_message_bytes": 1,
            "eager": False,
            "latency_bounds_ns": [1],
            "max_backend_connections": 1,
            "handshake_timeout_s": 1.0,
            "keepalive_time_s": 1.0,
            "keepalive_timeout_s": 1.0,
            "retry_buffer_bytes": 1,
            "limits": client_limits(ProxySettings()),
        }
        with pytest.raises(ValueError, match="threads must be at least 1"):
            weighbridge_native.Engine(
                sock.fileno(),
                threads=0,
                max_connection_age_s=0.0,
                **common,  # type: ignore[arg-type]
            )
        with pytest.raises(ValueError, match="max_connection_age_s"):
            weighbridge_native.Engine(
                sock.fileno(),
                threads=1,
                max_connection_age_s=-1.0,
                **common,  # type: ignore[arg-type]
            )


def test_client_limits_refuse_what_would_disable_them() -> None:
    good = {
        "handshake_timeout_s": 10.0,
        "idle_timeout_s": 0.0,  # 0: off
        "max_connections": 1,
        "max_concurrent_streams": 1,
        "max_header_list_size": 1024,
        "keepalive_time_s": 0.0,  # 0: off
        "keepalive_timeout_s": 1.0,
        "backend_stream_wait_s": 1.0,
    }
    weighbridge_native.ClientLimits(**good)  # type: ignore[arg-type]
    for key, bad, message in (
        ("handshake_timeout_s", 0.0, "handshake_timeout_s must be > 0"),
        ("max_connections", 0, "max_connections must be at least 1"),
        ("max_concurrent_streams", 0, "max_concurrent_streams must be at least 1"),
        ("max_header_list_size", 1023, "at least 1024 bytes"),
        ("keepalive_timeout_s", float("nan"), "keepalive_timeout_s must be a number"),
        ("backend_stream_wait_s", -1.0, "backend_stream_wait_s must be a number"),
    ):
        with pytest.raises(ValueError, match=message):
            weighbridge_native.ClientLimits(**{**good, key: bad})  # type: ignore[arg-type]


def test_proxy_settings_refuse_bad_limits() -> None:
    for field, bad in (
        ("client_handshake_timeout_s", 0.0),
        ("client_idle_timeout_s", -1.0),
        ("max_client_connections", 0),
        ("client_max_concurrent_streams", 2**32),
        ("client_max_header_list_size", 100),
        ("stream_idle_timeout_s", float("inf")),
        ("client_keepalive_time_s", float("nan")),
        ("backend_stream_wait_s", 0.0),
    ):
        with pytest.raises(ValueError, match="must be"):
            ProxySettings(**{field: bad})  # type: ignore[arg-type]
