"""Builders for the Kubernetes objects integration tests create (plain JSON dicts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


def address(i: int) -> str:
    """The i-th endpoint address: 198.18.0.0/15 is reserved for benchmarks (RFC 2544).

    EndpointSlices reject loopback; these tests never send traffic to these addresses.
    """
    return f"198.18.{i // 250}.{i % 250 + 1}"


def service(
    ns: str,
    name: str,
    annotations: Mapping[str, str] | None = None,
    ports: Sequence[tuple[str, int]] = (("grpc", 50051),),
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": dict(annotations or {})},
        "spec": {  # selectorless: the tests own the EndpointSlices
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        },
    }


def pod(
    ns: str,
    name: str,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        },
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }


@dataclass(frozen=True)
class Ep:
    """One endpoint of a test slice."""

    ip: str
    pod: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone: str = "zone-a"
    hint_zones: tuple[str, ...] = ()


def endpoint_slice(
    ns: str, svc: str, name: str, endpoints: Iterable[Ep], port: tuple[str, int] = ("grpc", 50051)
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "tests.weighbridge.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": port[0], "port": port[1], "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [e.ip],
                "conditions": {
                    "ready": e.ready,
                    "serving": e.serving,
                    "terminating": e.terminating,
                },
                "zone": e.zone,
                **(
                    {"hints": {"forZones": [{"name": z} for z in e.hint_zones]}}
                    if e.hint_zones
                    else {}
                ),
                **({"targetRef": {"kind": "Pod", "name": e.pod, "namespace": ns}} if e.pod else {}),
            }
            for e in endpoints
        ],
    }


def endpoints(
    ns: str,
    svc: str,
    ready: Iterable[Ep],
    not_ready: Iterable[Ep] = (),
    port: tuple[str, int] = ("grpc", 50051),
) -> Obj:
    def addr(e: Ep) -> Obj:
        return {
            "ip": e.ip,
            **({"targetRef": {"kind": "Pod", "name": e.pod, "namespace": ns}} if e.pod else {}),
        }

    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": svc, "namespace": ns},
        "subsets": [
            {
                "addresses": [addr(e) for e in ready],
                "notReadyAddresses": [addr(e) for e in not_ready],
                "ports": [{"name": port[0], "port": port[1], "protocol": "TCP"}],
            }
        ],
    }


PATHS = {
    "Service": "/api/v1/namespaces/{ns}/services",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Endpoints": "/api/v1/namespaces/{ns}/endpoints",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
    "Event": "/api/v1/namespaces/{ns}/events",
}


def collection(kind: str, ns: str) -> str:
    return PATHS[kind].format(ns=ns)


def item(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{collection(obj['kind'], meta['namespace'])}/{meta['name']}"
