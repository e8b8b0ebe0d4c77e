"""Hostile and broken clients on the client port: every limit hit on a real proxy, with a
real etcd and grpc.aio backends, and a normal gRPC client still served beside. Frames no gRPC
client would send come from a raw HTTP/2 client (the h2 library) or are written by hand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import aetcd
import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from devtools import testenv
from tests.echo import EchoBackend, echo_backends
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import AUTHORITY, applied, channel, put, who
from tests.integration.test_proxy_resilience import metric_values, scrape
from weighbridge.keys import KeyScheme

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/test.Echo/Bidi"),
    (":authority", AUTHORITY),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def limits(proxy: Any) -> dict[str, int]:
    return proxy.engine.client_limits()  # type: ignore[no-any-return]


def local_errors(proxy: Any) -> dict[str, int]:
    return proxy.engine.counters().local_errors  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serving(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, **settings: Any
) -> AsyncIterator[tuple[Any, EchoBackend]]:
    """A proxy with these settings in front of one echo backend "a", its set applied."""
    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme, **settings) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        yield proxy, a


class RawH2:
    """An HTTP/2 client that sends what it is told, however wrong, and records what it gets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []
        self.closed = False

    async def __aenter__(self) -> RawH2:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn.initiate_connection()
        self.flush()
        await self.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def ignore_stream_limit(self) -> None:
        """Open streams beyond the server's SETTINGS_MAX_CONCURRENT_STREAMS, as no polite
        client would."""
        limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        self.conn.remote_settings[limit] = 2**31 - 1
        self.conn.remote_settings.acknowledge()

    async def read(self, timeout: float) -> None:
        """Reads what arrives within ``timeout`` (once) and answers what h2 must answer."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.events += self.conn.receive_data(data)
        with contextlib.suppress(OSError):
            self.flush()

    async def until(
        self, found: Callable[[h2.events.Event], bool], timeout: float = 10
    ) -> h2.events.Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for e in self.events:
                if found(e):
                    return e
            if self.closed or loop.time() > deadline:
                raise AssertionError(f"not seen within {timeout}s; got {self.events}")
            await self.read(0.1)


async def test_connections_that_never_speak_are_closed_after_the_handshake_timeout(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    settings = {"client_handshake_timeout_s": 1.0}
    async with serving(etcd, scheme, etcd_server, **settings) as (proxy, _):
        silent = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(50)]
        async with channel(proxy) as ch:
            assert await who(ch) == "a"  # served while the silent ones wait
        await eventually(
            lambda: _async(proxy.engine.client_connections),
            lambda n: n == 0,
            timeout=5,
            what="the silent connections closed",
        )
        for reader, writer in silent:
            # (The proxy's SETTINGS went out at once; then the end of the connection.)
            await asyncio.wait_for(reader.read(), 1)
            assert reader.at_eof(), "closed by the proxy"
            writer.close()
        assert limits(proxy)["handshake_timeout"] == 50


async def _async(value: Any) -> Any:
    return value


async def test_an_invalid_preface_is_answered_with_a_clean_close(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with running_proxy(etcd_server.endpoint, scheme) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100)
        # FIN, not RST: the read ends instead of failing with "connection reset".
        while await asyncio.wait_for(reader.read(4096), 5):
            pass
        writer.close()
        assert limits(proxy)["invalid_preface"] == 1


async def test_connections_beyond_the_maximum_are_closed_at_once(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with serving(etcd, scheme, etcd_server, max_client_connections=10) as (proxy, _):
        async with channel(proxy) as ch:
            assert await who(ch) == "a"  # one connection of the ten
            held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(9)]
            await eventually(
                lambda: _async(proxy.engine.client_connections),
                lambda n: n == 10,
                what="ten connections open",
            )
            extra, extra_w = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await asyncio.wait_for(extra.read(1), 5) == b"", "the eleventh is closed"
            extra_w.close()
            assert limits(proxy)["max_connections"] == 1
            body = await scrape(proxy.metrics_port)
            hits = metric_values(body, "weighbridge_proxy_client_limit_hits_total")
            assert hits['{limit="max_connections"}'] == 1
            assert metric_values(body, "weighbridge_proxy_client_connections") == {"": 10}
            assert await who(ch) == "a", "the connections inside still served"
            for _, w in held:
                w.close()
            await eventually(
                lambda: _async(proxy.engine.client_connections),
                lambda n: n == 1,
                what="the held connections gone",
            )
        async with channel(proxy) as ch2:
            assert await who(ch2) == "a", "room again once connections close"


async def test_an_idle_connection_gets_goaway_and_its_client_reconnects(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with (
        serving(etcd, scheme, etcd_server, client_idle_timeout_s=1.0) as (proxy, _),
        channel(proxy) as ch,
    ):
        # A stream open for longer than the idle timeout: the connection is not idle.
        bidi = ch.stream_stream("/test.Echo/Bidi")()
        await bidi.write(b"x")
        assert await bidi.read() == b"a:x"
        await asyncio.sleep(2.0)
        assert limits(proxy)["idle_timeout"] == 0
        await bidi.done_writing()
        assert await bidi.code() == grpc.StatusCode.OK
        # Now without calls: GOAWAY after about a second.
        await eventually(
            lambda: _async(limits(proxy)["idle_timeout"]),
            lambda n: n == 1,
            timeout=5,
            what="GOAWAY to the idle connection",
        )
        assert await who(ch) == "a", "the client reconnects and is served"


async def test_streams_beyond_the_advertised_limit_are_refused(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with serving(etcd, scheme, etcd_server, client_max_concurrent_streams=5) as (proxy, a):
        async with RawH2(proxy.port) as raw:
            limit = raw.conn.remote_settings.max_concurrent_streams
            assert limit == 5, "advertised"
            raw.ignore_stream_limit()
            ids = [raw.conn.get_next_available_stream_id() + 2 * i for i in range(8)]
            for sid in ids:
                raw.conn.send_headers(sid, HEADERS)  # no END_STREAM: each stays open
            raw.flush()

            async def resets() -> list[h2.events.StreamReset]:
                await raw.read(0.1)
                return [e for e in raw.events if isinstance(e, h2.events.StreamReset)]

            await eventually(resets, lambda r: len(r) >= 3, what="three resets")
            await raw.read(0.3)  # and no more
            resets_seen = await resets()
            assert sorted(e.stream_id for e in resets_seen) == ids[5:]
            assert {e.error_code for e in resets_seen} == {h2.errors.ErrorCodes.REFUSED_STREAM}
            await eventually(
                lambda: _async(a.in_flight), lambda n: n == 5, what="five calls at the backend"
            )
            # The next stream the proxy takes shows it what HTTP/2 refused before.
            raw.conn.end_stream(ids[0])
            raw.flush()
            await raw.until(
                lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == ids[0]
            )
            sid = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(sid, HEADERS, end_stream=True)
            raw.flush()
            await raw.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid)
            assert limits(proxy)["streams_refused"] == 3
        async with channel(proxy) as ch:
            assert await who(ch) == "a"


async def test_a_header_list_over_the_limit_is_refused(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    settings = {"client_max_header_list_size": 4096}
    async with serving(etcd, scheme, etcd_server, **settings) as (proxy, a):
        async with RawH2(proxy.port) as raw:
            assert raw.conn.remote_settings.max_header_list_size == 4096, "advertised"
            big = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(big, [*HEADERS, ("x-big", "b" * 8000)], end_stream=True)
            raw.flush()
            answer = await raw.until(
                lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == big
            )
            assert dict(answer.headers)[":status"] == "431"  # type: ignore[attr-defined]
            small = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(small, [*HEADERS, ("x-small", "s" * 1000)], end_stream=True)
            raw.flush()
            await raw.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == small)
        assert a.calls == 1, "only the small one reached the backend"
        assert limits(proxy)["streams_refused"] == 1
        async with channel(proxy) as ch:
            assert await who(ch) == "a"


async def test_a_client_that_stops_answering_pings_is_closed(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    settings = {"client_keepalive_time_s": 0.5, "client_keepalive_timeout_s": 0.5}
    async with serving(etcd, scheme, etcd_server, **settings) as (proxy, _):
        # A peer that completed the handshake, then went silent (its host vanished, say):
        # it never reads, so it never answers a PING.
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(PREFACE + frame(4, 0, 0, b""))
        async with channel(proxy) as ch:
            assert await who(ch) == "a"
            await eventually(
                lambda: _async(limits(proxy)["keepalive_timeout"]),
                lambda n: n == 1,
                timeout=5,
                what="the silent peer closed",
            )
            await asyncio.sleep(1.5)  # three more PING rounds for the live client
            assert await who(ch) == "a"
            assert limits(proxy)["keepalive_timeout"] == 1, "the live client answers PINGs"
        sock.close()


async def test_a_quiet_stream_ends_after_its_services_idle_timeout(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme, stream_idle_timeout_s=30) as proxy,
    ):
        options = {"stream-idle-timeout": "1s"}
        await applied(proxy, await put(etcd, scheme, "round_robin", [a], options=options))
        async with channel(proxy) as ch:
            # Busy for longer than the timeout: every message moves it.
            bidi = ch.stream_stream("/test.Echo/Bidi")()
            for _ in range(6):
                await bidi.write(b"x")
                assert await bidi.read() == b"a:x"
                await asyncio.sleep(0.4)
            # Then quiet.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(bidi.read(), 5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "stream idle timeout of Service default/echo" in (info.value.details() or "")
            await eventually(
                lambda: _async(a.in_flight), lambda n: n == 0, what="the backend's stream ended"
            )
            assert local_errors(proxy)["stream_idle_timeout"] == 1
            assert await who(ch) == "a"


async def test_a_call_waits_a_bounded_time_for_a_saturated_backend(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    one_stream = (("grpc.max_concurrent_streams", 1),)
    a = EchoBackend("a", options=one_stream)
    b = EchoBackend("b")
    await a.start()
    await b.start()
    settings = {"max_backend_connections": 1, "backend_stream_wait_s": 0.5}
    try:
        async with running_proxy(etcd_server.endpoint, scheme, **settings) as proxy:
            await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
            async with channel(proxy) as ch:
                holding = ch.stream_stream("/test.Echo/Bidi")()
                await holding.write(b"x")
                assert await holding.read() == b"a:x"
                loop = asyncio.get_running_loop()
                began = loop.time()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/test.Echo/Unary")(b"", timeout=10)
                waited = loop.time() - began
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "no free stream within 0.5s" in (info.value.details() or "")
                assert waited < 5, "three tries of 0.5 s, not the call's 10 s deadline"
                assert local_errors(proxy)["backend_busy"] == 1
                # With another endpoint, the call goes there instead of failing.
                await applied(proxy, await put(etcd, scheme, "round_robin", [a, b]))
                for _ in range(4):
                    assert await who(ch) in {"a", "b"}
                await holding.done_writing()
                assert await holding.code() == grpc.StatusCode.OK
                assert local_errors(proxy)["backend_busy"] == 1
    finally:
        await a.stop()
        await b.stop()


async def test_rapid_reset_ends_in_goaway(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with serving(etcd, scheme, etcd_server) as (proxy, _):
        sent = 0
        async with RawH2(proxy.port) as raw:
            # HEADERS then RST_STREAM at once (CVE-2023-44487), ten pairs per write, until
            # GOAWAY; bounded at 5,000 pairs.
            while sent < 5000 and not any(
                isinstance(e, h2.events.ConnectionTerminated) for e in raw.events
            ):
                for _ in range(10):
                    sid = raw.conn.get_next_available_stream_id()
                    raw.conn.send_headers(sid, HEADERS)
                    raw.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    sent += 1
                try:
                    raw.flush()
                    await raw.writer.drain()
                except OSError:
                    break
                await raw.read(0.005)
            goaway = await raw.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
        # The proxy ends it after 100 premature resets (the rule's minimum), a few more in
        # flight.
        assert sent <= 300, f"GOAWAY after {sent} resets"
        # (The HTTP/2 library's own limit may be the one hit: counted just after its GOAWAY.)
        await eventually(
            lambda: _async(limits(proxy)),
            lambda hit: hit["rapid_reset"] + hit["flood"] == 1,
            what="the reset flood counted",
        )
        opened = sum(s.requests for s in proxy.engine.stats())
        assert opened <= 200, f"{opened} backend streams opened for the flood"
        async with channel(proxy) as ch:
            assert await who(ch) == "a"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


async def test_a_continuation_flood_ends_in_goaway_within_a_few_frames(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with serving(etcd, scheme, etcd_server) as (proxy, a):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(PREFACE + frame(4, 0, 0, b""))
        # A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
        # frames one at a time (a literal header each), watching for the GOAWAY after each.
        literal = b"\x00\x01a\x01b"
        writer.write(frame(1, 0, 1, literal))
        received = b""
        sent = 0
        while sent < 1000 and b"too_many_continuations" not in received:
            writer.write(frame(9, 0, 1, literal))
            sent += 1
            with contextlib.suppress(TimeoutError):
                received += await asyncio.wait_for(reader.read(65536), 0.05)
        writer.close()
        assert b"too_many_continuations" in received, "GOAWAY, ENHANCE_YOUR_CALM"
        assert sent <= 10, f"GOAWAY only after {sent} CONTINUATION frames"
        # (Counted once the connection's task sees the error, just after the GOAWAY left.)
        await eventually(
            lambda: _async(limits(proxy)["flood"]), lambda n: n == 1, what="the flood counted"
        )
        assert a.calls == 0
        async with channel(proxy) as ch:
            assert await who(ch) == "a"


async def test_client_headers_under_the_proxys_prefix_never_reach_backends(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    async with serving(etcd, scheme, etcd_server) as (proxy, a):
        async with channel(proxy) as ch:
            # (x-weighbridge-endpoint, the one that steers a call, is test_debug.py's.)
            md = (
                ("x-weighbridge-backend", "spoofed"),
                ("x-weighbridge-debug", "1"),
                ("x-other", "kept"),
            )
            await ch.unary_unary("/test.Echo/Unary")(b"", metadata=md, timeout=5)
        seen = a.seen[-1].metadata
        assert seen["x-other"] == "kept"
        assert not [k for k in seen if k.startswith("x-weighbridge-")]


# --- HTTP/2 conformance --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nginx_backend(work: Any) -> AsyncIterator[int]:
    """nginx answering every HTTP/2 request (h2c, prior knowledge) with 200 and a body: the
    backend both proxies forward the conformance suite's requests to."""
    from bench.launch import start_nginx, stop

    port = testenv.free_port()
    conf = work / "backend.conf"
    conf.write_text(f"""
worker_processes 1;
pid {work}/backend.pid;
error_log {work}/backend-error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/backend-body;
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ return 200 "conformance backend\\n"; }}
  }}
}}
""")
    with (work / "backend.log").open("wb") as log:
        proc = start_nginx(work, conf, log)
    try:
        await wait_port(port)
        yield port
    finally:
        stop([proc])


