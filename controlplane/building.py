"""Building one Service's BackendSet from Kubernetes objects (pure functions, no I/O).

Objects are the plain JSON dicts the API server sends; they are never modified here.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final

from controlplane.annotations import ServiceSpec, WeightSpec, excerpt, parse_pod_weight
from controlplane.errors import AnnotationError
from weighbridge.model import BackendSet, Endpoint

Obj = Mapping[str, Any]

EXACT_TOTAL_LIMIT: Final = 2**31
"""Group weights are exact integers while their sum stays below this; past it they are
rounded to parts per million (only with many groups of coprime sizes)."""

APPROXIMATE_TOTAL: Final = 1_000_000

DEFAULT_WEIGHT: Final = 1
"""The per-pod weight of a pod without ``weighbridge.io/weight``, or with a bad one."""


@dataclass(frozen=True, slots=True)
class RawEndpoint:
    """An endpoint as Kubernetes describes it, before weights are assigned."""

    address: str
    port: int
    serving: bool
    terminating: bool
    zone: str
    node: str
    pod: str
    hint_zones: tuple[str, ...] = ()
    hint_nodes: tuple[str, ...] = ()

    @property
    def rank(self) -> tuple[bool, bool]:
        """Better duplicates sort last: serving beats not serving, live beats terminating."""
        return (self.serving, not self.terminating)


def select_port(service: Obj, wanted: str | None) -> tuple[str, int]:
    """The Service port the proxy forwards to: ``(name, port)``.

    ``wanted`` (from ``weighbridge.io/port``) is a port name or number; without it a Service
    with a single port uses that one, else the port named ``grpc``.
    """
    ports = service.get("spec", {}).get("ports") or []
    if wanted is not None:
        for p in ports:
            if p.get("name") == wanted or str(p.get("port")) == wanted:
                return p.get("name") or "", int(p["port"])
        names = ", ".join(f"{p.get('name') or '<unnamed>'}={p.get('port')}" for p in ports)
        raise AnnotationError(
            "InvalidPort",
            f"weighbridge.io/port: Service has no port {excerpt(wanted)} "
            f"(ports: {names or 'none'})",
        )
    if len(ports) == 1:
        return ports[0].get("name") or "", int(ports[0]["port"])
    for p in ports:
        if p.get("name") == "grpc":
            return "grpc", int(p["port"])
    raise AnnotationError(
        "InvalidPort",
        f"Service has {len(ports)} ports and none is named 'grpc'; "
        "choose one with weighbridge.io/port: NAME",
    )


def endpoints_of(
    service: Obj,
    spec: ServiceSpec,
    *,
    source: str,
    slices: Iterable[Obj] = (),
    endpoints: Obj | None = None,
) -> list[RawEndpoint]:
    """The endpoints of ``service`` on the port its annotations choose, from its EndpointSlices
    (``source`` ``endpointslices``) or its core/v1 Endpoints object (``endpoints``); raises
    AnnotationError when the port cannot be chosen."""
    port_name, _ = select_port(service, spec.port)
    if source == "endpointslices":
        return endpoints_from_slices(slices, port_name)
    return endpoints_from_endpoints(endpoints, port_name)


def endpoints_from_slices(slices: Iterable[Obj], port_name: str) -> list[RawEndpoint]:
    """Merge every EndpointSlice of a Service (discovery.k8s.io/v1) for one port name."""
    found: dict[tuple[str, int], RawEndpoint] = {}
    for s in slices:
        if s.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port = _port_number(s.get("ports") or [], port_name)
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            cond = ep.get("conditions") or {}
            ready = cond.get("ready")
            ready = True if ready is None else bool(ready)
            serving = cond.get("serving")
            serving = ready if serving is None else bool(serving)
            ref = ep.get("targetRef") or {}
            hints = ep.get("hints") or {}
            raw = RawEndpoint(
                address=addresses[0],
                port=port,
                serving=serving,
                terminating=bool(cond.get("terminating")),
                zone=ep.get("zone") or "",
                node=ep.get("nodeName") or "",
                pod=ref.get("name", "") if ref.get("kind") == "Pod" else "",
                hint_zones=_hint_names(hints.get("forZones")),
                hint_nodes=_hint_names(hints.get("forNodes")),
            )
            _keep_best(found, raw)
    return sorted(found.values(), key=lambda e: (e.address, e.port))


def endpoints_from_endpoints(obj: Obj | None, port_name: str) -> list[RawEndpoint]:
    """Endpoints from a core/v1 Endpoints object (deprecated since Kubernetes 1.33)."""
    found: dict[tuple[str, int], RawEndpoint] = {}
    for subset in (obj or {}).get("subsets") or []:
        port = _port_number(subset.get("ports") or [], port_name)
        if port is None:
            continue
        for key, serving in (("addresses", True), ("notReadyAddresses", False)):
            for a in subset.get(key) or []:
                ref = a.get("targetRef") or {}
                raw = RawEndpoint(
                    address=a["ip"],
                    port=port,
                    serving=serving,
                    terminating=False,
                    zone="",
                    node=a.get("nodeName") or "",
                    pod=ref.get("name", "") if ref.get("kind") == "Pod" else "",
                )
                _keep_best(found, raw)
    return sorted(found.values(), key=lambda e: (e.address, e.port))


def _hint_names(hints: object) -> tuple[str, ...]:
    """The names of an EndpointSlice endpoint's ``hints.forZones`` or ``hints.forNodes``
    (``[{"name": ...}]``), sorted; anything else in them is ignored."""
    if not isinstance(hints, list):
        return ()
    names = {h["name"] for h in hints if isinstance(h, dict) and isinstance(h.get("name"), str)}
    return tuple(sorted(names))


def _port_number(ports: Sequence[Obj], name: str) -> int | None:
    for p in ports:
        if (p.get("name") or "") == name and p.get("port") is not None:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            return int(p["port"])
    return None


def _keep_best(found: dict[tuple[str, int], RawEndpoint], raw: RawEndpoint) -> None:
    key = (raw.address, raw.port)
    old = found.get(key)
    if old is None or raw.rank > old.rank:
        found[key] = raw


def assign_weights(
    endpoints: Sequence[RawEndpoint],
    spec: WeightSpec,
    pods: Mapping[str, Obj],
) -> tuple[list[int], list[AnnotationError]]:
    """Integer weights such that each endpoint's share of new requests is exactly what the
    annotations ask for (see docs/annotations.md), and the errors of the pods whose
    ``weighbridge.io/weight`` is bad: such a pod counts with :data:`DEFAULT_WEIGHT`, so a bad
    pod annotation affects that pod only.

    ``pods`` maps pod name → Pod object (same namespace). Endpoints that are not eligible
    (not serving, or terminating) get weight 0 in group mode, so group shares hold among
    the endpoints that take traffic.
    """
    base: list[int] = []
    problems: dict[str, AnnotationError] = {}
    for e in endpoints:
        weight = spec.pod_weights.get(e.pod) if e.pod else None
        if weight is None and e.pod:
            pod = pods.get(e.pod)
            try:
                weight = parse_pod_weight(e.pod, (pod or {}).get("metadata", {}).get("annotations"))
            except AnnotationError as exc:
                problems[e.pod] = AnnotationError(
                    exc.reason, f"{exc.message}; the pod gets the default weight {DEFAULT_WEIGHT}"
                )
        base.append(DEFAULT_WEIGHT if weight is None else weight)
    if not spec.groups:
        return base, list(problems.values())

    members: dict[int, list[int]] = {}
    for i, e in enumerate(endpoints):
        if not e.serving or e.terminating or base[i] == 0:
            continue
        g = group_of(spec, pod_labels(e.pod, pods))
        if g is not None:
            members.setdefault(g, []).append(i)

    shares = [Fraction(0)] * len(endpoints)
    for g, idx in members.items():
        group_share = spec.groups[g].share
        group_base = sum(base[i] for i in idx)
        for i in idx:
            shares[i] = group_share * base[i] / group_base
    return _integers(shares), list(problems.values())


def pod_labels(pod: str, pods: Mapping[str, Obj]) -> Mapping[str, str]:
    """The labels of Pod ``pod`` (name → object in ``pods``); none for "" or a missing pod."""
    labels: Mapping[str, str] = (
        (pods.get(pod) or {}).get("metadata", {}).get("labels") or {} if pod else {}
    )
    return labels


def group_of(spec: WeightSpec, labels: Mapping[str, str]) -> int | None:
    """The index of the group of ``spec`` that takes an endpoint whose Pod has ``labels``: the
    first whose selector matches, else the ``*`` group; None when no group takes it (it gets
    no traffic)."""
    for g, group in enumerate(spec.groups):
        if group.selector is not None and group.selector.matches(labels):
            return g
    return next((g for g, group in enumerate(spec.groups) if group.selector is None), None)


def usable_endpoints(
    raw: Sequence[RawEndpoint],
) -> tuple[list[RawEndpoint], list[AnnotationError]]:
    """The endpoints a backend set can hold, and an error for each one it cannot: an address
    Kubernetes accepted but that is no IP address to Python (``010.1.2.3``: a slice's
    leading zeros), or no port. Such an endpoint is left out; the others are published."""
    usable: list[RawEndpoint] = []
    problems: list[AnnotationError] = []
    for e in raw:
        try:
            ipaddress.ip_address(e.address)
        except ValueError:
            why = f"address {excerpt(e.address)} is not an IP address"
        else:
            if 0 < e.port < 65536:
                usable.append(e)
                continue
            why = f"port {e.port} is not from 1 to 65535"
        pod = f" (pod {e.pod})" if e.pod else ""
        problems.append(
            AnnotationError("InvalidEndpoint", f"endpoint {why}{pod}; it is left out of the set")
        )
    return usable, problems


def _integers(shares: Sequence[Fraction]) -> list[int]:
    """Smallest integers proportional to ``shares`` (exact), or parts per million if huge."""
    if not any(shares):
        return [0] * len(shares)
    lcm = math.lcm(*(s.denominator for s in shares))
    exact = [int(s * lcm) for s in shares]
    gcd = math.gcd(*exact)
    exact = [w // gcd for w in exact]
    if sum(exact) < EXACT_TOTAL_LIMIT:
        return exact
    total = sum(shares, Fraction(0))
    scaled = [s / total * APPROXIMATE_TOTAL for s in shares]
    out = [max(1, math.floor(x)) if x > 0 else 0 for x in scaled]
    # Largest remainder: hand out what flooring lost, biggest fractional parts first.
    missing = APPROXIMATE_TOTAL - sum(out)
    order = sorted(range(len(out)), key=lambda i: scaled[i] - math.floor(scaled[i]), reverse=True)
    for i in order[: max(0, missing)]:
        if scaled[i] > 0:
            out[i] += 1
    return out


@dataclass(frozen=True, slots=True)
class Built:
    """A Service's backend set, and the problems that affected only part of it."""

    backend_set: BackendSet
    problems: tuple[AnnotationError, ...] = ()
    """Bad pod weights (the pod got the default weight) and unusable endpoints (left out):
    reported as Warning Events on the Service, while the set is published."""


