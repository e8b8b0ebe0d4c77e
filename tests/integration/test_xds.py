"""The proxy's xDS server with a real etcd, a real proxy process and real proxyless gRPC clients
(grpcio's xds resolver, each in a process of its own), calling real grpc.aio backends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from devtools import testenv
from tests.integration.conftest import eventually
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint
from weighbridge.policy import (
    HASH,
    HEALTH_CHECK,
    RETRY,
    HashKey,
    HealthCheck,
    RetryPolicy,
    format_hash,
    format_health_check,
    format_retry,
)

pytestmark = pytest.mark.integration
CLIENT = Path(__file__).with_name("xds_client.py")


@dataclass
class Backend:
    """A gRPC server answering ``/test.Who/Who`` with its name, remembering each caller's
    address."""

    name: str
    port: int = 0
    peers: list[str] = field(default_factory=list)
    server: Any = None
    fail_every: int = 0
    """When > 0, every fail_every-th call fails UNAVAILABLE."""
    health: Any = None
    """A grpc.health.v1 servicer to serve too (tests set its status)."""

    async def start(self) -> None:
        async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
            self.peers.append(context.peer())
            if self.fail_every and len(self.peers) % self.fail_every == 0:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} fails this one")
            return self.name.encode()

        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Who", {"Who": grpc.unary_unary_rpc_method_handler(who)}
                ),
            )
        )
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()


@contextlib.asynccontextmanager
async def backends(*members: str | Backend) -> AsyncIterator[list[Backend]]:
    """Started backends: by name, or as given."""
    started = [Backend(m) if isinstance(m, str) else m for m in members]
    for b in started:
        await b.start()
    try:
        yield started
    finally:
        for b in started:
            await b.server.stop(0)


async def put(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    members: Sequence[tuple[Backend, int]],
    *,
    strategy: str = "weighted_round_robin",
    namespace: str = "default",
    name: str = "shop",
    options: dict[str, str] | None = None,
    terminating: Sequence[Backend] = (),
) -> int:
    endpoints = tuple(
        Endpoint("127.0.0.1", b.port, weight=w, pod=f"{b.name}-{i}", terminating=b in terminating)
        for i, (b, w) in enumerate(members)
    )
    return await store.put_set(
        etcd,
        scheme,
        BackendSet(namespace, name, strategy, endpoints=endpoints, options=options or {}),
    )


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    xds: int
    metrics: int
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{want}}}" if want else name
        for line in body.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {series} in the proxy's metrics")


@contextlib.asynccontextmanager
async def proxy_process(
    etcd_endpoint: str, scheme: KeyScheme, tmp_path: Path, *flags: str
) -> AsyncIterator[ProxyProcess]:
    """A proxy process with its xDS port open, once it applied the sets written before."""
    port, xds, metrics = testenv.free_port(), testenv.free_port(), testenv.free_port()
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "dataplane.main"),
                *("--etcd", etcd_endpoint, "--prefix", scheme.prefix),
                *("--listen", f"127.0.0.1:{port}", "--xds-listen", f"127.0.0.1:{xds}"),
                *("--metrics-listen", f"127.0.0.1:{metrics}", "--admin-listen", ""),
                *("--health-listen", "", "--threads", "1", "--log-format", "json"),
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proxy = ProxyProcess(proc, port, xds, metrics, log)
    try:

        async def sets() -> float:
            try:
                return await asyncio.to_thread(proxy.metric, "weighbridge_proxy_backend_sets")
            except OSError:
                return -1

        await eventually(sets, lambda n: n > 0, timeout=30, what="the proxy applied the sets")
        yield proxy
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


class XdsClient:
    """A client process with a bootstrap naming the proxy's xDS port."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "the xDS client process ended"
        return json.loads(line)  # type: ignore[no-any-return]

    async def run(self, n: int) -> dict[str, Any]:
        return await self.ask(f"run {n}")

    def local_ports(self) -> set[int]:
        """The local TCP ports of this process's sockets."""
        inodes = set()
        fds = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports


