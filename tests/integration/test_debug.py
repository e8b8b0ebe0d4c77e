"""Debugging aids on real parts: the debug header's metadata and the forced endpoint, through a
real proxy and its engine in front of real grpc.aio backends, with the sets in a real etcd.

A call carrying ``x-weighbridge-debug: 1`` learns where it went and why; a call carrying
``x-weighbridge-endpoint: POD`` goes to that pod when the Service's ``weighbridge.io/debug``
allows it (``BackendSet.options['debug']``, which the controller writes from the annotation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import aetcd
import grpc
import pytest

from devtools import testenv
from tests.echo import EchoBackend, echo_backends
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import applied, channel
from tests.integration.test_proxy_resilience import metric_values, scrape
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration
UNARY = "/test.Echo/Unary"
DEBUG = (("x-weighbridge-debug", "1"),)
GENERATION = 41


async def put(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    backends: Sequence[EchoBackend],
    options: Mapping[str, str] | None = None,
    strategy: str = "round_robin",
) -> int:
    """Service default/echo on ``backends``, each the endpoint of pod ``echo-NAME``."""
    return await store.put_set(
        etcd,
        scheme,
        BackendSet(
            namespace="default",
            name="echo",
            strategy=strategy,
            endpoints=tuple(Endpoint(b.host, b.port, pod=f"echo-{b.name}") for b in backends),
            generation=GENERATION,
            options=dict(options or {}),
        ),
    )


Metadata = dict[str, str]


async def unary(
    ch: grpc.aio.Channel, *metadata: tuple[str, str]
) -> tuple[grpc.StatusCode, str, Metadata, Metadata]:
    """(code, details, initial metadata, trailing metadata) of one unary call."""
    call = ch.unary_unary(UNARY)(b"", timeout=10, metadata=metadata)
    try:
        await call
    except grpc.aio.AioRpcError as e:
        initial, trailing = e.initial_metadata(), e.trailing_metadata()
        return e.code(), e.details() or "", dict(initial or ()), dict(trailing or ())
    return (
        grpc.StatusCode.OK,
        "",
        dict(await call.initial_metadata()),
        dict(await call.trailing_metadata()),
    )


def own(metadata: Metadata) -> Metadata:
    """The proxy's debug metadata among ``metadata``."""
    return {k: v for k, v in metadata.items() if k.startswith("x-weighbridge-")}


def never_forwarded(*backends: EchoBackend) -> None:
    """No backend saw a request header of the proxy's own."""
    for b in backends:
        for seen in b.seen:
            assert not own(seen.metadata), (b.name, seen.metadata)


