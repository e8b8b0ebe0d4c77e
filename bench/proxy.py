"""Benchmarks of the proxy (issue: data plane), each against real processes on loopback.

    .venv/bin/python -m bench.proxy [--threads N] update-latency [--changes 200]
    .venv/bin/python -m bench.proxy [--threads N] load [--requests 200000] [--profile]

update-latency  time from an etcd write (wbctl-style put) to the first request that the
                proxy routes by the new set, with requests sent back to back.
load            h2load (nghttp2-client) sends unary gRPC calls through one proxy process to
                two grpc.aio echo backends; reports proxy CPU µs per request (from
                /proc/PID/stat), throughput, and the proxy's RSS sampled during the run.
                --profile runs the proxy under cProfile and prints the hottest functions
                (Python's share only, which carries no calls: for the engine use perf, see
                docs/performance.md).

--threads is the proxy's engine threads (default 1, so that CPU per call is one thread's).

Bounded: fixed request counts, every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.procstat import cpu_seconds, pct, rss_mb
from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint


@contextlib.contextmanager
def processes(
    workdir: Path, profile: Path | None = None, threads: int = 1
) -> Iterator[dict[str, object]]:
    """etcd, two echo backends, one proxy (optionally under cProfile)."""
    etcd = testenv.Etcd(workdir)
    etcd.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [testenv.free_port() for _ in range(3)]
        for name, port in zip("ab", ports, strict=False):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.echo", name, "127.0.0.1", str(port)],
                    stdout=subprocess.DEVNULL,
                )
            )
        scheme = KeyScheme("/bench/")
        proxy_cmd = [
            "-m",
            "dataplane.main",
            "--etcd",
            etcd.endpoint,
            "--prefix",
            scheme.prefix,
            "--listen",
            f"127.0.0.1:{ports[2]}",
            "--admin-listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-level",
            "warning",
            "--log-format",
            "json",
            "--threads",
            str(threads),
        ]
        if profile is not None:
            code = (
                "import cProfile,sys,signal; from dataplane import main as m; p=cProfile.Profile();"
                f"sys.argv=['weighbridge-proxy']+{proxy_cmd[2:]!r}; p.enable()\n"
                "try: m.main()\nexcept SystemExit: pass\n"
                f"finally: p.disable(); p.dump_stats({str(profile)!r})"
            )
            proxy_cmd = ["-c", code]
        proxy = subprocess.Popen(
            [sys.executable, *proxy_cmd], stderr=(workdir / "proxy.log").open("wb")
        )
        procs.append(proxy)
        yield {
            "etcd": etcd,
            "scheme": scheme,
            "backends": ports[:2],
            "port": ports[2],
            "proxy": proxy,
        }
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        etcd.stop()


async def put(env: dict[str, object], strategy: str, ports: list[int]) -> int:
    etcd = store.client(env["etcd"].endpoint)  # type: ignore[attr-defined]
    try:
        return await store.put_set(
            etcd,
            env["scheme"],
            BackendSet(  # type: ignore[arg-type]
                namespace="default",
                name="echo",
                strategy=strategy,
                endpoints=tuple(Endpoint("127.0.0.1", p) for p in ports),
            ),
        )
    finally:
        await etcd.close()


async def wait_ready(port: int) -> grpc.aio.Channel:
    ch = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.default_authority", "echo.default")]
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            await ch.unary_unary("/test.Echo/Unary")(b"", timeout=1)
            return ch
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def update_latency(changes: int, workdir: Path, threads: int) -> None:
    with processes(workdir, threads=threads) as env:
        a, b = env["backends"]  # type: ignore[misc]
        await put(env, "round_robin", [a])
        ch = await wait_ready(env["port"])  # type: ignore[arg-type]
        etcd = store.client(env["etcd"].endpoint)  # type: ignore[attr-defined]
        unary = ch.unary_unary("/test.Echo/Unary")
        out: list[float] = []
        for i in range(changes):
            target = "b" if i % 2 == 0 else "a"
            t0 = time.perf_counter()
            await store.put_set(
                etcd,
                env["scheme"],
                BackendSet(  # type: ignore[arg-type]
                    namespace="default",
                    name="echo",
                    strategy="round_robin",
                    endpoints=(Endpoint("127.0.0.1", b if target == "b" else a),),
                ),
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                call = unary(b"")
                if dict(await call.initial_metadata()).get("x-backend") == target:
                    out.append((time.perf_counter() - t0) * 1000)
                    await call
                    break
                await call
            await asyncio.sleep(0.01)
        await etcd.close()
        await ch.close()
    print(f"etcd write → first request on the new set, {len(out)} changes:")
    print(
        f"  p50 {pct(out, 50):.2f} ms   p90 {pct(out, 90):.2f} ms   p99 {pct(out, 99):.2f} ms   "
        f"max {max(out):.2f} ms   mean {statistics.fmean(out):.2f} ms"
    )


def h2load(
    port: int, requests: int, body: Path, clients: int = 4, streams: int = 16
) -> dict[str, float]:
    cmd = [
        "h2load",
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        ":authority: echo.default",
        f"http://127.0.0.1:{port}/test.Echo/Unary",
    ]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    ok = int(re.search(r"(\d+) succeeded", text).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text).group(1))  # type: ignore[union-attr]
    return {"succeeded": ok, "rps": rps}


def load(requests: int, profile: bool, workdir: Path, threads: int) -> None:
    if shutil.which("h2load") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True)
    body = workdir / "body.bin"
    body.write_bytes(b"\x00" + (64).to_bytes(4, "big") + b"x" * 64)
    prof = workdir / "proxy.prof" if profile else None
    with processes(workdir, prof, threads) as env:
        a, b = env["backends"]  # type: ignore[misc]
        asyncio.run(put(env, "round_robin", [a, b]))
        asyncio.run(_ready(env["port"]))  # type: ignore[arg-type]
        pid = env["proxy"].pid  # type: ignore[attr-defined]
        direct = h2load(a, 20_000, body)
        warm = h2load(env["port"], 10_000, body)  # type: ignore[arg-type]
        rss0, cpu0 = rss_mb([pid]), cpu_seconds([pid])
        samples = [rss0]
        done = 0
        rps: list[float] = []
        chunk = max(requests // 10, 1)
        while done < requests:
            r = h2load(env["port"], chunk, body)  # type: ignore[arg-type]
            done += int(r["succeeded"])
            rps.append(r["rps"])
            samples.append(rss_mb([pid]))
        cpu = cpu_seconds([pid]) - cpu0
    print(
        f"direct to one backend: {direct['rps']:.0f} req/s "
        f"(warm-up through proxy: {warm['rps']:.0f} req/s)"
    )
    print(
        f"through the proxy: {done} requests, "
        f"{statistics.median(rps):.0f} req/s median of 10 rounds"
    )
    print(f"proxy CPU: {cpu / done * 1e6:.1f} µs per request (user+system, /proc/{pid}/stat)")
    print(
        f"proxy RSS MB after warm-up {rss0:.1f}, then per 10%: "
        + " ".join(f"{s:.1f}" for s in samples[1:])
    )
    if prof is not None:
        stats = pstats.Stats(str(prof))
        stats.sort_stats("tottime").print_stats(25)


async def _ready(port: int) -> None:
    ch = await wait_ready(port)
    await ch.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=1, help="the proxy's engine threads (1)")
    sub = p.add_subparsers(dest="what", required=True)
    u = sub.add_parser("update-latency")
    u.add_argument("--changes", type=int, default=200)
    ld = sub.add_parser("load")
    ld.add_argument("--requests", type=int, default=200_000)
    ld.add_argument("--profile", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        if args.what == "update-latency":
            asyncio.run(update_latency(args.changes, Path(tmp), args.threads))
        else:
            load(args.requests, args.profile, Path(tmp), args.threads)


if __name__ == "__main__":
    main()
