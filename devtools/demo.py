"""Weighbridge local demo: a real etcd and kube-apiserver, the controller, and a Service
whose annotations change step by step, with the backend set it produces shown after each.

It builds/starts everything on loopback, runs the steps, and stops all it started on exit
or Ctrl-C. Nothing is sent to the (documentation-range) endpoint addresses it uses.

    scripts/run [--pause SECONDS] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from controlplane.kube import Kube
from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet

NS = "demo"
SVC = "shop"
BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def slice_body(pods: list[tuple[str, str]], terminating: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{SVC}-1",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": SVC},
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"198.18.0.{i + 1}"],
                "conditions": {
                    "ready": name not in terminating,
                    "serving": True,
                    "terminating": name in terminating,
                },
                "targetRef": {"kind": "Pod", "name": name, "namespace": NS},
            }
            for i, (name, _) in enumerate(pods)
        ],
    }


def show(bs: BackendSet | None, pods: dict[str, str]) -> None:
    if bs is None:
        print(f"  {DIM}(no backend set in etcd){RESET}")
        return
    probabilities = bs.probabilities()
    print(f"  strategy {BOLD}{bs.strategy}{RESET}, generation {bs.generation}")
    groups: dict[str, float] = {}
    for e in bs.endpoints:
        share = float(probabilities.get(e.hostport, 0))
        groups[pods.get(e.pod, "?")] = groups.get(pods.get(e.pod, "?"), 0) + share
        state = "terminating" if e.terminating else ("" if e.serving else "not serving")
        bar = "█" * round(share * 40)
        version = pods.get(e.pod, "")
        print(f"  {e.pod:<10} {version:<3} w={e.weight:<4} {share:7.2%} {bar} {DIM}{state}{RESET}")
    print("  by version: " + ", ".join(f"{v} {s:.0%}" for v, s in sorted(groups.items())))


async def demo(pause: float, keep: bool, workdir: Path) -> None:
    with testenv.control_plane(workdir) as (etcd_server, apiserver):
        print(f"{DIM}etcd {etcd_server.endpoint}, kubeconfig {apiserver.kubeconfig}{RESET}")
        kube = await Kube.connect(str(apiserver.kubeconfig))
        etcd = store.client(etcd_server.endpoint)
        scheme = KeyScheme()
        controller = testenv.start_controller(
            apiserver.kubeconfig,
            etcd_server.endpoint,
            workdir / "controller.log",
            log_level="warning",
        )
        try:
            await run_steps(kube, etcd, scheme, pause)
            if keep:
                print(
                    f"\n{BOLD}Still running.{RESET} Try, in another shell:\n"
                    f"  WEIGHBRIDGE_ETCD={etcd_server.endpoint} .venv/bin/wbctl get {NS}/{SVC}\n"
                    f"Ctrl-C stops everything."
                )
                await asyncio.Event().wait()
        finally:
            controller.terminate()
            controller.wait(timeout=15)
            await etcd.close()
            await kube.close()


async def run_steps(kube: Kube, etcd: Any, scheme: KeyScheme, pause: float) -> None:
    key = ServiceKey(f"{NS}/{SVC}")
    pods = [(f"{SVC}-{i}", "v1") for i in range(3)] + [(f"{SVC}-3", "v2")]
    versions = dict(pods)
    slices = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
    service_path = f"/api/v1/namespaces/{NS}/services/{SVC}"

    async def annotate(path: str, annotations: dict[str, str | None]) -> None:
        await kube.request(
            "PATCH",
            path,
            body={"metadata": {"annotations": annotations}},
            content_type="application/merge-patch+json",
        )

    async def add_pod(name: str, version: str) -> None:
        await kube.request(
            "POST",
            f"/api/v1/namespaces/{NS}/pods",
            body={
                "metadata": {"name": name, "labels": {"app": SVC, "version": version}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/shop:1"}]},
            },
        )

    async def put_slice(terminating: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        current = await kube.request("GET", f"{slices}/{SVC}-1")
        body = slice_body(pods, terminating)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await kube.request("PUT", f"{slices}/{SVC}-1", body=body)

    async def generation() -> int | None:
        found = await store.get_set(etcd, scheme, key)
        return found.backend_set.generation if found and found.backend_set else None

    async def step(
        title: str, yaml: str, action: Callable[[], Awaitable[None]], *, changes: bool = True
    ) -> None:
        gen = await generation()
        print(f"\n{BOLD}▶ {title}{RESET}")
        for line in yaml.strip().splitlines():
            print(f"  {DIM}{line}{RESET}")
        t0 = time.perf_counter()
        await action()
        deadline = time.monotonic() + (10 if changes else 1)
        while time.monotonic() < deadline and await generation() == gen:
            await asyncio.sleep(0.005)
        elapsed = (time.perf_counter() - t0) * 1000
        if changes:
            print(f"  {DIM}etcd updated {elapsed:.0f} ms after the Kubernetes change{RESET}")
        else:
            print(f"  {DIM}etcd unchanged{RESET}")
        found = await store.get_set(etcd, scheme, key)
        show(found.backend_set if found else None, versions)
        await asyncio.sleep(pause)

    deadline = time.monotonic() + 60
    while await etcd.get(scheme.leader_key) is None:  # the controller is up and leading
        if time.monotonic() > deadline:
            raise TimeoutError("the controller did not start; see its log")
        await asyncio.sleep(0.1)
    await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": NS}})
    for name, version in pods:
        await add_pod(name, version)

    async def create() -> None:
        await kube.request(
            "POST",
            f"/api/v1/namespaces/{NS}/services",
            body={
                "metadata": {
                    "name": SVC,
                    "annotations": {"weighbridge.io/strategy": "round_robin"},
                },
                "spec": {"ports": [{"name": "grpc", "port": 50051}]},
            },
        )
        await kube.request("POST", slices, body=slice_body(pods))

    await step(
        "Annotate a Service: round robin over its 4 pods (3 of v1, 1 of v2)",
        "weighbridge.io/strategy: round_robin",
        create,
    )
    await step(
        "Canary: 90% to v1, 10% to v2, whatever the replica counts",
        "weighbridge.io/strategy: weighted_round_robin\nweighbridge.io/weights: |\n"
        "  version=v1: 90%\n  version=v2: 10%",
        lambda: annotate(
            service_path,
            {
                "weighbridge.io/strategy": "weighted_round_robin",
                "weighbridge.io/weights": "version=v1: 90%\nversion=v2: 10%",
            },
        ),
    )

    async def scale_v2() -> None:
        for i in (4, 5):
            pods.append((f"{SVC}-{i}", "v2"))
            versions[f"{SVC}-{i}"] = "v2"
            await add_pod(f"{SVC}-{i}", "v2")
        await put_slice()

    await step(
        "Scale v2 to 3 pods: v2 still gets 10% in all",
        "(2 more v2 pods join the EndpointSlice)",
        scale_v2,
    )
    await step(
        "A per-pod weight: shop-0 takes 3 times its v1 siblings' share",
        'metadata.annotations (Pod shop-0):\n  weighbridge.io/weight: "3"',
        lambda: annotate(f"/api/v1/namespaces/{NS}/pods/{SVC}-0", {"weighbridge.io/weight": "3"}),
    )
    await step(
        "shop-1 is terminating: no new requests for it",
        "EndpointSlice conditions: terminating=true",
        lambda: put_slice({f"{SVC}-1"}),
    )

    async def bad() -> None:
        await annotate(service_path, {"weighbridge.io/weights": "version=v1: 90%\nversion=v2: 20%"})
        await asyncio.sleep(0.3)
        events = await kube.request(
            "GET",
            f"/api/v1/namespaces/{NS}/events",
            query={"fieldSelector": f"involvedObject.name={SVC}"},
        )
        for e in events.get("items", [])[-1:]:
            print(f"  Event {e['type']} {e['reason']}: {e['message']}")

    await step(
        "A typo: shares add up to 110% → a Warning Event, the last good set stays",
        "weighbridge.io/weights: version=v1: 90% / version=v2: 20%",
        bad,
        changes=False,
    )
    await step(
        "Random, uniform over every serving pod",
        "weighbridge.io/strategy: random  (weights removed)",
        lambda: annotate(
            service_path, {"weighbridge.io/strategy": "random", "weighbridge.io/weights": None}
        ),
    )
    await step(
        "Opt out: remove the strategy annotation → the key leaves etcd",
        "weighbridge.io/strategy: (removed)",
        lambda: annotate(service_path, {"weighbridge.io/strategy": None}),
    )


def main() -> None:
    p = argparse.ArgumentParser(
        prog="scripts/run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pause", type=float, default=1.5, help="seconds between steps (default: %(default)s)"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep everything running after the steps until Ctrl-C"
    )
    args = p.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="weighbridge-demo-") as tmp,
        contextlib.suppress(KeyboardInterrupt),
    ):
        asyncio.run(demo(args.pause, args.keep, Path(tmp)))
    print("\nstopped everything the demo started")


if __name__ == "__main__":
    main()