def build_backend_set(
    *,
    service: Obj,
    spec: ServiceSpec,
    raw: Sequence[RawEndpoint],
    pods: Mapping[str, Obj],
    source: str,
    generation: int,
    built_unix_nanos: int,
) -> Built:
    """The BackendSet for one Service; raises AnnotationError for bad Service annotations.
    A bad pod annotation or endpoint is no error: see :attr:`Built.problems`."""
    raw, unusable = usable_endpoints(raw)
    weights, bad_weights = assign_weights(raw, spec.weights, pods)
    meta = service["metadata"]
    backend_set = BackendSet(
        namespace=meta["namespace"],
        name=meta["name"],
        strategy=spec.strategy,
        endpoints=tuple(
            Endpoint(
                address=e.address,
                port=e.port,
                weight=w,
                zone=e.zone,
                pod=e.pod,
                node=e.node,
                serving=e.serving,
                terminating=e.terminating,
                hint_zones=e.hint_zones,
                hint_nodes=e.hint_nodes,
            )
            for e, w in zip(raw, weights, strict=True)
        ),
        generation=generation,
        options=dict(spec.options),
        grpc_services=spec.grpc_services,
        source=source,
        built_unix_nanos=built_unix_nanos,
    )
    return Built(backend_set, (*unusable, *bad_weights))
