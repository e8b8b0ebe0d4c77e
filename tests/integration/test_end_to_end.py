"""End to end: backend "pods" in network namespaces with their own IPs, Pods, a selectorless
Service and its EndpointSlices in a real kube-apiserver, the controller and two proxies as
processes, and gRPC clients calling through both proxies."""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from devtools import testenv
from devtools.netns import PodNetwork
from tests.integration import kubeobjects as ko
from tests.integration.conftest import Cluster, eventually
from weighbridge.keys import KeyScheme
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("ip") is None, reason="needs iproute2 (scripts/bootstrap installs it)"
    ),
]

PORT = 50051


@pytest.fixture
def pods() -> Iterator[PodNetwork]:
    with PodNetwork() as net:
        yield net


@contextlib.contextmanager
def processes(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@contextlib.asynccontextmanager
async def channels(ports: list[int], authority: str) -> AsyncIterator[list[grpc.aio.Channel]]:
    chans = [
        grpc.aio.insecure_channel(f"127.0.0.1:{p}", options=[("grpc.default_authority", authority)])
        for p in ports
    ]
    try:
        yield chans
    finally:
        for c in chans:
            await c.close()


async def spread(chans: list[grpc.aio.Channel], per_proxy: int) -> collections.Counter[str]:
    """Calls ``per_proxy`` unary calls through each proxy; counts the backends that answered."""
    seen: collections.Counter[str] = collections.Counter()
    for ch in chans:
        for _ in range(per_proxy):
            call = ch.unary_unary("/test.Echo/Unary")(b"", timeout=5)
            backend = dict(await call.initial_metadata()).get("x-backend")
            await call  # raises the call's error, if it failed
            seen[str(backend)] += 1
    return seen


async def forced(
    chans: list[grpc.aio.Channel], pod: str, per_proxy: int
) -> collections.Counter[str]:
    """Calls ``per_proxy`` unary calls forced to ``pod`` through each proxy, with debug
    metadata; counts the backends that answered."""
    seen: collections.Counter[str] = collections.Counter()
    asked = (("x-weighbridge-endpoint", pod), ("x-weighbridge-debug", "1"))
    for ch in chans:
        for _ in range(per_proxy):
            call = ch.unary_unary("/test.Echo/Unary")(b"", timeout=5, metadata=asked)
            md = dict(await call.initial_metadata())
            await call  # FAILED_PRECONDITION until the proxy has the annotation
            assert md["x-weighbridge-pod"] == md["x-backend"] == pod, md
            assert md["x-weighbridge-reason"] == f"forced by x-weighbridge-endpoint: pod {pod}"
            seen[str(md["x-backend"])] += 1
    return seen


async def strategies(admin_ports: list[int], key: str) -> list[tuple[str, int]]:
    out = []
    for port in admin_ports:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            listing = await admin_pb2_grpc.AdminStub(ch).ListBackendSets(
                admin_pb2.ListBackendSetsRequest()
            )
            sets = [
                s.backend_set
                for s in listing.services
                if f"{s.backend_set.namespace}/{s.backend_set.name}" == key
            ]
            out.append((sets[0].strategy, sets[0].generation) if sets else ("", 0))
    return out


async def test_end_to_end_through_kubernetes_controller_and_two_proxies(
    k8s: Cluster,
    scheme: KeyScheme,
    pods: PodNetwork,
    tmp_path: Path,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
) -> None:
    names = ["v1-a", "v1-b", "v1-c", "v2-a"]
    for name in names:
        pods.add_host(name)
        pods.echo(name, PORT)
        await k8s.create(ko.pod(k8s.ns, name, {"app": "shop", "version": name[:2]}))

    def eps(members: list[str], terminating: str = "") -> list[ko.Ep]:
        return [
            ko.Ep(pods.hosts[m], pod=m, ready=m != terminating, terminating=m == terminating)
            for m in members
        ]

    await k8s.create(
        ko.service(
            k8s.ns, "shop", {"weighbridge.io/strategy": "round_robin"}, ports=(("grpc", PORT),)
        )
    )
    await k8s.create(ko.endpoint_slice(k8s.ns, "shop", "shop-1", eps(names), port=("grpc", PORT)))

    ports = [testenv.free_port() for _ in range(2)]
    admins = [testenv.free_port() for _ in range(2)]
    controller = testenv.start_controller(
        apiserver.kubeconfig,
        etcd_server.endpoint,
        tmp_path / "controller.log",
        prefix=scheme.prefix,
    )
    proxies = [
        testenv.start_proxy(
            etcd_server.endpoint,
            tmp_path / f"proxy{i}.log",
            port=ports[i],
            admin_port=admins[i],
            prefix=scheme.prefix,
            identity=f"proxy-{i}",
        )
        for i in range(2)
    ]
    key = f"{k8s.ns}/shop"
    with processes(controller, *proxies):
        async with channels(ports, f"shop.{k8s.ns}.svc.cluster.local:{PORT}") as chans:
            # Round robin: each proxy rotates strictly over the 4 pods.
            seen = await eventually(
                lambda: spread(chans, 40),
                lambda s: len(s) == 4,
                timeout=60,
                what="all four pods answer through both proxies",
            )
            assert seen == {n: 20 for n in names}

            # Annotate 90/10 in Kubernetes: both proxies follow.
            await k8s.annotate(
                "Service",
                "shop",
                **{
                    "weighbridge.io/strategy": "weighted_round_robin",
                    "weighbridge.io/weights": "version=v1: 90%\nversion=v2: 10%",
                },
            )
            await eventually(
                lambda: strategies(admins, key),
                lambda s: all(st == "weighted_round_robin" for st, _ in s),
                what="proxies applied WRR",
            )
            seen = await spread(chans, 100)  # weights 3:3:3:1, so exact per 10 calls
            assert seen == {"v1-a": 60, "v1-b": 60, "v1-c": 60, "v2-a": 20}

            # A new v2 pod: v2 keeps 10% in all, now split over two pods.
            pods.add_host("v2-b")
            pods.echo("v2-b", PORT)
            await k8s.create(ko.pod(k8s.ns, "v2-b", {"app": "shop", "version": "v2"}))
            names.append("v2-b")
            await k8s.replace(
                ko.endpoint_slice(k8s.ns, "shop", "shop-1", eps(names), port=("grpc", PORT))
            )
            seen = await eventually(lambda: spread(chans, 100), lambda s: "v2-b" in s, timeout=20)
            seen = await spread(chans, 200)
            assert seen["v2-a"] + seen["v2-b"] == 40
            assert seen["v2-a"] == seen["v2-b"] == 20

            # A removed pod gets no new calls.
            names.remove("v1-c")
            await k8s.replace(
                ko.endpoint_slice(k8s.ns, "shop", "shop-1", eps(names), port=("grpc", PORT))
            )
            await eventually(lambda: spread(chans, 50), lambda s: "v1-c" not in s, timeout=20)
            seen = await spread(chans, 100)
            assert "v1-c" not in seen
            assert seen["v1-a"] + seen["v1-b"] == 180

            # Terminating: an open stream to the pod completes; new calls go elsewhere.
            stream = chans[0].unary_stream("/test.Echo/ServerStream")(
                b"6", metadata=(("x-interval", "0.5"),)
            )
            victim = str(dict(await stream.initial_metadata())["x-backend"])
            await k8s.replace(
                ko.endpoint_slice(
                    k8s.ns, "shop", "shop-1", eps(names, terminating=victim), port=("grpc", PORT)
                )
            )
            await eventually(
                lambda: spread(chans, 20),
                lambda s: victim not in s,
                timeout=10,
                what="the terminating pod gets no new calls",
            )
            assert victim not in await spread(chans, 50)
            messages = [m async for m in stream]
            assert messages == [f"{victim}:{i}".encode() for i in range(6)]
            assert await stream.code() == grpc.StatusCode.OK

            # Debugging one call: once the Service allows it, both proxies send a call to the
            # pod its x-weighbridge-endpoint names, and x-weighbridge-debug says so.
            pod = next(n for n in names if n != victim)
            await k8s.annotate(
                "Service", "shop", **{"weighbridge.io/debug": "endpoint-override: on"}
            )
            await eventually(
                lambda: forced(chans, pod, 10),
                lambda s: s == {pod: 20},
                what="both proxies honour x-weighbridge-endpoint",
            )
