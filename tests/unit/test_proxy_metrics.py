"""The proxy's /metrics against its event loop: prometheus_client serves scrapes on threads of
its own, while the loop applies and removes sets."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request

import pytest

from dataplane import app
from dataplane.engine import EngineCounters
from dataplane.settings import ProxySettings
from tests.unit.fakeengine import FakeEngine
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, Endpoint

STEADY, FLAPPING = ServiceKey("ns/steady"), ServiceKey("ns/flapping")


class SlowEngine(FakeEngine):
    """Its reads take a moment and let other threads run meanwhile, as the real engine's do
    (its locks, thousands of rows to copy)."""

    def counters(self) -> EngineCounters:
        time.sleep(0.002)
        return super().counters()


class HangingEtcd:
    """An etcd that never answers (the proxy's own subscription stays out of the way)."""

    async def get_prefix(self, prefix: bytes) -> None:
        await asyncio.Event().wait()


def backend_set(key: ServiceKey) -> BackendSet:
    ns, name = key.split("/")
    return BackendSet(
        namespace=ns,
        name=name,
        strategy="round_robin",
        endpoints=(Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)),
    )


def scrape_until(port: int, scrapes: int, done: threading.Event) -> list[str | Exception]:
    out: list[str | Exception] = []
    try:
        while len(out) < scrapes:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    out.append(r.read().decode())
            except Exception as exc:
                out.append(exc)
    finally:
        done.set()
    return out


async def test_a_scrape_reads_one_moment_of_the_loops_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every scrape counts the sets it lists: `weighbridge_proxy_backend_sets` equals the
    Services in `weighbridge_proxy_endpoints`, however fast the loop changes them. (Collected
    on the server's thread, the families were read at different moments and disagreed in
    about half the scrapes.)"""
    engine = SlowEngine()
    monkeypatch.setattr(app, "NativeEngine", lambda sock, settings, seed=None: engine)
    proxy = app.Proxy(
        etcd=HangingEtcd(),  # type: ignore[arg-type]
        scheme=KeyScheme("/wb/"),
        proxy_id="p",
        settings=ProxySettings(
            listen="127.0.0.1:0",
            admin_listen=None,
            health_listen=None,
            metrics_listen="127.0.0.1:0",
            publish_status=False,
        ),
    )
    await proxy.start()
    try:
        proxy.routes.apply(STEADY, backend_set(STEADY), 1)
        done = threading.Event()
        scraping = asyncio.create_task(
            asyncio.to_thread(scrape_until, proxy.metrics_port, 40, done)
        )
        revision = 1
        while not done.is_set():  # the loop applies and removes a set as fast as it can
            revision += 1
            flapping = backend_set(FLAPPING) if revision % 2 else None
            proxy.routes.apply(FLAPPING, flapping, revision)
            await asyncio.sleep(0)
        bodies = await scraping
    finally:
        await proxy.stop(grace=0)

    assert [b for b in bodies if isinstance(b, Exception)] == []
    seen = []
    for body in bodies:
        assert isinstance(body, str)
        (sets,) = re.findall(r"^weighbridge_proxy_backend_sets (\S+)$", body, re.MULTILINE)
        listed = set(re.findall(r'^weighbridge_proxy_endpoints\{service="([^"]+)"', body, re.M))
        seen.append((int(float(sets)), sorted(listed)))
    assert {n for n, _ in seen} == {1, 2}, "the scrapes saw the set come and go"
    assert [(n, listed) for n, listed in seen if n != len(listed)] == []
