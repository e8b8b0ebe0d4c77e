"""The etcd key scheme.

Everything lives under one prefix (default ``/weighbridge/v1/``)::

    <prefix>services/<namespace>/<name>   BackendSet of one Service (protobuf)
    <prefix>controller/leader             the controller leader's lease-bound key
    <prefix>proxies/<proxy-id>            a proxy's lease-bound ProxyStatus
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NewType

ServiceKey = NewType("ServiceKey", str)
"""``namespace/name`` of a Kubernetes Service: the unit of reconciliation and routing."""

DEFAULT_PREFIX = "/weighbridge/v1/"

# RFC 1123 label (namespace) and DNS-1035 label (Service name), as Kubernetes validates them.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def service_key(namespace: str, name: str) -> ServiceKey:
    """Return the ``namespace/name`` key, refusing anything Kubernetes would refuse."""
    if not _NAMESPACE.match(namespace):
        raise ValueError(f"invalid namespace {namespace!r}: must be a DNS-1123 label")
    if not _NAME.match(name):
        raise ValueError(f"invalid Service name {name!r}: must be a DNS-1035 label")
    return ServiceKey(f"{namespace}/{name}")


ALL_NAMESPACES = "*"
"""In a list of namespaces (the controller's ``--grpc-service-namespaces``, the proxy's
``--xds-namespaces``): every namespace."""


def check_namespaces(what: str, namespaces: Sequence[str]) -> None:
    """Refuse a list of namespaces that is not namespace names, or ``*`` alone, each once;
    the ValueError names ``what`` the list is for."""
    if ALL_NAMESPACES in namespaces and len(namespaces) > 1:
        raise ValueError(
            f"{what}: '*' already means every namespace; "
            f"list either '*' or namespaces, not both ({', '.join(namespaces)})"
        )
    for ns in namespaces:
        if ns != ALL_NAMESPACES and not _NAMESPACE.match(ns):
            raise ValueError(f"{what}: {ns!r} is not a namespace name")
    if len(set(namespaces)) != len(namespaces):
        raise ValueError(f"{what}: a namespace is listed twice ({', '.join(namespaces)})")


def namespace_listed(namespace: str, namespaces: Collection[str]) -> bool:
    """Whether ``namespaces`` (checked by :func:`check_namespaces`) includes ``namespace``."""
    return ALL_NAMESPACES in namespaces or namespace in namespaces


def parse_service_key(text: str) -> ServiceKey:
    """Parse ``namespace/name`` (as typed by a human) into a ServiceKey."""
    namespace, sep, name = text.partition("/")
    if not sep:
        raise ValueError(f"expected NAMESPACE/NAME, got {text!r}")
    return service_key(namespace, name)


@dataclass(frozen=True, slots=True)
class KeyScheme:
    """Where things live in etcd, below one prefix."""

    prefix: str = DEFAULT_PREFIX
    """Root of every key Weighbridge reads or writes; one etcd can host several installs."""

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"etcd prefix must start and end with '/': {self.prefix!r}")

    @property
    def services_prefix(self) -> bytes:
        return f"{self.prefix}services/".encode()

    @property
    def leader_key(self) -> bytes:
        return f"{self.prefix}controller/leader".encode()

    @property
    def proxies_prefix(self) -> bytes:
        return f"{self.prefix}proxies/".encode()

    def service(self, key: ServiceKey) -> bytes:
        return self.services_prefix + key.encode()

    def proxy(self, proxy_id: str) -> bytes:
        return self.proxies_prefix + proxy_id.encode()

    def service_key_of(self, etcd_key: bytes) -> ServiceKey:
        """Inverse of :meth:`service`; raises ValueError for keys outside the services prefix."""
        prefix = self.services_prefix
        if not etcd_key.startswith(prefix):
            raise ValueError(f"{etcd_key!r} is not below {prefix!r}")
        return parse_service_key(etcd_key[len(prefix) :].decode())
