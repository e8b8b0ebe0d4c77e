"""Fixtures that start the real parts: etcd 3.6 and kube-apiserver built by scripts/build-testbin."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.kube import Kube, KubeError
from controlplane.metrics import Metrics
from controlplane.reconciling import Controller
from controlplane.settings import DEFAULTS, ControllerSettings, Source
from devtools import testenv
from tests.integration import kubeobjects as ko
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet

pytestmark = pytest.mark.integration
T = TypeVar("T")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("env")


@pytest.fixture(scope="session")
def cluster(workdir: Path) -> Iterator[tuple[testenv.Etcd, testenv.KubeAPIServer]]:
    """One etcd for Weighbridge and one kube-apiserver (with its own etcd) for the session."""
    with testenv.control_plane(workdir / "shared") as parts:
        yield parts


@pytest.fixture
def etcd_server(cluster: tuple[testenv.Etcd, testenv.KubeAPIServer]) -> testenv.Etcd:
    return cluster[0]


@pytest.fixture
def apiserver(cluster: tuple[testenv.Etcd, testenv.KubeAPIServer]) -> testenv.KubeAPIServer:
    return cluster[1]


@pytest.fixture
def scheme() -> KeyScheme:
    """A fresh etcd prefix per test, so tests sharing one etcd never see each other's keys."""
    return KeyScheme(f"/wbtest-{uuid.uuid4().hex[:8]}/")


@pytest.fixture
async def etcd(etcd_server: testenv.Etcd) -> AsyncIterator[aetcd.Client]:
    client = store.client(etcd_server.endpoint)
    yield client
    await client.close()


class Cluster:
    """Test-side access to the kube-apiserver: create, patch, delete, read Events."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.ns = namespace

    async def create(self, obj: ko.Obj) -> ko.Obj:
        return await self.kube.request(
            "POST", ko.collection(obj["kind"], obj["metadata"]["namespace"]), body=obj
        )

    async def replace(self, obj: ko.Obj) -> ko.Obj:
        current = await self.kube.request("GET", ko.item(obj))
        obj = {
            **obj,
            "metadata": {
                **obj["metadata"],
                "resourceVersion": current["metadata"]["resourceVersion"],
            },
        }
        return await self.kube.request("PUT", ko.item(obj), body=obj)

    async def patch(self, kind: str, name: str, patch: dict[str, Any]) -> ko.Obj:
        path = f"{ko.collection(kind, self.ns)}/{name}"
        return await self.kube.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def annotate(self, kind: str, name: str, **annotations: str | None) -> ko.Obj:
        return await self.patch(kind, name, {"metadata": {"annotations": annotations}})

    async def delete(self, kind: str, name: str) -> None:
        await self.kube.request("DELETE", f"{ko.collection(kind, self.ns)}/{name}")

    async def namespace(self, prefix: str = "t") -> Cluster:
        """Another fresh namespace, named ``PREFIX-<random>``, on the same API server."""
        ns = f"{prefix}-{uuid.uuid4().hex[:10]}"
        await self.kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
        return Cluster(self.kube, ns)

    async def events(self, service: str) -> list[ko.Obj]:
        doc = await self.kube.request(
            "GET",
            ko.collection("Event", self.ns),
            query={"fieldSelector": f"involvedObject.name={service},involvedObject.kind=Service"},
        )
        return list(doc.get("items") or [])


@pytest.fixture
async def kube(apiserver: testenv.KubeAPIServer) -> AsyncIterator[Kube]:
    client = await Kube.connect(str(apiserver.kubeconfig))
    yield client
    await client.close()


@pytest.fixture
async def k8s(kube: Kube) -> Cluster:
    """A fresh namespace per test."""
    ns = f"t-{uuid.uuid4().hex[:10]}"
    await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
    return Cluster(kube, ns)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until ``accept`` holds; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(KubeError, store.EtcdUnavailableError, grpc.aio.AioRpcError):
            last = await probe()
            if accept(last):
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout}s; last value: {last!r}")


async def stored_set(etcd: aetcd.Client, scheme: KeyScheme, key: str) -> BackendSet | None:
    found = await store.get_set(etcd, scheme, ServiceKey(key))
    return None if found is None else found.backend_set


@contextlib.asynccontextmanager
async def running_controller(
    kubeconfig: Path,
    etcd_endpoint: str,
    scheme: KeyScheme,
    *,
    identity: str = "controller-a",
    source: Source = DEFAULTS.source,
    lease_ttl: int = 3,
    etcd_tls: store.EtcdTLS | None = None,
    **settings: Any,
) -> AsyncIterator[Controller]:
    """A controller running in this event loop, stopped (and resigned) on exit; its lease is
    short so that failover tests finish quickly. With ``etcd_tls`` it reaches etcd over TLS;
    ``settings`` are other ControllerSettings fields."""
    kube = await Kube.connect(str(kubeconfig))
    etcd = store.client(etcd_endpoint, tls=etcd_tls)
    controller = Controller(
        kube=kube,
        etcd=etcd,
        scheme=scheme,
        identity=identity,
        metrics=Metrics(CollectorRegistry()),
        settings=ControllerSettings(source=source, lease_ttl=lease_ttl, **settings),
    )
    task = asyncio.create_task(controller.run())
    try:
        await asyncio.wait_for(controller.synced.wait(), 30)
        yield controller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close(etcd)
        await kube.close()


def metric(controller: Controller, name: str, **labels: str) -> float:
    value = controller.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[testenv.Etcd]:
    """An etcd of this test's own, to stop and restart."""
    server = testenv.Etcd(tmp_path, "private-etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_apiserver(tmp_path: Path) -> Iterator[testenv.KubeAPIServer]:
    """A kube-apiserver (and its etcd) of this test's own, to stop and restart."""
    kube_etcd = testenv.Etcd(tmp_path, "private-kube-etcd")
    kube_etcd.start()
    server = testenv.KubeAPIServer(tmp_path, kube_etcd, "private-kube-apiserver")
    server.start()
    yield server
    server.stop()
    kube_etcd.stop()


def established_to(port: int) -> int:
    """TCP connections on this machine in state ESTABLISHED whose remote port is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@contextlib.asynccontextmanager
async def running_proxy(
    etcd_endpoint: str,
    scheme: KeyScheme,
    *,
    seed: int | None = 7,
    proxy_id: str = "proxy-test",
    etcd_tls: store.EtcdTLS | None = None,
    **settings: Any,
) -> AsyncIterator[Any]:
    """A proxy in this event loop, listening on free loopback ports, stopped on exit. It runs
    as many engine threads as the default gives (2 on a 2-CPU machine) unless told; with
    ``etcd_tls`` it reaches etcd over TLS with those files."""
    from dataplane.app import Proxy
    from dataplane.settings import ProxySettings

    etcd = store.client(etcd_endpoint, tls=etcd_tls)
    proxy = Proxy(
        etcd=etcd,
        scheme=scheme,
        proxy_id=proxy_id,
        settings=ProxySettings(
            **{
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "health_listen": "127.0.0.1:0",
                "metrics_listen": "127.0.0.1:0",
                **settings,
            }
        ),
        seed=seed,
    )
    await proxy.start()
    try:
        await asyncio.wait_for(proxy.subscription.listed.wait(), 15)
        yield proxy
    finally:
        await proxy.stop(1)
        await store.close(etcd)
