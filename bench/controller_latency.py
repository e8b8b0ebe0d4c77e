"""Benchmark: time from a Kubernetes change to the controller's etcd write.

Starts a real etcd and kube-apiserver (devtools.testenv), one weighbridge-controller process,
an annotated Service with 10 pods, then makes N changes one after another, alternating
between a Pod weight annotation and an EndpointSlice edit. For each change it measures from
just before the API request is sent to the moment an etcd watch delivers the new backend set.

    .venv/bin/python -m bench.controller_latency [--changes 300] [--json PATH]

Bounded: N changes, each given at most 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procstat import pct
from controlplane.kube import Kube
from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, decode

NS = "bench"


def _pod_weight_is(weight: int) -> Callable[[BackendSet], bool]:
    return lambda bs: any(e.pod == "api-0" and e.weight == weight for e in bs.endpoints)


def _size_is(n: int) -> Callable[[BackendSet], bool]:
    return lambda bs: len(bs.endpoints) == n


def slice_obj(n: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "api-1",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": "api"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"198.18.0.{i + 1}"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": f"api-{i}", "namespace": NS},
            }
            for i in range(n)
        ],
    }


async def run(changes: int, workdir: Path) -> dict[str, Any]:
    with testenv.control_plane(workdir) as (etcd_server, apiserver):
        kube = await Kube.connect(str(apiserver.kubeconfig))
        scheme = KeyScheme(f"/bench-{uuid.uuid4().hex[:6]}/")
        key = ServiceKey(f"{NS}/api")
        await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": NS}})
        await kube.request(
            "POST",
            f"/api/v1/namespaces/{NS}/services",
            body={
                "metadata": {
                    "name": "api",
                    "annotations": {"weighbridge.io/strategy": "weighted_round_robin"},
                },
                "spec": {"ports": [{"name": "grpc", "port": 50051}]},
            },
        )
        for i in range(10):
            await kube.request(
                "POST",
                f"/api/v1/namespaces/{NS}/pods",
                body={
                    "metadata": {"name": f"api-{i}", "labels": {"app": "api"}},
                    "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
                },
            )
        slices = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
        await kube.request("POST", slices, body=slice_obj(10))
        controller = testenv.start_controller(
            apiserver.kubeconfig,
            etcd_server.endpoint,
            workdir / "controller.log",
            prefix=scheme.prefix,
            identity="bench",
            log_level="warning",
        )
        etcd = store.client(etcd_server.endpoint)
        arrivals: asyncio.Queue[tuple[float, BackendSet]] = asyncio.Queue()
        try:
            watch = await etcd.watch(scheme.service(key))

            async def pump() -> None:
                async for event in watch:
                    if event.kv.value:
                        await arrivals.put((time.perf_counter(), decode(event.kv.value)))

            pumper = asyncio.create_task(pump())
            deadline = time.monotonic() + 60
            while (await store.get_set(etcd, scheme, key)) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("controller never published")
                await asyncio.sleep(0.1)
            while not arrivals.empty():
                arrivals.get_nowait()
            by_kind: dict[str, list[float]] = {"pod-annotation": [], "endpointslice": []}
            for i in range(changes):
                if i % 2 == 0:
                    kind, weight = "pod-annotation", str(i + 2)
                    t0 = time.perf_counter()
                    await kube.request(
                        "PATCH",
                        f"/api/v1/namespaces/{NS}/pods/api-0",
                        body={"metadata": {"annotations": {"weighbridge.io/weight": weight}}},
                        content_type="application/merge-patch+json",
                    )
                    done = _pod_weight_is(int(weight))
                else:
                    kind, n = "endpointslice", 9 if (i // 2) % 2 == 0 else 10
                    current = await kube.request("GET", f"{slices}/api-1")
                    body = slice_obj(n)
                    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    t0 = time.perf_counter()
                    await kube.request("PUT", f"{slices}/api-1", body=body)
                    done = _size_is(n)
                while True:
                    arrived, bs = await asyncio.wait_for(arrivals.get(), 10)
                    if done(bs):
                        by_kind[kind].append((arrived - t0) * 1000)
                        break
            pumper.cancel()
            await watch.cancel()
        finally:
            controller.terminate()
            controller.wait(timeout=15)
            await etcd.close()
            await kube.close()
    all_ms = [v for vs in by_kind.values() for v in vs]

    def summary(vs: list[float]) -> dict[str, float]:
        return {
            "n": len(vs),
            "p50_ms": round(pct(vs, 50), 2),
            "p90_ms": round(pct(vs, 90), 2),
            "p99_ms": round(pct(vs, 99), 2),
            "max_ms": round(max(vs), 2),
            "mean_ms": round(statistics.fmean(vs), 2),
        }

    return {"all": summary(all_ms), **{k: summary(v) for k, v in by_kind.items()}}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--changes", type=int, default=300)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        result = asyncio.run(run(args.changes, Path(tmp)))
    print(f"{'change':<16} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, s in result.items():
        cells = [f"{s[c]:>8}" for c in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
        print(f"{name:<16} {s['n']:>4} {' '.join(cells)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
