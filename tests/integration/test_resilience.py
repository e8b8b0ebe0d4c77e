"""Leadership, fencing and restarts of etcd and kube-apiserver, with real processes."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aetcd
import pytest

from controlplane.errors import NotLeaderError
from controlplane.kube import Kube
from controlplane.publishing import Publisher
from devtools import testenv
from tests.integration import kubeobjects as ko
from tests.integration.conftest import Cluster, eventually, running_controller, stored_set
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey

pytestmark = pytest.mark.integration

WRR = {"weighbridge.io/strategy": "weighted_round_robin"}


def n_endpoints(n: int):  # type: ignore[no-untyped-def]
    return lambda s: s is not None and len(s.endpoints) == n


async def test_deposed_leader_write_is_refused_by_etcd(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    key = f"{k8s.ns}/api"
    await k8s.create(ko.service(k8s.ns, "api", WRR))
    await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-1", [ko.Ep(ko.address(1))]))
    async with running_controller(
        apiserver.kubeconfig, etcd_server.endpoint, scheme, identity="a"
    ) as a:
        await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(1))
        old_term = a.leadership.term
        assert old_term is not None
        async with running_controller(
            apiserver.kubeconfig, etcd_server.endpoint, scheme, identity="b"
        ) as b:
            assert not b.leading
            # A loses its lease (as when paused or partitioned past the TTL): B takes over.
            await etcd.revoke_lease(old_term.lease_id)
            await eventually(lambda: _value(b.leading), bool, what="b leads")
            leader = await etcd.get(scheme.leader_key)
            assert leader is not None and leader.value == b"b"
            # A write under A's old term is refused by etcd itself.
            with pytest.raises(NotLeaderError, match="fence"):
                await Publisher(etcd, scheme, old_term).put(ServiceKey(key), b"stale")
            # B converges the changes that follow.
            await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-2", [ko.Ep(ko.address(2))]))
            await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(2))


async def _value(x: bool) -> bool:
    return x


async def test_two_controllers_failover_when_the_leader_stops(
    k8s: Cluster,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    tmp_path: Path,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    key = f"{k8s.ns}/api"
    await k8s.create(ko.service(k8s.ns, "api", WRR))
    await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-1", [ko.Ep(ko.address(1))]))
    procs = {
        name: testenv.start_controller(
            apiserver.kubeconfig,
            etcd_server.endpoint,
            tmp_path / f"{name}.log",
            prefix=scheme.prefix,
            identity=name,
            lease_ttl=3,
        )
        for name in ("a", "b")
    }
    try:
        await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(1), timeout=30)
        leader_kv = await etcd.get(scheme.leader_key)
        assert leader_kv is not None
        leader = leader_kv.value.decode()
        follower = "b" if leader == "a" else "a"
        # Freeze the leader (no resignation, no goodbye): the follower must take over
        # within the lease TTL (3 s) and converge the change made meanwhile.
        procs[leader].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-2", [ko.Ep(ko.address(2))]))
        await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(2), timeout=20)
        took = time.monotonic() - stopped
        assert took < 3 + 5, f"failover took {took:.1f}s"
        new_leader = await etcd.get(scheme.leader_key)
        assert new_leader is not None and new_leader.value.decode() == follower
        # The old leader wakes up with a stale view: whatever it tries, etcd refuses it,
        # and it steps down instead of undoing the new leader's work.
        procs[leader].send_signal(signal.SIGCONT)
        await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-3", [ko.Ep(ko.address(3))]))
        final = await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(3), timeout=20)
        await asyncio.sleep(2)
        assert await stored_set(etcd, scheme, key) == final
        log = (tmp_path / f"{leader}.log").read_text()
        assert "leadership_lost" in log or "write_fenced_off" in log
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGCONT)
            p.terminate()
        for p in procs.values():
            p.wait(timeout=15)


async def test_controller_survives_etcd_restart_while_changes_happen(
    k8s: Cluster,
    scheme: KeyScheme,
    apiserver: testenv.KubeAPIServer,
    private_etcd: testenv.Etcd,
) -> None:
    key = f"{k8s.ns}/api"
    await k8s.create(ko.service(k8s.ns, "api", WRR))
    await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-1", [ko.Ep(ko.address(1))]))
    etcd = store.client(private_etcd.endpoint)
    try:
        async with running_controller(apiserver.kubeconfig, private_etcd.endpoint, scheme) as c:
            await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(1))
            private_etcd.kill()
            # Changes while etcd is down: the controller must keep them and publish later.
            await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-2", [ko.Ep(ko.address(2))]))
            await k8s.annotate("Service", "api", **{"weighbridge.io/strategy": "random"})
            await asyncio.sleep(4)  # longer than the lease TTL: leadership is lost meanwhile
            private_etcd.start()
            await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-3", [ko.Ep(ko.address(3))]))
            bs = await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(3), timeout=30)
            assert bs is not None and bs.strategy == "random"
            assert c.leading
    finally:
        await store.close(etcd)


async def test_controller_survives_kube_apiserver_restart_while_changes_happen(
    scheme: KeyScheme,
    etcd: aetcd.Client,
    etcd_server: testenv.Etcd,
    private_apiserver: testenv.KubeAPIServer,
) -> None:
    kube = await Kube.connect(str(private_apiserver.kubeconfig))
    ns = f"t-{uuid.uuid4().hex[:10]}"
    k8s = Cluster(kube, ns)
    key = f"{ns}/api"
    try:
        await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
        await k8s.create(ko.service(ns, "api", WRR))
        await k8s.create(ko.endpoint_slice(ns, "api", "api-1", [ko.Ep(ko.address(1))]))
        async with running_controller(private_apiserver.kubeconfig, etcd_server.endpoint, scheme):
            await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(1))
            await k8s.create(ko.endpoint_slice(ns, "api", "api-2", [ko.Ep(ko.address(2))]))
            private_apiserver.stop()
            await asyncio.sleep(2)
            private_apiserver.start()
            await k8s.create(ko.endpoint_slice(ns, "api", "api-3", [ko.Ep(ko.address(3))]))
            await k8s.annotate("Service", "api", **{"weighbridge.io/weights": "*: 1"})
            await eventually(lambda: stored_set(etcd, scheme, key), n_endpoints(3), timeout=40)
            await k8s.delete("Service", "api")
            await eventually(lambda: stored_set(etcd, scheme, key), lambda s: s is None, timeout=20)
    finally:
        await kube.close()
