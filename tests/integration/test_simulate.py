"""wbctl simulate against a real kube-apiserver (and the controller beside it, to compare with
what it publishes), and wbctl spread against a real proxy process carrying real calls."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aetcd
import grpc
import pytest

from devtools import testenv
from tests.echo import echo_backends
from tests.integration import kubeobjects as ko
from tests.integration.conftest import Cluster, eventually, running_controller, stored_set
from tests.integration.test_end_to_end import channels, processes
from wbtools import spreading
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration

CANARY = "weighbridge.io/strategy: weighted_round_robin\nweighbridge.io/weights: |\n  version=v1: 90%\n  version=v2: 10%\n"


async def wbctl(
    *args: str, kubeconfig: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """wbctl as a user runs it (``python -m wbtools`` is the ``wbctl`` entry point)."""
    env = {**os.environ, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "wbtools", *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        env=env,
    )


async def shop(k8s: Cluster) -> dict[str, str]:
    """Pods v1-a and v1-b (version=v1) and v2-a (version=v2) behind Service cart, whose own
    annotations say round_robin; HOST:PORT → pod."""
    names = ["v1-a", "v1-b", "v2-a"]
    for name in names:
        await k8s.create(ko.pod(k8s.ns, name, {"app": "cart", "version": name[:2]}))
    await k8s.create(ko.service(k8s.ns, "cart", {"weighbridge.io/strategy": "round_robin"}))
    eps = [ko.Ep(ko.address(i), pod=n) for i, n in enumerate(names)]
    await k8s.create(ko.endpoint_slice(k8s.ns, "cart", "cart-1", eps))
    return {f"{ko.address(i)}:50051": n for i, n in enumerate(names)}


async def test_simulate_a_canary_before_applying_it(
    k8s: Cluster,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    tmp_path: Path,
) -> None:
    pods = await shop(k8s)
    key = f"{k8s.ns}/cart"
    annotations = tmp_path / "canary.yaml"
    annotations.write_text(CANARY)
    async with running_controller(apiserver.kubeconfig, etcd_server.endpoint, scheme):
        live = await eventually(
            lambda: store.get_set(etcd, scheme, ServiceKey(key)),
            lambda s: s is not None,
            what="the controller publishes the live round_robin set",
        )
        assert live is not None
        service = await k8s.kube.request("GET", f"/api/v1/namespaces/{k8s.ns}/services/cart")

        sim = await wbctl(
            "simulate", key, "--annotations", str(annotations), "--calls", "2000", "-o", "json",
            kubeconfig=apiserver.kubeconfig,
        )  # fmt: skip
        assert sim.returncode == 0, sim.stderr
        doc = json.loads(sim.stdout)
        assert doc["strategy"] == "weighted_round_robin"
        shares = {pods[f"{e['address']}:{e['port']}"]: e for e in doc["endpoints"]}
        assert {p: e["expectedShare"] for p, e in shares.items()} == {
            "v1-a": 0.45,
            "v1-b": 0.45,
            "v2-a": 0.1,
        }
        # The engine's own picks: smooth WRR over weights 9:9:2 is exact per 20 calls.
        assert {p: e["picks"] for p, e in shares.items()} == {"v1-a": 900, "v1-b": 900, "v2-a": 200}
        assert [
            (g["selector"], g["pods"], g["expectedShare"], g["picks"]) for g in doc["groups"]
        ] == [
            ("version=v1", 2, 0.9, 1800),
            ("version=v2", 1, 0.1, 200),
        ]

        table = await wbctl(
            "simulate", key, "--annotations", "-", "--calls", "200",
            kubeconfig=apiserver.kubeconfig, stdin=CANARY,
        )  # fmt: skip
        assert table.returncode == 0, table.stderr
        rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line}
        assert rows["v2-a"][2:] == ["2", "version=v2", "10.00%", "10.00%"]
        assert rows["version=v1"] == ["version=v1", "2", "90.00%", "90.00%"]

        # Nothing was written: etcd holds the same set at the same revision, the Service is
        # unchanged.
        assert await store.get_set(etcd, scheme, ServiceKey(key)) == live
        again = await k8s.kube.request("GET", f"/api/v1/namespaces/{k8s.ns}/services/cart")
        assert again["metadata"] == service["metadata"]

        # An invalid annotation: the error the controller's Event will give, word for word.
        bad = "weighbridge.io/weights: 'version=v1: 90%; version=v2: 20%'\n"
        refused = await wbctl(
            "simulate", key, "--annotations", "-", kubeconfig=apiserver.kubeconfig, stdin=bad
        )
        assert refused.returncode == 1
        assert refused.stdout == ""
        assert refused.stderr.startswith(
            "wbctl: the controller would refuse these annotations and keep the Service's last "
            "good set (Warning Event InvalidWeights): weighbridge.io/weights: "
        ), refused.stderr
        await k8s.annotate(
            "Service", "cart", **{"weighbridge.io/weights": "version=v1: 90%; version=v2: 20%"}
        )
        events = await eventually(
            lambda: k8s.events("cart"),
            lambda evs: any(e["reason"] == "InvalidWeights" for e in evs),
            what="the controller's Warning Event",
        )
        message = next(e["message"] for e in events if e["reason"] == "InvalidWeights")
        assert refused.stderr.rstrip("\n").endswith(f"(Warning Event InvalidWeights): {message}")

        # Applied for real, the controller publishes the very shares simulate showed.
        await k8s.annotate(
            "Service",
            "cart",
            **{
                "weighbridge.io/strategy": "weighted_round_robin",
                "weighbridge.io/weights": "version=v1: 90%\nversion=v2: 10%",
            },
        )
        published = await eventually(
            lambda: stored_set(etcd, scheme, key),
            lambda s: s is not None and s.strategy == "weighted_round_robin",
            what="the controller publishes the canary",
        )
        assert published is not None
        got = {pods[h]: float(p) for h, p in published.probabilities().items()}
        assert got == {p: e["expectedShare"] for p, e in shares.items()}


async def test_simulate_errors_a_user_can_act_on(
    k8s: Cluster, apiserver: testenv.KubeAPIServer
) -> None:
    await shop(k8s)
    missing = await wbctl("simulate", f"{k8s.ns}/nope", kubeconfig=apiserver.kubeconfig)
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"wbctl: no Service {k8s.ns}/nope"), missing.stderr
    opted_out = await wbctl(
        "simulate", f"{k8s.ns}/cart", "--annotations", "-", kubeconfig=apiserver.kubeconfig,
        stdin="weighbridge.io/strategy: null\n",
    )  # fmt: skip
    assert opted_out.returncode == 1
    assert "has no weighbridge.io/strategy annotation, so the controller ignores it" in (
        opted_out.stderr
    )


async def test_simulate_reads_endpoints_as_the_controller_does_with_source_endpoints(
    k8s: Cluster, apiserver: testenv.KubeAPIServer
) -> None:
    pods = await shop(k8s)
    eps = [ko.Ep(ko.address(i), pod=n) for i, n in enumerate(pods.values())]
    await k8s.create(ko.endpoints(k8s.ns, "cart", eps[:2], not_ready=eps[2:]))
    out = await wbctl(
        "simulate", f"{k8s.ns}/cart", "--source", "endpoints", "--calls", "300", "-o", "json",
        kubeconfig=apiserver.kubeconfig,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["source"] == "endpoints"
    assert [(e["eligible"], e["picks"]) for e in doc["endpoints"]] == [
        (True, 150),
        (True, 150),
        (False, 0),
    ], "round_robin over the ready pods; v2-a is not ready"


async def applied(admin: int, key: str) -> list[int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{admin}") as ch:
        listing = await admin_pb2_grpc.AdminStub(ch).ListBackendSets(
            admin_pb2.ListBackendSetsRequest()
        )
    return [
        s.backend_set.generation
        for s in listing.services
        if f"{s.backend_set.namespace}/{s.backend_set.name}" == key
    ]


async def test_spread_of_a_real_proxys_calls(
    etcd_server: testenv.Etcd, scheme: KeyScheme, tmp_path: Path
) -> None:
    etcd_flags = ("--etcd", etcd_server.endpoint, "--prefix", scheme.prefix)
    key = "default/spread"
    async with echo_backends("a", "b", "c") as backends:
        weights = {"a": 9, "b": 9, "c": 2}
        put = await wbctl(
            *etcd_flags, "put", key, "--strategy", "weighted_round_robin",
            *(f"--endpoint={b.hostport}={weights[b.name]}" for b in backends),
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        port, admin = testenv.free_port(), testenv.free_port()
        proxy = testenv.start_proxy(
            etcd_server.endpoint,
            tmp_path / "proxy.log",
            port=port,
            admin_port=admin,
            prefix=scheme.prefix,
            identity="proxy-spread",
        )
        with processes(proxy):
            await eventually(lambda: applied(admin, key), lambda g: g == [1], timeout=30)
            async with channels([port], "spread.default") as (channel,):
                for _ in range(400):
                    await channel.unary_unary("/test.Echo/Unary")(b"", timeout=5)
            out = await wbctl(
                *etcd_flags, "spread", key, "--admin", f"127.0.0.1:{admin}", "-o", "json"
            )
            assert out.returncode == 0, out.stderr
            doc = json.loads(out.stdout)
            assert doc["calls"] == 400
            assert doc["verdict"] == "ok"
            assert doc["proxies"][0]["id"] == "proxy-spread"
            by_name = {b.hostport: b.name for b in backends}
            rows = {by_name[e["endpoint"]]: e for e in doc["endpoints"]}
            assert {n: e["calls"] for n, e in rows.items()} == {"a": 180, "b": 180, "c": 40}
            assert {n: e["expectedShare"] for n, e in rows.items()} == {
                "a": 0.45,
                "b": 0.45,
                "c": 0.1,
            }
            assert all(e["deviationSigma"] == pytest.approx(0) for e in rows.values())
            assert [b.calls for b in backends] == [180, 180, 40], "what the backends saw"

            # The set changes to equal weights: the calls made before it are far off its
            # shares, which is what --interval is for.
            equal = await wbctl(
                *etcd_flags, "put", key, "--strategy", "round_robin",
                *(f"--endpoint={b.hostport}" for b in backends),
            )  # fmt: skip
            assert equal.returncode == 0, equal.stderr
            await eventually(lambda: applied(admin, key), lambda g: g == [2], timeout=30)
            table = await wbctl(*etcd_flags, "spread", key, "--admin", f"127.0.0.1:{admin}")
            assert table.returncode == 0, table.stderr
            head, _, *lines = table.stdout.splitlines()
            assert head.endswith("400 calls through 1 proxy (proxy-spread); verdict: off"), head
            verdicts = {by_name[line.split()[1]]: line.split()[-1] for line in lines[1:]}
            # 180 calls where 400/3 were expected: +4.9 sigma; 40: -9.9 sigma.
            assert verdicts == {"a": "unlikely", "b": "unlikely", "c": "off"}

            # Counting only the calls of a few seconds, the new set's shares hold.
            measuring = asyncio.create_task(
                spreading.measure(ServiceKey(key), [f"127.0.0.1:{admin}"], interval=5.0)
            )
            await asyncio.sleep(0.5)  # the first reading
            async with channels([port], "spread.default") as (channel,):
                for _ in range(300):
                    await channel.unary_unary("/test.Echo/Unary")(b"", timeout=5)
            spread = await measuring
            assert [r.calls for r in spread.rows] == [100, 100, 100]
            assert spread.verdict == "ok"
