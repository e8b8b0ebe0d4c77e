"""A gRPC echo server for the cluster tests' backend pods (the ``backend`` image of
scripts/build-images runs it).

``/test.Echo/Unary`` answers with the request's bytes and the response header ``x-backend``
naming the pod (``$POD_NAME``, else the host name), so a test can count which pod each call
reached; a request header ``x-delay-ms: N`` holds the answer N ms (at most 10 s), so a test can
keep calls in flight; ``grpc.health.v1`` reports SERVING for the kubelet's readiness probe
until SIGTERM, then NOT_SERVING while calls in flight finish (``$GRACE`` seconds, 5 by
default).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

NAME = os.environ.get("POD_NAME") or socket.gethostname()


async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await context.send_initial_metadata((("x-backend", NAME),))
    for key, value in context.invocation_metadata() or ():
        if key == "x-delay-ms":
            await asyncio.sleep(min(float(value), 10_000.0) / 1000)
    return request


async def serve() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
            ),
        )
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"[::]:{os.environ.get('PORT', '50051')}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(float(os.environ.get("GRACE", "5")))


if __name__ == "__main__":
    asyncio.run(serve())
