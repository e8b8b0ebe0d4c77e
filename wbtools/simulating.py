"""``wbctl simulate``: the set the controller would publish for a Service, with the annotations
you are about to apply, and how the proxy's engine would spread calls over it. Writes nothing.

The live Service, its EndpointSlices (or Endpoints) and its Pods are read from the Kubernetes
API with the user's kubeconfig (in a pod: its service account), as the controller reads them;
the set is built by the controller's own functions (:mod:`controlplane.annotations`,
:mod:`controlplane.building`), each pod's expected share is the model's
(:meth:`weighbridge.model.BackendSet.probabilities`, what ``wbctl get`` shows), and the picks
are the engine's (:mod:`dataplane.simulating`). Annotation errors are the controller's, in
the words of its Events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TextIO

import yaml

from controlplane import annotations as ann
from controlplane.building import (
    build_backend_set,
    endpoints_of,
    group_of,
    pod_labels,
)
from controlplane.errors import AnnotationError
from controlplane.kube import Kube, KubeError, Obj
from controlplane.reconciling import SERVICE_NAME_LABEL
from dataplane.simulating import simulate_picks
from weighbridge.errors import WeighbridgeError
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet
from weighbridge.wbctl import write_table


@dataclass(frozen=True, slots=True)
class Live:
    """What the API server says about one Service, as the controller would read it."""

    service: Obj
    source: str
    """``endpointslices`` or ``endpoints``, as the controller's ``--source``."""
    slices: tuple[Obj, ...] = ()
    endpoints: Obj | None = None
    pods: Mapping[str, Obj] | None = None
    """Pod name → Pod, for every pod the slices (or Endpoints) name that exists."""


async def read_live(kube: Kube, key: ServiceKey, *, source: str = "endpointslices") -> Live:
    """Read Service ``key``, its endpoints and their Pods; raises WeighbridgeError when the
    Service does not exist or the API server refuses."""
    namespace, name = key.split("/", 1)
    try:
        service = await kube.request("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
        slices: list[Obj] = []
        endpoints: Obj | None = None
        if source == "endpointslices":
            page = await kube.request(
                "GET",
                f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                query={"labelSelector": f"{SERVICE_NAME_LABEL}={name}"},
            )
            slices = page.get("items") or []
            refs = [e.get("targetRef") or {} for s in slices for e in s.get("endpoints") or []]
        else:
            endpoints = await _get_or_none(kube, f"/api/v1/namespaces/{namespace}/endpoints/{name}")
            refs = [
                a.get("targetRef") or {}
                for subset in (endpoints or {}).get("subsets") or []
                for kind in ("addresses", "notReadyAddresses")
                for a in subset.get(kind) or []
            ]
        names = sorted({r["name"] for r in refs if r.get("kind") == "Pod" and r.get("name")})
        found = await asyncio.gather(
            *(_get_or_none(kube, f"/api/v1/namespaces/{namespace}/pods/{p}") for p in names)
        )
    except KubeError as exc:
        if exc.status == 404:
            raise WeighbridgeError(f"no Service {key} (the API server says: {exc})") from None
        raise WeighbridgeError(f"reading Service {key} from Kubernetes: {exc}") from None
    pods = {p: pod for p, pod in zip(names, found, strict=True) if pod is not None}
    return Live(service, source, tuple(slices), endpoints, pods)


async def _get_or_none(kube: Kube, path: str) -> Obj | None:
    try:
        return await kube.request("GET", path)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def parse_overrides(text: str, *, name: str = "--annotations") -> dict[str, str | None]:
    """A YAML (or JSON) map of annotation → value; a null value removes the annotation.
    Raises ValueError naming what is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{name}: not YAML or JSON: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{name}: expected a map of annotation: value, got {type(doc).__name__}")
    out: dict[str, str | None] = {}
    for key, value in doc.items():
        if not isinstance(key, str):
            raise ValueError(f"{name}: annotation name {key!r} is not a string")
        if isinstance(value, bool) or not isinstance(value, str | int | float | None):
            raise ValueError(
                f"{name}: {key}: a value must be text (quote it), or null to remove the annotation"
            )
        out[key] = None if value is None else str(value)
    return out


def merged_annotations(service: Obj, overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The Service's annotations with ``overrides`` applied (null: removed)."""
    merged = dict(service.get("metadata", {}).get("annotations") or {})
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True, slots=True)
class GroupShare:
    """One group of ``weighbridge.io/weights``: its selector (``*`` for the rest), its pods
    that take calls, its expected share and its picks."""

    selector: str
    pods: int
    expected: Fraction
    picks: int


@dataclass(frozen=True, slots=True)
class Simulation:
    backend_set: BackendSet
    annotations: Mapping[str, str]
    """The Service's Weighbridge annotations, overrides applied."""
    problems: tuple[AnnotationError, ...]
    """What the controller would post as Warning Events while publishing the set."""
    groups: tuple[GroupShare, ...]
    calls: int
    picks: Mapping[str, int]
    """HOST:PORT → the engine's picks, of ``calls``."""
    group_of: Mapping[str, str]
    """HOST:PORT → the selector of the group that takes it."""

    @property
    def expected(self) -> dict[str, Fraction]:
        return self.backend_set.probabilities()