async def wait_port(port: int, timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def h2spec(port: int, report: Any, *sections: str) -> dict[str, bool]:
    """Runs the h2spec suite (or these sections of it, like ``http2/5.1``) against
    127.0.0.1:port; case id → passed (skipped cases left out)."""
    import xml.etree.ElementTree as ET

    binary = testenv.build("h2spec")
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "-p",
        str(port),
        "-P",
        "/test.Echo/Unary",
        "-o",
        "3",
        "-j",
        str(report),
        *sections,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(proc.wait(), 240)
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        name = f"{case.get('package')} {case.get('classname')}: {case.get('name')}"
        out[name] = case.find("failure") is None and case.find("error") is None
    return out


async def test_http2_conformance_at_least_haproxys(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Any
) -> None:
    """Every h2spec case HAProxy passes in front of the same backend passes against the
    proxy too."""
    from bench.launch import haproxy_config, start_haproxy, stop

    async with nginx_backend(tmp_path) as backend:
        target = EchoBackend("nginx", port=backend)  # only its address, for the set
        haproxy_port = testenv.free_port()
        conf = haproxy_config(tmp_path, haproxy_port, [backend])
        with (tmp_path / "haproxy.log").open("wb") as log:
            haproxy = start_haproxy(conf, log)
        try:
            await wait_port(haproxy_port)
            anchor = await h2spec(haproxy_port, tmp_path / "haproxy.xml")
            async with running_proxy(etcd_server.endpoint, scheme) as proxy:
                await applied(
                    proxy,
                    await put(etcd, scheme, "round_robin", [target], grpc_services=("test.Echo",)),
                )
                ours = await h2spec(proxy.port, tmp_path / "weighbridge.xml")
                # A case may fail by timing: DATA after the client's RST_STREAM (5.1) is
                # answered STREAM_CLOSED once the proxy has let go of the stream, but with a
                # connection error while its call still holds it (the h2 library's rule). Such
                # a section runs once more; a case must pass there.
                behind = {c.split(" ")[0] for c, ok in anchor.items() if ok and not ours.get(c)}
                if behind:
                    again = await h2spec(proxy.port, tmp_path / "again.xml", *sorted(behind))
                    ours.update({c: ok for c, ok in again.items() if ok})
        finally:
            stop([haproxy])
    assert sum(anchor.values()) >= 130, f"HAProxy passed only {sum(anchor.values())}"
    behind_twice = sorted(case for case, ok in anchor.items() if ok and not ours.get(case))
    assert not behind_twice, f"passed by HAProxy, not by Weighbridge: {behind_twice}"
