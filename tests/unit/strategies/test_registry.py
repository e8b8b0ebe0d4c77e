"""Every strategy the model accepts has a configuration module and an executor in the engine."""

from __future__ import annotations

import weighbridge_native

from dataplane.strategies import REGISTRY
from weighbridge.model import STRATEGIES


def test_the_model_the_configuration_and_the_engine_know_the_same_strategies() -> None:
    assert set(REGISTRY) == set(STRATEGIES) == set(weighbridge_native.STRATEGIES)
