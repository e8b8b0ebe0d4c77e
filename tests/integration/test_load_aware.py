"""The load-aware strategies on a real proxy with real grpc.aio backends: at equal load they
follow the weights; with one backend slower they send it fewer calls than a rotation does."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import aetcd
import grpc
import pytest

from devtools import testenv
from tests.echo import EchoBackend
from tests.integration.conftest import running_proxy
from tests.integration.test_proxy import applied, channel, put, who
from weighbridge.keys import KeyScheme
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def backends(*delays: float) -> AsyncIterator[list[EchoBackend]]:
    bes = [EchoBackend(name, delay=d) for name, d in zip("abc", delays, strict=False)]
    for b in bes:
        await b.start()
    try:
        yield bes
    finally:
        for b in bes:
            await b.stop()


async def shares(ch: grpc.aio.Channel, calls: int, concurrency: int) -> collections.Counter[str]:
    """Who answered ``calls`` calls made ``concurrency`` at a time."""
    counts: collections.Counter[str] = collections.Counter()

    async def worker(n: int) -> None:
        for _ in range(n):
            counts[await who(ch)] += 1

    per = calls // concurrency
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    return counts


async def test_at_equal_load_least_request_follows_the_weights(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """One call at a time: every pick sees both endpoints idle, so the weighted draws decide.
    (peak_ewma compares latencies too, which differ by chance between equal backends: its
    equal-estimate case is the engine's unit test.)"""
    async with (
        backends(0, 0) as bes,
        running_proxy(etcd_server.endpoint, scheme, seed=3) as proxy,
        channel(proxy) as ch,
    ):
        await applied(proxy, await put(etcd, scheme, "least_request", bes, [3, 1]))
        n = 1200
        counts = collections.Counter([await who(ch) for _ in range(n)])
        p = 3 / 4
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(counts["a"] - n * p) < 5 * sigma, counts


@pytest.mark.parametrize("strategy", ["least_request", "peak_ewma"])
async def test_a_slower_backend_gets_fewer_calls(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, strategy: str
) -> None:
    """b answers after 40 ms, a and c at once: a rotation gives b a third of the calls, the
    load-aware strategies much less."""
    async with (
        backends(0, 0.04, 0) as bes,
        running_proxy(etcd_server.endpoint, scheme, seed=5) as proxy,
        channel(proxy) as ch,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", bes))
        rotation = await shares(ch, 300, 12)
        assert rotation["b"] == 100, rotation
        await applied(proxy, await put(etcd, scheme, strategy, bes))
        counts = await shares(ch, 600, 12)
        assert counts["b"] < 600 / 3 / 2, counts  # under half of a rotation's share
        assert min(counts["a"], counts["c"]) > 150, counts

        # Explain says why, with the numbers it compared.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin:
            stub = admin_pb2_grpc.AdminStub(admin)
            answer = await stub.Explain(
                admin_pb2.ExplainRequest(authority="echo.default", method="/test.Echo/Unary")
            )
        assert answer.reason.startswith(f"{strategy}: "), answer.reason
        assert " over " in answer.reason and "in flight" in answer.reason, answer.reason


async def test_a_new_endpoint_ramps_up_under_slow_start(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """round_robin over a and b; c joins under a 3 s linear slow start from 10%: in its first
    second it takes far less than its third (the rotation skips its turn); once the window
    has passed, the rotation is strict again."""
    async with (
        backends(0, 0, 0) as bes,
        running_proxy(etcd_server.endpoint, scheme, seed=9) as proxy,
        channel(proxy) as ch,
    ):
        options = {"slow-start": "window: 3s; min-weight: 10%"}
        await applied(proxy, await put(etcd, scheme, "round_robin", bes[:2], options=options))
        await applied(proxy, await put(etcd, scheme, "round_robin", bes, options=options))
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.0
        early: collections.Counter[str] = collections.Counter()
        while loop.time() < until:
            early[await who(ch)] += 1
        assert early["c"] > 0, early
        assert early["c"] / early.total() < 1 / 3 / 2, early
        await asyncio.sleep(2.5)
        late = collections.Counter([await who(ch) for _ in range(300)])
        assert late == {"a": 100, "b": 100, "c": 100}, late


async def test_ring_hash_keeps_keys_and_bounds_a_hot_one(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """Calls with the same x-user-id reach the same backend; when one of 4 backends leaves,
    only its keys move; a hot key's calls spill round the ring beyond c = 1.25 times the
    mean."""
    options = {"hash": "header: x-user-id; bound: 125%"}
    async with (
        backends(0, 0, 0) as bes,
        backends(0) as (d,),
        running_proxy(etcd_server.endpoint, scheme, seed=11) as proxy,
        channel(proxy) as ch,
    ):
        d.name = "d"
        four = [*bes, d]

        async def owner(user: str) -> str:
            call = ch.unary_unary("/test.Echo/Unary")(
                b"", metadata=(("x-user-id", user),), timeout=10
            )
            md = dict(await call.initial_metadata())
            await call
            return str(md["x-backend"])

        await applied(proxy, await put(etcd, scheme, "ring_hash", four, options=options))
        users = [f"user-{i}" for i in range(200)]
        before = {u: await owner(u) for u in users}
        assert before == {u: await owner(u) for u in users}, "a key keeps its backend"
        assert len(set(before.values())) == 4, "keys spread over all"
        await applied(proxy, await put(etcd, scheme, "ring_hash", bes, options=options))
        after = {u: await owner(u) for u in users}
        moved = [u for u in users if after[u] != before[u]]
        assert all(before[u] == "d" for u in moved), "only the leaving backend's keys move"
        assert len(moved) <= 1.5 / 4 * len(users), moved

        # A hot key: 9 calls held open at once. Bound: ceil(1.25 x 9 / 3) = 4 per backend.
        await applied(proxy, await put(etcd, scheme, "ring_hash", bes, options=options))
        held = [
            ch.unary_stream("/test.Echo/ServerStream")(
                b"3", metadata=(("x-user-id", "hot"), ("x-hold", "1")), timeout=20
            )
            for _ in range(9)
        ]
        firsts = [await call.read() for call in held]  # each has its first message
        loads = [b.in_flight for b in bes]
        assert sum(loads) == 9 and max(loads) <= 4, (loads, firsts)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin:
            answer = await admin_pb2_grpc.AdminStub(admin).Explain(
                admin_pb2.ExplainRequest(
                    authority="echo.default",
                    method="/test.Echo/Unary",
                    headers={"x-user-id": "hot"},
                )
            )
        assert answer.reason.startswith("ring_hash: key "), answer.reason
        for b in bes:
            b.release.set()
        for call in held:
            while await call.read() is not grpc.aio.EOF:
                pass
            assert await call.code() == grpc.StatusCode.OK
