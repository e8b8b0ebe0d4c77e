"""Weighbridge local demo: real etcd and kube-apiserver, the controller, two proxies and three
demo backends; traffic through both proxies while the Service's annotations switch between
strategies, with a live table of how calls spread.

By default (root with iproute2) the backends are "pods" with their own IPs in network
namespaces, listed in a real EndpointSlice, and every change is a Kubernetes annotation the
controller turns into an etcd backend set. With --etcd-only (or without root) the backends run
on loopback and the sets are written to etcd directly, as `wbctl put` does. Everything it
started is stopped on exit or Ctrl-C. Traffic goes only to loopback and the namespaces it made.

    scripts/run [--seconds 4] [--etcd-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc

from controlplane.kube import Kube
from devtools import testenv
from devtools.netns import PodNetwork
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

NS, SVC, PORT = "demo", "shop", 50051
BACKENDS = {"shop-v1-a": "v1", "shop-v1-b": "v1", "shop-v2-a": "v2"}
BOLD, DIM, RESET, CLEAR = "\033[1m", "\033[2m", "\033[0m", "\033[J"


async def listening(port: int, proc: asyncio.subprocess.Process, name: str) -> None:
    """Wait (at most 30 s) until backend ``name`` accepts connections on loopback ``port``, so
    the proxies' first connections find it up."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"backend {name} exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"backend {name} not listening on 127.0.0.1:{port} after 30 s")


@dataclass(frozen=True)
class Phase:
    title: str
    strategy: str
    weights: str | None  # weighbridge.io/weights
    pod_weights: dict[str, int]  # used in --etcd-only mode instead


PHASES = [
    Phase("round_robin: strict rotation, 1/3 each", "round_robin", None, {}),
    Phase("random: uniform, about 1/3 each", "random", None, {}),
    Phase(
        "weighted_round_robin, 90% v1 / 10% v2 by label",
        "weighted_round_robin",
        "version=v1: 90%\nversion=v2: 10%",
        {"shop-v1-a": 9, "shop-v1-b": 9, "shop-v2-a": 2},
    ),
    Phase(
        "weighted_random, 50% v2 / 50% v1 by label",
        "weighted_random",
        "version=v2: 50%\nversion=v1: 50%",
        {"shop-v1-a": 1, "shop-v1-b": 1, "shop-v2-a": 2},
    ),
]


