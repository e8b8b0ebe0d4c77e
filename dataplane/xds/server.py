"""The aggregated discovery service (ADS, state of the world) over the proxy's applied sets.

Contract, per stream:

- Nothing is answered before the proxy's first list of etcd, so a client never sees the empty
  table of a proxy that just started (an absent Listener or Cluster fails its calls).
- The first request of a type is answered at once; a later one only when its resource names
  changed. An ACK (the last nonce, no error) or a NACK (the last nonce with ``error_detail``) is
  recorded and never answered; a NACK is logged (``xds_nack``) and counted, and the client keeps
  the resources it had. A request carrying an older nonce is stale and ignored.
- Every response holds every resource of its type the client subscribed to and may see, never
  a part: the applied sets change by whole etcd events on this event loop (a re-list applies
  its whole difference before the loop runs anything else), and a stream reads them only when
  it runs. Changes are pushed: after :meth:`XdsServer.changed` each stream sends each type whose
  content changed, and nothing else. ``version_info`` is the etcd revision the proxy applied;
  nonces count per stream.
- Names: Listeners by any authority the engine routes to a Service (``shop.default``,
  ``shop.default.svc.cluster.local:50051``, …), Clusters and ClusterLoadAssignments by
  ``NAMESPACE/NAME``. An empty list of Listener or Cluster names, or ``*``, subscribes to all
  (Listeners then named ``NAME.NAMESPACE``). Routes are inline: RouteConfiguration requests
  get no resources.

Visibility: a client sees the Services of the namespaces in ``--xds-namespaces`` (``*``: all),
and, when it presented a client certificate (mTLS) with a SPIFFE ID of the form
``spiffe://TRUST-DOMAIN/ns/NAMESPACE/…``, those of NAMESPACE too. The ``node`` a client sends is
its own claim and grants nothing. A Service a client may not see is answered as one that does
not exist.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import grpc
import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from dataplane.engine import UNHEALTHY, NoRouteError
from dataplane.routing import Routes
from dataplane.settings import ProxySettings
from dataplane.subscription import Subscription
from dataplane.xds.resources import (
    CLUSTER,
    LISTENER,
    ROUTE,
    TYPES,
    XdsService,
    cluster_name,
    pack,
    translate,
)
from dataplane.xds.tls import server_credentials
from weighbridge.keys import ServiceKey, namespace_listed
from weighbridge.model import BackendSet

log = structlog.get_logger(__name__)

WILDCARD: Final = "*"
"""The xDS resource name that subscribes to every resource of its type."""
_CHANGED: Final = "changed"


def spiffe_namespace(spiffe_id: str) -> str | None:
    """NAMESPACE of ``spiffe://TRUST-DOMAIN/ns/NAMESPACE/…`` (Istio's and SPIRE's Kubernetes
    form), else None."""
    scheme, _, rest = spiffe_id.partition("://")
    parts = rest.split("/")
    if scheme != "spiffe" or len(parts) < 3 or parts[1] != "ns" or not parts[2]:
        return None
    return parts[2]


@dataclass(frozen=True, slots=True)
class Visibility:
    """Which namespaces' Services one client may see (the rule of this module's docstring)."""

    namespaces: frozenset[str]
    """Namespaces every client sees; ``*`` for all (:func:`weighbridge.keys.check_namespaces`)."""
    own: str | None = None
    """The namespace of the client's certificate's SPIFFE ID, if it presented one."""

    def allows(self, namespace: str) -> bool:
        return namespace_listed(namespace, self.namespaces) or namespace == self.own

    @classmethod
    def of(cls, namespaces: frozenset[str], context: grpc.aio.ServicerContext) -> Visibility:  # type: ignore[type-arg]
        """The peer's: C-core puts a certificate's SPIFFE ID in ``peer_spiffe_id`` when the
        certificate has exactly one, well-formed (a certificate verified by the client CA)."""
        ids = list(context.auth_context().get("peer_spiffe_id", []))
        own = spiffe_namespace(ids[0].decode()) if len(ids) == 1 else None
        return cls(namespaces, own)


@dataclass(slots=True)
class _Subscription:
    """One type's state on one stream."""

    names: frozenset[str] = frozenset()
    wildcard: bool = False
    sent: tuple[bytes, ...] | None = None
    """The serialized resources last sent (None: nothing sent yet)."""
    nonce: str = ""
    version: str = ""
    """Sent last."""
    acked: str = ""
    nacked: str = ""
    error: str = ""
    """The last NACK's version and message."""


