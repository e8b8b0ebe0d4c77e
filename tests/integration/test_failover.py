"""Failover on real parts: a real etcd, the proxy and its engine, real grpc.aio backends (some
in their own processes, to be killed or stopped) and real gRPC clients.

Each test shows one mechanism by behaviour: which calls succeed, where they went, and what the
admin API says about each endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence

import aetcd
import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from devtools import testenv
from tests.echo import EchoBackend, echo_backends
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import applied, channel, read_all, who
from tests.integration.test_proxy_resilience import metric_values, scrape
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration
UNARY = "/test.Echo/Unary"


async def put(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    ports: Sequence[int],
    options: Mapping[str, str] | None = None,
    strategy: str = "round_robin",
) -> int:
    eps = tuple(Endpoint("127.0.0.1", p) for p in ports)
    return await store.put_set(
        etcd,
        scheme,
        BackendSet(
            namespace="default",
            name="echo",
            strategy=strategy,
            endpoints=eps,
            options=dict(options or {}),
        ),
    )


async def endpoints(proxy: object) -> dict[int, admin_pb2.BackendStatus]:
    """The admin API's view of Service default/echo, by endpoint port."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin:  # type: ignore[attr-defined]
        listing = await admin_pb2_grpc.AdminStub(admin).ListBackendSets(
            admin_pb2.ListBackendSetsRequest(service="default/echo")
        )
    return {b.endpoint.port: b for s in listing.services for b in s.backends}


async def state_of(proxy: object, port: int) -> str:
    return (await endpoints(proxy))[port].state


async def unary(ch: grpc.aio.Channel, **kw: object) -> tuple[str | None, grpc.StatusCode, str]:
    """(backend, code, details) of one unary call."""
    call = ch.unary_unary(UNARY)(b"", timeout=10, **kw)
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return None, e.code(), e.details() or ""
    return str(dict(await call.initial_metadata())["x-backend"]), grpc.StatusCode.OK, ""


@contextlib.asynccontextmanager
async def process_backend(name: str) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """An echo backend in its own process (``python -m tests.echo``), to kill or stop."""
    port = testenv.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.echo", name, "127.0.0.1", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert b"listening" in line, line
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_goaway_with_a_held_stream_sends_new_calls_on_a_fresh_connection(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """A backend that limits its connections' age (as grpc-go's MaxConnectionAge) sends GOAWAY
    while a stream is held open on the connection: new calls must go on a new connection at
    once, the held stream must finish on the old one."""
    a = EchoBackend(
        "a",
        options=(
            ("grpc.max_connection_age_ms", 300),
            ("grpc.max_connection_age_grace_ms", 60_000),
        ),
    )
    await a.start()
    try:
        async with running_proxy(etcd_server.endpoint, scheme) as proxy:
            await applied(proxy, await put(etcd, scheme, [a.port]))
            async with channel(proxy) as ch:
                held = ch.unary_stream("/test.Echo/ServerStream")(
                    b"2", metadata=(("x-hold", "1"),), timeout=20
                )
                assert await held.read() == b"a:0"
                loop = asyncio.get_running_loop()
                end, outcomes = loop.time() + 2.0, []
                while loop.time() < end:
                    outcomes.append(await unary(ch))
                    await asyncio.sleep(0.005)
                failed = [o for o in outcomes if o[1] != grpc.StatusCode.OK]
                assert not failed, f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[0]}"
                a.release.set()
                assert await read_all(held) == [b"a:1"]
                assert (await held.code()) == grpc.StatusCode.OK
    finally:
        await a.stop(0)


async def test_a_backend_dying_mid_stream_ends_the_call_with_unavailable(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """Not CANCELLED, which gRPC clients read as their own cancellation."""
    async with (
        process_backend("doomed") as (proc, port),
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, [port]))
        async with channel(proxy) as ch:
            held = ch.unary_stream("/test.Echo/ServerStream")(
                b"2", metadata=(("x-hold", "1"),), timeout=20
            )
            assert await held.read() == b"doomed:0"
            proc.kill()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await held.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert "weighbridge:" in (info.value.details() or "")


