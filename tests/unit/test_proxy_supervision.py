"""The proxy's subscription under failure, on a fake engine and a fake etcd: a set that cannot
be applied is reported and retried while the others go on, the subscription starts over after a
failure of its own, and health and metrics say so meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from dataplane import subscription
from dataplane.health import SYNC, follow_sync
from dataplane.metrics import ProxyCollector
from dataplane.routing import Routes
from dataplane.strategies import RouteConfig
from dataplane.subscription import Subscription
from tests.unit.fakeengine import FakeEngine
from tests.unit.fakeetcd import FakeEtcd
from weighbridge.errors import EtcdUnavailableError
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint

SCHEME = KeyScheme("/wb/")
GOOD, BAD, LATER = ServiceKey("ns/good"), ServiceKey("ns/bad"), ServiceKey("ns/later")


def backend_set(key: ServiceKey, *addresses: str, **kw: Any) -> BackendSet:
    ns, name = key.split("/")
    return BackendSet(
        namespace=ns,
        name=name,
        strategy="round_robin",
        endpoints=tuple(Endpoint(a, 80) for a in addresses or ("10.0.0.1",)),
        **kw,
    )


class FailingEngine(FakeEngine):
    """Raises ``failures[key]`` when told anything about ``key``; counts what it is told."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[ServiceKey, Exception] = {}
        self.applied: list[ServiceKey] = []

    def apply(self, key: ServiceKey, route: RouteConfig) -> None:
        if key in self.failures:
            raise self.failures[key]
        self.applied.append(key)
        super().apply(key, route)

    def remove(self, key: ServiceKey) -> None:
        if key in self.failures:
            raise self.failures[key]
        super().remove(key)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not reached in {timeout}s: {what}"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def following(etcd: FakeEtcd, apply: Any, **retry: float) -> AsyncIterator[Subscription]:
    sub = Subscription(
        etcd,  # type: ignore[arg-type]
        SCHEME,
        apply,
        retry_first=retry.get("first", 0.05),
        retry_max=retry.get("max", 0.2),
    )
    task = asyncio.create_task(sub.run())
    try:
        await asyncio.wait_for(sub.listed.wait(), 5)
        yield sub
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# Routes: one set's failure is that set's alone.


def test_a_set_whose_apply_raises_keeps_the_previous_set_and_is_reported(
    logs: list[dict[str, Any]],
) -> None:
    engine = FailingEngine()
    routes = Routes(engine)
    assert routes.apply(GOOD, backend_set(GOOD, "10.0.0.1", generation=1), 5)
    engine.failures[GOOD] = RuntimeError("engine bug")
    assert not routes.apply(GOOD, backend_set(GOOD, "10.0.0.2", generation=2), 9)
    assert routes.services[GOOD].mod_revision == 5, "calls keep the set applied before"
    assert [e.hostport for e in engine.routes[GOOD].endpoints] == ["10.0.0.1:80"]
    failure = routes.unapplied[GOOD]
    assert (failure.mod_revision, failure.generation, failure.reason, failure.error) == (
        9,
        2,
        "error",
        "RuntimeError: engine bug",
    )
    assert (failure.failures, failure.serving_revision) == (1, 5)
    assert routes.apply_failures == {"rejected": 0, "error": 1}
    (line,) = events(logs, "backend_set_not_applied")
    assert line["log_level"] == "error"
    assert {k: line[k] for k in ("service", "mod_revision", "generation", "reason")} == {
        "service": GOOD,
        "mod_revision": 9,
        "generation": 2,
        "reason": "error",
    }
    assert isinstance(line["exc_info"], RuntimeError), "a bug is logged with its traceback"

    assert not routes.apply(GOOD, backend_set(GOOD, "10.0.0.2", generation=2), 9)
    again = routes.unapplied[GOOD]
    assert (again.failures, again.since_unix) == (2, failure.since_unix)
    del engine.failures[GOOD]
    assert routes.apply(GOOD, backend_set(GOOD, "10.0.0.2", generation=2), 9)
    assert routes.unapplied == {}
    assert [e.hostport for e in engine.routes[GOOD].endpoints] == ["10.0.0.2:80"]


def test_a_set_the_engine_refuses_is_rejected_without_a_traceback(
    logs: list[dict[str, Any]],
) -> None:
    engine = FailingEngine()
    engine.failures[GOOD] = ValueError("Service ns/good: backend TLS: no CA bundle 'internal'")
    routes = Routes(engine)
    assert not routes.apply(GOOD, backend_set(GOOD), 3)
    assert GOOD not in routes.services
    assert routes.unapplied[GOOD].reason == "rejected"
    assert routes.unapplied[GOOD].serving_revision is None
    assert routes.apply_failures == {"rejected": 1, "error": 0}
    (line,) = events(logs, "backend_set_not_applied")
    assert "no CA bundle 'internal'" in line["error"]
    assert line["exc_info"] is None