@dataclass(slots=True, eq=False)
class _Stream:
    """One client's stream (hashed by identity)."""

    visibility: Visibility
    peer: str
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | str | None] = field(
        default_factory=asyncio.Queue
    )
    node: str = ""
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    change_pending: bool = False


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves :class:`Routes`' applied sets as xDS; call :meth:`changed` after each change."""

    def __init__(
        self,
        routes: Routes,
        subscription: Subscription,
        *,
        namespaces: Iterable[str],
        max_streams: int,
    ) -> None:
        self.routes = routes
        self.subscription = subscription
        self.namespaces = frozenset(namespaces)
        self.max_streams = max_streams
        self.responses: Counter[str] = Counter()
        """Responses sent, by type (short name)."""
        self.nacks: Counter[str] = Counter()
        """NACKs received, by type (short name)."""
        self.refused = 0
        """Streams refused at ``max_streams``."""
        self._streams: set[_Stream] = set()
        self._cache: dict[ServiceKey, tuple[BackendSet, frozenset[str], XdsService]] = {}
        self._unhealthy: dict[ServiceKey, frozenset[str]] = {}
        """Per Service, the endpoints its active health checks find unhealthy, read from the
        engine once after each change."""

    async def serve(self, listen: str, settings: ProxySettings) -> tuple[grpc.aio.Server, int]:
        """A started gRPC server of this service alone on ``listen``, with the client port's
        TLS settings (:func:`dataplane.xds.tls.server_credentials`), and its port."""
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        credentials = server_credentials(settings)
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
        await server.start()
        return server, port

    @property
    def streams(self) -> int:
        return len(self._streams)

    def changed(self) -> None:
        """The applied sets, or the engine's view of their endpoints, changed: every stream
        compares and pushes when it next runs."""
        self._unhealthy.clear()
        for gone in self._cache.keys() - self.routes.services.keys():
            del self._cache[gone]
        for stream in self._streams:
            if not stream.change_pending:
                stream.change_pending = True
                stream.queue.put_nowait(_CHANGED)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        if len(self._streams) >= self.max_streams:
            self.refused += 1
            log.warning("xds_stream_refused", peer=context.peer(), max_streams=self.max_streams)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"weighbridge: this proxy serves at most {self.max_streams} xDS streams "
                "(--xds-max-streams)",
            )
        stream = _Stream(Visibility.of(self.namespaces, context), context.peer())
        reader = asyncio.create_task(self._read(request_iterator, stream.queue))
        self._streams.add(stream)
        try:
            await self.subscription.listed.wait()
            while (item := await stream.queue.get()) is not None:
                if item == _CHANGED:
                    stream.change_pending = False
                    for type_url in sorted(stream.subscriptions):
                        response = self._response(stream, type_url, force=False)
                        if response is not None:
                            yield response
                elif isinstance(item, discovery_pb2.DiscoveryRequest):
                    response = self._on_request(stream, item)
                    if response is not None:
                        yield response
        finally:
            self._streams.discard(stream)
            reader.cancel()
            log.info("xds_stream_closed", node=stream.node, peer=stream.peer)

    @staticmethod
    async def _read(
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | str | None],
    ) -> None:
        try:
            async for request in requests:
                queue.put_nowait(request)
        finally:
            queue.put_nowait(None)

    def _on_request(
        self, stream: _Stream, request: discovery_pb2.DiscoveryRequest
    ) -> discovery_pb2.DiscoveryResponse | None:
        type_url = request.type_url
        if not stream.node:  # only the first request carries the node
            stream.node = request.node.id or "(no node id)"
            log.info(
                "xds_stream_opened",
                node=stream.node,
                peer=stream.peer,
                sees=sorted(stream.visibility.namespaces)
                + ([stream.visibility.own] if stream.visibility.own else []),
            )
        if type_url not in TYPES:
            log.info("xds_unknown_type", node=stream.node, type_url=type_url)
            return None
        sub = stream.subscriptions.get(type_url)
        names = frozenset(request.resource_names)
        wildcard = WILDCARD in names or (
            not names and type_url in (LISTENER, CLUSTER) and (sub is None or sub.wildcard)
        )
        if sub is None:
            sub = stream.subscriptions[type_url] = _Subscription()
        elif request.response_nonce != sub.nonce:
            return None  # stale: a response the client had not seen yet supersedes it
        elif request.HasField("error_detail"):
            sub.nacked, sub.error = sub.version, request.error_detail.message
            self.nacks[TYPES[type_url]] += 1
            log.warning(
                "xds_nack",
                node=stream.node,
                peer=stream.peer,
                type=TYPES[type_url],
                version=sub.version,
                accepted_version=request.version_info,
                error=sub.error,
            )
        else:
            sub.acked = sub.version
        if sub.sent is not None and names == sub.names and wildcard == sub.wildcard:
            return None
        sub.names, sub.wildcard = names, wildcard
        return self._response(stream, type_url, force=True)

    def _response(
        self, stream: _Stream, type_url: str, *, force: bool
    ) -> discovery_pb2.DiscoveryResponse | None:
        """The response for one type, or None when its content did not change (unless forced)."""
        sub = stream.subscriptions[type_url]
        resources = self._resources(type_url, sub, stream.visibility)
        sent = tuple(r.value for r in resources)
        if sent == sub.sent and not force:
            return None
        sub.sent = sent
        sub.version = str(self.subscription.applied_revision)
        sub.nonce = str(next(stream.nonces))
        self.responses[TYPES[type_url]] += 1
        log.debug(
            "xds_response",
            node=stream.node,
            type=TYPES[type_url],
            version=sub.version,
            nonce=sub.nonce,
            resources=len(resources),
        )
        return discovery_pb2.DiscoveryResponse(
            version_info=sub.version, type_url=type_url, nonce=sub.nonce, resources=resources
        )

    def _resources(
        self, type_url: str, sub: _Subscription, visibility: Visibility
    ) -> list[any_pb2.Any]:
        """Every resource of ``type_url`` the subscription names (or all, wildcard) that exists
        and that the client may see, in name order."""
        if type_url == ROUTE:
            return []
        services = self.routes.services
        named: list[tuple[str, ServiceKey | None]]
        if sub.wildcard:
            named = [(self._wildcard_name(key, type_url), key) for key in sorted(services)]
        elif type_url == LISTENER:
            named = [(name, self._resolve(name)) for name in sorted(sub.names)]
        else:
            named = [(name, ServiceKey(name)) for name in sorted(sub.names)]
        out = []
        for name, key in named:
            state = services.get(key) if key is not None else None
            if state is None or not visibility.allows(state.backend_set.namespace):
                continue
            xds = self._service(state.key)
            if type_url == LISTENER:
                out.append(pack(xds.listener(name)))
            elif type_url == CLUSTER:
                out.append(pack(xds.cluster))
            else:
                out.append(pack(xds.load_assignment))
        return out

    def _wildcard_name(self, key: ServiceKey, type_url: str) -> str:
        """A Service's resource name of ``type_url`` in a wildcard subscription."""
        if type_url != LISTENER:
            return cluster_name(key)
        backend_set = self.routes.services[key].backend_set
        return f"{backend_set.name}.{backend_set.namespace}"

    def _resolve(self, authority: str) -> ServiceKey | None:
        """The Service whose calls ``authority`` reaches: the engine's rule, by authority."""
        try:
            key, matched_by = self.routes.engine.route(authority, "")
        except NoRouteError:
            return None
        return key if matched_by == "authority" and key in self.routes.services else None

    def _service(self, key: ServiceKey) -> XdsService:
        """The resources of an applied set, translated once per set and health verdicts."""
        backend_set = self.routes.services[key].backend_set
        unhealthy = self._unhealthy.get(key)
        if unhealthy is None:
            unhealthy = self._unhealthy[key] = frozenset(
                s.hostport for s in self.routes.engine.stats(key) if s.state == UNHEALTHY
            )
        cached = self._cache.get(key)
        if cached is None or cached[0] is not backend_set or cached[1] != unhealthy:
            cached = (backend_set, unhealthy, translate(backend_set, unhealthy))
            self._cache[key] = cached
        return cached[2]

    def snapshot(self) -> list[dict[str, object]]:
        """Each stream's node, peer and per-type state (for logs and tests)."""
        return [
            {
                "node": s.node,
                "peer": s.peer,
                "types": {
                    TYPES[t]: {
                        "names": sorted(sub.names),
                        "version": sub.version,
                        "acked": sub.acked,
                        "nacked": sub.nacked,
                        "error": sub.error,
                    }
                    for t, sub in s.subscriptions.items()
                },
            }
            for s in self._streams
        ]
