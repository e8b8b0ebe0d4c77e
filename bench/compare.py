"""Weighbridge against the proxies people would otherwise use, and against no proxy at all.

One run measures, on the same two grpc-go echo backends (bench/go/echo) with round robin and
the same load generator (bench/go/loadgen, grpc-go, raw bytes, 64-byte unary calls):

    direct          the load generator calls both backends itself (the limit)
    weighbridge-1   weighbridge-proxy --workers 1 (the Rust data path, the default)
    weighbridge-N   weighbridge-proxy --workers <cores>
    weighbridge-python-1   weighbridge-proxy --engine python (the pure-Python data path, for
                    the before/after of moving the data path to Rust)
    nginx           nginx grpc_pass (Debian package)
    haproxy         HAProxy, proto h2 (Debian package)

Rounds are interleaved (every target once per round) and each figure is the median over
rounds: CPU µs per request of the proxy's processes (/proc utime+stime over the throughput
run), throughput at fixed concurrency, latency p50/p99 at a fixed rate (half of HAProxy's
throughput), RSS of the proxy's processes before and after. Everything runs on loopback and
stops by itself.

    bench/run [--quick] [--json PATH] [--markdown PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procstat import cpu_seconds, rss_mb, tree
from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint

ROOT = testenv.ROOT
AUTHORITY = "echo.default"


def build_go() -> Path:
    out = Path(os.environ.get("WEIGHBRIDGE_CACHE", Path.home() / ".cache/weighbridge")) / "bench"
    subprocess.run(
        ["go", "build", "-o", str(out) + "/", "./..."],
        cwd=ROOT / "bench" / "go",
        check=True,
        env={**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"},
    )
    return out


@dataclass
class Target:
    name: str
    port: int | None  # None: direct
    proc: subprocess.Popen[bytes] | None = None
    runs: list[dict[str, float]] = field(default_factory=list)
    rss_before: float = 0.0
    rss_after: float = 0.0

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []


def nginx_config(work: Path, port: int, backends: list[int]) -> Path:
    conf = work / "nginx.conf"
    servers = "\n".join(f"    server 127.0.0.1:{b};" for b in backends)
    conf.write_text(f"""
worker_processes {os.cpu_count()};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  upstream echo {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://echo; }}
  }}
}}
""")
    return conf


def haproxy_config(work: Path, port: int, backends: list[int]) -> Path:
    conf = work / "haproxy.cfg"
    servers = "\n".join(f"  server s{i} 127.0.0.1:{b} proto h2" for i, b in enumerate(backends))
    conf.write_text(f"""
global
  nbthread {os.cpu_count()}
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{port} proto h2
  default_backend echo
