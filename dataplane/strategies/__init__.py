"""Load-balancing strategies, the configuration side: one small module each.

Each module describes its strategy and turns a backend set's eligible endpoints into what the
engine's executor of the same name (``native/src/strategy/``) needs: the weights it picks by.
The rule that picks an endpoint per call lives in the engine only.

:func:`configure` also reads the set's failover policies from its options
(:mod:`weighbridge.policy`); an option a proxy cannot read is logged and its default applies.

    route = configure(backend_set)      # → engine.apply(key, route)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import structlog

from dataplane.strategies import (
    leastrequest,
    peakewma,
    randompick,
    ringhash,
    roundrobin,
    weightedrandom,
    weightedroundrobin,
)
from dataplane.strategies.strategy import Strategy
from weighbridge.model import BackendSet
from weighbridge.policy import DEFAULTS, Failover, failover_from_options

log = structlog.get_logger(__name__)

REGISTRY: Final[dict[str, Strategy]] = {
    m.STRATEGY.name: m.STRATEGY
    for m in (
        roundrobin,
        randompick,
        weightedroundrobin,
        weightedrandom,
        leastrequest,
        peakewma,
        ringhash,
    )
}
"""Strategy name → its description; the same names as the model's and the engine's."""


@dataclass(frozen=True, slots=True)
class RouteEndpoint:
    """One eligible endpoint as the engine gets it."""

    hostport: str
    pod: str
    weight: int
    zone: str = ""
    hint_zones: tuple[str, ...] = ()
    hint_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """What the engine needs to route one Service's calls."""

    strategy: str
    endpoints: tuple[RouteEndpoint, ...]
    """The eligible endpoints (serving, not terminating, weight > 0): the only ones picked."""
    total: int
    """Endpoints in the set, eligible or not (to explain an empty route)."""
    failover: Failover = DEFAULTS
    """Retries, outlier detection, health checks and panic threshold."""
    generation: int = 0
    """The set's generation, and the etcd revision it was stored at: debug metadata names them."""
    revision: int = 0


def configure(backend_set: BackendSet, *, revision: int = 0) -> RouteConfig:
    """The engine's configuration of ``backend_set`` (whose strategy the model validated).

    An invalid failover option (the controller validates them, so only a hand-written set or a
    newer controller's syntax has one) is logged and replaced by its default, never refused:
    the endpoints still get their calls. ``revision`` is the etcd revision the set was stored
    at."""
    strategy = REGISTRY[backend_set.strategy]
    eligible = backend_set.eligible
    failover, errors = failover_from_options(backend_set.options)
    for option, error in errors.items():
        log.warning(
            "backend_set_option_invalid",
            service=backend_set.key,
            generation=backend_set.generation,
            option=option,
            text=backend_set.options[option],
            error=error,
            applied="the default",
        )
    return RouteConfig(
        strategy=strategy.name,
        endpoints=tuple(
            RouteEndpoint(e.hostport, e.pod, w, e.zone, e.hint_zones, e.hint_nodes)
            for e, w in zip(eligible, strategy.weights(eligible), strict=True)
        ),
        total=len(backend_set.endpoints),
        failover=failover,
        generation=backend_set.generation,
        revision=revision,
    )


__all__ = ["REGISTRY", "RouteConfig", "RouteEndpoint", "Strategy", "configure"]