def test_a_deletion_that_fails_keeps_the_set_so_that_it_can_be_tried_again() -> None:
    engine = FailingEngine()
    routes = Routes(engine)
    routes.apply(GOOD, backend_set(GOOD), 3)
    engine.failures[GOOD] = RuntimeError("engine bug")
    assert not routes.apply(GOOD, None, 4)
    assert GOOD in routes.services and GOOD in engine.routes
    del engine.failures[GOOD]
    assert routes.apply(GOOD, None, 4)
    assert GOOD not in routes.services and GOOD not in engine.routes
    assert routes.unapplied == {}


def test_grpc_service_names_the_engine_did_not_take_are_sent_again() -> None:
    engine = FailingEngine()
    routes = Routes(engine)
    told = engine.set_grpc_services

    def refuse(table: object) -> None:
        raise RuntimeError("busy")

    engine.set_grpc_services = refuse  # type: ignore[method-assign]
    assert not routes.apply(GOOD, backend_set(GOOD, grpc_services=("shop.Cart",)), 3)
    assert engine.grpc_services == {}
    engine.set_grpc_services = told  # type: ignore[method-assign]
    assert routes.apply(GOOD, backend_set(GOOD, grpc_services=("shop.Cart",)), 3)
    assert engine.grpc_services == {"shop.Cart": GOOD}


# The subscription: the others go on, the failed one is retried with backoff.


async def test_a_set_that_does_not_apply_is_retried_while_the_others_and_later_changes_apply(
    logs: list[dict[str, Any]],
) -> None:
    etcd = FakeEtcd(SCHEME)
    engine = FailingEngine()
    engine.failures[BAD] = RuntimeError("engine bug")
    routes = Routes(engine)
    etcd.put(backend_set(BAD))  # listed first: it must not stop the one after it
    etcd.put(backend_set(GOOD))
    async with following(etcd, routes.apply) as sub:
        assert set(routes.services) == {GOOD}
        bad_revision = routes.unapplied[BAD].mod_revision
        assert sub.applied_revision == bad_revision - 1, "the status key shows the proxy behind"
        later = etcd.put(backend_set(LATER))
        await until(lambda: LATER in routes.services, "a later change applied")
        assert sub.applied_revision == bad_revision - 1
        # Retried by re-listing, with backoff, while it fails.
        await until(lambda: routes.unapplied[BAD].failures >= 4, "retries")
        assert events(logs, "backend_sets_retried")[0]["services"] == [BAD]
        assert sub.relists >= 3
        del engine.failures[BAD]
        await until(lambda: BAD in routes.services, "the retry applied it")
        assert routes.unapplied == {}
        assert sub.applied_revision == later
        relists = sub.relists
        await asyncio.sleep(0.5)
        assert sub.relists == relists, "no more retries once everything applied"
        assert sub.connected


