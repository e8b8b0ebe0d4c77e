"""A fake of the few aetcd.Client calls a proxy's Subscription makes (``get_prefix``,
``watch_prefix``): an in-memory key space with revisions, whose watches get every later change.
Integration tests use a real etcd; this is for the subscription's own logic."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, encode


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Event:
    kind: str
    """"PUT" or "DELETE"."""
    kv: KV


@dataclass(frozen=True)
class Header:
    revision: int


@dataclass(frozen=True)
class Range:
    kvs: list[KV]
    header: Header


class Watch:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | Exception | None] = asyncio.Queue()

    async def _events(self):  # type: ignore[no-untyped-def]
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._events()

    async def cancel(self) -> None:
        self.queue.put_nowait(None)


@dataclass
class FakeEtcd:
    scheme: KeyScheme
    revision: int = 1
    data: dict[bytes, KV] = field(default_factory=dict)
    watches: list[Watch] = field(default_factory=list)
    lists: list[float] = field(default_factory=list)
    """Loop time of each listing."""

    def put(self, backend_set: BackendSet) -> int:
        self.revision += 1
        kv = KV(self.scheme.service(backend_set.key), encode(backend_set), self.revision)
        self.data[kv.key] = kv
        self._tell(Event("PUT", kv))
        return self.revision

    def delete(self, key: ServiceKey) -> int:
        self.revision += 1
        old = self.data.pop(self.scheme.service(key))
        self._tell(Event("DELETE", KV(old.key, b"", self.revision)))
        return self.revision

    def break_watches(self, error: Exception) -> None:
        for w in self.watches:
            w.queue.put_nowait(error)

    def _tell(self, event: Event) -> None:
        for w in self.watches:
            w.queue.put_nowait(event)

    async def get_prefix(self, prefix: bytes) -> Range:
        self.lists.append(asyncio.get_running_loop().time())
        kvs = [kv for k, kv in sorted(self.data.items()) if k.startswith(prefix)]
        return Range(kvs, Header(self.revision))

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> Watch:
        assert start_revision == self.revision + 1, "the fake replays no history"
        w = Watch()
        self.watches = [w]  # the subscription has one watch at a time
        return w
