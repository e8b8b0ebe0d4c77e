"""The backend pool: one HTTP/2 connection (more only when one is full) per endpoint.

An endpoint that leaves every backend set is *drained*: it gets no new calls, the calls it
has finish, then its connections close.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import h2.events
import structlog

from dataplane.http2 import Http2Connection, flush_all
from weighbridge.model import join_hostport

if TYPE_CHECKING:
    from dataplane.proxying import Call
    from dataplane.routing import BackendHandle

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT: Final = 3.0
RETRY_BACKOFF: Final = (0.1, 0.2, 0.5, 1.0, 2.0)


class BackendConnection(Http2Connection):
    """The client side of one HTTP/2 connection to a backend."""

    client_side = True

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.calls: dict[int, Call] = {}
        self.goaway = False

    @property
    def usable(self) -> bool:
        if self.closed or self.goaway:
            return False
        # len(self.calls), not h2's open_outbound_streams: that one walks every stream.
        return len(self.calls) < self.h2.remote_settings.max_concurrent_streams

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.response.push(event.data, event.flow_controlled_length)
            else:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.on_response_headers(event.headers, event.stream_ended is not None)
        elif isinstance(event, h2.events.TrailersReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.response.finish(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.response.finish(None)
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.on_backend_reset(event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for call in list(self.calls.values()):
                    call.request.flush()
            else:
                call = self.calls.get(event.stream_id)
                if call is not None:
                    call.request.flush()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            for sid, call in list(self.calls.items()):
                if sid > (event.last_stream_id or 0):
                    call.on_backend_lost(f"backend sent GOAWAY ({event.error_code!r})")
            self.backend.forget(self)

    def open_stream(self, call: Call, headers: list[tuple[bytes, bytes]]) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        self.calls[sid] = call
        self.touch()
        return sid

    def stream_done(self, sid: int) -> None:
        self.calls.pop(sid, None)
        if not self.calls and (self.backend.draining or self.goaway):
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f"connection to backend lost ({exc or 'closed by backend'})"
        for call in list(self.calls.values()):
            call.on_backend_lost(reason)
        self.calls.clear()
        self.backend.forget(self)
        flush_all()


class Backend:
    """One endpoint (``host:port``) and its connections, shared by every set that lists it."""

    def __init__(self, address: str, port: int, *, on_idle: Callable[[Backend], None]) -> None:
        self.address = address
        self.port = port
        self.hostport = join_hostport(address, port)
        self.connections: list[BackendConnection] = []
        self.refs = 0
        self.draining = False
        self.last_error = ""
        self._failures = 0
        self._retry_at = 0.0
        self._connecting: asyncio.Task[BackendConnection] | None = None
        self._on_idle = on_idle

    @property
    def active_calls(self) -> int:
        return sum(len(c.calls) for c in self.connections)

    @property
    def connected(self) -> bool:
        return any(c.usable for c in self.connections)

    def ready_connection(self) -> BackendConnection | None:
        """A connection that can take a new stream now, or None."""
        for c in self.connections:
            if c.usable:
                return c
        return None

    async def connection(self) -> BackendConnection:
        """A usable connection, connecting (once, shared) when there is none."""
        ready = self.ready_connection()
        if ready is not None:
            return ready
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(self._connecting)

    def warm_up(self) -> None:
        """Connect in the background so the first request does not pay for it."""
        if self.ready_connection() is None and (
            self._connecting is None or self._connecting.done()
        ):
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
            self._connecting.add_done_callback(_ignore_result)

    async def _connect(self) -> BackendConnection:
        now = time.monotonic()
        if now < self._retry_at:
            raise ConnectionError(f"{self.last_error} (retrying in {self._retry_at - now:.1f}s)")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: BackendConnection(self), self.address, self.port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno:
                why = os.strerror(exc.errno)
            elif isinstance(exc, TimeoutError):
                why = f"no answer within {CONNECT_TIMEOUT:g}s"
            else:
                why = repr(exc)
            self.last_error = f"cannot connect: {why}"
            self._retry_at = (
                time.monotonic() + RETRY_BACKOFF[min(self._failures, len(RETRY_BACKOFF) - 1)]
            )
            self._failures += 1
            raise ConnectionError(self.last_error) from exc
        self._failures = 0
        self.last_error = ""
        self.connections.append(conn)
        return conn

    def forget(self, conn: BackendConnection) -> None:
        if conn in self.connections and (conn.closed or not conn.calls):
            self.connections.remove(conn)
        if self.draining and not self.active_calls:
            self._on_idle(self)

    def drain(self) -> None:
        """No set lists this endpoint any more: close once its calls are done."""
        self.draining = True
        for c in list(self.connections):
            if not c.calls:
                c.close()
                self.connections.remove(c)
        if not self.active_calls:
            self._on_idle(self)

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        for c in self.connections:
            c.close()
        self.connections.clear()


def _ignore_result(task: asyncio.Task[BackendConnection]) -> None:
    if not task.cancelled():
        task.exception()


class Pool:
    """Backends by ``host:port``, reference-counted by the backend sets that list them."""

    def __init__(self, *, eager: bool = True) -> None:
        self.eager = eager
        """Connect to an endpoint as soon as a set lists it (else on its first call)."""
        self.backends: dict[str, Backend] = {}
        self.draining: dict[str, Backend] = {}

    def acquire(self, address: str, port: int) -> Backend:
        hostport = join_hostport(address, port)
        backend = self.backends.get(hostport) or self.draining.pop(hostport, None)
        if backend is None:
            backend = Backend(address, port, on_idle=self._idle)
        backend.draining = False
        backend.refs += 1
        self.backends[hostport] = backend
        if self.eager:
            backend.warm_up()
        return backend

    def release(self, handle: BackendHandle) -> None:
        backend = cast(Backend, handle)
        backend.refs -= 1
        if backend.refs <= 0:
            self.backends.pop(backend.hostport, None)
            self.draining[backend.hostport] = backend
            backend.drain()

    def _idle(self, backend: Backend) -> None:
        if backend.draining and self.draining.get(backend.hostport) is backend:
            del self.draining[backend.hostport]
            backend.close()
            log.info("backend_closed", backend=backend.hostport)

    def close(self) -> None:
        for b in [*self.backends.values(), *self.draining.values()]:
            b.close()
        self.backends.clear()
        self.draining.clear()
