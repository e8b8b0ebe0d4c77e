"""A real grpc.aio test backend with raw-bytes methods of all four RPC kinds.

Every call answers with response header ``x-backend: NAME`` and records what it saw, so tests
can check what went through the proxy. Request metadata steers it:
``x-status``/``x-details`` end the call with that status (and a binary
``grpc-status-details-bin`` trailer); ``x-sleep`` sleeps that many seconds first.

Backend-wide: ``fail`` answers every call at once with that status and no response headers
(Trailers-Only, as a failing gRPC server does); ``health`` serves ``grpc.health.v1`` whose
status tests set; ``options`` are gRPC server options (e.g. ``grpc.max_connection_age_ms``);
``tls`` serves TLS only, with these server credentials; ``delay`` seconds pass before every
call's response headers (a slow backend).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

SERVICE = "test.Echo"


@dataclass
class Seen:
    metadata: dict[str, Any]
    time_remaining: float | None
    cancelled: bool = False


@dataclass
class EchoBackend:
    name: str
    host: str = "127.0.0.1"
    port: int = 0
    calls: int = 0
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    server: grpc.aio.Server | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    fail: grpc.StatusCode | None = None
    health: Any = None
    options: tuple[tuple[str, Any], ...] = ()
    tls: grpc.ServerCredentials | None = None
    delay: float = 0.0

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                *self.options,
            ]
        )
        self.server.add_generic_rpc_handlers((_Handler(self),))
        if self.health is not None:
            from grpc_health.v1 import health_pb2_grpc

            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{self.host}:{port}"
        if self.tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.tls)
        await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            await self.server.stop(grace)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, backend: EchoBackend) -> None:
        self.b = backend

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]  # type: ignore[union-attr]
        b = self.b

        async def begin(context: grpc.aio.ServicerContext) -> Seen:
            b.calls += 1
            if b.fail is not None:
                b.seen.append(
                    Seen({m.key: m.value for m in context.invocation_metadata() or ()}, None)
                )
                await context.abort(b.fail, f"{b.name} fails every call")
            md = {m.key: m.value for m in context.invocation_metadata() or ()}
            seen = Seen(md, context.time_remaining())
            b.seen.append(seen)
            if b.delay:
                await asyncio.sleep(b.delay)
            await context.send_initial_metadata(
                (
                    ("x-backend", b.name),
                    *((f"echo-{k}", v) for k, v in md.items() if k.startswith("x-")),
                )
            )
            if "x-sleep" in md:
                await asyncio.sleep(float(md["x-sleep"]))
            return seen

        async def end(context: grpc.aio.ServicerContext, md: dict[str, Any]) -> None:
            trailers: list[tuple[str, Any]] = [
                ("x-trailer", "t-" + b.name),
                ("x-raw-bin", b"\x00\xffraw"),
            ]
            if "x-status" in md:
                trailers.append(("grpc-status-details-bin", b"\x08\x03\x12\x05rich!"))
                context.set_trailing_metadata(trailers)
                # Non-ASCII on purpose: grpc-message is percent-encoded on the wire.
                details = md.get("x-details", "") + " (échec, 失敗)"
                await context.abort(grpc.StatusCode(_code(int(md["x-status"]))), details)
            context.set_trailing_metadata(trailers)

        async def tracked(context: grpc.aio.ServicerContext, body: Any) -> Any:
            b.in_flight += 1
            try:
                return await body
            except asyncio.CancelledError:
                if b.seen:
                    b.seen[-1].cancelled = True
                raise
            finally:
                b.in_flight -= 1

        if method == "Unary":

            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                async def body() -> bytes:
                    seen = await begin(context)
                    await end(context, seen.metadata)
                    return request

                return await tracked(context, body())

            return grpc.unary_unary_rpc_method_handler(unary)
        if method == "ClientStream":

            async def client_stream(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> bytes:
                async def body() -> bytes:
                    seen = await begin(context)
                    total = [len(r) async for r in requests]
                    await end(context, seen.metadata)
                    return f"{len(total)}:{sum(total)}".encode()

                return await tracked(context, body())

            return grpc.stream_unary_rpc_method_handler(client_stream)
        if method == "ServerStream":

            async def server_stream(
                request: bytes, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                seen = await begin(context)
                b.in_flight += 1
                try:
                    for i in range(int(request or b"3")):
                        if "x-hold" in seen.metadata and i == 1:
                            await b.release.wait()
                        if "x-interval" in seen.metadata and i > 0:
                            await asyncio.sleep(float(seen.metadata["x-interval"]))
                        yield f"{b.name}:{i}".encode()
                    await end(context, seen.metadata)
                except asyncio.CancelledError:
                    seen.cancelled = True
                    raise
                finally:
                    b.in_flight -= 1

            return grpc.unary_stream_rpc_method_handler(server_stream)
        if method == "Bidi":

            async def bidi(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                seen = await begin(context)
                b.in_flight += 1
                try:
                    async for r in requests:
                        yield b.name.encode() + b":" + r
                    await end(context, seen.metadata)
                except asyncio.CancelledError:
                    seen.cancelled = True
                    raise
                finally:
                    b.in_flight -= 1

            return grpc.stream_stream_rpc_method_handler(bidi)
        return None


def _code(n: int) -> tuple[int, str]:
    return next(c.value for c in grpc.StatusCode if c.value[0] == n)


@contextlib.asynccontextmanager
async def echo_backends(*names: str, host: str = "127.0.0.1") -> AsyncIterator[list[EchoBackend]]:
    backends = [EchoBackend(n, host=host) for n in names]
    for b in backends:
        await b.start()
    try:
        yield backends
    finally:
        for b in backends:
            await b.stop(0)


async def _serve(name: str, host: str, port: int) -> None:
    import signal

    backend = EchoBackend(name, host=host)
    await backend.start(port)
    print(f"echo {name} listening on {backend.hostport}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backend.stop(1)


def main() -> None:
    """``python -m tests.echo NAME HOST PORT``: run one echo backend until SIGTERM."""
    import sys

    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(_serve(name, host, port))


if __name__ == "__main__":
    main()
