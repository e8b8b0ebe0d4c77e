"""What the configuration side knows of a strategy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from weighbridge.model import Endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Strategy:
    name: str
    """The annotation value and the name of the engine's executor."""
    weighted: bool
    """Whether endpoint weights shape the picks; unweighted strategies give each 1/N."""
    share: str
    """The share of endpoint i, for docs and humans."""

    def weights(self, eligible: Sequence[Endpoint]) -> tuple[int, ...]:
        """The weight the engine picks each eligible endpoint by (all 1 when unweighted)."""
        if self.weighted:
            return tuple(e.weight for e in eligible)
        return (1,) * len(eligible)