backend echo
  balance roundrobin
{servers}
""")
    return conf


@contextlib.contextmanager
def environment(work: Path, bins: Path) -> Iterator[tuple[list[Target], list[int]]]:
    procs: list[subprocess.Popen[bytes]] = []
    etcd = testenv.Etcd(work)
    etcd.start()
    try:
        backends = [testenv.free_port() for _ in range(2)]
        for i, b in enumerate(backends):
            procs.append(
                subprocess.Popen(
                    [str(bins / "echo"), "-listen", f"127.0.0.1:{b}", "-name", f"b{i}"],
                    stderr=subprocess.DEVNULL,
                )
            )
        scheme = KeyScheme("/bench/")

        async def put() -> None:
            client = store.client(etcd.endpoint)
            await store.put_set(
                client,
                scheme,
                BackendSet(
                    namespace="default",
                    name="echo",
                    strategy="round_robin",
                    endpoints=tuple(Endpoint("127.0.0.1", b) for b in backends),
                ),
            )
            await client.close()

        asyncio.run(put())
        targets = [Target("direct", None)]
        log = (work / "proxies.log").open("wb")
        for name, workers, engine in (
            ("weighbridge-1", 1, "native"),
            (f"weighbridge-{os.cpu_count()}", os.cpu_count() or 2, "native"),
            ("weighbridge-python-1", 1, "python"),
        ):
            port = testenv.free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dataplane.main",
                    "--etcd",
                    etcd.endpoint,
                    "--prefix",
                    scheme.prefix,
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    "127.0.0.1:0",
                    "--workers",
                    str(workers),
                    "--engine",
                    engine,
                    "--log-level",
                    "warning",
                    "--log-format",
                    "json",
                ],
                stdout=log,
                stderr=log,
                cwd=ROOT,
            )
            targets.append(Target(name, port, proc))
        if shutil.which("nginx"):
            port = testenv.free_port()
            conf = nginx_config(work, port, backends)
            targets.append(
                Target(
                    "nginx",
                    port,
                    subprocess.Popen(
                        ["nginx", "-c", str(conf), "-p", str(work)], stdout=log, stderr=log
                    ),
                )
            )
        if shutil.which("haproxy"):
            port = testenv.free_port()
            conf = haproxy_config(work, port, backends)
            targets.append(
                Target(
                    "haproxy",
                    port,
                    subprocess.Popen(["haproxy", "-f", str(conf), "-db"], stdout=log, stderr=log),
                )
            )
        procs += [t.proc for t in targets if t.proc]
        time.sleep(3)
        yield targets, backends
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        etcd.stop()


def loadgen(
    bins: Path, target: Target, backends: list[int], seconds: float, **mode: float
) -> dict[str, float]:
    targets = (
        ",".join(f"127.0.0.1:{b}" for b in backends)
        if target.port is None
        else f"127.0.0.1:{target.port}"
    )
    args = [
        str(bins / "loadgen"),
        "-targets",
        targets,
        "-authority",
        AUTHORITY,
        "-duration",
        f"{seconds}s",
        # Several connections, so that multi-process proxies (nginx workers, weighbridge
        # workers) can use every process: the kernel hands each connection to one of them.
        "-connections",
        "8" if target.port is not None else "4",
    ]
    for k, v in mode.items():
        args += [f"-{k}", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


LIGHT_RATE = 1000
"""req/s of the second latency run."""


def measure(quick: bool) -> dict[str, dict[str, float]]:
    rounds, seconds, concurrency = (2, 3.0, 64) if quick else (5, 10.0, 64)
    bins = build_go()
    with (
        tempfile.TemporaryDirectory(prefix="wb-compare-") as tmp,
        environment(Path(tmp), bins) as (targets, backends),
    ):
        for t in targets:
            loadgen(bins, t, backends, 1.0, concurrency=8)  # warm up connections and caches
            t.rss_before = rss_mb(t.pids())
        rate = 0.0
        for r in range(rounds):
            for t in targets:
                cpu0 = cpu_seconds(t.pids())
                tp = loadgen(bins, t, backends, seconds, concurrency=concurrency)
                cpu = cpu_seconds(t.pids()) - cpu0
                t.runs.append(
                    {
                        "rps": tp["rps"],
                        "errors": tp["errors"],
                        "cpu_us_per_request": cpu / max(tp["requests"], 1) * 1e6,
                    }
                )
            if r == 0:  # the fixed rate: half of HAProxy's throughput (else the best proxy's)
                by_name = {t.name: t.runs[0]["rps"] for t in targets if t.port is not None}
                rate = by_name.get("haproxy", max(by_name.values())) / 2
            for t in targets:
                lat = loadgen(bins, t, backends, seconds, rate=round(rate))
                t.runs[-1].update(
                    {
                        "p50_us": lat["p50_us"],
                        "p99_us": lat["p99_us"],
                        "rate": round(rate),
                        "rate_achieved": lat["rps"],
                        "latency_errors": lat["errors"],
                    }
                )
                # And at a light load, where no process waits for a core: the proxy's own cost.
                light = loadgen(bins, t, backends, seconds / 2, rate=LIGHT_RATE)
                t.runs[-1].update(
                    {"p50_light_us": light["p50_us"], "p99_light_us": light["p99_us"]}
                )
        for t in targets:
            t.rss_after = rss_mb(t.pids())
    results = {}
    for t in targets:
        med = {k: statistics.median(run[k] for run in t.runs) for k in t.runs[0]}
        med.update(
            {
                "rss_mb_before": round(t.rss_before, 1),
                "rss_mb_after": round(t.rss_after, 1),
                "rounds": rounds,
                "seconds_per_run": seconds,
                "concurrency": concurrency,
            }
        )
        if t.port is None:
            med["cpu_us_per_request"] = 0.0  # no proxy process
        results[t.name] = {k: round(v, 1) if isinstance(v, float) else v for k, v in med.items()}
    return results


def ratios(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    h, d = results.get("haproxy"), results.get("direct")
    for name, r in results.items():
        row: dict[str, float | None] = {}
        for key in ("cpu_us_per_request", "rps", "p50_us", "p99_us"):
            if h and h[key]:
                row[f"{key}_vs_haproxy"] = round(r[key] / h[key], 2)
            if d and d[key]:
                row[f"{key}_vs_direct"] = round(r[key] / d[key], 2)
        out[name] = row
    return out


def markdown(results: dict[str, dict[str, float]]) -> str:
    rel = ratios(results)
    lines = [
        "| target | CPU µs/req | x HAProxy | req/s (c=64) | x HAProxy | x direct | p50 µs | p99 µs "
        "| p50 added over direct µs | p50 / p99 µs at 1k req/s | RSS MB before → after |",
        "|" + "---|" * 11,
    ]
    d = results.get("direct", {})
    for name, r in results.items():
        x = rel[name]
        cpu_x = x.get("cpu_us_per_request_vs_haproxy") or "-"
        lines.append(
            f"| {name} | {r['cpu_us_per_request']:.1f} | {cpu_x} "
            f"| {r['rps']:.0f} | {x.get('rps_vs_haproxy', '-')} | {x.get('rps_vs_direct', '-')} "
            f"| {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p50_us'] - d.get('p50_us', 0):.0f} "
            f"| {r['p50_light_us']:.0f} / {r['p99_light_us']:.0f} "
            f"| {r['rss_mb_before']} → {r['rss_mb_after']} |"
        )
    rate = next(iter(results.values()))["rate"]
    lines.append(
        f"\nLatency at {rate:.0f} req/s (half of HAProxy's throughput) and at {LIGHT_RATE} "
        "req/s; medians of "
        f"{next(iter(results.values()))['rounds']} interleaved rounds."
    )
    return "\n".join(lines)


def color(name: str) -> str:
    """One colour per kind of target: no proxy, Weighbridge (Rust, Python), nginx, HAProxy."""
    for part, c in (
        ("python", "#36c"),
        ("weighbridge", "#2a7"),
        ("nginx", "#c63"),
        ("haproxy", "#859"),
    ):
        if part in name:
            return c
    return "#888"


def chart(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(
        axes,
        (
            ("cpu_us_per_request", "CPU µs per request (lower is better)"),
            ("rps", "req/s at 64 in flight (higher is better)"),
            ("p99_us", "p99 µs at half HAProxy load (lower is better)"),
        ),
        strict=True,
    ):
        ax.bar(
            names,
            [results[n][key] for n in names],
            color=[color(n) for n in names],
        )
        ax.set_title(title, fontsize=10)
        if key == "p99_us":
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=8)
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds of 3 s (a few minutes); default 5 rounds of 10 s",
    )
    p.add_argument("--json", type=Path, help="write {targets: {NAME: figures}, ratios: …} here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here")
    p.add_argument("--png", type=Path, help="write a bar chart here")
    args = p.parse_args()
    results = measure(args.quick)
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "targets": results,
                    "ratios": ratios(results),
                    "machine": {"cores": os.cpu_count(), "uname": " ".join(os.uname())},
                },
                indent=2,
            )
        )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.png:
        chart(results, args.png)


if __name__ == "__main__":
    main()
