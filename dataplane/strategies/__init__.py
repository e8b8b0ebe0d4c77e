"""Load-balancing strategies: one small module each, looked up by name.

picker = build_picker("weighted_round_robin", backends, rng)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Final

from dataplane.strategies import randompick, roundrobin, weightedrandom, weightedroundrobin
from dataplane.strategies.base import (
    B,
    ErrorPicker,
    Explanation,
    NoBackendError,
    Picker,
    Weighted,
)

REGISTRY: Final[dict[str, Any]] = {
    m.NAME: m.build for m in (roundrobin, randompick, weightedroundrobin, weightedrandom)
}
"""Strategy name → builder(eligible_backends, rng) → picker."""


def build_picker(
    strategy: str, backends: Sequence[B], rng: random.Random, *, empty_message: str
) -> Picker[B]:
    """The picker for ``strategy`` over ``backends`` (already filtered to eligible ones).

    An empty list, or an unknown strategy, gives an :class:`ErrorPicker` that fails every
    pick with a message a human understands.
    """
    builder = REGISTRY.get(strategy)
    if builder is None:
        return ErrorPicker(
            f"unknown strategy {strategy!r} (this proxy knows {', '.join(REGISTRY)})"
        )
    if not backends:
        return ErrorPicker(empty_message)
    picker: Picker[B] = builder(backends, rng)
    return picker


__all__ = [
    "REGISTRY",
    "ErrorPicker",
    "Explanation",
    "NoBackendError",
    "Picker",
    "Weighted",
    "build_picker",
]
