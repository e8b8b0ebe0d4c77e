"""The proxy when etcd dies or compacts, with several engine threads, and with a maximum
client connection age."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import aetcd
import grpc
import pytest

from dataplane.subscription import Subscription
from devtools import testenv
from tests.echo import echo_backends
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import applied, channel, put, read_all, who
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.v1 import backend_set_pb2 as pb

pytestmark = pytest.mark.integration


async def _value(x: object) -> object:
    return x


async def test_etcd_down_proxy_keeps_serving_then_catches_up(
    scheme: KeyScheme, private_etcd: testenv.Etcd
) -> None:
    etcd = store.client(private_etcd.endpoint)
    try:
        async with (
            echo_backends("a", "b") as (a, b),
            running_proxy(private_etcd.endpoint, scheme) as proxy,
        ):
            await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
            async with channel(proxy) as ch:
                private_etcd.kill()
                await eventually(
                    lambda: _value(proxy.subscription.connected),
                    lambda c: not c,
                    what="proxy noticed etcd is gone",
                )
                # Still serving the last set it had.
                assert {await who(ch) for _ in range(10)} == {"a"}
                private_etcd.start()
                # A change made while the proxy is (re)connecting arrives. (The writer gets a
                # fresh client with a deadline: a put on a client whose server died can wait
                # forever in aetcd, which is not what this test is about.)
                await store.close(etcd)
                etcd = store.client(private_etcd.endpoint)
                await asyncio.wait_for(put(etcd, scheme, "round_robin", [b]), 20)
                await eventually(
                    lambda: who(ch),
                    lambda w: w == "b",
                    timeout=30,
                    what="change after etcd came back",
                )
                assert proxy.subscription.relists >= 1
    finally:
        await store.close(etcd)


async def test_compacted_revision_triggers_a_relist_and_nothing_is_missed(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with echo_backends("a", "b", "c") as (a, b, c):
        await put(etcd, scheme, "round_robin", [a], name="one")
        await put(etcd, scheme, "round_robin", [a], name="two")
        applied: dict[str, object] = {}

        class Lagging(Subscription):
            """After its first list, etcd moves on and compacts past the watch's start."""

            lagged = False

            async def _list(self) -> int:
                revision = await super()._list()
                if not self.lagged:
                    self.lagged = True
                    await put(etcd, scheme, "random", [b], name="one")
                    await store.delete_set(etcd, scheme, store.ServiceKey("default/two"))
                    latest = await put(etcd, scheme, "random", [c], name="three")
                    await etcd.compact(latest)
                return revision

        def record(key: store.ServiceKey, backend_set: object, revision: int) -> bool:
            applied[key] = backend_set
            return True

        client = store.client(etcd_server.endpoint)
        sub = Lagging(client, scheme, record)  # type: ignore[arg-type]
        task = asyncio.create_task(sub.run())
        try:
            await eventually(lambda: _value(sub.relists), lambda n: n >= 1, what="a relist")
            await eventually(
                lambda: _value(set(k for k, v in applied.items() if v is not None)),
                lambda keys: keys == {"default/one", "default/three"},
            )
            assert applied["default/two"] is None
            assert applied["default/one"].strategy == "random"  # type: ignore[attr-defined]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await client.close()


