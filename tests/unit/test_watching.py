"""The informer against a scripted fake API server: 410 Gone re-lists, and the diff is reported."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from controlplane.kube import KubeError
from controlplane.watching import SERVICES, Informer


def svc(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}}


class FakeKube:
    """Serves scripted lists and watch streams; a fake for unit tests only."""

    def __init__(
        self, lists: list[list[dict[str, Any]]], watches: list[list[dict[str, Any]] | KubeError]
    ) -> None:
        self.lists = lists
        self.watches = watches
        self.watch_versions: list[str] = []

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        items = self.lists.pop(0)
        return {"items": items, "metadata": {"resourceVersion": str(100 + len(self.lists))}}

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, query: Mapping[str, Any], *, idle_timeout: float
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        self.watch_versions.append(query["resourceVersion"])
        if not self.watches:
            await asyncio.sleep(3600)
        script = self.watches.pop(0)
        if isinstance(script, KubeError):
            raise script

        async def events() -> AsyncIterator[dict[str, Any]]:
            for e in script:
                yield e

        yield events()


async def test_watch_applies_events_and_410_relists_with_deletions_reported() -> None:
    seen: list[tuple[str, str | None, str | None]] = []
    kube = FakeKube(
        lists=[[svc("a", "1"), svc("b", "1")], [svc("a", "1"), svc("c", "7")]],
        watches=[
            [
                {"type": "MODIFIED", "object": svc("a", "5")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "6"}}},
            ],
            KubeError("gone", status=410),
        ],
    )

    def handler(key: str, old: Any, new: Any) -> None:
        rv = lambda o: None if o is None else o["metadata"]["resourceVersion"]  # noqa: E731
        seen.append((key, rv(old), rv(new)))

    informer = Informer(kube, SERVICES, handler)  # type: ignore[arg-type]
    task = asyncio.create_task(informer.run())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if "ns/c" in informer.store:
            break
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert seen == [
        ("ns/a", None, "1"),
        ("ns/b", None, "1"),  # first list
        ("ns/a", "1", "5"),  # watch event
        ("ns/b", "1", None),  # re-list: b is gone
        ("ns/a", "5", "1"),
        ("ns/c", None, "7"),  # re-list: a replaced, c new
    ]
    assert kube.watch_versions[:2] == ["101", "6"], "resumes from the bookmark, not the list"
    assert set(informer.store) == {"ns/a", "ns/c"}
