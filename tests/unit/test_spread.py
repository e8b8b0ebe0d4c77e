"""wbctl spread's arithmetic: the proxies' counters summed, against the expected shares, in
binomial standard deviations, with a verdict; counters read twice count only the calls between."""

from __future__ import annotations

import io
import math

import pytest

from wbtools import spreading
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint, endpoint_to_proto, to_proto
from weighbridge.v1 import admin_pb2

KEY = ServiceKey("shop/cart")
SET = BackendSet(
    "shop",
    "cart",
    "weighted_random",
    (
        Endpoint("198.18.0.1", 50051, 9, pod="v1-a"),
        Endpoint("198.18.0.2", 50051, 9, pod="v1-b"),
        Endpoint("198.18.0.3", 50051, 2, pod="v2-a"),
    ),
)


def answer(
    proxy: str, requests: list[int], *, revision: int = 7, backend_set: BackendSet = SET
) -> admin_pb2.ListBackendSetsResponse:
    shares = backend_set.probabilities()
    status = admin_pb2.ServiceStatus(backend_set=to_proto(backend_set), mod_revision=revision)
    for e, n in zip(backend_set.endpoints, requests, strict=True):
        status.backends.append(
            admin_pb2.BackendStatus(
                endpoint=endpoint_to_proto(e),
                eligible=e.eligible,
                share=float(shares.get(e.hostport, 0)),
                requests=n,
            )
        )
    return admin_pb2.ListBackendSetsResponse(proxy_id=proxy, services=[status])


def test_counters_of_every_proxy_add_up_against_the_expected_shares() -> None:
    spread = spreading.compare(
        KEY, None, [answer("p1", [450, 450, 100]), answer("p2", [460, 440, 100])]
    )
    assert spread.total == 2000
    rows = {r.pod: r for r in spread.rows}
    assert rows["v1-a"].calls == 910
    assert rows["v1-a"].per_proxy == (450, 460)
    # 2000 calls at p = 0.45: mean 900, sigma sqrt(2000 * 0.45 * 0.55) = 22.25
    assert rows["v1-a"].deviation(2000) == pytest.approx(10 / math.sqrt(495))
    assert rows["v2-a"].deviation(2000) == 0.0
    assert spread.verdict == "ok"

    out = io.StringIO()
    spreading.print_spread(spread, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "Service shop/cart: weighted_random, 2000 calls through 2 proxies (p1, p2); verdict: ok"
    )
    assert lines[2].split() == [
        "POD", "ENDPOINT", "CALLS", "OBSERVED", "EXPECTED", "DEVIATION", "VERDICT"
    ]  # fmt: skip
    assert lines[3].split() == [
        "v1-a",
        "198.18.0.1:50051",
        "910",
        "45.50%",
        "45.00%",
        "+0.4\u03c3",
        "ok",
    ]

    doc = spreading.to_json(spread)
    assert doc["endpoints"][2]["callsPerProxy"] == [100, 100]
    assert doc["proxies"] == [{"id": "p1", "setRevision": 7}, {"id": "p2", "setRevision": 7}]


def test_a_skewed_spread_is_called_off() -> None:
    spread = spreading.compare(KEY, None, [answer("p1", [500, 500, 0])])
    rows = {r.pod: r for r in spread.rows}
    assert rows["v2-a"].verdict(1000) == "off"  # 0 of 1000 at p = 0.1: -10.5 sigma
    assert rows["v1-a"].verdict(1000) == "unlikely"  # 500 at p = 0.45: +3.2 sigma
    assert spread.verdict == "off"


def test_no_calls_and_calls_to_an_endpoint_expected_to_get_none() -> None:
    assert spreading.compare(KEY, None, [answer("p1", [0, 0, 0])]).verdict == "no calls"
    draining = BackendSet(
        "shop", "cart", "round_robin", (*SET.endpoints[:2], Endpoint("198.18.0.3", 50051, 0))
    )
    spread = spreading.compare(KEY, None, [answer("p1", [50, 50, 3], backend_set=draining)])
    row = spread.rows[2]
    assert row.expected == 0.0
    assert row.deviation(103) == math.inf
    assert row.verdict(103) == "off"
    assert spreading.to_json(spread)["endpoints"][2]["deviationSigma"] is None


def test_an_interval_counts_only_the_calls_between_two_readings() -> None:
    before = [answer("p1", [1000, 0, 0])]  # an older set sent everything to one pod
    after = [answer("p1", [1450, 450, 100])]
    spread = spreading.compare(KEY, before, after, interval=5)
    assert [r.calls for r in spread.rows] == [450, 450, 100]
    assert spread.verdict == "ok"
    out = io.StringIO()
    spreading.print_spread(spread, out)
    assert "1000 calls in 5s through 1 proxy (p1)" in out.getvalue()


def test_proxies_out_of_step_are_named_and_the_newest_set_is_expected() -> None:
    older = BackendSet("shop", "cart", "weighted_random", SET.endpoints[:2])
    spread = spreading.compare(
        KEY, None, [answer("p1", [5, 5], revision=6, backend_set=older), answer("p2", [9, 9, 2])]
    )
    assert [r.expected for r in spread.rows] == [0.45, 0.45, 0.1]
    out = io.StringIO()
    spreading.print_spread(spread, out)
    assert "the proxies applied different versions of the set (revisions 6, 7)" in out.getvalue()


def test_a_proxy_without_the_set_is_an_error() -> None:
    empty = admin_pb2.ListBackendSetsResponse(proxy_id="p9")
    with pytest.raises(Exception, match="proxy p9 has no backend set for shop/cart"):
        spreading.compare(KEY, None, [empty])
