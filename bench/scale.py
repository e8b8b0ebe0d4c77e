"""Control-plane benchmarks at scale (real etcd, real kube-apiserver, real processes).

    .venv/bin/python -m bench.scale fanout [--proxies 10] [--changes 100]
    .venv/bin/python -m bench.scale services [--services 10000] [--endpoints 10]

fanout    time from an etcd write to every one of N proxy processes applying it: all N
          admin APIs are polled concurrently over open channels until each reports an
          applied revision at least the write's.
services  S Services with one EndpointSlice of E endpoints each in the kube-apiserver (no
          traffic is sent to their documentation-range addresses: the proxy runs with
          --lazy-connect and gets no calls): the controller's full sync time from its start to
          S keys in etcd, the proxy's time to apply them and its RSS, then the time for one
          Service's change to reach the proxy while all are loaded.

Bounded: fixed counts, every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.procstat import pct, rss_mb
from controlplane.kube import Kube
from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2, admin_pb2_grpc


def benchmark_ip(n: int) -> str:
    """The n-th address of 198.18.0.0/15 (RFC 2544); nothing is ever sent to it."""
    return f"198.{18 + n // 65536}.{n // 256 % 256}.{n % 256}"


def start_proxies(
    n: int, etcd: str, scheme: KeyScheme, work: Path, lazy: bool = False
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    procs, admins = [], []
    for i in range(n):
        admin = testenv.free_port()
        cmd = [
            sys.executable,
            "-m",
            "dataplane.main",
            "--etcd",
            etcd,
            "--prefix",
            scheme.prefix,
            "--listen",
            f"127.0.0.1:{testenv.free_port()}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--health-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--id",
            f"p{i}",
            "--log-level",
            "warning",
            "--log-format",
            "json",
        ]
        if lazy:
            cmd.append("--lazy-connect")
        with (work / f"proxy{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=testenv.ROOT)
            )
        admins.append(admin)
    return procs, admins


async def applied(stubs: list[admin_pb2_grpc.AdminStub], service: str) -> list[int]:
    async def one(stub: admin_pb2_grpc.AdminStub) -> int:
        try:
            r = await stub.ListBackendSets(
                admin_pb2.ListBackendSetsRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError:
            return 0
        return int(r.applied_revision)

    return list(await asyncio.gather(*(one(s) for s in stubs)))


async def wait_all(
    stubs: list[admin_pb2_grpc.AdminStub], service: str, revision: int, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while min(await applied(stubs, service)) < revision:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every proxy applied revision {revision}")


async def fanout(n: int, changes: int, work: Path) -> None:
    etcd_server = testenv.Etcd(work)
    etcd_server.start()
    scheme = KeyScheme("/fanout/")
    etcd = store.client(etcd_server.endpoint)
    procs, admins = start_proxies(n, etcd_server.endpoint, scheme, work)
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{a}") for a in admins]
    stubs = [admin_pb2_grpc.AdminStub(c) for c in chans]
    try:

        def backend_set(i: int) -> BackendSet:
            return BackendSet(
                namespace="default",
                name="echo",
                strategy="round_robin",
                endpoints=(Endpoint("127.0.0.1", 1 + i % 2),),
            )

        await wait_all(stubs, "", await store.put_set(etcd, scheme, backend_set(0)), timeout=60)
        out = []
        for i in range(changes):
            t0 = time.perf_counter()
            revision = await store.put_set(etcd, scheme, backend_set(i + 1))
            await wait_all(stubs, "default/echo", revision)
            out.append((time.perf_counter() - t0) * 1000)
        print(
            f"etcd write → all {n} proxies applied, {changes} writes: p50 {pct(out, 50):.1f} ms, "
            f"p99 {pct(out, 99):.1f} ms, max {max(out):.1f} ms, mean {statistics.fmean(out):.1f} ms"
        )
    finally:
        for c in chans:
            await c.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
        await etcd.close()
        etcd_server.stop()


async def services(count: int, endpoints: int, work: Path) -> None:
    with testenv.control_plane(work) as (etcd_server, apiserver):
        kube = await Kube.connect(str(apiserver.kubeconfig))
        etcd = store.client(etcd_server.endpoint)
        scheme = KeyScheme("/scale/")
        ns = "scale"
        await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
        sem = asyncio.Semaphore(16)

        async def create(i: int) -> None:
            async with sem:
                await kube.request(
                    "POST",
                    f"/api/v1/namespaces/{ns}/services",
                    body={
                        "metadata": {
                            "name": f"svc-{i}",
                            "annotations": {"weighbridge.io/strategy": "round_robin"},
                        },
                        "spec": {"ports": [{"name": "grpc", "port": 50051}]},
                    },
                )
                await kube.request(
                    "POST",
                    f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                    body={
                        "metadata": {
                            "name": f"svc-{i}-1",
                            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                        },
                        "addressType": "IPv4",
                        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
                        "endpoints": [
                            {
                                "addresses": [benchmark_ip(i * endpoints + j)],
                                "conditions": {"ready": True},
                            }
                            for j in range(endpoints)
                        ],
                    },
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(create(i) for i in range(count)))
        print(
            f"created {count} Services and EndpointSlices ({count * endpoints} endpoints) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        procs, admins = start_proxies(1, etcd_server.endpoint, scheme, work, lazy=True)
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{admins[0]}")
        stub = admin_pb2_grpc.AdminStub(chan)
        t0 = time.perf_counter()
        controller = testenv.start_controller(
            apiserver.kubeconfig,
            etcd_server.endpoint,
            work / "controller.log",
            prefix=scheme.prefix,
            log_level="warning",
        )
        procs.append(controller)
        try:
            deadline = time.monotonic() + 900
            while True:
                result = await etcd.get_prefix(scheme.services_prefix, keys_only=True)
                if len(result.kvs) >= count:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(result.kvs)} sets after 900 s")
                await asyncio.sleep(0.2)
            synced = time.perf_counter() - t0
            # Ask for one set only: the applied revision is global, and listing all 10,000
            # sets on every poll would keep the proxy busy serving the poll.
            await wait_all([stub], f"{ns}/svc-0", result.header.revision, timeout=600)
            applied_at = time.perf_counter() - t0
            print(
                f"controller full sync (process start → {count} sets in etcd): {synced:.1f} s; "
                f"proxy applied all: {applied_at:.1f} s after controller start"
            )
            print(
                f"RSS with {count} sets / {count * endpoints} endpoints: "
                f"proxy {rss_mb([procs[0].pid]):.0f} MB, "
                f"controller {rss_mb([controller.pid]):.0f} MB"
            )
            out = []
            for i in range(50):
                t1 = time.perf_counter()
                await kube.request(
                    "PATCH",
                    f"/api/v1/namespaces/{ns}/services/svc-{i}",
                    body={"metadata": {"annotations": {"weighbridge.io/strategy": "random"}}},
                    content_type="application/merge-patch+json",
                )
                while True:
                    r = await stub.ListBackendSets(
                        admin_pb2.ListBackendSetsRequest(service=f"{ns}/svc-{i}"), timeout=5
                    )
                    if r.services and r.services[0].backend_set.strategy == "random":
                        break
                out.append((time.perf_counter() - t1) * 1000)
            print(
                f"one Service's annotation change → proxy applied, with all {count} loaded, "
                f"50 changes: p50 {pct(out, 50):.1f} ms, p99 {pct(out, 99):.1f} ms"
            )
        finally:
            await chan.close()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
            await etcd.close()
            await kube.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fanout")
    f.add_argument("--proxies", type=int, default=10)
    f.add_argument("--changes", type=int, default=100)
    s = sub.add_parser("services")
    s.add_argument("--services", type=int, default=10_000)
    s.add_argument("--endpoints", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wb-scale-") as tmp:
        if args.what == "fanout":
            asyncio.run(fanout(args.proxies, args.changes, Path(tmp)))
        else:
            asyncio.run(services(args.services, args.endpoints, Path(tmp)))


if __name__ == "__main__":
    main()
