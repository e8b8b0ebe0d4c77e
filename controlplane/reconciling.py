"""The controller: Kubernetes caches in, one fenced etcd write per changed Service out.

Level-triggered, as in client-go's sample-controller: every event only queues a Service key;
``sync(key)`` re-reads the caches and converges etcd to what they say. Bad input is reported
(Event, log, metric) and dropped; transient errors requeue the key with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import aetcd
import structlog

from controlplane import annotations as ann
from controlplane.building import (
    build_backend_set,
    endpoints_from_endpoints,
    endpoints_from_slices,
    select_port,
)
from controlplane.errors import AnnotationError, NotLeaderError
from controlplane.kube import Kube, KubeError, Obj
from controlplane.leading import Leadership, Term
from controlplane.metrics import Metrics
from controlplane.publishing import Publisher
from controlplane.queueing import WorkQueue
from controlplane.reporting import EventRecorder
from controlplane.settings import DEFAULTS, ControllerSettings
from controlplane.watching import ENDPOINT_SLICES, ENDPOINTS, PODS, SERVICES, Informer
from weighbridge.errors import EtcdUnavailableError
from weighbridge.etcd import list_sets
from weighbridge.keys import KeyScheme, ServiceKey
from weighbridge.model import BackendSet, encode

log = structlog.get_logger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class Controller:
    """Watches Kubernetes, leads through etcd, publishes backend sets while leading."""

    def __init__(
        self,
        *,
        kube: Kube,
        etcd: aetcd.Client,
        scheme: KeyScheme,
        identity: str,
        metrics: Metrics,
        settings: ControllerSettings = DEFAULTS,
    ) -> None:
        self.kube = kube
        self.etcd = etcd
        self.scheme = scheme
        self.identity = identity
        self.metrics = metrics
        self.settings = settings
        self.events = EventRecorder(kube, identity)
        self.leadership = Leadership(etcd, scheme, identity, ttl=settings.lease_ttl)
        self.log = log.bind(identity=identity)

        on_error = self.metrics.watch_restarts.labels
        self.services = Informer(
            kube, SERVICES, self._on_service, on_error=lambda k: on_error(k).inc()
        )
        self.pods = Informer(kube, PODS, self._on_pod, on_error=lambda k: on_error(k).inc())
        self.endpoints = (
            Informer(kube, ENDPOINT_SLICES, self._on_slice, on_error=lambda k: on_error(k).inc())
            if settings.source == "endpointslices"
            else Informer(kube, ENDPOINTS, self._on_endpoints, on_error=lambda k: on_error(k).inc())
        )
        self.informers = (self.services, self.endpoints, self.pods)

        self.queue: WorkQueue[ServiceKey] = WorkQueue()
        self.published: dict[ServiceKey, BackendSet | None] = {}
        """What etcd holds, as far as this leader knows; None for a value it cannot decode."""
        self._slices_of: dict[ServiceKey, set[str]] = {}
        self._services_of_pod: dict[str, set[ServiceKey]] = {}
        self._pods_of: dict[ServiceKey, set[str]] = {}
        self._queued_at: dict[ServiceKey, float] = {}
        self._publisher: Publisher | None = None
        self._term_tasks: list[asyncio.Task[None]] = []
        self.synced = asyncio.Event()

    # --- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled: informers always (a warm standby), workers while leading."""
        async with asyncio.TaskGroup() as tg:
            for informer in self.informers:
                tg.create_task(informer.run(), name=f"informer-{informer.resource.kind}")
            await asyncio.gather(*(i.synced.wait() for i in self.informers))
            self.synced.set()
            self.log.info("caches_synced", services=len(self.services.store))
            tg.create_task(self.leadership.run(self._elected, self._deposed), name="leadership")

    @property
    def leading(self) -> bool:
        return self._publisher is not None

    async def _elected(self, term: Term) -> None:
        self._publisher = Publisher(self.etcd, self.scheme, term)
        self.metrics.leader.set(1)
        self._term_tasks = [
            asyncio.create_task(self._worker(), name=f"worker-{i}")
            for i in range(self.settings.workers)
        ]
        self._term_tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))

    async def _deposed(self, term: Term) -> None:
        self._publisher = None
        self.metrics.leader.set(0)
        tasks, self._term_tasks = self._term_tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.queue.close()
        self.queue = WorkQueue()
        self._queued_at.clear()

    async def _resync_loop(self) -> None:
        """Full resync at the start of each term and every ``settings.resync_interval`` after."""
        while True:
            try:
                await self.resync()
            except EtcdUnavailableError as exc:
                self.metrics.errors.labels("etcd").inc()
                self.log.warning("resync_failed", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(self.settings.resync_interval)

    async def resync(self) -> None:
        """Re-read etcd and queue every Service we manage or find there (stale keys go)."""
        revision, stored = await list_sets(self.etcd, self.scheme)
        self.published = {s.key: s.backend_set for s in stored}
        keys = {ServiceKey(k) for k, svc in self.services.store.items() if _opted_in(svc)}
        keys.update(s.key for s in stored)
        for key in keys:
            self._enqueue(key)
        self.metrics.backend_sets.set(len(self.published))
        self.log.info("resync", revision=revision, stored=len(stored), queued=len(keys))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            self.metrics.queue_depth.set(len(self.queue))
            try:
                await self.sync(key)
                self.queue.forget(key)
            except NotLeaderError as exc:
                self.metrics.errors.labels("fence").inc()
                self.log.error("write_fenced_off", service=key, error=str(exc))
                self.leadership.step_down()
                return
            except EtcdUnavailableError as exc:
                self.metrics.errors.labels("etcd").inc()
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.add_rate_limited(key)
                self.log.warning("sync_failed", service=key, error=str(exc), retry_in=delay)
            except Exception:
                self.metrics.errors.labels("internal").inc()
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.add_rate_limited(key)
                self.log.exception("sync_crashed", service=key, retry_in=delay)
            finally:
                self.queue.done(key)

    # --- event handlers: update indexes, queue keys --------------------------------------

    def _enqueue(self, key: ServiceKey) -> None:
        if not self.leading:
            return
        self._queued_at.setdefault(key, time.monotonic())
        self.queue.add(key)
        self.metrics.queue_depth.set(len(self.queue))

    def _on_service(self, key: str, old: Obj | None, new: Obj | None) -> None:
        self._enqueue(ServiceKey(key))

    def _on_slice(self, key: str, old: Obj | None, new: Obj | None) -> None:
        for obj, adding in ((old, False), (new, True)):
            if obj is None:
                continue
            name = (obj["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
            if not name:
                continue
            svc = ServiceKey(f"{obj['metadata']['namespace']}/{name}")
            members = self._slices_of.setdefault(svc, set())
            if adding:
                members.add(key)
            else:
                members.discard(key)
                if not members:
                    del self._slices_of[svc]
            self._enqueue(svc)

    def _on_endpoints(self, key: str, old: Obj | None, new: Obj | None) -> None:
        self._enqueue(ServiceKey(key))

    def _on_pod(self, key: str, old: Obj | None, new: Obj | None) -> None:
        if old is not None and new is not None and _pod_inputs(old) == _pod_inputs(new):
            return  # status churn: nothing the backend set depends on changed
        for svc in self._services_of_pod.get(key, ()):
            self._enqueue(svc)

    def _index_pods(self, key: ServiceKey, namespace: str, pods: set[str]) -> None:
        pod_keys = {f"{namespace}/{p}" for p in pods}
        old = self._pods_of.get(key, set())
        for p in old - pod_keys:
            users = self._services_of_pod.get(p)
            if users is not None:
                users.discard(key)
                if not users:
                    del self._services_of_pod[p]
        for p in pod_keys - old:
            self._services_of_pod.setdefault(p, set()).add(key)
        if pod_keys:
            self._pods_of[key] = pod_keys
        else:
            self._pods_of.pop(key, None)

    # --- reconcile ------------------------------------------------------------------------

    async def sync(self, key: ServiceKey) -> None:
        """Converge etcd's set for ``key`` to what the caches say."""
        publisher = self._publisher
        if publisher is None:
            return
        queued_at = self._queued_at.pop(key, None)
        service = self.services.store.get(key)
        namespace, _ = key.split("/", 1)
        if service is None or not _opted_in(service):
            self._index_pods(key, namespace, set())
            if key in self.published:
                started = time.perf_counter()
                revision = await publisher.delete(key)
                self.metrics.publish_seconds.observe(time.perf_counter() - started)
                del self.published[key]
                self.metrics.backend_sets.set(len(self.published))
                self.metrics.reconciles.labels("deleted").inc()
                self.log.info(
                    "backend_set_deleted",
                    service=key,
                    revision=revision,
                    why="service deleted" if service is None else "opted out",
                )
            return

        try:
            backend_set = self._build(key, namespace, service)
        except AnnotationError as exc:
            self.metrics.reconciles.labels("invalid").inc()
            self.metrics.invalid_annotations.labels(exc.reason).inc()
            self.log.warning(
                "annotation_invalid",
                service=key,
                reason=exc.reason,
                error=exc.message,
                kept_generation=getattr(self.published.get(key), "generation", None),
            )
            await self.events.record(
                service, type_="Warning", reason=exc.reason, message=exc.message
            )
            return

        previous = self.published.get(key)
        if backend_set.same_content(previous):
            self.metrics.reconciles.labels("unchanged").inc()
            return
        started = time.perf_counter()
        revision = await publisher.put(key, encode(backend_set))
        now = time.perf_counter()
        self.metrics.publish_seconds.observe(now - started)
        if queued_at is not None:
            self.metrics.change_to_publish_seconds.observe(time.monotonic() - queued_at)
        self.published[key] = backend_set
        self.metrics.backend_sets.set(len(self.published))
        self.metrics.reconciles.labels("published").inc()
        self.events.forget(service["metadata"].get("uid", ""))
        self.log.info(
            "backend_set_published",
            service=key,
            revision=revision,
            generation=backend_set.generation,
            strategy=backend_set.strategy,
            endpoints=len(backend_set.endpoints),
            eligible=len(backend_set.eligible),
        )

    def _build(self, key: ServiceKey, namespace: str, service: Obj) -> BackendSet:
        spec = ann.parse_service(service["metadata"].get("annotations") or {})
        port_name, _ = select_port(service, spec.port)
        if self.settings.source == "endpointslices":
            slices = [
                self.endpoints.store[s]
                for s in self._slices_of.get(key, ())
                if s in self.endpoints.store
            ]
            raw = endpoints_from_slices(slices, port_name)
            source = "endpointslices"
        else:
            raw = endpoints_from_endpoints(self.endpoints.store.get(key), port_name)
            source = "endpoints"
        pod_names = {e.pod for e in raw if e.pod}
        self._index_pods(key, namespace, pod_names)
        pods: Mapping[str, Obj] = {
            p: obj
            for p in pod_names
            if (obj := self.pods.store.get(f"{namespace}/{p}")) is not None
        }
        previous = self.published.get(key)
        return build_backend_set(
            service=service,
            spec=spec,
            raw=raw,
            pods=pods,
            source=source,
            generation=(previous.generation + 1) if previous else 1,
            built_unix_nanos=time.time_ns(),
        )


def _opted_in(service: Obj) -> bool:
    return ann.opted_in(service["metadata"].get("annotations"))


def _pod_inputs(pod: Obj) -> tuple[object, object]:
    meta = pod["metadata"]
    return (meta.get("labels"), (meta.get("annotations") or {}).get(ann.POD_WEIGHT))


__all__ = ["Controller", "KubeError"]
