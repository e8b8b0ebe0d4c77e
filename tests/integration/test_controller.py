"""The controller against a real kube-apiserver and a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.annotations import GRPC_SERVICES, POD_WEIGHT
from controlplane.settings import DEFAULTS
from devtools import testenv
from tests.integration import kubeobjects as ko
from tests.integration.conftest import Cluster, eventually, metric, running_controller, stored_set
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint, decode, encode

pytestmark = pytest.mark.integration

WRR = {"weighbridge.io/strategy": "weighted_round_robin"}


def shares_by_pod(bs: BackendSet) -> dict[str, Fraction]:
    probabilities = bs.probabilities()
    return {e.pod: probabilities.get(e.hostport, Fraction(0)) for e in bs.endpoints}


async def test_150_endpoints_over_two_slices_make_one_set(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "api", {"weighbridge.io/strategy": "round_robin"}))
    eps = [ko.Ep(ko.address(i)) for i in range(150)]
    await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-a", eps[:100]))
    await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-b", eps[100:140]))
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        # A third slice arriving later is merged too.
        await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-c", eps[140:]))
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/api"),
            lambda s: s is not None and len(s.endpoints) == 150,
            what="150 endpoints in etcd",
        )
    assert bs is not None
    assert {e.address for e in bs.endpoints} == {ko.address(i) for i in range(150)}
    assert all(e.port == 50051 and e.serving and not e.terminating for e in bs.endpoints)
    assert bs.strategy == "round_robin"
    assert bs.source == "endpointslices"
    assert set(bs.probabilities().values()) == {Fraction(1, 150)}


async def _pods_and_slice(
    k8s: Cluster, svc: str, versions: list[str], weights: dict[int, str] | None = None
) -> None:
    eps = []
    for i, version in enumerate(versions):
        name = f"{svc}-{i}"
        annotations = {"weighbridge.io/weight": weights[i]} if weights and i in weights else {}
        await k8s.create(ko.pod(k8s.ns, name, {"app": svc, "version": version}, annotations))
        eps.append(ko.Ep(ko.address(i), pod=name))
    await k8s.create(ko.endpoint_slice(k8s.ns, svc, f"{svc}-slice", eps))


@pytest.mark.parametrize(("v1", "v2"), [(9, 1), (1, 9)])
async def test_group_weights_hold_90_10_whatever_the_replica_count(
    v1: int,
    v2: int,
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    annotations = {**WRR, "weighbridge.io/weights": "version=v1: 90%\nversion=v2: 10%"}
    await k8s.create(ko.service(k8s.ns, "shop", annotations))
    await _pods_and_slice(k8s, "shop", ["v1"] * v1 + ["v2"] * v2)
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/shop"),
            lambda s: s is not None and len(s.endpoints) == v1 + v2,
            what="set published",
        )
    assert bs is not None
    shares = shares_by_pod(bs)
    v1_share = sum(shares[f"shop-{i}"] for i in range(v1))
    v2_share = sum(shares[f"shop-{i}"] for i in range(v1, v1 + v2))
    assert (v1_share, v2_share) == (Fraction(9, 10), Fraction(1, 10))
    # Within a group, pods share equally; P_i = w_i / sum(w) exactly.
    assert len({shares[f"shop-{i}"] for i in range(v1)}) == 1
    total = sum(e.weight for e in bs.endpoints)
    assert all(shares[e.pod] == Fraction(e.weight, total) for e in bs.endpoints)


async def test_per_pod_weights_from_pod_annotation_and_service_annotation(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "db", {**WRR, "weighbridge.io/weights": "pod/db-2: 5"}))
    await _pods_and_slice(k8s, "db", ["v1", "v1", "v1"], weights={1: "3"})
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/db"),
            lambda s: s is not None and len(s.endpoints) == 3,
        )
        assert bs is not None
        assert shares_by_pod(bs) == {
            "db-0": Fraction(1, 9),
            "db-1": Fraction(3, 9),
            "db-2": Fraction(5, 9),
        }
        # The Pod annotation follows the pod: changing it changes the set.
        await k8s.annotate("Pod", "db-0", **{"weighbridge.io/weight": "0"})
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/db"),
            lambda s: s is not None and s.generation == 2,
        )
        assert bs is not None
        assert shares_by_pod(bs) == {"db-0": 0, "db-1": Fraction(3, 8), "db-2": Fraction(5, 8)}


async def test_not_serving_and_terminating_endpoints_get_no_new_traffic(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "web", {"weighbridge.io/strategy": "random"}))
    await k8s.create(
        ko.endpoint_slice(
            k8s.ns,
            "web",
            "web-a",
            [
                ko.Ep(ko.address(0), zone="zone-a", hint_zones=("zone-a", "zone-b")),
                ko.Ep(ko.address(1), ready=False, serving=False, zone="zone-b"),
                ko.Ep(ko.address(2), ready=False, serving=True, terminating=True, zone="zone-c"),
            ],
        )
    )
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/web"), lambda s: s is not None
        )
    assert bs is not None
    by_ip = {e.address: e for e in bs.endpoints}
    assert (by_ip[ko.address(1)].serving, by_ip[ko.address(1)].terminating) == (False, False)
    assert (by_ip[ko.address(2)].serving, by_ip[ko.address(2)].terminating) == (True, True)
    assert by_ip[ko.address(2)].zone == "zone-c"
    # EndpointSlice hints, as the apiserver stored them, travel to the proxies.
    assert by_ip[ko.address(0)].hint_zones == ("zone-a", "zone-b")
    assert [e.address for e in bs.eligible] == [ko.address(0)]
    assert bs.probabilities() == {f"{ko.address(0)}:50051": 1}


async def test_v1_endpoints_source(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "legacy", WRR))
    await k8s.create(
        ko.endpoints(
            k8s.ns,
            "legacy",
            [ko.Ep(ko.address(0)), ko.Ep(ko.address(1))],
            not_ready=[ko.Ep(ko.address(2))],
        )
    )
    async with running_controller(
        apiserver.kubeconfig, etcd_server.endpoint, scheme, source="endpoints"
    ):
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/legacy"), lambda s: s is not None
        )
    assert bs is not None
    assert bs.source == "endpoints"
    assert [(e.address, e.serving) for e in bs.endpoints] == [
        (ko.address(0), True),
        (ko.address(1), True),
        (ko.address(2), False),
    ]


BAD = [
    ({"weighbridge.io/strategy": "fastest"}, "InvalidStrategy", "'fastest' is not a strategy"),
    ({"weighbridge.io/weights": "version=v1 90%"}, "InvalidWeights", "is not 'TARGET: VALUE'"),
    (
        {"weighbridge.io/weights": "version=v1: 90%\nversion=v2: 5%"},
        "InvalidWeights",
        "add up to 95%",
    ),
    (
        {"weighbridge.io/weights": "version=v1: 90%\nversion=v2: 10"},
        "InvalidWeights",
        "mix of percentages",
    ),
    ({"weighbridge.io/weights": "version=v1: -3"}, "InvalidWeights", "is not a number"),
    ({"weighbridge.io/weights": "pod/x: 1.5"}, "InvalidWeights", "is not a whole number"),
    ({"weighbridge.io/port": "http"}, "InvalidPort", "has no port 'http'"),
    (
        {"weighbridge.io/debug": "endpoint-override: yes"},
        "InvalidDebug",
        "weighbridge.io/debug: endpoint-override: 'yes' is not 'on' or 'off'",
    ),
]


@pytest.mark.parametrize(
    ("patch", "reason", "message"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)]
)
async def test_bad_annotation_gives_event_and_keeps_last_good_set(
    patch: dict[str, str],
    reason: str,
    message: str,
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "good", WRR))
    await k8s.create(ko.service(k8s.ns, "other", WRR))
    await k8s.create(ko.endpoint_slice(k8s.ns, "good", "good-a", [ko.Ep(ko.address(0))]))
    await k8s.create(ko.endpoint_slice(k8s.ns, "other", "other-a", [ko.Ep(ko.address(1))]))
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme) as controller:
        first = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/good"), lambda s: s is not None
        )
        await k8s.annotate("Service", "good", **patch)
        events = await eventually(
            lambda: k8s.events("good"),
            lambda evs: any(e["reason"] == reason for e in evs),
            what=f"Event {reason}",
        )
        event = next(e for e in events if e["reason"] == reason)
        assert event["type"] == "Warning"
        assert message in event["message"]
        assert event["source"]["component"] == "weighbridge-controller"
        assert (
            metric(controller, "weighbridge_controller_invalid_annotations_total", reason=reason)
            >= 1
        )
        # The last good set stays, while the controller keeps reconciling other Services.
        await k8s.create(ko.endpoint_slice(k8s.ns, "good", "good-b", [ko.Ep(ko.address(5))]))
        await k8s.create(ko.endpoint_slice(k8s.ns, "other", "other-b", [ko.Ep(ko.address(6))]))
        await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/other"),
            lambda s: s is not None and len(s.endpoints) == 2,
            what="other Service still reconciled",
        )
        assert await stored_set(etcd, scheme, f"{k8s.ns}/good") == first
        # Fixing the annotation publishes again.
        await k8s.annotate("Service", "good", **{k: WRR.get(k) for k in patch})
        await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/good"),
            lambda s: s is not None and len(s.endpoints) == 2,
            what="fixed Service republished",
        )


BAD_POD_WEIGHTS = ["\u00b2", "9" * 5000, "1.5", "-1"]
"""A superscript two and a number past int()'s 4300 digits once escaped the parser as
ValueError; a fraction and a negative number once froze the whole set."""


def pod_weight_problems(events: list[ko.Obj]) -> dict[str, str]:
    """Pod name → message of the InvalidPodWeight Events."""
    return {
        e["message"].split(":")[0].removeprefix("pod "): e["message"]
        for e in events
        if e["reason"] == "InvalidPodWeight"
    }


async def test_bad_pod_weights_affect_only_their_pods_and_the_set_follows_its_slices(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "svc", WRR))
    weights = [*BAD_POD_WEIGHTS, "3"]
    for i, weight in enumerate(weights):
        await k8s.create(ko.pod(k8s.ns, f"svc-{i}", {"app": "svc"}, {POD_WEIGHT: weight}))
    eps = [ko.Ep(ko.address(i), pod=f"svc-{i}") for i in range(len(weights))]
    await k8s.create(ko.endpoint_slice(k8s.ns, "svc", "svc-a", eps))

    async def stored() -> BackendSet | None:
        return await stored_set(etcd, scheme, f"{k8s.ns}/svc")

    def weights_by_pod(bs: BackendSet | None) -> dict[str, int]:
        return {} if bs is None else {e.pod: e.weight for e in bs.endpoints}

    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme) as controller:
        # Each bad pod gets the default weight 1; the good one keeps its 3.
        await eventually(
            stored,
            lambda s: (
                weights_by_pod(s) == {"svc-0": 1, "svc-1": 1, "svc-2": 1, "svc-3": 1, "svc-4": 3}
            ),
            what="set published with default weights for the bad pods",
        )
        events = await eventually(
            lambda: k8s.events("svc"),
            lambda evs: set(pod_weight_problems(evs)) == {"svc-0", "svc-1", "svc-2", "svc-3"},
            what="one InvalidPodWeight Event per bad pod",
        )
        for message in pod_weight_problems(events).values():
            assert "the pod gets the default weight 1" in message
            assert len(message) < 300  # the 5,000 digits are not all quoted
        assert all(e["type"] == "Warning" for e in events if e["reason"] == "InvalidPodWeight")
        assert (
            metric(
                controller,
                "weighbridge_controller_invalid_annotations_total",
                reason="InvalidPodWeight",
            )
            >= 4
        )

        # Pods come and go: the set follows its slices, bad pods and all.
        await k8s.create(ko.pod(k8s.ns, "svc-5", {"app": "svc"}, {POD_WEIGHT: "\u00b2"}))
        await k8s.create(ko.pod(k8s.ns, "svc-6", {"app": "svc"}, {POD_WEIGHT: "2"}))
        eps = [ko.Ep(ko.address(i), pod=f"svc-{i}") for i in range(1, 7)]
        await k8s.replace(ko.endpoint_slice(k8s.ns, "svc", "svc-a", eps))
        await eventually(
            stored,
            lambda s: (
                weights_by_pod(s)
                == {"svc-1": 1, "svc-2": 1, "svc-3": 1, "svc-4": 3, "svc-5": 1, "svc-6": 2}
            ),
            what="set following the slice",
        )
        await eventually(
            lambda: k8s.events("svc"),
            lambda evs: "svc-5" in pod_weight_problems(evs),
            what="an Event for the new bad pod",
        )
        # A fixed annotation is followed too.
        await k8s.annotate("Pod", "svc-2", **{POD_WEIGHT: "4"})
        await eventually(
            stored, lambda s: weights_by_pod(s).get("svc-2") == 4, what="fixed weight followed"
        )


async def test_slow_event_posting_does_not_delay_publishing(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme) as controller:
        # The controller's API server takes an hour to accept an Event; everything else is
        # as fast as ever.
        kube = controller.events.kube
        request = kube.request
        posting: list[str] = []

        async def slow_events(method: str, path: str, **kw: Any) -> ko.Obj:
            if method == "POST" and path.endswith("/events"):
                posting.append(kw["body"]["reason"])
                await asyncio.sleep(3600)
            return await request(method, path, **kw)

        monkeypatch.setattr(kube, "request", slow_events)

        # More Services with a bad annotation than the controller has workers, each reported
        # with an Event, so a reconcile that waited for its Event would hold every worker.
        for i in range(DEFAULTS.workers + 2):
            await k8s.create(ko.service(k8s.ns, f"bad-{i}", {"weighbridge.io/strategy": "fast"}))

        async def posts() -> int:
            return len(posting)

        await eventually(posts, lambda n: n >= 1, what="an Event post hanging")
        # A good Service, whose reconcile reports an Event of its own (a bad pod weight).
        await k8s.create(ko.service(k8s.ns, "good", WRR))
        await k8s.create(ko.pod(k8s.ns, "good-0", annotations={POD_WEIGHT: "lots"}))
        await k8s.create(
            ko.endpoint_slice(k8s.ns, "good", "good-a", [ko.Ep(ko.address(0), pod="good-0")])
        )
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/good"),
            lambda s: s is not None and len(s.endpoints) == 1,
            timeout=20,
            what="the good Service published while Events hang",
        )
        assert bs is not None
        assert bs.endpoints[0].weight == 1
        assert metric(controller, "weighbridge_controller_events_total", result="posted") == 0
        assert len(posting) == 1, "Events are posted one at a time"
        assert controller.events.queued >= DEFAULTS.workers + 1


# --- gRPC service names: one Service per name, the oldest claim wins -------------------------


def unique_grpc_service(what: str) -> str:
    """A gRPC service name no other test claims: the API server is shared by the session, and
    a Service another test left behind would win an older claim."""
    return f"t{uuid.uuid4().hex[:10]}.{what}"


async def grpc_routes(etcd: aetcd.Client, scheme: KeyScheme, key: str) -> tuple[str, ...] | None:
    bs = await stored_set(etcd, scheme, key)
    return None if bs is None else bs.grpc_services


@contextlib.asynccontextmanager
async def routers_of(
    etcd: aetcd.Client, scheme: KeyScheme, name: str
) -> AsyncIterator[list[set[str]]]:
    """After every write under ``scheme``, in etcd's order: the keys whose set lists ``name``."""
    revision, sets = await store.list_sets(etcd, scheme)
    current = {s.key: s.backend_set.grpc_services for s in sets if s.backend_set is not None}
    states: list[set[str]] = []
    watch = await etcd.watch_prefix(scheme.services_prefix, start_revision=revision + 1)

    async def follow() -> None:
        async for event in watch:
            key = scheme.service_key_of(event.kv.key)
            if event.kind == "DELETE":
                current.pop(key, None)
            else:
                current[key] = decode(event.kv.value).grpc_services
            states.append({k for k, names in current.items() if name in names})

    task = asyncio.create_task(follow())
    try:
        yield states
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(watch.cancel(), 5)


