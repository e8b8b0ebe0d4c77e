"""The routing table's configuration side: which backend sets are applied, and which Service
serves a gRPC service name. The engine routes each call (by ``:authority`` or gRPC service, see
``native/src/routing.rs``); this module keeps it told and remembers what it was told, for the
admin API.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from dataplane.engine import DRAINING, BackendStats, Engine
from dataplane.strategies import configure
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint
from weighbridge.policy import BACKEND_TLS

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What an endpoint of an applied set is doing (one of
    :data:`dataplane.engine.ENDPOINT_STATES`), why, and since when."""

    state: str
    reason: str
    since_unix: float
    """0 when unknown."""


def endpoint_state(endpoint: Endpoint, stats: BackendStats | None) -> EndpointState:
    """``draining`` for an endpoint the set keeps from new calls (the engine never sees it),
    else the engine's state of it; "" while the engine has not reported on it."""
    if not endpoint.eligible:
        why = (
            "terminating"
            if endpoint.terminating
            else "not serving"
            if not endpoint.serving
            else "weight 0"
        )
        return EndpointState(DRAINING, why, 0.0)
    if stats is None:
        return EndpointState("", "", 0.0)
    return EndpointState(stats.state, stats.state_reason, stats.state_since_unix)


class ServiceState:
    """One applied backend set: immutable once built, replaced on update."""

    __slots__ = ("backend_set", "key", "mod_revision")

    def __init__(self, backend_set: BackendSet, mod_revision: int) -> None:
        self.key = backend_set.key
        self.backend_set = backend_set
        self.mod_revision = mod_revision


class Routes:
    """The applied sets, kept in step with the engine's routing table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.services: dict[ServiceKey, ServiceState] = {}
        self.by_grpc_service: dict[str, ServiceKey] = {}
        """gRPC service name → the Service that declares it."""

    def apply(self, key: ServiceKey, backend_set: BackendSet | None, mod_revision: int) -> None:
        """Install (or, with None, remove) one Service's set: a single swap in the engine."""
        old = self.services.get(key)
        if backend_set is None:
            if old is None:
                return
            del self.services[key]
            self.engine.remove(key)
        else:
            try:
                self.engine.apply(key, configure(backend_set))
            except ValueError as exc:
                # Only a setting this proxy cannot honour (its backend TLS files are missing,
                # say): calls keep the set applied before, never go out in a weaker form.
                log.error(
                    "backend_set_not_applied",
                    service=key,
                    generation=backend_set.generation,
                    error=str(exc),
                    kept="the previous set" if old is not None else "no route",
                )
                return
            self.services[key] = ServiceState(backend_set, mod_revision)
        old_names = old.backend_set.grpc_services if old is not None else ()
        new_names = backend_set.grpc_services if backend_set is not None else ()
        if old_names != new_names:  # O(Services), so only when the names change
            self._rebuild_grpc_services()

    def reapply_backend_tls(self) -> int:
        """Applies again every set with backend TLS (its files changed); how many."""
        again = [
            (key, state)
            for key, state in self.services.items()
            if BACKEND_TLS in state.backend_set.options
        ]
        for key, state in again:
            self.apply(key, state.backend_set, state.mod_revision)
        return len(again)

    def _rebuild_grpc_services(self) -> None:
        table: dict[str, ServiceKey] = {}
        for key in sorted(self.services):
            for name in self.services[key].backend_set.grpc_services:
                if name in table:
                    log.warning(
                        "grpc_service_claimed_twice",
                        grpc_service=name,
                        kept=table[name],
                        ignored=key,
                    )
                    continue
                table[name] = key
        self.by_grpc_service = table
        self.engine.set_grpc_services(table)
