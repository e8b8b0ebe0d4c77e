"""wbctl as a user runs it, against a real etcd (and a real proxy for `wbctl proxies`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from devtools import testenv
from tests.integration.conftest import running_proxy
from weighbridge.keys import KeyScheme

pytestmark = pytest.mark.integration


async def wbctl(
    etcd: testenv.Etcd, scheme: KeyScheme, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "weighbridge.wbctl",
        "--etcd",
        etcd.endpoint,
        "--prefix",
        scheme.prefix,
        *args,
    ]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30)


async def test_put_get_delete(etcd_server: testenv.Etcd, scheme: KeyScheme) -> None:
    put = await wbctl(
        etcd_server,
        scheme,
        "put",
        "default/echo",
        "--strategy",
        "weighted_random",
        "--endpoint",
        "198.18.0.1:50051=3",
        "--endpoint",
        "198.18.0.2:50051",
        "--grpc-service",
        "test.Echo",
    )
    assert put.returncode == 0, put.stderr
    assert "default/echo: generation 1 written" in put.stdout
    table = await wbctl(etcd_server, scheme, "get")
    assert table.stdout.splitlines()[1].split()[:5] == [
        "default/echo",
        "weighted_random",
        "1",
        "2",
        "2",
    ]
    one = await wbctl(etcd_server, scheme, "get", "default/echo")
    assert "198.18.0.1:50051  3       75.00%" in one.stdout
    doc = json.loads((await wbctl(etcd_server, scheme, "get", "default/echo", "-o", "json")).stdout)
    assert doc["grpcServices"] == ["test.Echo"]
    assert [e["share"] for e in doc["endpoints"]] == [0.75, 0.25]
    again = await wbctl(
        etcd_server,
        scheme,
        "put",
        "default/echo",
        "--strategy",
        "random",
        "--endpoint",
        "198.18.0.1:1",
    )
    assert "generation 2" in again.stdout
    assert (await wbctl(etcd_server, scheme, "delete", "default/echo")).returncode == 0
    missing = await wbctl(etcd_server, scheme, "get", "default/echo")
    assert missing.returncode == 1
    assert "no backend set for default/echo" in missing.stderr


async def test_bad_input_is_a_clear_error(etcd_server: testenv.Etcd, scheme: KeyScheme) -> None:
    bad = await wbctl(
        etcd_server,
        scheme,
        "put",
        "default/echo",
        "--strategy",
        "random",
        "--endpoint",
        "host.example:80",
    )
    assert bad.returncode == 1
    assert "wbctl: endpoint address 'host.example' is not an IP address" in bad.stderr


async def test_proxies_shows_who_is_in_sync(etcd_server: testenv.Etcd, scheme: KeyScheme) -> None:
    await wbctl(
        etcd_server,
        scheme,
        "put",
        "default/echo",
        "--strategy",
        "random",
        "--endpoint",
        "198.18.0.1:1",
    )
    async with running_proxy(etcd_server.endpoint, scheme, proxy_id="p-1"):
        for _ in range(50):
            out = await wbctl(etcd_server, scheme, "proxies", "-o", "json")
            doc = json.loads(out.stdout)
            if doc["proxies"] and doc["proxies"][0]["inSync"]:
                break
            await asyncio.sleep(0.1)
        assert [(p["id"], p["inSync"], p["backendSets"]) for p in doc["proxies"]] == [
            ("p-1", True, 1)
        ]
        table = await wbctl(etcd_server, scheme, "proxies")
        assert table.stdout.splitlines()[1].split()[:4] == [
            "p-1",
            str(doc["setsRevision"]),
            "1",
            "yes",
        ]
