"""Shared pytest configuration."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    from weighbridge.logs import configure

    configure(level="warning", fmt="console")
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the proxy's subscription, routes and health log, as event dicts."""
    from dataplane import health, routing, subscription

    capture = LogCapture()
    logger = structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    for module in (routing, subscription, health):
        monkeypatch.setattr(module, "log", logger)
    return capture.entries
