"""The controller against a real kube-apiserver and a real etcd."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devtools import testenv
from tests.integration import kubeobjects as ko
from tests.integration.conftest import Cluster, eventually, metric, running_controller, stored_set
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint, encode

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
                ko.Ep(ko.address(0), zone="zone-a"),
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


async def test_bad_pod_weight_names_the_pod(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    await k8s.create(ko.service(k8s.ns, "svc", WRR))
    await _pods_and_slice(k8s, "svc", ["v1", "v1"], weights={1: "lots"})
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        events = await eventually(
            lambda: k8s.events("svc"),
            lambda evs: any(e["reason"] == "InvalidPodWeight" for e in evs),
        )
        assert "pod svc-1" in events[0]["message"]
        assert await stored_set(etcd, scheme, f"{k8s.ns}/svc") is None
        await k8s.annotate("Pod", "svc-1", **{"weighbridge.io/weight": "2"})
        bs = await eventually(
            lambda: stored_set(etcd, scheme, f"{k8s.ns}/svc"), lambda s: s is not None
        )
        assert bs is not None
        assert sorted(e.weight for e in bs.endpoints) == [1, 2]


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
