"""An HTTP/2 connection (either side) as an asyncio protocol, batching its writes.

Both the client-facing and the backend-facing side of the proxy are plain HTTP/2 (the ``h2``
state machine): the proxy forwards HEADERS and DATA frames between streams, so payloads are
never deserialized and every header and trailer, binary ones included, passes unchanged.
(grpcio's server API does not expose ``:authority``, which routing needs; see docs.)
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack

from dataplane.hpackcache import StatelessEncoder

STREAM_WINDOW: Final = 1 << 20
"""Per-stream receive window: how far a sender may run ahead of its reader."""
CONNECTION_WINDOW: Final = 16 << 20

MAX_CLOSED_STREAMS: Final = 4096
"""Closed streams h2 remembers per connection (to answer late frames correctly); h2's default
of 65,536 costs megabytes per long-lived backend connection."""

_dirty: set[Http2Connection] = set()


class _NoLog:
    """hpack calls ``log.debug(...)`` for every header of every request; even with DEBUG off
    that was ~3% of the proxy's CPU in the profile (docs/performance.md)."""

    def debug(self, *args: object, **kwargs: object) -> None:
        pass


hpack.hpack.log = _NoLog()  # type: ignore[assignment]


class _H2Connection(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS


def flush_all() -> None:
    """Write out what every touched connection has queued (end of an input batch)."""
    while _dirty:
        _dirty.pop().flush()


class Http2Connection(asyncio.Protocol):
    """Common plumbing: the h2 state machine, its transport, and write batching."""

    client_side: bool = False

    def __init__(self) -> None:
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=not self.client_side,
            normalize_inbound_headers=False,
        )
        self.h2 = _H2Connection(config=config)
        self.h2.encoder = StatelessEncoder()  # type: ignore[assignment]
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Every write is a complete batch of frames: never let Nagle hold it back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def touch(self) -> None:
        """Mark this connection as having output to write at the end of the batch."""
        _dirty.add(self)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.touch()
            flush_all()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self.handle(event)
        self.touch()
        flush_all()

    def handle(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.h2.close_connection()
            self.flush()
            if self.transport is not None:
                self.transport.close()