async def test_a_grpc_service_name_claimed_twice_goes_to_the_oldest_service(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    name, own = unique_grpc_service("Payments"), unique_grpc_service("Evil")
    # The younger Service's namespace sorts first: only the age can make the other one win.
    evil = await k8s.namespace("aaa")
    payments = f"{k8s.ns}/api"
    intruder = f"{evil.ns}/evil"

    def listed(key: str, names: tuple[str, ...]) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            return await grpc_routes(etcd, scheme, key) == names

        return probe

    async with (
        running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme) as controller,
        routers_of(etcd, scheme, name) as routers,
    ):
        await k8s.create(ko.service(k8s.ns, "api", {**WRR, GRPC_SERVICES: name}))
        await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-a", [ko.Ep(ko.address(0))]))
        await eventually(listed(payments, (name,)), bool, what="the first claim routed")
        await asyncio.sleep(1.1)  # creation times have whole seconds: the next one is younger
        await evil.create(ko.service(evil.ns, "evil", {**WRR, GRPC_SERVICES: f"{name}, {own}"}))
        await evil.create(ko.endpoint_slice(evil.ns, "evil", "evil-a", [ko.Ep(ko.address(1))]))

        # The younger claim loses the name and keeps its other one; a Warning names the winner.
        await eventually(listed(intruder, (own,)), bool, what="the younger set without the name")
        assert await grpc_routes(etcd, scheme, payments) == (name,)
        events = await eventually(
            lambda: evil.events("evil"),
            lambda evs: any(e["reason"] == "GrpcServiceNameTaken" for e in evs),
            what="GrpcServiceNameTaken Event",
        )
        taken = next(e for e in events if e["reason"] == "GrpcServiceNameTaken")
        assert taken["type"] == "Warning"
        assert f"{name} is routed to Service {payments}, which claimed it first" in taken["message"]
        assert metric(controller, "weighbridge_controller_grpc_service_names_taken") >= 1

        # The winner drops the name: the other Service gets it.
        await k8s.annotate("Service", "api", **{GRPC_SERVICES: None})
        await eventually(listed(intruder, (name, own)), bool, what="the name handed over")
        assert await grpc_routes(etcd, scheme, payments) == ()

        # The older Service claims it again: it wins again.
        await k8s.annotate("Service", "api", **{GRPC_SERVICES: name})
        await eventually(listed(payments, (name,)), bool, what="the name back to the oldest")
        assert await grpc_routes(etcd, scheme, intruder) == (own,)

        # The winner is deleted: the other Service gets the name.
        await k8s.delete("Service", "api")
        await eventually(listed(intruder, (name, own)), bool, what="the name to the survivor")
        assert await grpc_routes(etcd, scheme, payments) is None

    # At no moment did two sets in etcd route the name.
    assert {frozenset(s) for s in routers} >= {
        frozenset({payments}),
        frozenset({intruder}),
        frozenset(),
    }
    assert all(len(s) <= 1 for s in routers), routers