@contextlib.asynccontextmanager
async def xds_client(
    xds_port: int,
    target: str,
    node: str = "test-client",
    tls: dict[str, str] | None = None,
) -> AsyncIterator[XdsClient]:
    """``tls``: the bootstrap's ``tls`` channel credentials config (gRFC A65)."""
    creds = {"type": "tls", "config": tls} if tls else {"type": "insecure"}
    bootstrap = {
        "xds_servers": [
            {
                "server_uri": f"127.0.0.1:{xds_port}",
                "channel_creds": [creds],
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }
        ],
        "node": {"id": node},
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        target,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,  # C-core logs each NACK at ERROR
        env={**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap)},
    )
    try:
        yield XdsClient(proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def pushed(proxy: ProxyProcess, kind: str, responses: int) -> None:
    """Once the proxy has sent ``responses`` responses of ``kind``, and a moment for the client
    to apply the last."""
    await eventually(
        lambda: asyncio.to_thread(proxy.metric, "weighbridge_proxy_xds_responses_total", type=kind),
        lambda n: n >= responses,
        what=f"{responses} {kind} responses sent",
    )
    await asyncio.sleep(0.3)


def within_5_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


async def test_a_90_10_set_reaches_a_proxyless_client_with_its_shares_and_no_proxy_between(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """Three v1 pods of weight 30 and one v2 pod of weight 10 (what ``version=v1: 90%;
    version=v2: 10%`` gives): a grpcio client of ``xds:///shop.default`` sends v2 10% of its
    calls within 5 sigma, straight to the pods (they see the client's own sockets; the proxy
    carries nothing)."""
    async with backends("v1a", "v1b", "v1c", "v2") as (a, b, c, v2):
        await put(etcd, scheme, [(a, 30), (b, 30), (c, 30), (v2, 10)])
        async with (
            proxy_process(
                etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "default"
            ) as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
        ):
            warm = await client.run(200)  # every locality READY before counting
            assert not warm["errors"], warm
            for backend in (a, b, c, v2):
                backend.peers.clear()
            n = 3000
            result = await client.run(n)
            assert not result["errors"], result
            counts = result["counts"]
            assert sum(counts.values()) == n
            assert within_5_sigma(counts.get("v2", 0), n, 0.10), counts
            for name in ("v1a", "v1b", "v1c"):
                assert within_5_sigma(counts.get(name, 0), n, 0.30), counts
            own = client.local_ports()
            peers = {int(p.rsplit(":", 1)[1]) for x in (a, b, c, v2) for p in x.peers}
            assert peers and peers <= own, f"callers {peers}, the client's sockets {own}"
            assert proxy.metric("weighbridge_proxy_calls_total") == 0
            assert proxy.metric("weighbridge_proxy_xds_streams") == 1
            assert proxy.metric("weighbridge_proxy_xds_nacks_total", type="endpoints") == 0
            print(f"\nxDS client shares of {n} calls: {counts}")


async def test_an_endpoint_change_reaches_the_live_client(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """A pod added to the set gets the xDS client's calls as soon as the proxy's own clients'
    (the times are printed: benchmarks, not this test, make claims about them)."""
    async with backends("a", "b", "new") as (a, b, new):
        await put(etcd, scheme, [(a, 1), (b, 1)])
        async with (
            proxy_process(etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "*") as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
            grpc.aio.insecure_channel(
                f"127.0.0.1:{proxy.port}", options=[("grpc.default_authority", "shop.default")]
            ) as through_proxy,
        ):
            assert not (await client.run(50))["errors"]
            call = through_proxy.unary_unary("/test.Who/Who")
            await eventually(lambda: call(b"", timeout=5), lambda r: r in (b"a", b"b"))

            async def proxy_reaches_new() -> float:
                while await call(b"", timeout=5) != b"new":
                    pass
                return time.time()

            waiting = asyncio.create_task(client.ask("until new"))
            await asyncio.sleep(0.3)  # the client is calling
            t0 = time.time()
            await put(etcd, scheme, [(a, 1), (b, 1), (new, 1)])
            proxy_at = await asyncio.wait_for(proxy_reaches_new(), 10)
            seen = await waiting
            assert seen["at"] is not None, "the new pod never answered the xDS client"
            xds_ms, proxy_ms = (seen["at"] - t0) * 1000, (proxy_at - t0) * 1000
            print(
                f"\nchange → first call to the new pod: xDS client {xds_ms:.1f} ms, "
                f"through the proxy {proxy_ms:.1f} ms"
            )
            result = await client.run(300)
            assert set(result["counts"]) == {"a", "b", "new"}, result


async def test_a_set_the_client_rejects_is_nacked_counted_and_the_last_good_one_kept(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """A hand-written set (``wbctl`` writes them; the controller never does) listing one pod
    twice is valid to the proxy but not to gRPC (an address twice in a ClusterLoadAssignment):
    the client NACKs, the proxy logs and counts it, the client keeps calling as before, and the
    next good set reaches it."""
    async with backends("a", "b", "c") as (a, b, c):
        await put(etcd, scheme, [(a, 3), (b, 1)])
        async with (
            proxy_process(
                etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "default"
            ) as proxy,
            xds_client(proxy.xds, "xds:///shop.default", node="nack-me") as client,
        ):
            assert not (await client.run(100))["errors"]
            await put(etcd, scheme, [(a, 3), (b, 1), (c, 1), (c, 1)])
            await eventually(
                lambda: asyncio.to_thread(
                    proxy.metric, "weighbridge_proxy_xds_nacks_total", type="endpoints"
                ),
                lambda n: n >= 1,
                what="the client's NACK counted",
            )
            result = await client.run(400)
            assert not result["errors"], result
            assert set(result["counts"]) == {"a", "b"}, result  # the last good set
            assert within_5_sigma(result["counts"]["b"], 400, 0.25), result
            logged = [json.loads(x) for x in proxy.log.read_text().splitlines() if "xds_nack" in x]
            assert logged and logged[0]["node"] == "nack-me", logged
            assert logged[0]["type"] == "endpoints" and logged[0]["error"], logged
            await put(etcd, scheme, [(a, 1), (c, 1)])
            assert (await client.ask("until c"))["at"] is not None
            assert set((await client.run(100))["counts"]) == {"a", "c"}


async def test_a_client_sees_only_the_namespaces_it_is_allowed(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """``--xds-namespaces default``: a Service in namespace ``secret`` is to clients as if it did
    not exist, whatever the node they claim to be; one in ``default`` works."""
    async with backends("a") as (a,):
        await put(etcd, scheme, [(a, 1)], namespace="secret", name="vault")
        await put(etcd, scheme, [(a, 1)])
        async with proxy_process(
            etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "default"
        ) as proxy:
            async with xds_client(proxy.xds, "xds:///vault.secret", node="secret") as hidden:
                # A name never seen is declared absent by the client's 15 s resource timer (calls
                # wait for it meanwhile, here until their 5 s deadline).
                result = await hidden.run(4)
                assert not result["counts"], result
                assert any(
                    "LDS resource vault.secret: does not exist" in e for e in result["errors"]
                ), result
                assert set(result["errors"]) <= {
                    "DEADLINE_EXCEEDED: Deadline Exceeded",
                    *(e for e in result["errors"] if "does not exist" in e),
                }, result
            async with xds_client(proxy.xds, "xds:///shop.default.svc.cluster.local") as shown:
                assert (await shown.run(3))["counts"] == {"a": 3}


async def test_over_mtls_a_client_sees_the_namespace_of_its_spiffe_id(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """The xDS port takes the client port's certificate and client CA: a client whose
    certificate says ``spiffe://cluster.local/ns/shop/sa/web`` sees namespace ``shop`` and no
    other (``--xds-namespaces`` names none)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    ca = testenv.CertificateAuthority(tmp_path / "pki")
    server = (tmp_path / "pki/server.crt", tmp_path / "pki/server.key")
    client = (tmp_path / "pki/web.crt", tmp_path / "pki/web.key")
    ca.issue("weighbridge-proxy", *server, server=True)
    ca.issue("web", *client, san="URI:spiffe://cluster.local/ns/shop/sa/web")
    tls = {
        "ca_certificate_file": str(ca.cert),
        "certificate_file": str(client[0]),
        "private_key_file": str(client[1]),
    }
    async with backends("a") as (a,):
        await put(etcd, scheme, [(a, 1)], namespace="shop", name="cart")
        await put(etcd, scheme, [(a, 1)])
        async with proxy_process(
            etcd_server.endpoint,
            scheme,
            tmp_path,
            *("--tls-cert", str(server[0]), "--tls-key", str(server[1])),
            *("--tls-client-ca", str(ca.cert)),
        ) as proxy:
            async with xds_client(proxy.xds, "xds:///cart.shop", tls=tls) as own:
                assert (await own.run(3))["counts"] == {"a": 3}
            async with xds_client(proxy.xds, "xds:///shop.default", tls=tls) as other:
                result = await other.run(4)
                assert not result["counts"], result
                assert any("does not exist" in e for e in result["errors"]), result
            async with xds_client(proxy.xds, "xds:///cart.shop") as plaintext:
                result = await plaintext.run(1)
                assert not result["counts"], result


async def test_ring_hash_keeps_a_key_on_its_pod_and_spreads_keys_by_weight(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """ring_hash with ``weighbridge.io/hash: header: x-user``: the client hashes the header, so
    each key stays on one pod, and a pod of weight 3 holds about 3/4 of the keys."""
    hashing = {HASH: format_hash(HashKey(header="x-user"))}
    async with backends("heavy", "light") as (heavy, light):
        await put(etcd, scheme, [(heavy, 3), (light, 1)], strategy="ring_hash", options=hashing)
        async with (
            proxy_process(etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "*") as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
        ):
            assert not (await client.run(20))["errors"]
            n = 600
            result = await client.ask(f"keys {n} x-user")
            assert result["moved"] == 0, result
            assert within_5_sigma(result["counts"].get("heavy", 0), n, 0.75), result


async def test_configured_retries_reach_the_client(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """A pod failing every other call UNAVAILABLE: without ``weighbridge.io/retry`` half the
    client's calls fail; with ``on: unavailable; attempts: 3`` none does."""
    retry = {RETRY: format_retry(RetryPolicy(on=(14,), attempts=3))}
    async with backends("flaky") as (flaky,):
        flaky.fail_every = 2
        await put(etcd, scheme, [(flaky, 1)])
        async with (
            proxy_process(etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "*") as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
        ):
            without = await client.run(100)
            assert sum(without["errors"].values()) >= 40, without
            await put(etcd, scheme, [(flaky, 1)], options=retry)
            await pushed(proxy, "listener", 2)
            assert (await client.run(100)) == {"counts": {"flaky": 100}, "errors": {}}


async def test_a_terminating_pod_gets_no_new_calls_from_the_client(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    async with backends("a", "b") as (a, b):
        await put(etcd, scheme, [(a, 1), (b, 1)])
        async with (
            proxy_process(etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "*") as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
        ):
            assert set((await client.run(40))["counts"]) == {"a", "b"}
            await put(etcd, scheme, [(a, 1), (b, 1)], terminating=[b])
            await pushed(proxy, "endpoints", 2)
            assert (await client.run(100))["counts"] == {"a": 100}


async def test_outlier_detection_ejects_a_pod_that_fails_every_call(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """Outlier detection is on by default: the client's own (failure percentage over a sweep a
    second) ejects a pod that fails every call, and its calls go to the others."""
    async with backends("good", "also-good", "broken") as (good, also, broken):
        broken.fail_every = 1
        await put(etcd, scheme, [(good, 1), (also, 1), (broken, 1)])
        async with (
            proxy_process(etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "*") as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
        ):
            before = await client.run(60)
            assert sum(before["errors"].values()) >= 10, before
            await asyncio.sleep(2.5)  # two sweeps
            after = await client.run(200)
            assert not after["errors"], after
            assert set(after["counts"]) == {"good", "also-good"}, after


async def test_the_proxys_active_health_checks_reach_the_client(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, tmp_path: Path
) -> None:
    """``weighbridge.io/health-check``: a pod whose health service says NOT_SERVING is
    published UNHEALTHY and gets none of the client's calls; SERVING again, it gets them."""
    checks = {
        HEALTH_CHECK: format_health_check(
            HealthCheck(interval_ms=200, timeout_ms=100, unhealthy_threshold=1, healthy_threshold=1)
        )
    }
    a_health, b_health = health_aio.HealthServicer(), health_aio.HealthServicer()
    await a_health.set("", health_pb2.HealthCheckResponse.SERVING)
    await b_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with backends(Backend("a", health=a_health), Backend("b", health=b_health)) as (a, b):
        await put(etcd, scheme, [(a, 1), (b, 1)], options=checks)
        async with (
            proxy_process(etcd_server.endpoint, scheme, tmp_path, "--xds-namespaces", "*") as proxy,
            xds_client(proxy.xds, "xds:///shop.default") as client,
        ):
            await eventually(
                lambda: asyncio.to_thread(
                    proxy.metric,
                    "weighbridge_proxy_endpoints",
                    service="default/shop",
                    state="unhealthy",
                ),
                lambda n: n == 1,
                what="b found unhealthy by the proxy",
            )
            await asyncio.sleep(0.8)  # the engine's events are read every 0.5 s
            assert (await client.run(100)) == {"counts": {"a": 100}, "errors": {}}
            await b_health.set("", health_pb2.HealthCheckResponse.SERVING)
            assert (await client.ask("until b"))["at"] is not None