class Demo:
    def __init__(self, workdir: Path, etcd_only: bool) -> None:
        self.workdir = workdir
        self.etcd_only = etcd_only
        self.scheme = KeyScheme()
        self.key = ServiceKey(f"{NS}/{SVC}")
        self.hosts: dict[str, tuple[str, int]] = {}
        self.proxy_ports = [testenv.free_port(), testenv.free_port()]
        self.admin_ports = [testenv.free_port(), testenv.free_port()]

    @contextlib.contextmanager
    def infrastructure(
        self,
    ) -> Iterator[tuple[testenv.Etcd, testenv.KubeAPIServer | None, PodNetwork | None]]:
        with contextlib.ExitStack() as stack:
            if self.etcd_only:
                etcd = testenv.Etcd(self.workdir)
                etcd.start()
                stack.callback(etcd.stop)
                yield etcd, None, None
            else:
                etcd, apiserver = stack.enter_context(testenv.control_plane(self.workdir))
                net = stack.enter_context(PodNetwork())
                yield etcd, apiserver, net

    async def run(self, seconds: float) -> None:
        with self.infrastructure() as (etcd_server, apiserver, net):
            procs = []
            etcd = store.client(etcd_server.endpoint)
            kube = await Kube.connect(str(apiserver.kubeconfig)) if apiserver else None
            try:
                for name in BACKENDS:
                    if net is not None:
                        net.add_host(name)
                        net.echo(name, PORT)
                        self.hosts[name] = (net.hosts[name], PORT)
                    else:
                        port = testenv.free_port()
                        procs.append(
                            await asyncio.create_subprocess_exec(
                                sys.executable,
                                "-m",
                                "tests.echo",
                                name,
                                "127.0.0.1",
                                str(port),
                                stdout=asyncio.subprocess.DEVNULL,
                                cwd=testenv.ROOT,
                            )
                        )
                        self.hosts[name] = ("127.0.0.1", port)
                        await listening(port, procs[-1], name)
                if kube is not None:
                    await self.create_kubernetes_objects(kube)
                procs_sync = self.start_components(etcd_server, apiserver)
                try:
                    mode = (
                        "Kubernetes annotations → controller → etcd"
                        if kube
                        else "sets written to etcd"
                    )
                    print(f"{BOLD}Weighbridge demo{RESET}: 3 backends, 2 proxies, {mode}")
                    print(
                        f"{DIM}etcd {etcd_server.endpoint}; proxies 127.0.0.1:"
                        f"{self.proxy_ports[0]} and :{self.proxy_ports[1]} (authority "
                        f"{SVC}.{NS}); admin :{self.admin_ports[0]} :{self.admin_ports[1]}; "
                        f"logs in {self.workdir}{RESET}\n"
                    )
                    for phase in PHASES:
                        started = time.perf_counter()
                        generation = await self.apply(phase, kube, etcd)
                        await self.wait_applied(generation)
                        applied_ms = (time.perf_counter() - started) * 1000
                        await self.traffic(phase, etcd, seconds, applied_ms)
                finally:
                    for p in procs_sync:
                        p.terminate()
                    for p in procs_sync:
                        p.wait(timeout=15)
            finally:
                for ap in procs:
                    ap.terminate()
                    await ap.wait()
                await etcd.close()
                if kube is not None:
                    await kube.close()

    def start_components(
        self, etcd_server: testenv.Etcd, apiserver: testenv.KubeAPIServer | None
    ) -> list[subprocess.Popen[bytes]]:
        """The controller (with a kube-apiserver) and the two proxies, as processes."""
        procs = []
        if apiserver is not None:
            procs.append(
                testenv.start_controller(
                    apiserver.kubeconfig,
                    etcd_server.endpoint,
                    self.workdir / "controller.log",
                    log_level="warning",
                )
            )
        for i, (port, admin) in enumerate(zip(self.proxy_ports, self.admin_ports, strict=True)):
            procs.append(
                testenv.start_proxy(
                    etcd_server.endpoint,
                    self.workdir / f"proxy{i}.log",
                    port=port,
                    admin_port=admin,
                    identity=f"proxy-{i}",
                    log_level="warning",
                )
            )
        return procs

    async def create_kubernetes_objects(self, kube: Kube) -> None:
        await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": NS}})
        for name, version in BACKENDS.items():
            await kube.request(
                "POST",
                f"/api/v1/namespaces/{NS}/pods",
                body={
                    "metadata": {"name": name, "labels": {"app": SVC, "version": version}},
                    "spec": {"containers": [{"name": "app", "image": "registry.invalid/shop:1"}]},
                },
            )
        await kube.request(
            "POST",
            f"/api/v1/namespaces/{NS}/services",
            body={"metadata": {"name": SVC}, "spec": {"ports": [{"name": "grpc", "port": PORT}]}},
        )
        await kube.request(
            "POST",
            f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
            body={
                "metadata": {"name": f"{SVC}-1", "labels": {"kubernetes.io/service-name": SVC}},
                "addressType": "IPv4",
                "ports": [{"name": "grpc", "port": PORT, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": [ip],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": name, "namespace": NS},
                    }
                    for name, (ip, _) in self.hosts.items()
                ],
            },
        )

    async def apply(self, phase: Phase, kube: Kube | None, etcd: Any) -> int:
        """Make the change; returns the generation before it."""
        found = await store.get_set(etcd, self.scheme, self.key)
        before = found.backend_set.generation if found and found.backend_set else 0
        print(f"{BOLD}▶ {phase.title}{RESET}")
        if kube is not None:
            annotations = {
                "weighbridge.io/strategy": phase.strategy,
                "weighbridge.io/weights": phase.weights,
            }
            print(
                f"  {DIM}kubectl annotate service {SVC} -n {NS} --overwrite "
                + " ".join(f"{k}={v!r}" if v else f"{k}-" for k, v in annotations.items())
                + RESET
            )
            await kube.request(
                "PATCH",
                f"/api/v1/namespaces/{NS}/services/{SVC}",
                body={"metadata": {"annotations": annotations}},
                content_type="application/merge-patch+json",
            )
        else:
            endpoints = tuple(
                Endpoint(ip, port, weight=phase.pod_weights.get(name, 1), pod=name)
                for name, (ip, port) in self.hosts.items()
            )
            print(
                f"  {DIM}wbctl put {self.key} --strategy {phase.strategy} "
                + " ".join(f"--endpoint {e.hostport}={e.weight}" for e in endpoints)
                + RESET
            )
            await store.put_set(
                etcd,
                self.scheme,
                BackendSet(
                    namespace=NS,
                    name=SVC,
                    strategy=phase.strategy,
                    endpoints=endpoints,
                    generation=before + 1,
                ),
            )
        return before

    async def wait_applied(self, before: int, interval: float = 0.01) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            generations = []
            for port in self.admin_ports:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                        listing = await admin_pb2_grpc.AdminStub(ch).ListBackendSets(
                            admin_pb2.ListBackendSetsRequest(), timeout=1
                        )
                        generations += [s.backend_set.generation for s in listing.services]
            if len(generations) == 2 and min(generations) > before:
                return
            await asyncio.sleep(interval)
        raise TimeoutError("the proxies did not apply the change; see the logs")

    async def traffic(self, phase: Phase, etcd: Any, seconds: float, applied_ms: float) -> None:
        found = await store.get_set(etcd, self.scheme, self.key)
        assert found is not None and found.backend_set is not None
        expected = {
            e.pod: found.backend_set.probabilities().get(e.hostport, Fraction(0))
            for e in found.backend_set.endpoints
        }
        counts = [Counter[str](), Counter[str]()]
        stop = time.monotonic() + seconds

        async def client(i: int, ch: grpc.aio.Channel) -> None:
            unary = ch.unary_unary("/test.Echo/Unary")
            while time.monotonic() < stop:
                call = unary(b"", timeout=5)
                counts[i][str(dict(await call.initial_metadata()).get("x-backend"))] += 1
                await call

        async with self.channels() as chans:
            tasks = [
                asyncio.create_task(client(i, ch)) for i, ch in enumerate(chans) for _ in range(4)
            ]
            lines = 0
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.25)
                lines = self.table(counts, expected, lines, applied_ms)
            await asyncio.gather(*tasks)
            self.table(counts, expected, lines, applied_ms)
        print()

    @contextlib.asynccontextmanager
    async def channels(self) -> AsyncIterator[list[grpc.aio.Channel]]:
        chans = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{p}", options=[("grpc.default_authority", f"{SVC}.{NS}")]
            )
            for p in self.proxy_ports
        ]
        try:
            yield chans
        finally:
            for ch in chans:
                await ch.close()

    def table(
        self,
        counts: list[Counter[str]],
        expected: dict[str, Fraction],
        lines: int,
        applied_ms: float,
    ) -> int:
        if lines:
            sys.stdout.write(f"\033[{lines}F{CLEAR}")
        total = sum(sum(c.values()) for c in counts) or 1
        head = ("backend", "version", "proxy-0", "proxy-1", "share", "expected")
        rows = ["  {:<10} {:<8} {:>8} {:>8} {:>7} {:>9}".format(*head)]
        for name, version in BACKENDS.items():
            n = counts[0][name] + counts[1][name]
            share = n / total
            bar = "█" * round(share * 30)
            rows.append(
                f"  {name:<10} {version:<8} {counts[0][name]:>8} {counts[1][name]:>8} "
                f"{share:>7.1%} {float(expected.get(name, 0)):>9.1%} {bar}"
            )
        rows.append(
            f"  {DIM}{total} calls; both proxies applied the change "
            f"{applied_ms:.0f} ms after it was made{RESET}"
        )
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()
        return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="scripts/run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--seconds", type=float, default=4.0, help="traffic per strategy (default: %(default)s)"
    )
    p.add_argument(
        "--etcd-only",
        action="store_true",
        help="no Kubernetes: backends on loopback, sets written to etcd directly",
    )
    args = p.parse_args()
    etcd_only = args.etcd_only or os.geteuid() != 0 or shutil.which("ip") is None
    with (
        tempfile.TemporaryDirectory(prefix="weighbridge-demo-") as tmp,
        contextlib.suppress(KeyboardInterrupt),
    ):
        asyncio.run(Demo(Path(tmp), etcd_only).run(args.seconds))
    print("stopped everything the demo started")


if __name__ == "__main__":
    main()