def simulate(
    live: Live,
    overrides: Mapping[str, str | None],
    *,
    calls: int,
    seed: int | None = None,
) -> Simulation:
    """The set the controller would build from ``live`` with ``overrides`` applied to the
    Service's annotations, its expected shares, and ``calls`` picks of the engine. Raises
    :class:`AnnotationError` (as the controller's Event would say it) for bad annotations, and
    WeighbridgeError for a Service the controller ignores."""
    meta = live.service["metadata"]
    key = ServiceKey(f"{meta['namespace']}/{meta['name']}")
    annotations = merged_annotations(live.service, overrides)
    if not ann.opted_in(annotations):
        raise WeighbridgeError(
            f"Service {key} has no {ann.STRATEGY} annotation, so the controller ignores it; "
            f"give one with --annotations"
        )
    spec = ann.parse_service(annotations)
    pods = live.pods or {}
    raw = endpoints_of(
        live.service, spec, source=live.source, slices=live.slices, endpoints=live.endpoints
    )
    built = build_backend_set(
        service=live.service,
        spec=spec,
        raw=raw,
        pods=pods,
        source=live.source,
        generation=0,
        built_unix_nanos=0,
    )
    backend_set = built.backend_set
    eligible = backend_set.eligible
    picks = simulate_picks(backend_set, calls, seed=seed) if eligible and calls > 0 else {}
    expected = backend_set.probabilities()
    groups: list[GroupShare] = []
    group_of_endpoint: dict[str, str] = {}
    if spec.weights.groups:
        selectors = [g.selector.text if g.selector else "*" for g in spec.weights.groups]
        pod_count = [0] * len(selectors)
        shares = [Fraction(0)] * len(selectors)
        picked = [0] * len(selectors)
        for e in eligible:
            g = group_of(spec.weights, pod_labels(e.pod, pods))
            if g is None:
                continue
            group_of_endpoint[e.hostport] = selectors[g]
            pod_count[g] += 1
            shares[g] += expected.get(e.hostport, Fraction(0))
            picked[g] += picks.get(e.hostport, 0)
        groups = [
            GroupShare(selectors[g], pod_count[g], shares[g], picked[g])
            for g in range(len(selectors))
        ]
    return Simulation(
        backend_set=backend_set,
        annotations={k: v for k, v in annotations.items() if k.startswith(ann.PREFIX)},
        problems=built.problems,
        groups=tuple(groups),
        calls=calls if picks else 0,
        picks=picks,
        group_of=group_of_endpoint,
    )


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def to_json(sim: Simulation) -> dict[str, Any]:
    bs = sim.backend_set
    expected = sim.expected
    return {
        "service": bs.key,
        "strategy": bs.strategy,
        "source": bs.source,
        "annotations": dict(sim.annotations),
        "options": dict(bs.options),
        "grpcServices": list(bs.grpc_services),
        "calls": sim.calls,
        "endpoints": [
            {
                "pod": e.pod,
                "address": e.address,
                "port": e.port,
                "weight": e.weight,
                "eligible": e.eligible,
                "group": sim.group_of.get(e.hostport),
                "expectedShare": float(expected.get(e.hostport, 0)),
                "picks": sim.picks.get(e.hostport, 0),
                "simulatedShare": _share(sim.picks.get(e.hostport, 0), sim.calls),
            }
            for e in bs.endpoints
        ],
        "groups": [
            {
                "selector": g.selector,
                "pods": g.pods,
                "expectedShare": float(g.expected),
                "picks": g.picks,
                "simulatedShare": _share(g.picks, sim.calls),
            }
            for g in sim.groups
        ],
        "problems": [{"reason": p.reason, "message": p.message} for p in sim.problems],
    }


def _percent(share: float | Fraction | None) -> str:
    return "-" if share is None else f"{float(share):.2%}"


def print_simulation(sim: Simulation, out: TextIO) -> None:
    bs = sim.backend_set
    expected = sim.expected
    out.write(
        f"Service {bs.key}: {bs.strategy}, {len(bs.endpoints)} endpoints "
        f"({len(bs.eligible)} take calls), from {bs.source}; nothing written\n"
    )
    for key, value in sorted(sim.annotations.items()):
        lines = [line.strip() for line in value.strip().splitlines() if line.strip()]
        out.write(f"  {key}: {'; '.join(lines)}\n")  # one line each, as the syntax allows
    for p in sim.problems:
        out.write(f"warning: {p.reason}: {p.message}\n")
    simulated = f"SIMULATED ({sim.calls} picks)" if sim.calls else "SIMULATED"
    rows: list[Sequence[str]] = [("POD", "ENDPOINT", "WEIGHT", "GROUP", "EXPECTED", simulated)]
    for e in bs.endpoints:
        share = expected.get(e.hostport)
        picked = sim.picks.get(e.hostport)
        rows.append(
            (
                e.pod or "-",
                e.hostport,
                str(e.weight),
                sim.group_of.get(e.hostport, "-"),
                _percent(share) if e.eligible else "- (takes no calls)",
                _percent(_share(picked, sim.calls)) if picked is not None else "-",
            )
        )
    out.write("\n")
    write_table(rows, out)
    if sim.groups:
        out.write("\n")
        rows = [("GROUP", "PODS", "EXPECTED", simulated)]
        for g in sim.groups:
            rows.append(
                (
                    g.selector,
                    str(g.pods),
                    _percent(g.expected),
                    _percent(_share(g.picks, sim.calls)) if sim.calls else "-",
                )
            )
        write_table(rows, out)


def write_json(sim: Simulation, out: TextIO) -> None:
    out.write(json.dumps(to_json(sim), indent=2) + "\n")
