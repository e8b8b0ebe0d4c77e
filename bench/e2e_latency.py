"""Benchmark: from a Kubernetes annotation change to both proxies applying it.

Runs the demo's setup (real etcd + kube-apiserver, backends in network namespaces, the
controller and two proxies as processes), then N times: PATCH the Service's
weighbridge.io/weights (what `kubectl annotate` sends) and poll both proxies' admin API until
each reports the new generation. Needs root (network namespaces).

    .venv/bin/python -m bench.e2e_latency [--changes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.procstat import pct
from controlplane.kube import Kube
from devtools.demo import NS, SVC, Demo
from weighbridge import etcd as store


async def run(changes: int, workdir: Path) -> list[float]:
    demo = Demo(workdir, etcd_only=False)
    out: list[float] = []
    with demo.infrastructure() as (etcd_server, apiserver, net):
        assert apiserver is not None and net is not None
        for name in ("shop-v1-a", "shop-v1-b", "shop-v2-a"):
            net.add_host(name)
            net.echo(name, 50051)
            demo.hosts[name] = (net.hosts[name], 50051)
        kube = await Kube.connect(str(apiserver.kubeconfig))
        etcd = store.client(etcd_server.endpoint)
        await demo.create_kubernetes_objects(kube)
        procs = demo.start_components(etcd_server, apiserver)
        try:
            path = f"/api/v1/namespaces/{NS}/services/{SVC}"
            await kube.request(
                "PATCH",
                path,
                body={
                    "metadata": {"annotations": {"weighbridge.io/strategy": "weighted_round_robin"}}
                },
                content_type="application/merge-patch+json",
            )
            await demo.wait_applied(0)
            for i in range(changes):
                found = await store.get_set(etcd, demo.scheme, demo.key)
                before = found.backend_set.generation if found and found.backend_set else 0
                weights = f"version=v1: {10 + i % 80}%\nversion=v2: {90 - i % 80}%"
                t0 = time.perf_counter()
                await kube.request(
                    "PATCH",
                    path,
                    body={"metadata": {"annotations": {"weighbridge.io/weights": weights}}},
                    content_type="application/merge-patch+json",
                )
                await demo.wait_applied(before, interval=0.001)
                out.append((time.perf_counter() - t0) * 1000)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=15)
            await etcd.close()
            await kube.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--changes", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        ms = asyncio.run(run(args.changes, Path(tmp)))
    print(
        f"annotation PATCH → both proxies applied, {len(ms)} changes: p50 {pct(ms, 50):.1f} ms, "
        f"p90 {pct(ms, 90):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms, "
        f"mean {statistics.fmean(ms):.1f} ms (both admin APIs polled back to back)"
    )


if __name__ == "__main__":
    main()
