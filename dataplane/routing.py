"""The routing table's configuration side: which backend sets are applied, and which Service
serves a gRPC service name. The engine routes each call (by ``:authority`` or gRPC service, see
``native/src/routing.rs``); this module keeps it told and remembers what it was told, for the
admin API, and what it could not tell it, for health and metrics.

Each set is applied on its own: whatever applying one set raises is that set's failure (logged,
counted, remembered in :attr:`Routes.unapplied`), never the caller's, so one bad set cannot
stop the sets after it, and the Service keeps the set it had.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import structlog

from dataplane.engine import DRAINING, BackendStats, Engine
from dataplane.strategies import configure
from weighbridge.keys import ServiceKey
from weighbridge.model import BackendSet, Endpoint
from weighbridge.policy import BACKEND_TLS

log = structlog.get_logger(__name__)

REJECTED: Final = "rejected"
"""Why a set was not applied: it asks for something this proxy cannot do (a ValueError from
configuring it or from the engine: a backend TLS file it lacks, a setting out of range, a
strategy of a newer version). Fixed by changing the set, or by giving the proxy what it lacks."""
ERROR: Final = "error"
"""Why a set was not applied: any other exception, a bug (the log line has the traceback)."""
APPLY_FAILURE_REASONS: Final = (REJECTED, ERROR)


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


@dataclass(frozen=True, slots=True)
class Unapplied:
    """A Service whose latest set (or deletion) this proxy could not apply: calls keep the set
    it had (``serving_revision``), or get no route when it had none."""

    mod_revision: int
    """The etcd revision of the set (or deletion) not applied."""
    generation: int
    reason: str
    """One of :data:`APPLY_FAILURE_REASONS`."""
    error: str
    """For a human: the exception's type and message."""
    since_unix: float
    """When this Service's sets began failing (the first failure since its last success)."""
    failures: int
    """Failed attempts since then (a retry counts too)."""
    serving_revision: int | None
    """The etcd revision of the set calls get instead; None: no route."""


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
        self.unapplied: dict[ServiceKey, Unapplied] = {}
        """Services whose latest set (or deletion) could not be applied; an entry goes when the
        Service's next set applies, or when it is deleted."""
        self.apply_failures: dict[str, int] = dict.fromkeys(APPLY_FAILURE_REASONS, 0)
        """Failed applies so far, by reason."""
        self._names_stale = False

    def apply(self, key: ServiceKey, backend_set: BackendSet | None, mod_revision: int) -> bool:
        """Install (or, with None, remove) one Service's set: a single swap in the engine.

        True when done. False when it could not be: whatever was raised is logged
        (``backend_set_not_applied``), counted and remembered in :attr:`unapplied`, and calls
        keep the set applied before, never a weaker form of the new one. Never raises (but
        :class:`BaseException`, cancellation included)."""
        old = self.services.get(key)
        try:
            self._install(key, old, backend_set, mod_revision)
        except Exception as exc:  # one set's failure, whatever it is, is that set's alone
            self._failed(key, backend_set, mod_revision, exc)
            return False
        self.unapplied.pop(key, None)
        return True

    def _install(
        self,
        key: ServiceKey,
        old: ServiceState | None,
        backend_set: BackendSet | None,
        mod_revision: int,
    ) -> None:
        """Tells the engine first and remembers after, so what is remembered is never ahead of
        the engine when the engine raises."""
        if backend_set is None:
            if old is None:
                return
            self.engine.remove(key)
            del self.services[key]
        else:
            self.engine.apply(key, configure(backend_set, revision=mod_revision))
            self.services[key] = ServiceState(backend_set, mod_revision)
        old_names = old.backend_set.grpc_services if old is not None else ()
        new_names = backend_set.grpc_services if backend_set is not None else ()
        if old_names != new_names or self._names_stale:  # O(Services): only when needed
            self._rebuild_grpc_services()

    def _failed(
        self,
        key: ServiceKey,
        backend_set: BackendSet | None,
        mod_revision: int,
        exc: Exception,
    ) -> None:
        reason = REJECTED if isinstance(exc, ValueError) else ERROR
        self.apply_failures[reason] += 1
        before = self.unapplied.get(key)
        serving = self.services.get(key)
        failure = Unapplied(
            mod_revision=mod_revision,
            generation=backend_set.generation if backend_set is not None else 0,
            reason=reason,
            error=f"{type(exc).__name__}: {exc}",
            since_unix=before.since_unix if before is not None else time.time(),
            failures=before.failures + 1 if before is not None else 1,
            serving_revision=serving.mod_revision if serving is not None else None,
        )
        self.unapplied[key] = failure
        log.error(
            "backend_set_not_applied",
            service=key,
            mod_revision=mod_revision,
            generation=failure.generation,
            strategy=backend_set.strategy if backend_set is not None else None,
            deleted=backend_set is None,
            reason=reason,
            error=failure.error,
            failures=failure.failures,
            serving_revision=failure.serving_revision,
            # A rejection names its cause in its message; anything else is a bug to report.
            exc_info=exc if reason == ERROR else None,
        )

    def reapply_backend_tls(self) -> int:
        """Applies again every set with backend TLS (its files changed); how many. A set that
        no longer applies keeps the one applied before and is reported like any other."""
        again = [
            (key, state)
            for key, state in self.services.items()
            if BACKEND_TLS in state.backend_set.options
        ]
        for key, state in again:
            self.apply(key, state.backend_set, state.mod_revision)
        return len(again)

    def _rebuild_grpc_services(self) -> None:
        self._names_stale = True  # until the engine has the new table
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
        self.engine.set_grpc_services(table)
        self.by_grpc_service = table
        self._names_stale = False