async def test_a_losing_claim_in_a_set_that_keeps_its_last_good_state_still_gives_the_name_up(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    """A Service with a bad annotation keeps its last good set, but not a name that an older
    Service now claims: a broken Service cannot hold a name hostage."""
    name = unique_grpc_service("Orders")
    await k8s.create(ko.service(k8s.ns, "old", WRR))
    await k8s.create(ko.endpoint_slice(k8s.ns, "old", "old-a", [ko.Ep(ko.address(0))]))
    await asyncio.sleep(1.1)
    await k8s.create(ko.service(k8s.ns, "young", {**WRR, GRPC_SERVICES: name}))
    await k8s.create(ko.endpoint_slice(k8s.ns, "young", "young-a", [ko.Ep(ko.address(1))]))
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        await eventually(
            lambda: grpc_routes(etcd, scheme, f"{k8s.ns}/young"),
            lambda names: names == (name,),
            what="the only claim routed",
        )
        await k8s.annotate("Service", "young", **{"weighbridge.io/strategy": "fastest"})
        await eventually(
            lambda: k8s.events("young"),
            lambda evs: any(e["reason"] == "InvalidStrategy" for e in evs),
        )
        await k8s.annotate("Service", "old", **{GRPC_SERVICES: name})
        await eventually(
            lambda: grpc_routes(etcd, scheme, f"{k8s.ns}/old"),
            lambda names: names == (name,),
            what="the older claim routed",
        )
        young = await stored_set(etcd, scheme, f"{k8s.ns}/young")
        assert young is not None
        assert young.grpc_services == ()
        assert young.strategy == "weighted_round_robin"  # the rest of its last good set stays


@pytest.mark.parametrize("allowed", ["listed", "off"])
async def test_routing_by_name_only_in_the_namespaces_the_controller_allows(
    allowed: str,
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    other = await k8s.namespace()
    mine, theirs = unique_grpc_service("Mine"), unique_grpc_service("Theirs")
    namespaces = (k8s.ns,) if allowed == "listed" else ()
    async with running_controller(
        apiserver.kubeconfig, etcd_server.endpoint, scheme, grpc_service_namespaces=namespaces
    ):
        for cluster, name in ((k8s, mine), (other, theirs)):
            await cluster.create(ko.service(cluster.ns, "svc", {**WRR, GRPC_SERVICES: name}))
            await cluster.create(
                ko.endpoint_slice(cluster.ns, "svc", "svc-a", [ko.Ep(ko.address(0))])
            )
        for cluster in (k8s, other):
            await eventually(
                lambda c=cluster: stored_set(etcd, scheme, f"{c.ns}/svc"),
                lambda s: s is not None,
                what="both sets published: routing by authority is never off",
            )
        assert await grpc_routes(etcd, scheme, f"{k8s.ns}/svc") == (
            (mine,) if allowed == "listed" else ()
        )
        assert await grpc_routes(etcd, scheme, f"{other.ns}/svc") == ()
        events = await eventually(
            lambda: other.events("svc"),
            lambda evs: any(e["reason"] == "GrpcServicesNotRouted" for e in evs),
            what="GrpcServicesNotRouted Event",
        )
        (not_routed,) = (e for e in events if e["reason"] == "GrpcServicesNotRouted")
        assert "--grpc-service-namespaces" in not_routed["message"]
        if allowed == "off":
            await eventually(
                lambda: k8s.events("svc"),
                lambda evs: any(e["reason"] == "GrpcServicesNotRouted" for e in evs),
                what="GrpcServicesNotRouted Event in the other namespace too",
            )


async def test_deleted_or_opted_out_service_loses_its_key_and_stale_keys_go_at_start(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    stale = BackendSet(
        namespace=k8s.ns, name="gone", strategy="random", endpoints=(Endpoint("198.18.9.9", 1),)
    )
    await etcd.put(scheme.service(ServiceKey(f"{k8s.ns}/gone")), encode(stale))
    await etcd.put(scheme.service(ServiceKey(f"{k8s.ns}/garbage")), b"\xff not a protobuf")
    for name in ("a", "b"):
        await k8s.create(ko.service(k8s.ns, name, WRR))
        await k8s.create(ko.endpoint_slice(k8s.ns, name, f"{name}-s", [ko.Ep(ko.address(0))]))
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):

        async def keys() -> set[str]:
            _, sets = await store.list_sets(etcd, scheme)
            # The kube-apiserver is shared: keep to this test's namespace.
            return {s.key for s in sets if s.key.startswith(f"{k8s.ns}/")}

        await eventually(
            keys, lambda k: k == {f"{k8s.ns}/a", f"{k8s.ns}/b"}, what="stale keys removed"
        )
        await k8s.delete("Service", "a")
        await k8s.annotate("Service", "b", **{"weighbridge.io/strategy": None})
        await eventually(
            keys, lambda k: k == set(), what="keys of deleted and opted-out Services removed"
        )


async def test_controller_process_serves_health_alone_on_its_health_port_and_reflection_on_admin(
    apiserver: testenv.KubeAPIServer, etcd_server: testenv.Etcd, scheme: KeyScheme, tmp_path: Path
) -> None:
    """What the chart's probes and a port-forward reach: grpc.health.v1 on --health-listen
    (SERVING once synced), nothing else there; reflection (and health) on --admin-listen."""
    admin, health = testenv.free_port(), testenv.free_port()
    with (tmp_path / "controller.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.main",
                *("--kubeconfig", str(apiserver.kubeconfig), "--etcd", etcd_server.endpoint),
                *("--prefix", scheme.prefix, "--metrics-listen", "127.0.0.1:0"),
                *("--admin-listen", f"127.0.0.1:{admin}", "--health-listen", f"127.0.0.1:{health}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health}") as probe:

            async def status() -> int | None:
                try:
                    reply = await health_pb2_grpc.HealthStub(probe).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                except grpc.aio.AioRpcError:
                    return None
                return int(reply.status)

            await eventually(
                status, lambda s: s == health_pb2.HealthCheckResponse.SERVING, timeout=30
            )
            reflect = probe.unary_unary(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await reflect(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{admin}") as ch:
            refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for r in refl for s in r.list_services_response.service}
            assert "grpc.health.v1.Health" in names
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
