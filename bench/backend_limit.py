"""A backend that limits streams per connection: queue calls, or open another connection?

The engine opens another connection to an endpoint (up to ``--max-backend-connections`` per
thread) while every connection it has carries as many streams as the backend allows (its
SETTINGS_MAX_CONCURRENT_STREAMS); ``--max-backend-connections 1`` gives the other behaviour,
one connection with calls queued for a free stream. Both run side by side here, in
interleaved rounds, against one grpc-go echo backend (bench/go/echo) that takes ``--delay``
per call, with and without a stream limit:

    .venv/bin/python -m bench.backend_limit [--rounds 3] [--seconds 4] [--limit 16]

Prints a Markdown table: calls/s, p50/p99 latency, errors and the proxy's CPU µs per call
(median over rounds). Everything runs on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.launch import build_go, cache_dir
from bench.procstat import cpu_seconds
from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint

BIN = cache_dir() / "bench"


@contextlib.contextmanager
def running(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=testenv.ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def put_set(etcd: str, scheme: KeyScheme, name: str, port: int) -> None:
    async def put() -> None:
        client = store.client(etcd)
        endpoints = (Endpoint("127.0.0.1", port),)
        await store.put_set(client, scheme, BackendSet("default", name, "round_robin", endpoints))
        await client.close()

    asyncio.run(put())


def loadgen(port: int, authority: str, seconds: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [
            str(BIN / "loadgen"),
            f"-targets=127.0.0.1:{port}",
            f"-authority={authority}",
            f"-concurrency={concurrency}",
            "-connections=8",
            f"-duration={seconds}s",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    return dict(json.loads(out.stdout))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--limit", type=int, default=16, help="the backend's streams per connection")
    p.add_argument("--delay", default="2ms", help="time each call takes at the backend")
    p.add_argument("--concurrency", type=int, default=128, help="calls in flight")
    args = p.parse_args()
    build_go()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log = work / "bench.log"
        etcd = testenv.Etcd(work, "etcd")
        etcd.start()
        scheme = KeyScheme("/bench/")
        try:
            with contextlib.ExitStack() as stack:
                backends = {"limited": testenv.free_port(), "unlimited": testenv.free_port()}
                for name, port in backends.items():
                    limit = args.limit if name == "limited" else 0
                    stack.enter_context(
                        running(
                            [
                                str(BIN / "echo"),
                                f"-listen=127.0.0.1:{port}",
                                f"-max-streams={limit}",
                                f"-delay={args.delay}",
                            ],
                            log,
                        )
                    )
                    put_set(etcd.endpoint, scheme, name, port)
                proxies = {}
                for variant, conns in (("queue (1 connection)", 1), ("extra connections", 8)):
                    port = testenv.free_port()
                    proc = stack.enter_context(
                        running(
                            [
                                sys.executable,
                                "-m",
                                "dataplane.main",
                                *("--etcd", etcd.endpoint, "--prefix", scheme.prefix),
                                *("--listen", f"127.0.0.1:{port}", "--threads", "1"),
                                *("--admin-listen", "", "--metrics-listen", ""),
                                *("--health-listen", ""),
                                *(
                                    "--max-backend-connections",
                                    str(conns),
                                    "--log-level",
                                    "warning",
                                ),
                            ],
                            log,
                        )
                    )
                    proxies[variant] = (port, proc)
                for port, _ in proxies.values():
                    for name in backends:  # warm up, and wait until the sets are applied
                        loadgen(port, f"{name}.default", 1.0, 8)
                samples: dict[tuple[str, str], list[dict[str, float]]] = {}
                for _ in range(args.rounds):
                    for backend in backends:
                        for variant, (port, proc) in proxies.items():
                            before = cpu_seconds([proc.pid])
                            r = loadgen(port, f"{backend}.default", args.seconds, args.concurrency)
                            r["cpu_us"] = (
                                (cpu_seconds([proc.pid]) - before) / max(r["requests"], 1) * 1e6
                            )
                            samples.setdefault((backend, variant), []).append(r)
        finally:
            etcd.stop()
    print(
        f"{args.rounds} interleaved rounds of {args.seconds} s, {args.concurrency} calls in "
        f"flight over 8 client connections, 1 engine thread, backend delay {args.delay}; "
        f"limited = {args.limit} streams per connection; medians\n"
    )
    print("| backend | proxy | calls/s | p50 µs | p99 µs | errors | proxy CPU µs/call |")
    print("|---|---|---|---|---|---|---|")
    for (backend, variant), rs in samples.items():

        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"| {backend} | {variant} | {med('rps'):.0f} | {med('p50_us'):.0f} | "
            f"{med('p99_us'):.0f} | {med('errors'):.0f} | {med('cpu_us'):.1f} |"
        )


if __name__ == "__main__":
    main()
