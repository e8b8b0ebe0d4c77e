"""A proxy whose sets do not all apply, on a real etcd, the real proxy and its engine, and real
gRPC clients: the set is logged and counted, the other sets and later changes still apply, the
health service weighbridge.sync says so (readiness does not), and it all heals by itself."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataplane.health import SYNC
from dataplane.strategies import RouteConfig
from devtools import testenv
from tests.echo import echo_backends
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import applied, channel, put, who
from tests.integration.test_proxy_resilience import metric_values, scrape
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.policy import canonical_option
from weighbridge.v1 import backend_set_pb2 as pb

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def etcd(private_etcd: testenv.Etcd) -> AsyncIterator[aetcd.Client]:
    """A client of this test's own etcd (no kube-apiserver needed here)."""
    client = store.client(private_etcd.endpoint)
    yield client
    await store.close(client)


async def status(proxy: Any, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.health_port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


async def metrics(proxy: Any) -> dict[str, float]:
    body = await scrape(proxy.metrics_port)
    out = {}
    for name in (
        "weighbridge_proxy_in_sync",
        "weighbridge_proxy_backend_set_apply_failures_total",
        "weighbridge_proxy_backend_sets_unapplied",
        "weighbridge_proxy_subscription_failures_total",
    ):
        for labels, value in metric_values(body, name).items():
            out[name + labels] = value
    return out


async def published_revision(etcd: aetcd.Client, scheme: KeyScheme, proxy_id: str) -> int:
    """The applied revision in the proxy's status key (what `wbctl proxies` compares)."""
    kv = await etcd.get(scheme.proxy(proxy_id))
    return -1 if kv is None else pb.ProxyStatus.FromString(kv.value).applied_revision


async def answer(ch: grpc.aio.Channel) -> str:
    """The backend that answered, or the status code's name."""
    try:
        return await who(ch)
    except grpc.aio.AioRpcError as e:
        return e.code().name


async def test_a_set_whose_apply_raises_is_reported_the_others_go_on_and_it_heals(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    private_etcd: testenv.Etcd,
    logs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine raises for one Service's set (injected in the running proxy): the set is
    logged with its traceback and counted, calls to the other Service follow its changes,
    weighbridge.sync is NOT_SERVING while readiness stays SERVING, and once the engine takes
    the set the proxy's own retry applies it, without anything written to etcd."""
    bad = ServiceKey("default/bad")
    async with (
        echo_backends("a", "b") as (a, b),
        running_proxy(private_etcd.endpoint, scheme, proxy_id="sup") as proxy,
    ):
        proxy.subscription.retry_first, proxy.subscription.retry_max = 0.2, 0.5
        engine_apply = proxy.engine.apply
        broken = True

        def apply(key: ServiceKey, route: RouteConfig) -> None:
            if key == bad and broken:
                raise RuntimeError("injected: the engine failed on this set")
            engine_apply(key, route)

        monkeypatch.setattr(proxy.engine, "apply", apply)
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        await eventually(lambda: status(proxy, SYNC), lambda s: s == SERVING)

        bad_revision = await put(etcd, scheme, "round_robin", [b], name="bad")
        later = await put(etcd, scheme, "round_robin", [b])  # echo moves to b, after it
        async with channel(proxy) as echo, channel(proxy, "bad.default") as to_bad:
            await eventually(lambda: answer(echo), lambda w: w == "b", what="later change")
            assert await answer(to_bad) == "UNAVAILABLE", "no route: it never applied"
            await eventually(lambda: status(proxy, SYNC), lambda s: s == NOT_SERVING)
            assert await status(proxy, "") == SERVING, "readiness is not the sync's"
            seen = await metrics(proxy)
            assert seen["weighbridge_proxy_in_sync"] == 0
            assert seen['weighbridge_proxy_backend_sets_unapplied{reason="error"}'] == 1
            assert seen['weighbridge_proxy_backend_set_apply_failures_total{reason="error"}'] >= 1
            assert seen["weighbridge_proxy_subscription_failures_total"] == 0
            line = next(e for e in logs if e["event"] == "backend_set_not_applied")
            assert (line["service"], line["mod_revision"], line["reason"]) == (
                bad,
                bad_revision,
                "error",
            )
            assert "injected" in str(line["exc_info"])
            # Behind in its status key, so `wbctl proxies` shows it out of sync; retrying.
            assert proxy.subscription.applied_revision == bad_revision - 1
            await eventually(
                lambda: published_revision(etcd, scheme, "sup"),
                lambda r: r == bad_revision - 1,
            )
            await eventually(
                lambda: metrics(proxy),
                lambda m: (
                    m['weighbridge_proxy_backend_set_apply_failures_total{reason="error"}'] >= 3
                ),
                what="retries",
            )
            assert proxy.subscription.relists >= 2

            broken = False  # the engine takes it now: the next retry applies it
            await eventually(lambda: answer(to_bad), lambda w: w == "b", what="healed")
            await eventually(lambda: status(proxy, SYNC), lambda s: s == SERVING)
            seen = await metrics(proxy)
            assert seen["weighbridge_proxy_in_sync"] == 1
            assert seen['weighbridge_proxy_backend_sets_unapplied{reason="error"}'] == 0
            assert proxy.subscription.applied_revision >= later
            await eventually(lambda: published_revision(etcd, scheme, "sup"), lambda r: r >= later)
            assert await answer(echo) == "b"


async def test_a_set_the_proxy_cannot_honour_applies_once_it_can(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    private_etcd: testenv.Etcd,
    tmp_path: Path,
    logs: list[dict[str, Any]],
) -> None:
    """A set naming a backend CA bundle the proxy lacks is rejected (no traceback: it is not a
    bug), the Service keeps its previous set, and when the bundle is mounted the retry applies
    it, without the set being written again."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test CA")
    cas = tmp_path / "cas"
    cas.mkdir()
    async with (
        echo_backends("a", "b") as (a, b),
        running_proxy(private_etcd.endpoint, scheme, backend_ca_dir=str(cas)) as proxy,
    ):
        proxy.subscription.retry_first, proxy.subscription.retry_max = 0.2, 0.5
        first = await put(etcd, scheme, "round_robin", [a])
        await applied(proxy, first)
        named = {"backend-tls": canonical_option("backend-tls", "ca: shop-ca")}
        revision = await put(etcd, scheme, "round_robin", [b], options=named)
        echo = ServiceKey("default/echo")

        async def unapplied() -> Any:
            return proxy.routes.unapplied.get(echo)

        failure = await eventually(
            unapplied, lambda u: u is not None and u.mod_revision == revision
        )
        assert (failure.reason, failure.serving_revision) == ("rejected", first)
        assert "shop-ca" in failure.error
        line = next(e for e in logs if e["event"] == "backend_set_not_applied")
        assert line["reason"] == "rejected" and line["exc_info"] is None
        await eventually(lambda: status(proxy, SYNC), lambda s: s == NOT_SERVING)
        seen = await metrics(proxy)
        assert seen['weighbridge_proxy_backend_sets_unapplied{reason="rejected"}'] == 1
        async with channel(proxy) as ch:
            assert await who(ch) == "a", "the previous set stays"

        (cas / "shop-ca").mkdir()
        shutil.copy(testenv.CertificateAuthority(tmp_path / "pki").cert, cas / "shop-ca/ca.crt")
        await eventually(unapplied, lambda u: u is None, what="the retry applied it")
        assert proxy.routes.services[echo].mod_revision == revision
        await eventually(lambda: status(proxy, SYNC), lambda s: s == SERVING)