def metric_values(body: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus text."""
    out = {}
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


async def scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())


async def test_threads_share_one_port_one_subscription_and_one_rotation(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """``--threads 2``: one process, one status key, one admin and one metrics port; client
    connections spread over both threads, and round robin stays one strict rotation whichever
    thread carries a call."""
    port, admin, metrics = testenv.free_port(), testenv.free_port(), testenv.free_port()
    async with echo_backends("a", "b", "c") as backends:
        await put(etcd, scheme, "round_robin", backends)
        with (tmp_path / "proxy.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dataplane.main",
                    *("--etcd", etcd_server.endpoint, "--prefix", scheme.prefix),
                    *("--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"),
                    *("--metrics-listen", f"127.0.0.1:{metrics}", "--threads", "2"),
                    *("--health-listen", "127.0.0.1:0"),
                    *("--id", "th", "--log-format", "json"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:

            async def statuses() -> set[str]:
                result = await etcd.get_prefix(scheme.proxies_prefix)
                return {pb.ProxyStatus.FromString(kv.value).id for kv in result.kvs}

            await eventually(statuses, lambda s: s == {"th"}, timeout=30)
            # Eight client connections held open at once (a subchannel pool of each channel's
            # own, so they are eight TCP connections), called in turn.
            options = [
                ("grpc.default_authority", "echo.default"),
                ("grpc.use_local_subchannel_pool", 1),
            ]
            channels = [
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(8)
            ]
            try:
                seq = [await who(channels[i % 8]) for i in range(96)]
            finally:
                for ch in channels:
                    await ch.close()
            assert all(sorted(seq[i : i + 3]) == ["a", "b", "c"] for i in range(0, 96, 3)), seq
            body = await scrape(metrics)
            assert metric_values(body, "weighbridge_proxy_threads") == {"": 2.0}
            accepted = metric_values(body, "weighbridge_proxy_thread_connections_total")
            calls = metric_values(body, "weighbridge_proxy_thread_calls_total")
            assert len(accepted) == 2 and sum(accepted.values()) >= 8, accepted
            assert all(n > 0 for n in calls.values()), f"both threads carried calls: {calls}"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        await eventually(
            statuses, lambda s: s == set(), timeout=5, what="status key revoked on shutdown"
        )


async def test_max_connection_age_makes_clients_reconnect_without_failing_calls(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme, max_connection_age=0.3) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        async with channel(proxy) as ch:
            # A stream that outlives the connection's age still finishes on it.
            stream = ch.unary_stream("/test.Echo/ServerStream")(
                b"2", metadata=(("x-hold", "1"),), timeout=10
            )
            assert await stream.read() == b"a:0"
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5
            calls = 0
            while loop.time() < end:
                assert await who(ch) == "a"
                calls += 1
            a.release.set()
            assert await read_all(stream) == [b"a:1"]
        accepted = sum(t.connections for t in proxy.engine.thread_stats())
        assert accepted >= 3, f"{accepted} connections for {calls} calls over 1.5 s"


class BlackHole:
    """A TCP forwarder to etcd that can start swallowing bytes without closing anything,
    like a dead network path (no RST, no FIN)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.swallow = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self.stopped = False
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Every socket this opens is closed here, whatever ends the connection: stop() cancels
        # the handlers, and a socket left to the garbage collector would surface as a
        # ResourceWarning in whichever later test happens to collect it.
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.stopped:
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        if not self.swallow:
                            dst.write(data)
                            await dst.drain()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.handlers.discard(task)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()

    async def stop(self) -> None:
        self.stopped = True
        if self.server is not None:
            self.server.close()
        for task in list(self.handlers):
            task.cancel()
        if self.handlers:
            await asyncio.wait(list(self.handlers), timeout=5)
        if self.server is not None:
            await self.server.wait_closed()


async def test_black_holed_etcd_is_noticed_within_seconds(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    hole = BlackHole(etcd_server.client_port)
    await hole.start()
    try:
        async with (
            echo_backends("a") as (a,),
            running_proxy(f"127.0.0.1:{hole.port}", scheme) as proxy,
        ):
            await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
            assert proxy.subscription.connected
            hole.swallow = True
            started = asyncio.get_running_loop().time()
            # gRPC keepalive on the etcd channel: a ping every 10 s, 5 s to answer.
            await eventually(
                lambda: _value(proxy.subscription.connected),
                lambda c: not c,
                timeout=30,
                interval=0.2,
                what="proxy noticed the black hole",
            )
            noticed = asyncio.get_running_loop().time() - started
            assert noticed < 20, f"took {noticed:.1f}s"
            async with channel(proxy) as ch:
                assert await who(ch) == "a", "still serving the last set"
    finally:
        await hole.stop()