@pytest.mark.parametrize("failing", ["a set", "the subscription"])
async def test_retries_back_off_from_the_first_delay_to_the_longest(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """While a set does not apply, or while the subscription itself keeps failing on it (an
    applier that raises), the re-lists come further and further apart."""
    monkeypatch.setattr(subscription, "_jitter", lambda delay: delay)
    etcd = FakeEtcd(SCHEME)
    engine = FailingEngine()
    engine.failures[BAD] = RuntimeError("engine bug")
    routes = Routes(engine)

    def raising(key: ServiceKey, backend_set: BackendSet | None, revision: int) -> bool:
        raise RuntimeError("applier bug")

    etcd.put(backend_set(BAD))
    sub = Subscription(
        etcd,  # type: ignore[arg-type]
        SCHEME,
        routes.apply if failing == "a set" else raising,
        retry_first=0.05,
        retry_max=0.2,
    )
    task = asyncio.create_task(sub.run())
    try:
        await until(lambda: len(etcd.lists) >= 6, "five retries", timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    gaps = [b - a for a, b in zip(etcd.lists, etcd.lists[1:], strict=False)][:5]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        assert expected <= gap < expected * 1.5 + 0.1, gaps
    assert sub.failures == (0 if failing == "a set" else len(etcd.lists))


async def test_a_relist_applies_only_what_changed_or_did_not_apply() -> None:
    etcd = FakeEtcd(SCHEME)
    engine = FailingEngine()
    routes = Routes(engine)
    etcd.put(backend_set(GOOD))
    etcd.put(backend_set(LATER))
    async with following(etcd, routes.apply) as sub:
        assert sorted(engine.applied) == [GOOD, LATER]
        etcd.break_watches(EtcdUnavailableError("stream lost"))
        await until(lambda: sub.relists == 1 and sub.connected, "a relist")
        # Meanwhile GOOD changed and LATER went: only that reaches the engine.
        etcd.put(backend_set(GOOD, "10.0.0.9"))
        await until(lambda: engine.applied.count(GOOD) == 2, "the change applied")
        assert engine.applied.count(LATER) == 1, "an unchanged set keeps its picker"


async def test_a_failure_of_the_subscription_itself_is_logged_counted_and_it_starts_over(
    logs: list[dict[str, Any]],
) -> None:
    etcd = FakeEtcd(SCHEME)
    engine = FakeEngine()
    routes = Routes(engine)
    broken = {GOOD}

    def buggy_apply(key: ServiceKey, backend_set: BackendSet | None, revision: int) -> bool:
        """An applier that raises instead of reporting: a bug the subscription outlives."""
        if key in broken:
            broken.discard(key)
            raise KeyError(key)
        return routes.apply(key, backend_set, revision)

    etcd.put(backend_set(LATER))
    async with following(etcd, buggy_apply) as sub:
        etcd.put(backend_set(GOOD))
        await until(lambda: sub.failures == 1, "the failure counted")
        assert not sub.connected, "out of sync until it has listed again"
        assert sub.last_error == "KeyError: 'ns/good'"
        (line,) = events(logs, "subscription_failed")
        assert line["log_level"] == "error" and line["exc_info"] is True
        assert LATER in routes.services, "the last sets are served meanwhile"
        await until(lambda: GOOD in routes.services and sub.connected, "started over")
        assert sub.relists == 1
        etcd.put(backend_set(GOOD, "10.0.0.2"))
        await until(
            lambda: [e.hostport for e in engine.routes[GOOD].endpoints] == ["10.0.0.2:80"],
            "changes after it apply",
        )


async def test_a_deleted_set_that_never_applied_is_no_longer_awaited() -> None:
    etcd = FakeEtcd(SCHEME)
    engine = FailingEngine()
    engine.failures[BAD] = RuntimeError("engine bug")
    routes = Routes(engine)
    etcd.put(backend_set(BAD))
    async with following(etcd, routes.apply) as sub:
        assert BAD in routes.unapplied
        deleted = etcd.delete(BAD)
        await until(lambda: not routes.unapplied, "the deletion cleared it")
        assert sub.applied_revision == deleted


# Health and metrics.


async def status(servicer: Any, service: str) -> int:
    class Context:
        async def abort(self, code: object, details: str) -> None:
            raise AssertionError(details)

    reply = await servicer.Check(health_pb2.HealthCheckRequest(service=service), Context())
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_sync_health_and_metrics_say_when_a_set_cannot_be_applied_and_recover(
    logs: list[dict[str, Any]],
) -> None:
    etcd = FakeEtcd(SCHEME)
    engine = FailingEngine()
    routes = Routes(engine)
    servicer = health_aio.HealthServicer()
    await servicer.set("", SERVING)
    etcd.put(backend_set(GOOD))
    registry = CollectorRegistry(auto_describe=False)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    async with following(etcd, routes.apply, first=0.05, max=0.05) as sub:
        registry.register(ProxyCollector(engine, routes, sub))
        follower = asyncio.create_task(follow_sync(servicer, sub, routes, interval=0.01))
        try:
            await until(lambda: bool(events(logs, "proxy_sync_changed")), "in sync")
            assert await status(servicer, SYNC) == SERVING
            assert sample("weighbridge_proxy_in_sync") == 1
            engine.failures[BAD] = RuntimeError("engine bug")
            etcd.put(backend_set(BAD))
            await until(lambda: len(events(logs, "proxy_sync_changed")) == 2, "out of sync")
            assert await status(servicer, SYNC) == NOT_SERVING
            assert await status(servicer, "") == SERVING, "readiness is not the sync's"
            out = events(logs, "proxy_sync_changed")[1]
            assert (out["log_level"], out["in_sync"], out["unapplied"]) == (
                "warning",
                False,
                [BAD],
            )
            assert sample("weighbridge_proxy_in_sync") == 0
            assert sample("weighbridge_proxy_backend_sets_unapplied", reason="error") == 1
            assert sample("weighbridge_proxy_backend_sets_unapplied", reason="rejected") == 0
            failures = sample("weighbridge_proxy_backend_set_apply_failures_total", reason="error")
            assert failures is not None and failures >= 1
            del engine.failures[BAD]
            await until(lambda: len(events(logs, "proxy_sync_changed")) == 3, "in sync again")
            assert await status(servicer, SYNC) == SERVING
            assert sample("weighbridge_proxy_in_sync") == 1
            assert sample("weighbridge_proxy_backend_sets_unapplied", reason="error") == 0
            # etcd lost: out of sync too, while the sets stay served.
            sub.connected = False
            await until(lambda: len(events(logs, "proxy_sync_changed")) == 4, "etcd lost")
            assert await status(servicer, SYNC) == NOT_SERVING
        finally:
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follower
