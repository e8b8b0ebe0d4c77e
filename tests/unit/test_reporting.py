"""Events are posted off the reconcile path: posting never waits for the API server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane.kube import KubeError
from controlplane.metrics import Metrics
from controlplane.reporting import EventRecorder

SERVICE = {"kind": "Service", "metadata": {"namespace": "ns", "name": "svc", "uid": "u-1"}}


class FakeKube:
    """Records Event posts; each waits until ``gate`` is set; fails while ``error`` is set."""

    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

    async def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        assert (method, path) == ("POST", "/api/v1/namespaces/ns/events")
        self.posted.append(kw["body"])
        return kw["body"]  # type: ignore[no-any-return]


def count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "weighbridge_controller_events_total", {"result": result}
    )
    return value or 0.0


@contextlib.asynccontextmanager
async def recorder(max_queued: int = 10) -> AsyncIterator[tuple[EventRecorder, FakeKube]]:
    kube = FakeKube()
    events = EventRecorder(kube, "ctl-a", Metrics(CollectorRegistry()), max_queued=max_queued)  # type: ignore[arg-type]
    task = asyncio.create_task(events.run())
    try:
        yield events, kube
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.001)


async def test_post_returns_at_once_while_the_api_server_does_not_answer() -> None:
    async with recorder(max_queued=3) as (events, kube):
        kube.gate.clear()  # the API server accepts nothing
        for i in range(5):
            events.post(SERVICE, type_="Warning", reason="InvalidWeights", message=f"bad {i}")
        # Three fit the queue; the other two are dropped and counted, and post never waited.
        assert count(events.metrics, "dropped") == 2
        kube.gate.set()
        await until(lambda: count(events.metrics, "posted") >= 3)
        assert [e["message"] for e in kube.posted][:3] == ["bad 0", "bad 1", "bad 2"]
        assert count(events.metrics, "posted") + count(events.metrics, "dropped") == 5
        # A dropped Event is not remembered as posted: reported again, it is posted.
        events.post(SERVICE, type_="Warning", reason="InvalidWeights", message="bad 4")
        await until(lambda: kube.posted[-1]["message"] == "bad 4")


async def test_identical_events_are_posted_once_until_forgotten() -> None:
    async with recorder() as (events, kube):
        for _ in range(3):
            events.post(SERVICE, type_="Warning", reason="InvalidPodWeight", message="pod p")
            events.post(SERVICE, type_="Warning", reason="GrpcServiceNameTaken", message="x.Y")
        await until(lambda: count(events.metrics, "posted") == 2)
        # A problem the Service still has stays remembered; the others are forgotten.
        events.forget("u-1", keep={("InvalidPodWeight", "pod p")})
        events.post(SERVICE, type_="Warning", reason="InvalidPodWeight", message="pod p")
        events.post(SERVICE, type_="Warning", reason="GrpcServiceNameTaken", message="x.Y")
        await until(lambda: count(events.metrics, "posted") == 3)
        assert [e["reason"] for e in kube.posted] == [
            "InvalidPodWeight",
            "GrpcServiceNameTaken",
            "GrpcServiceNameTaken",
        ]
        event = kube.posted[0]
        assert event["involvedObject"]["uid"] == "u-1"
        assert event["type"] == "Warning"
        assert event["source"]["component"] == "weighbridge-controller"


@pytest.mark.parametrize("error", [KubeError("POST: 500", status=500), ValueError("not JSON")])
async def test_a_failed_post_is_counted_and_tried_again_when_reported_again(
    error: Exception,
) -> None:
    async with recorder() as (events, kube):
        kube.error = error
        events.post(SERVICE, type_="Warning", reason="InvalidPort", message="no port")
        await until(lambda: count(events.metrics, "failed") == 1)
        kube.error = None
        events.post(SERVICE, type_="Warning", reason="InvalidPort", message="no port")
        await until(lambda: count(events.metrics, "posted") == 1)


@pytest.mark.parametrize("length", [10, 5000])
async def test_messages_are_cut_to_what_kubernetes_keeps(length: int) -> None:
    async with recorder() as (events, kube):
        events.post(SERVICE, type_="Warning", reason="InvalidWeights", message="x" * length)
        await until(lambda: len(kube.posted) == 1)
        assert kube.posted[0]["message"] == "x" * min(length, 1024)
