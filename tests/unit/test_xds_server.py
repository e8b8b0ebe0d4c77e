"""The ADS protocol of the proxy's xDS server, spoken by a raw stream (no xDS client library):
when it answers, pushes, stays quiet, counts a NACK, and what a client may see."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from dataplane.routing import Routes
from dataplane.settings import ProxySettings
from dataplane.xds.resources import CLUSTER, ENDPOINTS, LISTENER
from dataplane.xds.server import Visibility, XdsServer, spiffe_namespace
from tests.unit.fakeengine import FakeEngine, stats_row
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint


@dataclass
class FakeSubscription:
    applied_revision: int = 0
    listed: asyncio.Event = field(default_factory=asyncio.Event)


class Proxy:
    """The parts of a proxy the xDS server reads: routes applied like the subscription does."""

    def __init__(self, namespaces: tuple[str, ...] = ("*",)) -> None:
        self.routes = Routes(FakeEngine())  # type: ignore[arg-type]
        self.sub = FakeSubscription()
        self.xds = XdsServer(self.routes, self.sub, namespaces=namespaces, max_streams=2)  # type: ignore[arg-type]

    def apply(self, namespace: str, name: str, *ports: int) -> None:
        s = BackendSet(
            namespace,
            name,
            "round_robin",
            endpoints=tuple(Endpoint("10.0.0.1", p) for p in ports),
        )
        self.sub.applied_revision += 1
        assert self.routes.apply(s.key, s, self.sub.applied_revision)
        self.xds.changed()

    def delete(self, key: str) -> None:
        self.sub.applied_revision += 1
        assert self.routes.apply(ServiceKey(key), None, self.sub.applied_revision)
        self.xds.changed()


class Stream:
    """One ADS stream; responses are read by a task of their own (cancelling a read would
    cancel the call)."""

    def __init__(self, call: Any, requests: asyncio.Queue[Any]) -> None:
        self.call = call
        self.requests = requests
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.responses.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            self.responses.put_nowait(exc)

    def send(
        self,
        type_url: str,
        names: list[str],
        *,
        ack: discovery_pb2.DiscoveryResponse | None = None,
        error: str | None = None,
        node: str = "",
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        if node:
            request.node.id = node
        if ack is not None:
            request.response_nonce = ack.nonce
            request.version_info = ack.version_info
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put_nowait(request)

    async def receive(self, timeout: float = 2.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(response, Exception):
            raise response
        return response  # type: ignore[no-any-return]

    async def quiet(self, seconds: float = 0.2) -> bool:
        await asyncio.sleep(seconds)
        return self.responses.empty()


@contextlib.asynccontextmanager
async def serving(proxy: Proxy) -> AsyncIterator[int]:
    server, port = await proxy.xds.serve("127.0.0.1:0", ProxySettings())
    try:
        yield port
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def stream(port: int) -> AsyncIterator[Stream]:
    requests: asyncio.Queue[Any] = asyncio.Queue()

    async def feed() -> AsyncIterator[Any]:
        while True:
            yield await requests.get()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(feed())
        s = Stream(call, requests)
        try:
            yield s
        finally:
            call.cancel()
            await asyncio.gather(s.reader, return_exceptions=True)


def names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for r in response.resources:
        kind = {LISTENER: listener_pb2.Listener, CLUSTER: cluster_pb2.Cluster}.get(r.type_url)
        if kind is None:
            m: Any = endpoint_pb2.ClusterLoadAssignment()
            r.Unpack(m)
            out.append(m.cluster_name)
        else:
            m = kind()
            r.Unpack(m)
            out.append(m.name)
    return out


async def test_nothing_is_answered_before_the_first_list_then_every_subscribed_type_is() -> None:
    proxy = Proxy()
    proxy.apply("shop", "cart", 1)
    async with serving(proxy) as port, stream(port) as s:
        s.send(LISTENER, ["cart.shop"], node="n1")
        assert await s.quiet()
        proxy.sub.listed.set()
        first = await s.receive()
        assert first.type_url == LISTENER and names(first) == ["cart.shop"]
        assert first.version_info == "1" and first.nonce
        s.send(CLUSTER, ["shop/cart"])
        assert names(await s.receive()) == ["shop/cart"]
        s.send(ENDPOINTS, ["shop/cart"])
        assert names(await s.receive()) == ["shop/cart"]


async def test_an_ack_is_not_answered_a_change_is_pushed_and_an_unrelated_one_is_not() -> None:
    proxy = Proxy()
    proxy.apply("shop", "cart", 1)
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as s:
        s.send(ENDPOINTS, ["shop/cart"], node="n1")
        first = await s.receive()
        s.send(ENDPOINTS, ["shop/cart"], ack=first)
        assert await s.quiet()
        proxy.apply("shop", "other", 9)  # not subscribed
        assert await s.quiet()
        proxy.apply("shop", "cart", 1, 2)
        pushed = await s.receive()
        assert pushed.version_info == "3" and pushed.nonce != first.nonce
        assert pushed.resources != first.resources


async def test_a_nack_is_counted_and_recorded_and_the_next_change_still_pushed() -> None:
    proxy = Proxy()
    proxy.apply("shop", "cart", 1)
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as s:
        s.send(ENDPOINTS, ["shop/cart"], node="n1")
        first = await s.receive()
        s.send(ENDPOINTS, ["shop/cart"], ack=first)
        proxy.apply("shop", "cart", 1, 2)
        second = await s.receive()
        s.send(ENDPOINTS, ["shop/cart"], ack=first, error="bad weights")
        s.requests.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=ENDPOINTS,
                resource_names=["shop/cart"],
                response_nonce=second.nonce,
                version_info=first.version_info,
                error_detail=status_pb2.Status(code=3, message="bad weights"),
            )
        )
        assert await s.quiet()  # never answered: resending the same would be refused again
        assert proxy.xds.nacks["endpoints"] == 1  # the stale one (first's nonce) not counted
        (state,) = proxy.xds.snapshot()
        assert state["node"] == "n1"
        assert state["types"]["endpoints"]["nacked"] == second.version_info  # type: ignore[index]
        assert state["types"]["endpoints"]["error"] == "bad weights"  # type: ignore[index]
        proxy.apply("shop", "cart", 3)
        assert names(await s.receive()) == ["shop/cart"]


async def test_a_health_verdict_of_the_proxy_is_pushed_as_unhealthy() -> None:
    proxy = Proxy()
    proxy.apply("shop", "cart", 1, 2)
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as s:
        s.send(ENDPOINTS, ["shop/cart"], node="n1")
        first = await s.receive()
        s.send(ENDPOINTS, ["shop/cart"], ack=first)
        proxy.routes.engine.rows = [stats_row("shop/cart", "10.0.0.1:2", state="unhealthy")]  # type: ignore[attr-defined]
        proxy.xds.changed()  # as the proxy does after the engine's state events
        pushed = await s.receive()
        cla = endpoint_pb2.ClusterLoadAssignment()
        assert pushed.resources[0].Unpack(cla)
        statuses = {
            lb.endpoint.address.socket_address.port_value: lb.health_status
            for lb in cla.endpoints[0].lb_endpoints
        }
        assert statuses == {1: health_check_pb2.HEALTHY, 2: health_check_pb2.UNHEALTHY}
        proxy.xds.changed()  # nothing new: nothing sent
        assert await s.quiet()


async def test_new_names_are_answered_with_every_subscribed_resource() -> None:
    proxy = Proxy()
    proxy.apply("shop", "cart", 1)
    proxy.apply("shop", "pay", 2)
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as s:
        s.send(CLUSTER, ["shop/cart"], node="n1")
        first = await s.receive()
        s.send(CLUSTER, ["shop/cart", "shop/pay"], ack=first)
        assert names(await s.receive()) == ["shop/cart", "shop/pay"]


async def test_an_empty_listener_or_cluster_list_subscribes_to_every_visible_service() -> None:
    proxy = Proxy(namespaces=("shop",))
    proxy.apply("shop", "cart", 1)
    proxy.apply("bank", "vault", 2)
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as s:
        s.send(LISTENER, [], node="n1")
        assert names(await s.receive()) == ["cart.shop"]
        s.send(CLUSTER, [])
        assert names(await s.receive()) == ["shop/cart"]
        proxy.delete("shop/cart")
        pushed = {(await s.receive()).type_url, (await s.receive()).type_url}
        assert pushed == {LISTENER, CLUSTER}


async def test_a_service_of_another_namespace_is_as_if_it_did_not_exist() -> None:
    proxy = Proxy(namespaces=("shop",))
    proxy.apply("bank", "vault", 2)
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as s:
        s.send(LISTENER, ["vault.bank"], node="bank-admin")  # the node grants nothing
        assert not (await s.receive()).resources
        s.send(ENDPOINTS, ["bank/vault"])
        assert not (await s.receive()).resources


async def test_streams_beyond_the_limit_are_refused() -> None:
    proxy = Proxy()
    proxy.sub.listed.set()
    async with serving(proxy) as port, stream(port) as a, stream(port) as b:
        for s in (a, b):
            s.send(CLUSTER, ["x/y"], node="n")
            await s.receive()
        async with stream(port) as c:
            c.send(CLUSTER, ["x/y"], node="n")
            try:
                await c.receive()
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--xds-max-streams" in (exc.details() or "")
            else:
                raise AssertionError("a third stream was served")
        assert proxy.xds.refused == 1


def test_the_spiffe_id_names_the_namespace_a_client_sees() -> None:
    assert spiffe_namespace("spiffe://cluster.local/ns/shop/sa/web") == "shop"
    assert spiffe_namespace("spiffe://cluster.local/sa/web") is None
    assert spiffe_namespace("https://cluster.local/ns/shop/sa/web") is None
    assert spiffe_namespace("spiffe://cluster.local/ns//sa/web") is None
    v = Visibility(frozenset({"public"}), own="shop")
    assert v.allows("public") and v.allows("shop") and not v.allows("bank")
    assert Visibility(frozenset({"*"})).allows("bank")
    assert not Visibility(frozenset()).allows("shop")
