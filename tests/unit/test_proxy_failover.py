"""The proxy's side of failover, on a fake engine: what it hands the engine for a set's
policies, and what it reports of the engine's endpoint states, counters and events (admin API,
metrics, logs)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import CapturingLogger

from dataplane.admin import AdminService
from dataplane.app import follow_engine_events, log_engine_events
from dataplane.engine import EndpointEvent, FailoverCount
from dataplane.metrics import ProxyCollector
from dataplane.routing import Routes
from dataplane.subscription import Subscription
from tests.unit.fakeengine import FakeEngine, stats_row
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint
from weighbridge.policy import DEFAULTS, HealthCheck, PanicThreshold, RetryPolicy
from weighbridge.v1 import admin_pb2 as api

KEY = ServiceKey("ns/svc")


def backend_set(options: dict[str, str] | None = None) -> BackendSet:
    return BackendSet(
        namespace="ns",
        name="svc",
        strategy="round_robin",
        endpoints=(
            Endpoint("10.0.0.1", 80, pod="ok"),
            Endpoint("10.0.0.2", 80, pod="ejected"),
            Endpoint("10.0.0.3", 80, pod="leaving", terminating=True),
            Endpoint("10.0.0.4", 80, pod="starting", serving=False),
            Endpoint("10.0.0.5", 80, pod="drained", weight=0),
        ),
        options=options or {},
    )


def applied(options: dict[str, str] | None = None) -> tuple[FakeEngine, Routes]:
    engine = FakeEngine()
    routes = Routes(engine)
    routes.apply(KEY, backend_set(options), 7)
    engine.rows = [
        stats_row("ns/svc", "10.0.0.1:80", since=1.5),
        stats_row(
            "ns/svc",
            "10.0.0.2:80",
            state="ejected",
            reason="5 consecutive failures: UNAVAILABLE",
            since=1700000000.25,
            ejections=2,
        ),
    ]
    return engine, routes


def test_the_engine_gets_the_sets_policies() -> None:
    engine, _ = applied(
        {
            "retry": "on: unavailable; attempts: 3",
            "outlier-detection": "off",
            "health-check": "service: a.B",
            "panic-threshold": "0%",
        }
    )
    failover = engine.routes[KEY].failover
    assert failover.retry == RetryPolicy(on=(14,), attempts=3)
    assert failover.outlier_detection is None
    assert failover.health_check == HealthCheck(service="a.B")
    assert failover.panic_threshold == PanicThreshold(percent=0)


def test_a_set_without_policies_gets_the_defaults() -> None:
    engine, _ = applied()
    assert engine.routes[KEY].failover == DEFAULTS


def test_a_malformed_option_gets_its_default_and_the_rest_still_apply() -> None:
    engine, _ = applied({"retry": "on: sometimes", "panic-threshold": "10%"})
    failover = engine.routes[KEY].failover
    assert failover.retry is DEFAULTS.retry
    assert failover.panic_threshold == PanicThreshold(percent=10)
    assert [e.hostport for e in engine.routes[KEY].endpoints] == ["10.0.0.1:80", "10.0.0.2:80"]


async def test_admin_shows_each_endpoints_state_reason_and_ejections() -> None:
    engine, routes = applied()
    admin = AdminService("p", routes, engine, Subscription(None, KeyScheme("/wb/"), routes.apply))  # type: ignore[arg-type]
    response = await admin.ListBackendSets(api.ListBackendSetsRequest(service=KEY), None)  # type: ignore[arg-type]
    view = {
        b.endpoint.pod: (b.state, b.state_reason, b.state_since_unix, b.ejections)
        for b in response.services[0].backends
    }
    assert view == {
        "ok": ("healthy", "", 1.5, 0),
        "ejected": ("ejected", "5 consecutive failures: UNAVAILABLE", 1700000000.25, 2),
        "leaving": ("draining", "terminating", 0.0, 0),
        "starting": ("draining", "not serving", 0.0, 0),
        "drained": ("draining", "weight 0", 0.0, 0),
    }


def metrics(engine: FakeEngine, routes: Routes) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    sub = Subscription(None, KeyScheme("/wb/"), routes.apply)  # type: ignore[arg-type]
    registry.register(ProxyCollector(engine, routes, sub))
    return registry


def test_metrics_count_endpoints_by_state_and_the_failover_counters() -> None:
    engine, routes = applied()
    engine.failover = [
        FailoverCount(KEY, "transparent_retries", 4),
        FailoverCount(KEY, "retries", 3),
        FailoverCount(KEY, "retry_budget_exhausted", 2),
        FailoverCount(KEY, "ejections", 1),
        FailoverCount(KEY, "health_checks_passed", 10),
        FailoverCount(KEY, "health_checks_failed", 5),
        FailoverCount(KEY, "debug_metadata", 7),
        FailoverCount(KEY, "endpoint_overrides", 8),
        FailoverCount(KEY, "a_counter_of_a_newer_engine", 9),
    ]
    engine.events_dropped = 6
    registry = metrics(engine, routes)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"service": KEY, **labels})

    endpoints = {
        state: sample("weighbridge_proxy_endpoints", state=state)
        for state in ("healthy", "connect_failing", "ejected", "unhealthy", "draining")
    }
    assert endpoints == {
        "healthy": 1,
        "connect_failing": 0,
        "ejected": 1,
        "unhealthy": 0,
        "draining": 3,
    }
    assert sample("weighbridge_proxy_retries_total", kind="transparent") == 4
    assert sample("weighbridge_proxy_retries_total", kind="configured") == 3
    assert sample("weighbridge_proxy_retry_budget_exhausted_total") == 2
    assert sample("weighbridge_proxy_ejections_total") == 1
    assert sample("weighbridge_proxy_health_checks_total", result="passed") == 10
    assert sample("weighbridge_proxy_health_checks_total", result="failed") == 5
    assert sample("weighbridge_proxy_debug_calls_total", kind="metadata") == 7
    assert sample("weighbridge_proxy_debug_calls_total", kind="endpoint_override") == 8
    assert registry.get_sample_value("weighbridge_proxy_state_events_dropped_total") == 6
    assert "newer_engine" not in generate_latest(registry).decode()


def json_logger() -> tuple[Any, CapturingLogger]:
    out = CapturingLogger()
    logger = structlog.wrap_logger(
        out,
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(0),
    )
    return logger, out


def test_each_engine_event_is_one_json_log_line() -> None:
    engine = FakeEngine()
    engine.queued = [
        EndpointEvent(1700000000.5, KEY, "10.0.0.2:80", "ejected", "5 consecutive failures"),
        EndpointEvent(1700000030.5, KEY, "10.0.0.2:80", "healthy", "ejection over"),
        EndpointEvent(1700000031.0, None, "10.0.0.3:80", "connection_lost", "PING timed out"),
    ]
    logger, out = json_logger()
    assert log_engine_events(engine, logger) == 3
    lines = [(call.method_name, json.loads(call.args[0])) for call in out.calls]
    assert [(level, line["event"], line["state"]) for level, line in lines] == [
        ("warning", "endpoint state", "ejected"),
        ("info", "endpoint state", "healthy"),
        ("warning", "endpoint state", "connection_lost"),
    ]
    first = lines[0][1]
    assert {k: first[k] for k in ("service", "endpoint", "reason", "at")} == {
        "service": "ns/svc",
        "endpoint": "10.0.0.2:80",
        "reason": "5 consecutive failures",
        "at": "2023-11-14T22:13:20.500000+00:00",
    }
    assert lines[2][1]["service"] is None, "a backend connection's change is no Service's"
    assert log_engine_events(engine, logger) == 0, "drained"


async def test_events_are_followed_until_cancelled() -> None:
    engine = FakeEngine()
    engine.queued = [EndpointEvent(1.0, KEY, "10.0.0.1:80", "unhealthy", "NOT_SERVING")]
    task = asyncio.create_task(follow_engine_events(engine, interval=0.01))
    await asyncio.sleep(0.05)
    assert engine.queued == []
    engine.queued = [EndpointEvent(2.0, KEY, "10.0.0.1:80", "healthy", "")]
    await asyncio.sleep(0.05)
    assert engine.queued == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class HangingEtcd:
    """An etcd that never answers (the subscription waits until cancelled)."""

    async def get_prefix(self, prefix: bytes) -> None:
        await asyncio.Event().wait()


async def test_a_running_proxy_logs_engine_events_and_the_last_ones_before_the_engine_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataplane import app
    from dataplane.settings import ProxySettings

    engine = FakeEngine()  # its events() raises once closed
    monkeypatch.setattr(app, "NativeEngine", lambda sock, settings, seed=None: engine)
    logged: list[EndpointEvent] = []

    def log_events(engine: FakeEngine) -> int:
        events = engine.events()
        logged.extend(events)
        return len(events)

    monkeypatch.setattr(app, "log_engine_events", log_events)
    proxy = app.Proxy(
        etcd=HangingEtcd(),  # type: ignore[arg-type]
        scheme=KeyScheme("/wb/"),
        proxy_id="p",
        settings=ProxySettings(
            listen="127.0.0.1:0",
            admin_listen=None,
            health_listen=None,
            metrics_listen=None,
            publish_status=False,
        ),
    )
    first = EndpointEvent(1.0, KEY, "10.0.0.1:80", "ejected", "5 consecutive failures")
    engine.queued = [first]
    await proxy.start()
    for _ in range(100):
        if logged:
            break
        await asyncio.sleep(0.05)
    assert logged == [first]
    last = EndpointEvent(2.0, KEY, "10.0.0.1:80", "healthy", "")
    engine.queued = [last]
    await proxy.stop(grace=0)
    assert logged == [first, last]
    assert engine.closed