async def test_the_debug_header_names_the_backend_pod_strategy_set_and_reason(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """The metadata a debug call gets names where it went and why, in the words Explain uses
    for the same pick; a call without the header gets nothing of the kind, and backends never
    see the header."""
    async with (
        echo_backends("a", "b") as (a, b),
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        revision = await put(etcd, scheme, [a, b])
        await applied(proxy, revision)
        async with (
            channel(proxy) as ch,
            grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin,
        ):
            stub = admin_pb2_grpc.AdminStub(admin)
            for _ in range(4):
                explained = await stub.Explain(
                    admin_pb2.ExplainRequest(authority="echo.default", method=UNARY)
                )
                code, _, initial, trailing = await unary(ch, *DEBUG)
                assert code == grpc.StatusCode.OK
                backend = {"a": a, "b": b}[initial["x-backend"]]
                assert own(initial) == {
                    "x-weighbridge-service": "default/echo",
                    "x-weighbridge-strategy": "round_robin",
                    "x-weighbridge-generation": str(GENERATION),
                    "x-weighbridge-revision": str(revision),
                    "x-weighbridge-backend": backend.hostport,
                    "x-weighbridge-pod": f"echo-{backend.name}",
                    "x-weighbridge-attempts": "1",
                    "x-weighbridge-reason": explained.reason,
                }
                assert explained.endpoint.port == backend.port
                assert explained.reason.startswith("round_robin: next in the rotation (position")
                assert not own(trailing)

            code, _, initial, trailing = await unary(ch)
            assert code == grpc.StatusCode.OK
            assert not own(initial) and not own(trailing)
            # x-weighbridge-* request headers are the proxy's: taken out, never forwarded.
            await unary(ch, ("x-weighbridge-anything", "x"), ("x-kept", "y"))
            assert b.seen[-1].metadata.get("x-kept") or a.seen[-1].metadata.get("x-kept")
            never_forwarded(a, b)

        # A Service may refuse debug metadata to its callers.
        await applied(proxy, await put(etcd, scheme, [a, b], {"debug": "metadata: off"}))
        async with channel(proxy) as ch:
            code, _, initial, trailing = await unary(ch, *DEBUG)
            assert code == grpc.StatusCode.OK
            assert not own(initial) and not own(trailing)

        body = await scrape(proxy.metrics_port)
        calls = metric_values(body, "weighbridge_proxy_debug_calls_total")
        assert calls['{kind="metadata",service="default/echo"}'] == 4, calls


async def test_debug_metadata_is_initial_metadata_when_calls_fail_too(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """A failure is when a caller most wants to know where the call went: a backend's
    Trailers-Only error and the proxy's own errors carry the debug metadata as initial
    metadata; the status and the backend's trailing metadata stay what they were."""
    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        a.fail = grpc.StatusCode.PERMISSION_DENIED  # Trailers-Only, as a failing server does
        await applied(proxy, await put(etcd, scheme, [a]))
        async with channel(proxy) as ch:
            code, details, initial, trailing = await unary(ch, *DEBUG)
            assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "a fails every call")
            assert own(initial)["x-weighbridge-backend"] == a.hostport
            assert own(initial)["x-weighbridge-pod"] == "echo-a"
            assert not own(trailing)
            # Without the header the backend's Trailers-Only answer passes as it was.
            code, details, initial, trailing = await unary(ch)
            assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "a fails every call")
            assert not own(initial) and not own(trailing)

        # The proxy's own error: the only endpoint refuses connections.
        gone = testenv.free_port()
        down = EchoBackend("down", port=gone)
        await applied(proxy, await put(etcd, scheme, [down]))
        async with channel(proxy) as ch:
            code, details, initial, _ = await unary(ch, *DEBUG)
            assert code == grpc.StatusCode.UNAVAILABLE
            assert details.startswith(f"weighbridge: backend 127.0.0.1:{gone}"), details
            assert own(initial)["x-weighbridge-backend"] == f"127.0.0.1:{gone}"
            assert own(initial)["x-weighbridge-strategy"] == "round_robin"
            code, _, initial, trailing = await unary(ch)
            assert code == grpc.StatusCode.UNAVAILABLE
            assert not own(initial) and not own(trailing)


async def explain(proxy: object, **headers: str) -> admin_pb2.ExplainResponse:
    """The proxy's admin API's Explain of a call to default/echo with these headers."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin:  # type: ignore[attr-defined]
        return await admin_pb2_grpc.AdminStub(admin).Explain(
            admin_pb2.ExplainRequest(authority="echo.default", method=UNARY, headers=headers)
        )


async def test_a_forced_endpoint_needs_the_services_leave_and_a_pod_it_has(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """``x-weighbridge-endpoint: POD`` is refused (FAILED_PRECONDITION, naming the annotation
    that allows it) unless the Service allows it; allowed, every such call goes to that pod,
    and a pod the Service does not have is NOT_FOUND, naming the pods it has. Explain, given
    the header, says the same without a call."""
    async with (
        echo_backends("a", "b", "c") as backends,
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        a, b, c = backends
        await applied(proxy, await put(etcd, scheme, backends))
        force_b = ("x-weighbridge-endpoint", "echo-b")
        refused = (
            "weighbridge: Service default/echo does not allow x-weighbridge-endpoint; "
            "annotate it with weighbridge.io/debug: 'endpoint-override: on' to allow it"
        )
        async with channel(proxy) as ch:
            code, details, _, _ = await unary(ch, force_b)
            assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, refused)
            assert a.calls + b.calls + c.calls == 0
        assert (await explain(proxy, **dict([force_b]))).error == refused

        allowed = {"debug": "endpoint-override: on"}
        await applied(proxy, await put(etcd, scheme, backends, allowed))
        async with channel(proxy) as ch:
            for _ in range(12):
                code, _, initial, _ = await unary(ch, force_b)
                assert (code, initial["x-backend"]) == (grpc.StatusCode.OK, "b")
            code, _, initial, _ = await unary(ch, force_b, *DEBUG)
            assert initial["x-weighbridge-reason"] == "forced by x-weighbridge-endpoint: pod echo-b"
            assert initial["x-weighbridge-pod"] == "echo-b"
            assert (a.calls, b.calls, c.calls) == (0, 13, 0)
            # Without the header the strategy picks as ever.
            assert {(await unary(ch))[2]["x-backend"] for _ in range(3)} == {"a", "b", "c"}

            code, details, initial, _ = await unary(
                ch, ("x-weighbridge-endpoint", "echo-z"), *DEBUG
            )
            assert code == grpc.StatusCode.NOT_FOUND
            assert details == (
                "weighbridge: Service default/echo has no endpoint of pod 'echo-z' that takes "
                "calls (serving, not terminating, weight > 0); its pods: echo-a, echo-b, echo-c"
            )
            assert own(initial)["x-weighbridge-service"] == "default/echo"
            assert "x-weighbridge-backend" not in initial
        never_forwarded(a, b, c)
        explained = await explain(proxy, **dict([force_b]))
        assert (explained.endpoint.port, explained.reason) == (
            b.port,
            "forced by x-weighbridge-endpoint: pod echo-b",
        )
        explained = await explain(proxy, **{"x-weighbridge-endpoint": "echo-z"})
        assert explained.error.startswith(
            "weighbridge: Service default/echo has no endpoint of pod 'echo-z'"
        ), explained.error

        body = await scrape(proxy.metrics_port)
        calls = metric_values(body, "weighbridge_proxy_debug_calls_total")
        assert calls['{kind="endpoint_override",service="default/echo"}'] == 13, calls
        local = metric_values(body, "weighbridge_proxy_local_errors_total")
        assert local['{reason="endpoint_override_denied"}'] == 1, local
        assert local['{reason="endpoint_not_found"}'] == 1, local


async def test_a_forced_call_reaches_an_ejected_endpoint(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd
) -> None:
    """Outlier detection keeps the strategy's calls away from an ejected endpoint, not the
    calls forced to it: they go (that is how one checks whether it has recovered), and the
    debug reason says it is ejected."""
    async with (
        echo_backends("a", "b") as (a, b),
        running_proxy(etcd_server.endpoint, scheme) as proxy,
    ):
        b.fail = grpc.StatusCode.UNAVAILABLE
        options = {
            "debug": "endpoint-override: on",
            "outlier-detection": "consecutive-failures: 1; base-ejection-time: 5m; "
            "max-ejected: 50%",
        }
        await applied(proxy, await put(etcd, scheme, [a, b], options))
        async with channel(proxy) as ch:
            await eventually(
                lambda: unary(ch),
                lambda r: r[0] == grpc.StatusCode.UNAVAILABLE,
                what="b's failure",
            )
            picked = {(await unary(ch))[2].get("x-backend") for _ in range(6)}
            assert picked == {"a"}, "b is ejected"
            before = b.calls
            b.fail = None
            code, _, initial, _ = await unary(ch, ("x-weighbridge-endpoint", "echo-b"), *DEBUG)
            assert (code, initial["x-backend"]) == (grpc.StatusCode.OK, "b")
            assert b.calls == before + 1
            reason = initial["x-weighbridge-reason"]
            assert reason.startswith(
                f"forced by x-weighbridge-endpoint: pod echo-b; but {b.hostport} is ejected ("
            ), reason
            assert reason.endswith("and a forced call goes to it anyway"), reason
