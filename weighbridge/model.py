"""The backend-set model and its protobuf codec.

A :class:`BackendSet` is an immutable value: writers build a new one, readers swap it in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Final

from google.protobuf.message import DecodeError as _ProtoDecodeError

from weighbridge.errors import DecodeError
from weighbridge.keys import ServiceKey, service_key
from weighbridge.v1 import backend_set_pb2 as pb

STRATEGIES: Final = (
    "round_robin",
    "random",
    "weighted_round_robin",
    "weighted_random",
    "least_request",
    "peak_ewma",
    "ring_hash",
)
"""Strategy names every proxy of this version understands."""

MAX_WEIGHT: Final = 2**32 - 1

_GRPC_SERVICE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def is_grpc_service_name(name: str) -> bool:
    """Whether ``name`` is a fully qualified gRPC service name, like ``helloworld.Greeter``."""
    return _GRPC_SERVICE_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend: where to send requests and how much of them."""

    address: str
    port: int
    weight: int = 1
    zone: str = ""
    pod: str = ""
    node: str = ""
    serving: bool = True
    terminating: bool = False
    hint_zones: tuple[str, ...] = ()
    """EndpointSlice ``hints.forZones``: the zones whose consumers should use it."""
    hint_nodes: tuple[str, ...] = ()
    """EndpointSlice ``hints.forNodes``: the nodes whose consumers should use it."""

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"endpoint address {self.address!r} is not an IP address") from None
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range 1-65535")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight {self.weight} out of range 0-{MAX_WEIGHT}")

    @property
    def eligible(self) -> bool:
        """Eligible endpoints may get new requests: serving, not terminating, weight > 0."""
        return self.serving and not self.terminating and self.weight > 0

    @property
    def hostport(self) -> str:
        return join_hostport(self.address, self.port)


def join_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class BackendSet:
    """Everything a proxy needs to route one Service's requests."""

    namespace: str
    name: str
    strategy: str
    endpoints: tuple[Endpoint, ...] = ()
    generation: int = 0
    options: Mapping[str, str] = field(default_factory=dict)
    grpc_services: tuple[str, ...] = ()
    source: str = ""
    built_unix_nanos: int = 0

    def __post_init__(self) -> None:
        service_key(self.namespace, self.name)  # validates both
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(f"{self.namespace}/{self.name}")

    @property
    def eligible(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.eligible)

    def probabilities(self) -> dict[str, Fraction]:
        """Exact share of new requests per endpoint (``host:port``) under this set's strategy
        (for the load-aware ones, least_request and peak_ewma: while every endpoint has the
        same latency and load per weight; for ring_hash: of the keys, and of calls without one)."""
        eligible = self.eligible
        if not eligible:
            return {}
        if self.strategy in ("round_robin", "random"):
            return {e.hostport: Fraction(1, len(eligible)) for e in eligible}
        total = sum(e.weight for e in eligible)
        return {e.hostport: Fraction(e.weight, total) for e in eligible}

    def same_content(self, other: BackendSet | None) -> bool:
        """True when only bookkeeping (generation, build time) differs."""
        if other is None:
            return False
        return replace(self, generation=0, built_unix_nanos=0) == replace(
            other, generation=0, built_unix_nanos=0
        )


def endpoint_to_proto(e: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
        address=e.address,
        port=e.port,
        weight=e.weight,
        zone=e.zone,
        pod=e.pod,
        node=e.node,
        serving=e.serving,
        terminating=e.terminating,
        hint_zones=e.hint_zones,
        hint_nodes=e.hint_nodes,
    )


def to_proto(backend_set: BackendSet) -> pb.BackendSet:
    return pb.BackendSet(
        namespace=backend_set.namespace,
        name=backend_set.name,
        strategy=backend_set.strategy,
        endpoints=[endpoint_to_proto(e) for e in backend_set.endpoints],
        generation=backend_set.generation,
        options=dict(backend_set.options),
        grpc_services=list(backend_set.grpc_services),
        source=backend_set.source,
        built_unix_nanos=backend_set.built_unix_nanos,
    )


def encode(backend_set: BackendSet) -> bytes:
    """Serialize to the protobuf wire format stored in etcd (deterministic)."""
    return to_proto(backend_set).SerializeToString(deterministic=True)


def decode(data: bytes) -> BackendSet:
    """Parse a stored value; raises :class:`DecodeError` for anything that is not a valid set."""
    msg = pb.BackendSet()
    try:
        msg.ParseFromString(data)
        return BackendSet(
            namespace=msg.namespace,
            name=msg.name,
            strategy=msg.strategy,
            endpoints=tuple(
                Endpoint(
                    address=e.address,
                    port=e.port,
                    weight=e.weight,
                    zone=e.zone,
                    pod=e.pod,
                    node=e.node,
                    serving=e.serving,
                    terminating=e.terminating,
                    hint_zones=tuple(e.hint_zones),
                    hint_nodes=tuple(e.hint_nodes),
                )
                for e in msg.endpoints
            ),
            generation=msg.generation,
            options=dict(msg.options),
            grpc_services=tuple(msg.grpc_services),
            source=msg.source,
            built_unix_nanos=msg.built_unix_nanos,
        )
    except (_ProtoDecodeError, ValueError) as exc:
        raise DecodeError(f"not a valid BackendSet: {exc}") from exc