async def test_calls_that_never_reached_a_backend_are_retried_on_another(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    dead = testenv.free_port()  # nothing listens there: connections are refused
    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme, eager_connections=False) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, [dead, a.port]))
        async with channel(proxy) as ch:
            outcomes = [await unary(ch) for _ in range(20)]
        assert outcomes == [("a", grpc.StatusCode.OK, "")] * 20
        view = await endpoints(proxy)
        assert view[dead].state == "connect_failing"
        assert "refused" in view[dead].state_reason.lower(), view[dead]
        retries = metric_values(await scrape(proxy.metrics_port), "weighbridge_proxy_retries_total")
        transparent = sum(v for k, v in retries.items() if 'kind="transparent"' in k)
        assert transparent >= 1, retries


async def test_configured_retries_go_to_another_endpoint_within_their_budget(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with (
        echo_backends("bad", "good") as (bad, good),
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        bad.fail = grpc.StatusCode.UNAVAILABLE
        no_ejection = {"outlier-detection": "off"}
        await applied(
            proxy,
            await put(
                etcd,
                scheme,
                [bad.port, good.port],
                {**no_ejection, "retry": "on: unavailable; attempts: 3"},
            ),
        )
        async with channel(proxy) as ch:
            outcomes = [await unary(ch) for _ in range(20)]
        assert outcomes == [("good", grpc.StatusCode.OK, "")] * 20
        assert bad.calls >= 5, "round robin sent about half of the first tries to bad"
        retried = [s for s in good.seen if "grpc-previous-rpc-attempts" in s.metadata]
        assert retried and all(s.metadata["grpc-previous-rpc-attempts"] == "1" for s in retried)

        # No budget at all: a call whose first try fails is not retried, and says why.
        await applied(
            proxy,
            await put(
                etcd,
                scheme,
                [bad.port, good.port],
                {**no_ejection, "retry": "on: unavailable; attempts: 3; budget: 0% + 0/s"},
            ),
        )
        async with channel(proxy) as ch:
            outcomes = [await unary(ch) for _ in range(10)]
        failed = [o for o in outcomes if o[1] != grpc.StatusCode.OK]
        assert failed, outcomes
        for _, code, details in failed:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "retry budget of Service default/echo" in details, details
            assert "bad fails every call" in details, details


async def test_consecutive_failures_eject_an_endpoint_until_its_time_is_up(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with (
        echo_backends("bad", "good") as (bad, good),
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        bad.fail = grpc.StatusCode.UNAVAILABLE
        await applied(
            proxy,
            await put(
                etcd,
                scheme,
                [bad.port, good.port],
                {
                    "outlier-detection": (
                        "consecutive-failures: 3; base-ejection-time: 1.5s; max-ejected: 50%"
                    )
                },
            ),
        )
        async with channel(proxy) as ch:
            outcomes = [await unary(ch) for _ in range(6)]
            assert [o[0] for o in outcomes].count(None) == 3, outcomes
            view = (await endpoints(proxy))[bad.port]
            assert view.state == "ejected", view
            assert "3 consecutive failures" in view.state_reason
            assert view.ejections == 1
            before = bad.calls
            assert [await who(ch) for _ in range(10)] == ["good"] * 10
            assert bad.calls == before, "an ejected endpoint gets no calls"
            await eventually(
                lambda: state_of(proxy, bad.port), lambda s: s == "healthy", what="ejection ends"
            )
            outcomes = [await unary(ch) for _ in range(4)]
            assert bad.calls > before, "back in rotation once the ejection is over"


async def test_below_the_panic_threshold_calls_spread_over_every_endpoint(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    dead = [testenv.free_port(), testenv.free_port()]  # refused, as above

    async def tries_to_dead(threshold: str) -> int:
        await applied(
            proxy, await put(etcd, scheme, [*dead, a.port], {"panic-threshold": threshold})
        )
        async with channel(proxy) as ch:
            for _ in range(6):  # until both are known to be down
                await unary(ch)
            await eventually(
                lambda: endpoints(proxy),
                lambda v: all(v[p].state in ("connect_failing", "ejected") for p in dead),
                what="dead endpoints out of rotation",
            )
            view = await endpoints(proxy)
            before = sum(view[p].requests for p in dead)
            for _ in range(30):
                await unary(ch)
        view = await endpoints(proxy)
        return sum(view[p].requests for p in dead) - before

    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme, eager_connections=False) as proxy,
    ):
        # One of three can take calls: 33% is under 50%, so calls spread over all three.
        assert await tries_to_dead("50%") > 0
        # With no panic threshold, down endpoints are skipped whatever their number.
        assert await tries_to_dead("0%") == 0


async def test_health_checks_take_an_endpoint_out_and_bring_it_back(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    servicer = health.aio.HealthServicer()
    a = EchoBackend("a", health=servicer)
    await a.start()
    try:
        async with (
            echo_backends("b") as (b,),
            running_proxy(etcd_server.endpoint, scheme) as proxy,
        ):
            await servicer.set("test.Echo", health_pb2.HealthCheckResponse.NOT_SERVING)
            checks = (
                "service: test.Echo; interval: 200ms; timeout: 200ms; "
                "unhealthy-threshold: 1; healthy-threshold: 2"
            )
            await applied(
                proxy, await put(etcd, scheme, [a.port, b.port], {"health-check": checks})
            )
            # b has no health service: its checks fail with UNIMPLEMENTED.
            await eventually(
                lambda: endpoints(proxy),
                lambda v: v[a.port].state == "unhealthy" and v[b.port].state == "unhealthy",
                what="both endpoints unhealthy",
            )
            view = await endpoints(proxy)
            assert "NOT_SERVING" in view[a.port].state_reason, view[a.port]
            assert "UNIMPLEMENTED" in view[b.port].state_reason, view[b.port]

            await servicer.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
            await eventually(
                lambda: state_of(proxy, a.port), lambda s: s == "healthy", what="a healthy"
            )
            async with channel(proxy) as ch:
                # b is still unhealthy, but one of two is not under the 50% panic threshold.
                assert [await who(ch) for _ in range(6)] == ["a"] * 6
    finally:
        await a.stop(0)


async def test_a_stopped_backend_is_taken_out_by_keepalive_and_the_handshake_timeout(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """SIGSTOP: the kernel still completes TCP handshakes for the stopped process, so only
    PINGs left unanswered show it is gone."""
    async with (
        process_backend("frozen") as (proc, port),
        echo_backends("a") as (a,),
        running_proxy(
            etcd_server.endpoint,
            scheme,
            keepalive_time_s=0.5,
            keepalive_timeout_s=0.5,
            handshake_timeout_s=0.5,
        ) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, [port, a.port]))
        async with channel(proxy) as ch:
            assert {await who(ch) for _ in range(4)} == {"frozen", "a"}
            os.kill(proc.pid, signal.SIGSTOP)
            # Calls sent to it now wait until keepalive gives up on the connection.
            stuck = [asyncio.ensure_future(unary(ch)) for _ in range(4)]
            await eventually(
                lambda: state_of(proxy, port),
                lambda s: s == "connect_failing",
                what="the stopped backend is down",
            )
            outcomes = await asyncio.gather(*stuck)
            assert {o[1] for o in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
            reason = (await endpoints(proxy))[port].state_reason
            assert "PING" in reason or "handshake" in reason, reason
            assert [await who(ch) for _ in range(10)] == ["a"] * 10
            os.kill(proc.pid, signal.SIGCONT)
            await eventually(
                lambda: state_of(proxy, port), lambda s: s == "healthy", what="back after SIGCONT"
            )
