"""Informers: list+watch one Kubernetes resource into a read-only cache.

Like client-go's reflector: list (paginated), then watch from the list's resourceVersion
with bookmarks; on ``410 Gone`` (or a watch ERROR event) re-list and report the difference;
on a lost connection back off and resume from the last resourceVersion seen. An API server
restart is survived without any help from outside.

NEVER modify objects from the store: handlers receive them read-only.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from controlplane.kube import Kube, KubeError, Obj

log = structlog.get_logger(__name__)

Handler = Callable[[str, Obj | None, Obj | None], None]
"""``handler(key, old, new)``: ``new`` None is a deletion, ``old`` None a creation."""


@dataclass(frozen=True, slots=True)
class Resource:
    """A listable, watchable collection, e.g. ``/api/v1/services``."""

    kind: str
    path: str


SERVICES = Resource("Service", "/api/v1/services")
ENDPOINT_SLICES = Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices")
ENDPOINTS = Resource("Endpoints", "/api/v1/endpoints")
PODS = Resource("Pod", "/api/v1/pods")


def object_key(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


def _slim(obj: Obj) -> Obj:
    """Drop fields the controller never reads (managedFields is most of a Pod's size)."""
    obj.get("metadata", {}).pop("managedFields", None)
    if obj.get("kind") == "Pod" or "containers" in obj.get("spec", {}):
        obj.pop("spec", None)
        status = obj.get("status")
        if isinstance(status, dict):
            obj["status"] = {"phase": status.get("phase"), "podIP": status.get("podIP")}
    return obj


class Informer:
    """A cache of one resource kept current by list+watch; see the module docstring."""

    def __init__(
        self,
        kube: Kube,
        resource: Resource,
        handler: Handler,
        *,
        page_size: int = 500,
        watch_timeout: int = 300,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.kube = kube
        self.resource = resource
        self.handler = handler
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.on_error = on_error
        self.store: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.log = log.bind(resource=resource.kind)

    async def run(self) -> None:
        """List and watch until cancelled."""
        backoff = 0.2
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch()
                backoff = 0.2
            except KubeError as exc:
                if exc.status == 410:
                    self.log.info("watch_expired_relisting", resource_version=self.resource_version)
                    need_list = True
                    continue
                self._error(exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # a bug or a malformed object: never kill the informer
                self.log.exception("watch_crashed")
                self._error(exc)
                need_list = True
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)

    def _error(self, exc: Exception) -> None:
        self.log.warning("watch_failed", error=str(exc))
        if self.on_error is not None:
            self.on_error(self.resource.kind)

    async def _list(self) -> None:
        fresh: dict[str, Obj] = {}
        cont: str | None = None
        while True:
            page = await self.kube.request(
                "GET",
                self.resource.path,
                query={"limit": self.page_size, "continue": cont},
                timeout=60.0,
            )
            for item in page.get("items") or []:
                obj = _slim(item)
                fresh[object_key(obj)] = obj
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or None
            if cont is None:
                self.resource_version = str(meta.get("resourceVersion", ""))
                break
        old_store, self.store = self.store, fresh
        for key, gone in old_store.items():
            if key not in fresh:
                self.handler(key, gone, None)
        for key, new in fresh.items():
            old = old_store.get(key)
            if old is None or _rv(old) != _rv(new):
                self.handler(key, old, new)
        self.log.info("listed", objects=len(fresh), resource_version=self.resource_version)
        self.synced.set()

    async def _watch(self) -> None:
        query: dict[str, Any] = {
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": self.watch_timeout + random.randint(0, self.watch_timeout // 2),
        }
        async with self.kube.watch(
            self.resource.path, query, idle_timeout=self.watch_timeout + 60
        ) as events:
            async for event in events:
                self._apply(event)

    def _apply(self, event: Obj) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code", 0)
            raise KubeError(f"watch error: {obj.get('message')}", status=int(code or 0))
        rv = str(obj.get("metadata", {}).get("resourceVersion", ""))
        if kind == "BOOKMARK":
            self.resource_version = rv
            return
        obj = _slim(obj)
        key = object_key(obj)
        if kind in ("ADDED", "MODIFIED"):
            old = self.store.get(key)
            self.store[key] = obj
            self.handler(key, old, obj)
        elif kind == "DELETED":
            old = self.store.pop(key, None)
            self.handler(key, old, None)
        if rv:
            self.resource_version = rv


def _rv(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion", ""))
