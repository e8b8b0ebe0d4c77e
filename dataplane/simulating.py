"""Picks without calls: a backend set applied to an engine of its own, whose strategy then
picks as many times as asked (``wbctl simulate``).

The picks are the engine's (``weighbridge_native.Engine.simulate``): the same executor, the
same configuration (:func:`dataplane.strategies.configure`) as a proxy's, but nothing is
dialled and nothing is sent. Every endpoint counts as healthy, as on a proxy that has not yet
heard from any; active health checks and backend TLS, which only decide whether an endpoint
can take calls, are left out so that no connection is opened and no certificate is needed.
The engine is a proxy without a zone: zone preferences do not apply.
"""

from __future__ import annotations

import dataclasses
import socket

from dataplane.engine import NativeEngine, NoBackendError
from dataplane.settings import ProxySettings
from dataplane.strategies import configure
from weighbridge.model import BackendSet


def simulate_picks(
    backend_set: BackendSet, calls: int, *, seed: int | None = None
) -> dict[str, int]:
    """HOST:PORT → how many of ``calls`` picks the engine gave each eligible endpoint of
    ``backend_set``; raises :class:`NoBackendError` when none is eligible (and ``calls`` > 0).
    ``seed`` fixes where rotations start."""
    route = configure(backend_set)
    route = dataclasses.replace(
        route,
        failover=dataclasses.replace(route.failover, health_check=None, backend_tls=None),
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # the engine serves a socket; nobody connects to it
        sock.listen()
        engine = NativeEngine(sock, ProxySettings(threads=1, eager_connections=False), seed=seed)
        try:
            engine.apply(backend_set.key, route)
            return engine.simulate(backend_set.key, calls)
        finally:
            engine.close()


__all__ = ["NoBackendError", "simulate_picks"]
