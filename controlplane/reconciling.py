"""The controller: Kubernetes caches in, one fenced etcd write per changed Service out.

Level-triggered, as in client-go's sample-controller: every event only queues a Service key;
``sync(key)`` re-reads the caches and converges etcd to what they say. Bad input is reported
(Event, log, metric) and dropped; transient errors requeue the key with backoff. Bad Service
annotations keep the Service's last good set; a bad pod annotation or endpoint affects only
that pod or endpoint. No input can make ``sync`` raise anything but a transient error.

gRPC service names (``weighbridge.io/grpc-services``) are granted by :mod:`claiming`: a
Service's set lists a name only while the Service wins its claim, and only once no other set
this leader published lists it, so two sets never route one name at once. A set that gives
a name up requeues the Services that claim it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

import aetcd
import structlog

from controlplane import annotations as ann
from controlplane.building import Built, build_backend_set, endpoints_of
from controlplane.claiming import NEVER, Claim, Claims
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
        self.events = EventRecorder(kube, identity, metrics)
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
        self.claims = Claims()
        """Every gRPC service name claim in the Service cache (kept by :meth:`_on_service`)."""
        self._names_of: dict[ServiceKey, frozenset[str]] = {}
        """The gRPC service names each key's set in etcd lists, or may list: a write on its way
        (or one whose answer was lost) counts with the names of both sets."""
        self._routed: dict[str, set[ServiceKey]] = {}
        """The reverse of ``_names_of``: name → keys whose set lists it, or may."""
        self._unsure: set[ServiceKey] = set()
        """Keys whose last write failed: etcd may hold it or the one before, so the next sync
        writes again even when its set equals ``published``."""
        self._listed = asyncio.Event()
        """Set once this term's first resync has read etcd: until then ``published`` does not
        say which names other sets route, so no worker syncs."""
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
            tg.create_task(self.events.run(), name="events")
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
        self._listed.clear()

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
            self._listed.set()
            await asyncio.sleep(self.settings.resync_interval)

    async def resync(self) -> None:
        """Re-read etcd and queue every Service we manage or find there (stale keys go)."""
        revision, stored = await list_sets(self.etcd, self.scheme)
        self._reset_published({s.key: s.backend_set for s in stored})
        keys = {ServiceKey(k) for k, svc in self.services.store.items() if _opted_in(svc)}
        keys.update(s.key for s in stored)
        for key in keys:
            self._enqueue(key)
        self.log.info("resync", revision=revision, stored=len(stored), queued=len(keys))

    async def _worker(self) -> None:
        await self._listed.wait()
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
        service_key = ServiceKey(key)
        if new is None and old is not None:
            self.events.forget(old["metadata"].get("uid", ""))
        changed = self.claims.update(service_key, self._claim_of(service_key, new))
        self.metrics.grpc_service_names_taken.set(self.claims.taken)
        self._enqueue(service_key)
        for other in self.claims.claimants(changed):
            self._enqueue(other)  # who wins those names may have changed

    def _claim_of(self, key: ServiceKey, service: Obj | None) -> Claim | None:
        """The gRPC service names ``service`` claims: none unless it is opted in, in a
        namespace allowed to route by name, and its annotation parses."""
        if service is None or not _opted_in(service):
            return None
        meta = service["metadata"]
        if not self.settings.routes_names_in(meta["namespace"]):
            return None
        try:
            annotations = meta.get("annotations") or {}
            names = ann.parse_grpc_services(annotations.get(ann.GRPC_SERVICES, ""))
        except AnnotationError:
            return None  # sync reports it
        return Claim(key, meta.get("creationTimestamp") or NEVER, frozenset(names))

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
            if service is not None:
                self.events.forget(service["metadata"].get("uid", ""))
            if key in self.published:
                started = time.perf_counter()
                revision = await publisher.delete(key)
                self.metrics.publish_seconds.observe(time.perf_counter() - started)
                del self.published[key]
                self.metrics.backend_sets.set(len(self.published))
                self._unsure.discard(key)
                self._route(key, frozenset())
                self.metrics.reconciles.labels("deleted").inc()
                self.log.info(
                    "backend_set_deleted",
                    service=key,
                    revision=revision,
                    why="service deleted" if service is None else "opted out",
                )
            return

        try:
            built = self._build(key, namespace, service)
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
            self._warn(service, exc)
            await self._give_up_names(key, publisher)
            return

        names, refused = self._grant(key, service, built.backend_set.grpc_services)
        backend_set = replace(built.backend_set, grpc_services=names)
        problems = (*built.problems, *refused)
        for problem in built.problems:
            self.metrics.invalid_annotations.labels(problem.reason).inc()
            self.log.warning(
                "input_ignored", service=key, reason=problem.reason, error=problem.message
            )
        for problem in problems:
            self._warn(service, problem)
        self.events.forget(
            service["metadata"].get("uid", ""), keep={(p.reason, p.message) for p in problems}
        )

        if key not in self._unsure and backend_set.same_content(self.published.get(key)):
            self.metrics.reconciles.labels("unchanged").inc()
            return
        revision = await self._put(key, publisher, backend_set)
        if queued_at is not None:
            self.metrics.change_to_publish_seconds.observe(time.monotonic() - queued_at)
        self.metrics.reconciles.labels("published").inc()
        self.log.info(
            "backend_set_published",
            service=key,
            revision=revision,
            generation=backend_set.generation,
            strategy=backend_set.strategy,
            endpoints=len(backend_set.endpoints),
            eligible=len(backend_set.eligible),
            grpc_services=list(backend_set.grpc_services),
        )

    def _warn(self, service: Obj, problem: AnnotationError) -> None:
        self.events.post(service, type_="Warning", reason=problem.reason, message=problem.message)

    async def _put(self, key: ServiceKey, publisher: Publisher, backend_set: BackendSet) -> int:
        """One fenced write of ``backend_set``. Its names count as routed from before it is
        sent, and the names of the set it replaces until it is known to be written (a write
        whose answer is lost may have reached etcd, or not)."""
        names = frozenset(backend_set.grpc_services)
        self._route(key, self._names_of.get(key, frozenset()) | names)
        self._unsure.add(key)
        started = time.perf_counter()
        revision = await publisher.put(key, encode(backend_set))
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self._unsure.discard(key)
        self.published[key] = backend_set
        self.metrics.backend_sets.set(len(self.published))
        self._route(key, names)
        return revision

    # --- gRPC service names ---------------------------------------------------------------

    def _grant(
        self, key: ServiceKey, service: Obj, wanted: tuple[str, ...]
    ) -> tuple[tuple[str, ...], list[AnnotationError]]:
        """The names of ``wanted`` that ``key``'s set may list now, and a problem for each
        name it loses to an older claim (or all of them, in a namespace not allowed)."""
        if not wanted:
            return (), []
        namespace = service["metadata"]["namespace"]
        if not self.settings.routes_names_in(namespace):
            self.log.info("grpc_services_not_routed", service=key, grpc_services=list(wanted))
            return (), [
                AnnotationError(
                    "GrpcServicesNotRouted",
                    f"{ann.GRPC_SERVICES}: routing by gRPC service name is not enabled for "
                    f"namespace {namespace} (controller option --grpc-service-namespaces); "
                    "clients reach this Service by its :authority only",
                )
            ]
        granted: list[str] = []
        refused: list[AnnotationError] = []
        for name in wanted:
            winner = self.claims.winner(name)
            if winner is not None and winner.key != key:
                refused.append(
                    AnnotationError(
                        "GrpcServiceNameTaken",
                        f"{ann.GRPC_SERVICES}: {name} is routed to Service {winner.key}, which "
                        f"claimed it first (created {winner.created}); this Service gets no "
                        "route by that name",
                    )
                )
                self.log.warning(
                    "grpc_service_name_taken", service=key, grpc_service=name, winner=winner.key
                )
                continue
            holders = self._holders(name, key)
            if holders:
                # Their sets give the name up first; each requeues the claimants when it does.
                self.log.info(
                    "grpc_service_name_waiting", service=key, grpc_service=name, holders=holders
                )
                for holder in holders:
                    self._enqueue(holder)
                continue
            granted.append(name)
        return tuple(granted), refused

    def _holders(self, name: str, key: ServiceKey) -> list[ServiceKey]:
        """The other keys whose set in etcd lists ``name``, or may."""
        return sorted(self._routed.get(name, set()) - {key})

    async def _give_up_names(self, key: ServiceKey, publisher: Publisher) -> None:
        """A Service whose annotations are bad keeps its last good set, but not the names an
        older claim (or the namespace option) now gives another Service."""
        previous = self.published.get(key)
        if previous is None or not previous.grpc_services:
            return
        namespace = previous.namespace
        kept = tuple(
            name
            for name in previous.grpc_services
            if self.settings.routes_names_in(namespace)
            and ((winner := self.claims.winner(name)) is None or winner.key == key)
        )
        if kept == previous.grpc_services:
            return
        backend_set = replace(
            previous,
            grpc_services=kept,
            generation=previous.generation + 1,
            built_unix_nanos=time.time_ns(),
        )
        revision = await self._put(key, publisher, backend_set)
        self.log.info(
            "grpc_service_names_given_up",
            service=key,
            revision=revision,
            generation=backend_set.generation,
            grpc_services=sorted(set(previous.grpc_services) - set(kept)),
        )

    def _route(self, key: ServiceKey, names: frozenset[str]) -> None:
        """Record the names ``key``'s set in etcd lists, or may; the Services that claim a
        name it no longer lists are requeued, one of them may take it now."""
        old = self._names_of.pop(key, frozenset())
        if names:
            self._names_of[key] = names
        for name in old - names:
            routed = self._routed[name]
            routed.discard(key)
            if not routed:
                del self._routed[name]
        for name in names - old:
            self._routed.setdefault(name, set()).add(key)
        self._requeue_claimants(old - names, key)

    def _reset_published(self, sets: Mapping[ServiceKey, BackendSet | None]) -> None:
        """What a full read of etcd found: ``published`` and the names index start again."""
        self.published = dict(sets)
        self.metrics.backend_sets.set(len(self.published))
        self._names_of, self._routed = {}, {}
        for key, backend_set in sets.items():
            if backend_set is not None and backend_set.grpc_services:
                self._route(key, frozenset(backend_set.grpc_services))

    def _requeue_claimants(self, names: Iterable[str], but: ServiceKey) -> None:
        for other in self.claims.claimants(names):
            if other != but:
                self._enqueue(other)

    def _build(self, key: ServiceKey, namespace: str, service: Obj) -> Built:
        spec = ann.parse_service(service["metadata"].get("annotations") or {})
        source = self.settings.source
        # One informer holds either kind: endpoints_of reads the one ``source`` names.
        slices = [
            self.endpoints.store[s]
            for s in self._slices_of.get(key, ())
            if s in self.endpoints.store
        ]
        raw = endpoints_of(
            service, spec, source=source, slices=slices, endpoints=self.endpoints.store.get(key)
        )
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
