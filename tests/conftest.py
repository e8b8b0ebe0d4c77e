"""Shared pytest configuration."""

from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    from weighbridge.logs import configure

    configure(level="warning", fmt="console")
    structlog.contextvars.clear_contextvars()
