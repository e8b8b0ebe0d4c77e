"""Carrying calls: one client HTTP/2 stream ↔ one backend HTTP/2 stream, frames as they come.

Each :class:`Call` owns two :class:`Pipe` s (request and response). A pipe forwards DATA
within the receiver's flow-control window and returns window to the sender only as bytes
leave, so a slow reader slows its writer instead of filling the proxy's memory. Headers and
trailers (binary ones included) pass unchanged; status and details are the backend's own.
Errors the proxy itself produces are gRPC statuses whose message starts with
``weighbridge:`` and names the route or backend concerned.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

import h2.errors
import h2.events
import h2.exceptions
from hyperframe.frame import GoAwayFrame

from dataplane.backends import Backend, BackendConnection
from dataplane.grpcwire import CODES, MessageMeter, error_headers, error_trailers, parse_timeout
from dataplane.http2 import Http2Connection, flush_all
from dataplane.routing import Router, ServiceState, Target
from dataplane.strategies import NoBackendError

Headers = list[tuple[bytes, bytes]]
CANCEL: Final = h2.errors.ErrorCodes.CANCEL
NO_ERROR: Final = h2.errors.ErrorCodes.NO_ERROR


@dataclass(slots=True)
class ProxyCounters:
    """Process-wide counters of calls the proxy answered itself, by reason."""

    calls: int = 0
    local_errors: dict[str, int] = field(default_factory=dict)

    def error(self, reason: str) -> None:
        self.local_errors[reason] = self.local_errors.get(reason, 0) + 1


@dataclass(slots=True)
class ProxySettings:
    max_message_bytes: int = 16 << 20
    """Largest gRPC message accepted in either direction; larger ones end the call with
    RESOURCE_EXHAUSTED. The proxy never buffers whole messages, so this protects backends."""


class Pipe:
    """One direction of a call: frames from ``src``'s stream to ``dst``'s stream."""

    __slots__ = (
        "call",
        "closed",
        "dst",
        "dst_sid",
        "ended",
        "meter",
        "pending",
        "src",
        "src_sid",
        "trailers",
    )

    def __init__(self, call: Call, src: Http2Connection | None, src_sid: int, limit: int) -> None:
        self.call = call
        self.src = src
        self.src_sid = src_sid
        self.dst: Http2Connection | None = None
        self.dst_sid = 0
        self.pending: deque[list[object]] = deque()
        self.ended = False
        self.closed = False
        self.trailers: Headers | None = None
        self.meter = MessageMeter(limit)

    def push(self, data: bytes, flow: int) -> None:
        if self.closed:
            self._ack(flow)
            return
        too_big = self.meter.feed(data)
        if too_big is not None:
            self._ack(flow)
            self.call.too_big(self, too_big)
            return
        self.pending.append([data, flow])
        self.flush()

    def discard(self) -> None:
        """Drop what is buffered, returning its flow-control window to the sender (else the
        connection's window would shrink for good with every call cut short)."""
        for item in self.pending:
            self._ack(item[1])  # type: ignore[arg-type]
        self.pending.clear()

    def finish(self, trailers: Headers | None) -> None:
        if not self.ended:
            self.ended = True
            self.trailers = trailers
            self.flush()

    def _ack(self, flow: int) -> None:
        src = self.src
        if src is not None and flow:
            try:
                src.h2.acknowledge_received_data(flow, self.src_sid)
            except h2.exceptions.StreamClosedError:
                return
            src.touch()

    def flush(self) -> None:
        dst = self.dst
        if dst is None or self.closed:
            return
        conn, sid = dst.h2, self.dst_sid
        try:
            while self.pending:
                item = self.pending[0]
                data: bytes = item[0]  # type: ignore[assignment]
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                size = min(window, conn.max_outbound_frame_size)
                if size < len(data):
                    conn.send_data(sid, data[:size])
                    item[0] = data[size:]
                else:
                    conn.send_data(sid, data)
                    self.pending.popleft()
                    self._ack(item[1])  # type: ignore[arg-type]
                dst.touch()
            if not self.pending and self.ended:
                self.closed = True
                if self.trailers is not None:
                    conn.send_headers(sid, self.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                dst.touch()
                self.call.pipe_done(self)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.closed = True
            self.discard()


class Call:
    """One proxied RPC."""

    __slots__ = (
        "authority",
        "backend",
        "bsid",
        "front",
        "fsid",
        "headers",
        "path",
        "request",
        "response",
        "response_started",
        "route",
        "started",
        "state",
        "status",
        "target",
        "timer",
    )

    def __init__(self, front: FrontConnection, fsid: int, headers: Headers) -> None:
        self.front = front
        self.fsid = fsid
        self.headers = headers
        self.started = time.perf_counter()
        limit = front.settings.max_message_bytes
        self.request = Pipe(self, front, fsid, limit)
        self.response = Pipe(self, None, 0, limit)
        self.response.dst = front
        self.response.dst_sid = fsid
        self.backend: BackendConnection | None = None
        self.bsid = 0
        self.target: Target | None = None
        self.state: ServiceState | None = None
        self.route = ""
        self.response_started = False
        self.status = b""
        self.timer: asyncio.TimerHandle | None = None
        self.authority = b""
        self.path = b""

    # --- starting -------------------------------------------------------------------------

    def start(self) -> None:
        timeout = None
        for name, value in self.headers:
            if name == b":authority":
                self.authority = value
            elif name == b":path":
                self.path = value
            elif name == b"grpc-timeout":
                timeout = parse_timeout(value)
        front = self.front
        front.counters.calls += 1
        try:
            self.state, self.route = front.router.route(self.authority, self.path)
            target = self.target = self.state.picker.pick()
        except NoBackendError as exc:
            front.counters.error("no_route" if self.state is None else "no_backend")
            self.fail(CODES["UNAVAILABLE"], f"weighbridge: {exc}")
            return
        target.stats.requests += 1
        target.stats.in_flight += 1
        if timeout is not None:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._deadline, timeout)
        conn = cast(Backend, target.backend).ready_connection()
        if conn is not None:
            self._attach(conn)
        else:
            asyncio.get_running_loop().create_task(self._connect_then_attach())

    async def _connect_then_attach(self) -> None:
        assert self.target is not None
        try:
            conn = await cast(Backend, self.target.backend).connection()
        except ConnectionError as exc:
            self.front.counters.error("connect_failed")
            self.fail(CODES["UNAVAILABLE"], f"weighbridge: {self._who()}: {exc}")
        else:
            self._attach(conn)
        flush_all()

    def _attach(self, conn: BackendConnection) -> None:
        if self.front.calls.get(self.fsid) is not self:
            return  # finished (cancelled, timed out) while connecting
        self.backend = conn
        self.bsid = conn.open_stream(self, self.headers)
        self.request.dst = conn
        self.request.dst_sid = self.bsid
        self.response.src = conn
        self.response.src_sid = self.bsid
        self.request.flush()

    def _who(self) -> str:
        t = self.target
        if t is None:
            return "no backend"
        pod = f", pod {t.endpoint.pod}" if t.endpoint.pod else ""
        return f"backend {t.backend.hostport} (Service {t.service}{pod})"

    # --- events from the backend -------------------------------------------------------------

    def on_response_headers(self, headers: Headers, end_stream: bool) -> None:
        self.response_started = True
        try:
            self.front.h2.send_headers(self.fsid, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.fail(CODES["CANCELLED"], "weighbridge: client went away")
            return
        self.front.touch()
        if end_stream:  # Trailers-Only: the status is in these headers
            self._status_from(headers)
            self.response.closed = True
            self.pipe_done(self.response)

    def on_backend_reset(self, code: int) -> None:
        if self.response_started:
            self._reset_front(code)
            self._complete(ok=False)
        else:
            self.front.counters.error("backend_reset")
            self.fail(
                CODES["UNAVAILABLE"], f"weighbridge: {self._who()} reset the stream ({code!r})"
            )

    def on_backend_lost(self, reason: str) -> None:
        if self.response_started:
            self._reset_front(CANCEL)
            self._complete(ok=False)
        else:
            self.front.counters.error("backend_lost")
            self.fail(CODES["UNAVAILABLE"], f"weighbridge: {self._who()}: {reason}")

    # --- events from the client --------------------------------------------------------------

    def on_front_reset(self) -> None:
        self._reset_backend()
        self._complete(ok=False, status=b"1")

    # --- ending ---------------------------------------------------------------------------

    def pipe_done(self, pipe: Pipe) -> None:
        if pipe is self.response:
            if pipe.trailers is not None:
                self._status_from(pipe.trailers)
            if not self.request.ended:
                # The backend answered before the client finished sending: end the client's
                # half too, as gRPC servers do.
                self._reset_front(NO_ERROR)
            self._complete(ok=self.status == b"0")

    def _status_from(self, headers: Headers) -> None:
        for name, value in headers:
            if name == b"grpc-status":
                self.status = value
                return

    def too_big(self, pipe: Pipe, size: int) -> None:
        self.front.counters.error("message_too_big")
        direction = "request" if pipe is self.request else "response"
        limit = self.front.settings.max_message_bytes
        self.fail(
            CODES["RESOURCE_EXHAUSTED"],
            f"weighbridge: {direction} message of {size} bytes is larger than the proxy's "
            f"limit of {limit} bytes (--max-message-bytes)",
        )

    def _deadline(self, timeout: float) -> None:
        self.timer = None
        self.front.counters.error("deadline_exceeded")
        self.fail(
            CODES["DEADLINE_EXCEEDED"],
            f"weighbridge: deadline of {timeout:g}s exceeded waiting for {self._who()}",
        )
        flush_all()

    def fail(self, code: int, message: str) -> None:
        """End the call with a status of the proxy's own (the backend, if any, is cancelled)."""
        if self.front.calls.get(self.fsid) is not self:
            return
        self._reset_backend()
        self.response.closed = True
        self.response.discard()
        try:
            if self.response_started:
                self.front.h2.send_headers(
                    self.fsid, error_trailers(code, message), end_stream=True
                )
            else:
                self.front.h2.send_headers(self.fsid, error_headers(code, message), end_stream=True)
            if not self.request.ended:
                self.front.h2.reset_stream(self.fsid, NO_ERROR)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.front.touch()
        self._complete(ok=False, status=str(code).encode())

    def _reset_front(self, code: int) -> None:
        try:
            self.front.h2.reset_stream(self.fsid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.front.touch()

    def _reset_backend(self) -> None:
        conn = self.backend
        if conn is None or conn.calls.get(self.bsid) is not self:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            conn.h2.reset_stream(self.bsid, CANCEL)
        conn.touch()

    def _complete(self, *, ok: bool, status: bytes | None = None) -> None:
        if self.front.calls.pop(self.fsid, None) is None:
            return
        if status is not None:
            self.status = status
        self.request.closed = True
        self.request.discard()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.backend is not None:
            self.backend.stream_done(self.bsid)
        t = self.target
        if t is not None:
            t.stats.in_flight -= 1
            t.stats.observe(time.perf_counter() - self.started, ok)
        self.front.on_call_done(self)


class FrontConnection(Http2Connection):
    """The server side of one client's HTTP/2 connection."""

    client_side = False

    def __init__(
        self,
        router: Router,
        settings: ProxySettings,
        counters: ProxyCounters,
        on_close: Callable[[FrontConnection], None],
    ) -> None:
        super().__init__()
        self.router = router
        self.settings = settings
        self.counters = counters
        self.calls: dict[int, Call] = {}
        self._on_close = on_close

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.request.push(event.data, event.flow_controlled_length)
            else:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.RequestReceived):
            call = Call(self, event.stream_id, event.headers)
            self.calls[event.stream_id] = call
            call.start()
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.request.finish(None)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for call in list(self.calls.values()):
                    call.response.flush()
            else:
                call = self.calls.get(event.stream_id)
                if call is not None:
                    call.response.flush()
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.on_front_reset()
        elif isinstance(event, h2.events.TrailersReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.request.finish(event.headers)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    def on_call_done(self, call: Call) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for call in list(self.calls.values()):
            call.on_front_reset()
        self.calls.clear()
        flush_all()
        self._on_close(self)

    def goaway(self) -> None:
        """Graceful shutdown: refuse new streams, let open ones finish."""
        if not self.closed and self.transport is not None:
            # The frame, not h2's close_connection(): that one also moves the state machine to
            # CLOSED, and the streams still open would die with it.
            self.flush()
            frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id)
            self.transport.write(frame.serialize())
