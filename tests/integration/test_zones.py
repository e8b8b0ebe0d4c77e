"""Zone-aware routing on real proxies (each told its zone), real etcd and grpc.aio backends.

Backends a1, a2 are in zone-a and b1..b4 in zone-b, all of weight 1: zone-a holds a third of
the weight. With one proxy in each zone, zone-a's proxy keeps (1/3)/(1/2) = 2/3 of its calls
in zone-a and spills the rest to zone-b; zone-b's proxy keeps all of its calls. A second proxy
in zone-a makes zone-a's share of proxies 2/3, and its proxies keep (1/3)/(2/3) = 1/2.
EndpointSlice hints, where a set carries them, choose the endpoints without any annotation.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

import aetcd
import grpc
import pytest

from devtools import testenv
from tests.echo import EchoBackend
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import applied, channel, who
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration

NAMES = ("a1", "a2", "b1", "b2", "b3", "b4")


@contextlib.asynccontextmanager
async def backends() -> AsyncIterator[list[EchoBackend]]:
    bes = [EchoBackend(name) for name in NAMES]
    for b in bes:
        await b.start()
    try:
        yield bes
    finally:
        for b in bes:
            await b.stop()


async def put(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    bes: Sequence[EchoBackend],
    options: Mapping[str, str],
    hints: Mapping[str, tuple[str, ...]] | None = None,
) -> int:
    eps = tuple(
        Endpoint(b.host, b.port, zone=f"zone-{b.name[0]}", hint_zones=(hints or {}).get(b.name, ()))
        for b in bes
    )
    backend_set = BackendSet(
        namespace="default",
        name="echo",
        strategy="round_robin",
        endpoints=eps,
        options=dict(options),
    )
    return await store.put_set(etcd, scheme, backend_set)


async def counts(proxy: object, calls: int) -> collections.Counter[str]:
    async with channel(proxy) as ch:
        return collections.Counter([await who(ch) for _ in range(calls)])


def in_zone_a(c: collections.Counter[str]) -> int:
    return c["a1"] + c["a2"]


def within_5_sigma(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) < 5 * (n * p * (1 - p)) ** 0.5


async def explain(proxy: object) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin:  # type: ignore[attr-defined]
        answer = await admin_pb2_grpc.AdminStub(admin).Explain(
            admin_pb2.ExplainRequest(authority="echo.default", method="/test.Echo/Unary")
        )
    return str(answer.reason)


def zoned(zone: str, proxy_id: str) -> dict[str, object]:
    return {"zone": zone, "proxy_id": proxy_id, "proxy_zones_refresh_s": 0.2}


async def test_a_zone_keeps_what_its_endpoints_can_carry_and_spills_the_rest(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    endpoint = etcd_server.endpoint
    async with (
        backends() as bes,
        running_proxy(endpoint, scheme, **zoned("zone-a", "proxy-a")) as pa,
        running_proxy(endpoint, scheme, **zoned("zone-b", "proxy-b")) as pb,
    ):
        revision = await put(etcd, scheme, bes, {"zone-aware": "on"})
        await applied(pa, revision)
        await applied(pb, revision)
        both = {"zone-a": 1, "zone-b": 1}
        for proxy in (pa, pb):
            await eventually(lambda p=proxy: _zones(p), lambda z: z == both, what="zone count")

        n = 600
        from_a = await counts(pa, n)
        assert within_5_sigma(in_zone_a(from_a), n, 2 / 3), from_a
        # What spills is spread over zone-b's endpoints (it is zone-b's round robin).
        assert min(from_a[b] for b in ("b1", "b2", "b3", "b4")) > 0, from_a
        from_b = await counts(pb, 400)
        assert in_zone_a(from_b) == 0, from_b
        assert set(from_b.values()) == {100}, "a strict rotation within zone-b"
        assert (await explain(pa)).startswith(
            "67% of calls kept in zone zone-a (33% of the endpoints' weight for 50% of the "
            "proxies), 33% to zone-b; round_robin: "
        )
        assert (await explain(pb)).startswith("every call kept in zone zone-b")

        # A second proxy in zone-a: the plans follow the new spread of proxies.
        async with running_proxy(endpoint, scheme, **zoned("zone-a", "proxy-a2")) as pa2:
            await applied(pa2, revision)
            spread = {"zone-a": 2, "zone-b": 1}
            await eventually(lambda: _zones(pa), lambda z: z == spread, what="zone count")
            from_a = await counts(pa, n)
            assert within_5_sigma(in_zone_a(from_a), n, 1 / 2), from_a

        # Zone preference off: the Service's rotation over every zone.
        await applied(pa, await put(etcd, scheme, bes, {}))
        from_a = await counts(pa, 600)
        assert set(from_a.values()) == {100}, from_a


async def test_endpointslice_hints_choose_the_endpoints(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """The cluster lent b1 to zone-a: zone-a's proxy rotates over a1, a2 and b1, zone-b's over
    the rest, with no annotation; ``off`` turns hints off."""
    endpoint = etcd_server.endpoint
    hints = {n: ("zone-a",) if n in ("a1", "a2", "b1") else ("zone-b",) for n in NAMES}
    async with (
        backends() as bes,
        running_proxy(endpoint, scheme, **zoned("zone-a", "proxy-a")) as pa,
        running_proxy(endpoint, scheme, **zoned("zone-b", "proxy-b")) as pb,
    ):
        revision = await put(etcd, scheme, bes, {}, hints)
        await applied(pa, revision)
        await applied(pb, revision)
        assert await counts(pa, 300) == {"a1": 100, "a2": 100, "b1": 100}
        assert await counts(pb, 300) == {"b2": 100, "b3": 100, "b4": 100}
        assert (await explain(pa)).startswith(
            "EndpointSlice hints: 3 of 6 endpoints are for this proxy's zone zone-a"
        )
        await applied(pa, await put(etcd, scheme, bes, {"zone-aware": "off"}, hints))
        assert set((await counts(pa, 600)).values()) == {100}


async def _zones(proxy: object) -> dict[str, int]:
    return dict(proxy.proxy_zones)  # type: ignore[attr-defined]
