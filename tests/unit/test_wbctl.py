"""wbctl without etcd: failover options for `put`, and `backends` against a proxy's admin API
(a real grpc.aio server on loopback, serving the proxy's AdminService over a fake engine)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from dataplane.admin import AdminService
from dataplane.routing import Routes
from dataplane.subscription import Subscription
from tests.unit.fakeengine import FakeEngine, stats_row
from weighbridge import wbctl
from weighbridge.errors import WeighbridgeError
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2_grpc


def test_put_options_are_checked_and_canonical() -> None:
    assert wbctl.parse_option("retry=on: UNAVAILABLE;attempts:3") == (
        "retry",
        "on: unavailable; attempts: 3; backoff: 25ms..250ms; budget: 20% + 10/s",
    )
    assert wbctl.parse_option("panic-threshold=0%") == ("panic-threshold", "0%")
    with pytest.raises(
        ValueError, match="option 'retries=x' is not KEY=TEXT with KEY one of retry"
    ):
        wbctl.parse_option("retries=x")
    with pytest.raises(ValueError, match="option retry: attempts: 9 is not from 2 to 5"):
        wbctl.parse_option("retry=on: 14; attempts: 9")


@pytest.fixture
async def admin() -> AsyncIterator[str]:
    """HOST:PORT of an admin API with Service ns/svc applied: one endpoint ejected 90 s ago,
    one healthy, one terminating."""
    engine = FakeEngine()
    routes = Routes(engine)
    endpoints = (
        Endpoint("10.0.0.1", 80, pod="a"),
        Endpoint("10.0.0.2", 80, pod="b"),
        Endpoint("10.0.0.3", 80, pod="c", terminating=True),
    )
    routes.apply(ServiceKey("ns/svc"), BackendSet("ns", "svc", "round_robin", endpoints), 5)
    engine.rows = [
        stats_row("ns/svc", "10.0.0.1:80", since=1000.0, requests=7),
        stats_row(
            "ns/svc",
            "10.0.0.2:80",
            state="ejected",
            reason="5 consecutive failures (last: UNAVAILABLE)",
            since=1000.0 - 90,
            ejections=1,
        ),
    ]
    sub = Subscription(None, KeyScheme("/wb/"), routes.apply)  # type: ignore[arg-type]
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService("proxy-1", routes, engine, sub), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_backends_shows_each_endpoints_state_and_why(admin: str) -> None:
    args = wbctl.build_parser().parse_args(["backends", "--admin", admin, "-o", "json"])
    out = io.StringIO()
    assert await wbctl.run(args, out) == 0
    doc = json.loads(out.getvalue())
    assert doc["proxyId"] == "proxy-1"
    states = {
        e["pod"]: (e["state"], e["stateReason"], e["ejections"])
        for e in doc["services"][0]["endpoints"]
    }
    assert states == {
        "a": ("healthy", "", 0),
        "b": ("ejected", "5 consecutive failures (last: UNAVAILABLE)", 1),
        "c": ("draining", "terminating", 0),
    }

    table = io.StringIO()
    args = wbctl.build_parser().parse_args(["backends", "ns/svc", "--admin", admin])
    assert await wbctl.run(args, table) == 0
    lines = table.getvalue().splitlines()
    assert lines[0] == "proxy proxy-1, applied revision 0"
    assert lines[2].split() == [
        "SERVICE",
        "ENDPOINT",
        "POD",
        "SHARE",
        "STATE",
        "SINCE",
        "EJECTIONS",
        "REQUESTS",
        "ERRORS",
        "REASON",
    ]
    rows = {line.split()[2]: line for line in lines[3:]}
    assert rows["b"].split()[4] == "ejected"
    assert rows["b"].endswith("5 consecutive failures (last: UNAVAILABLE)")
    assert rows["c"].split()[4:6] == ["draining", "-"]


async def test_backends_of_an_unknown_service_fail_plainly(admin: str) -> None:
    args = wbctl.build_parser().parse_args(["backends", "ns/nope", "--admin", admin])
    with pytest.raises(WeighbridgeError) as caught:
        await wbctl.run(args, io.StringIO())
    assert str(caught.value) == f"no backend set for ns/nope (proxy admin API at {admin})"


def test_since_reads_as_time_ago() -> None:
    assert [wbctl.ago(s) for s in (0.4, 59, 119, 120, 7199, 7200, 200_000)] == [
        "0s",
        "59s",
        "119s",
        "2m",
        "119m",
        "2h",
        "2d",
    ]
