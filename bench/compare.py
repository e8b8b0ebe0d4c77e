"""Weighbridge against the proxies people would otherwise use, and against no proxy at all.

One run measures, on the same two grpc-go echo backends (bench/go/echo) with round robin and
the same load generator (bench/go/loadgen, grpc-go, raw bytes, 64-byte unary calls, 8 client
connections to every proxy):

    direct          the load generator calls both backends itself (the limit)
    xds             the load generator built with grpc-go's xDS client (loadgen-xds) dials
                    xds:///echo.default and calls both backends itself, told where they are
                    by a Weighbridge proxy's xDS server (--xds-listen; it carries no call)
    weighbridge-1t  weighbridge-proxy --threads 1
    weighbridge-2t  weighbridge-proxy --threads 2
    before-1        with --baseline REV only: REV's weighbridge-proxy on one engine thread
                    (--threads 1; a revision from before issue 9 gets its equivalent,
                    --workers 1 --engine native), for "not worse than before" in the same run
    nginx           nginx grpc_pass (Debian package), a worker per core
    haproxy         HAProxy, proto h2 (Debian package), a thread per core

and with --tls, the same proxies terminating TLS on their client port (backends stay
plaintext), all with one ECDSA P-256 certificate made by the openssl CLI in the run's
temporary directory, TLS 1.3 only, TLS_AES_128_GCM_SHA256 and X25519 where the proxy lets one
choose, ALPN h2, the load generator's 8 connections reused for the whole run:

    weighbridge-1t-tls  weighbridge-proxy --threads 1 --tls-cert … --tls-key …
    nginx-tls           listen … ssl http2, grpc_pass grpc://
    haproxy-tls         bind … ssl crt … alpn h2, proto h2 to the servers

What each TLS target negotiated is reported twice: with the load generator (grpc-go, TLS 1.3
and X25519 only; Go chooses the TLS 1.3 suite itself) and with `openssl s_client -alpn h2`
offering OpenSSL's defaults, which shows the suite a proxy prefers when offered a choice.

Rounds are interleaved (every target once per round) and each figure is the median over
rounds: CPU µs per request of the proxy's processes (/proc utime+stime over the throughput
run), throughput at fixed concurrency, latency p50/p99 at a fixed rate (half of HAProxy's
throughput) and at 1k req/s, RSS of the proxy's processes before and after. During each
throughput run it also reads who uses the cores: the proxy (and each Weighbridge engine
thread), the load generator, the backends, everything else on the machine, idle.

--baseline REV prepares, once, a detached `git worktree` of REV and a virtualenv for it,
both cached outside the checkout in ~/.cache/weighbridge/baseline/<commit>/ (src/, venv/,
and target/ for cargo), and adds REV's proxy as target before-1. Everything runs on
loopback and stops by itself.

    bench/run [--quick | --rounds N --seconds S] [--baseline REV] [--tls] [--targets A,B,…]
              [--json PATH] [--markdown PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from bench.launch import (
    AUTHORITY,
    Baseline,
    ProxySpec,
    TLSFiles,
    build_go,
    git,
    haproxy_config,
    make_tls,
    nginx_config,
    prepare_baseline,
    put_set,
    start_haproxy,
    start_nginx,
    start_weighbridge,
    stop,
)
from bench.launch import ROOT as ROOT  # re-exported: bench/tuning.py imports it from here
from bench.launch import cache_dir as cache_dir  # re-exported, as ROOT
from bench.procstat import cpu_seconds, machine_cpu_seconds, rss_mb, thread_cpu_seconds, tree
from devtools import testenv

CONNECTIONS = 8
"""Client connections to a proxy (direct: half as many to each of the two backends): enough
for every thread or worker of a proxy to get some, since the kernel hands each accepted
connection to one of them and a connection stays where it landed."""

OTHERS = frozenset({"direct", "xds", "nginx", "haproxy", "nginx-tls", "haproxy-tls"})
"""The targets that are not Weighbridge."""

TLS_TARGETS = frozenset({"weighbridge-1t-tls", "nginx-tls", "haproxy-tls"})
"""The targets that terminate TLS (--tls); each is its h2c namesake with "-tls" appended."""


@dataclass
class Target:
    name: str
    port: int | None  # None: the load generator calls the backends (direct, xds)
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int | None = None  # a Weighbridge proxy's /metrics
    xds_port: int | None = None  # the load generator's xDS server (target xds)
    runs: list[dict[str, float]] = field(default_factory=list)
    threads: list[dict[str, float]] = field(default_factory=list)  # per round, per thread
    rss_before: float = 0.0
    rss_after: float = 0.0
    tls: TLSFiles | None = None  # the target serves TLS with this certificate
    negotiated: list[str] = field(default_factory=list)  # the load generator's TLS states
    s_client: str = ""  # what openssl s_client negotiated

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []


def weighbridge_specs(baseline: Baseline | None, tls: TLSFiles | None = None) -> list[ProxySpec]:
    specs = [
        ProxySpec("weighbridge-1t", ["--threads", "1"]),
        ProxySpec("weighbridge-2t", ["--threads", "2"]),
    ]
    if tls is not None:
        specs.append(ProxySpec("weighbridge-1t-tls", ["--threads", "1"], tls=tls))
    if baseline is not None:
        threads = "--threads" in (baseline.src / "dataplane" / "main.py").read_text()
        specs.append(
            ProxySpec(
                "before-1",
                ["--threads", "1"] if threads else ["--workers", "1", "--engine", "native"],
                python=baseline.python,
                cwd=baseline.src,
            )
        )
    return specs


@dataclass
class Env:
    targets: list[Target]
    backends: list[int]
    backend_procs: list[subprocess.Popen[bytes]]


@contextlib.contextmanager
def environment(
    work: Path,
    bins: Path,
    specs: list[ProxySpec],
    others: AbstractSet[str] = OTHERS,
    tls: TLSFiles | None = None,
) -> Iterator[Env]:
    """etcd, two echo backends, a proxy per spec, and those of direct, nginx, HAProxy (and,
    with ``tls``, nginx-tls and haproxy-tls) named in ``others``; h2c targets first."""
    procs: list[subprocess.Popen[bytes]] = []
    etcd = testenv.Etcd(work)
    etcd.start()
    try:
        backends = [testenv.free_port() for _ in range(2)]
        backend_procs = [
            subprocess.Popen(
                [str(bins / "echo"), "-listen", f"127.0.0.1:{b}", "-name", f"b{i}"],
                stderr=subprocess.DEVNULL,
            )
            for i, b in enumerate(backends)
        ]
        procs += backend_procs
        put_set(etcd.endpoint, backends)
        targets = [Target("direct", None)] if "direct" in others else []
        log = (work / "proxies.log").open("wb")
        if "xds" in others:
            xds, metrics = testenv.free_port(), testenv.free_port()
            flags = ["--threads", "1", "--xds-listen", f"127.0.0.1:{xds}"]
            spec = ProxySpec("xds", [*flags, "--xds-namespaces", "default"])
            proc = start_weighbridge(spec, etcd.endpoint, testenv.free_port(), metrics, log)
            targets.append(Target("xds", None, proc, metrics_port=metrics, xds_port=xds))
        for spec in specs:
            port, metrics = testenv.free_port(), testenv.free_port()
            proc = start_weighbridge(spec, etcd.endpoint, port, metrics, log)
            targets.append(Target(spec.name, port, proc, metrics_port=metrics, tls=spec.tls))
        for files in (None, tls) if tls else (None,):
            suffix = "-tls" if files else ""
            # Each in a directory of its own: nginx and nginx-tls must not share a pid file.
            name, home = f"nginx{suffix}", work / f"nginx{suffix}"
            if name in others and shutil.which("nginx"):
                port = testenv.free_port()
                home.mkdir(exist_ok=True)
                conf = nginx_config(home, port, backends, tls=files)
                targets.append(Target(name, port, start_nginx(home, conf, log), tls=files))
            name, home = f"haproxy{suffix}", work / f"haproxy{suffix}"
            if name in others and shutil.which("haproxy"):
                port = testenv.free_port()
                home.mkdir(exist_ok=True)
                conf = haproxy_config(home, port, backends, tls=files)
                targets.append(Target(name, port, start_haproxy(conf, log), tls=files))
        targets.sort(key=lambda t: t.tls is not None)
        procs += [t.proc for t in targets if t.proc]
        time.sleep(3)
        for t in targets:
            if t.proc is not None and t.proc.poll() is not None:
                raise RuntimeError(f"{t.name} exited at start; see {work / 'proxies.log'}")
        yield Env(targets, backends, backend_procs)
    finally:
        stop(procs)
        etcd.stop()


def loadgen(
    bins: Path,
    target: Target,
    backends: list[int],
    seconds: float,
    connections: int = CONNECTIONS,
    **mode: float,
) -> dict[str, float]:
    """One loadgen run; adds ``cpu_s``, the load generator's own CPU seconds."""
    env = None
    if target.xds_port is not None:  # as many connections to each backend as direct
        targets, per_target = f"xds:///{AUTHORITY}", max(connections // len(backends), 1)
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": xds_bootstrap(target.xds_port)}
    elif target.port is None:
        targets = ",".join(f"127.0.0.1:{b}" for b in backends)
        per_target = max(connections // len(backends), 1)
    else:
        targets, per_target = f"127.0.0.1:{target.port}", connections
    tls = target.tls
    args = [
        str(bins / ("loadgen" if env is None else "loadgen-xds")),
        "-targets",
        targets,
        *(["-authority", AUTHORITY] if env is None else []),
        "-duration",
        f"{seconds}s",
        "-connections",
        str(per_target),
        *(["-tls-ca", str(tls.ca), "-tls-server-name", tls.server_name] if tls else []),
    ]
    for k, v in mode.items():
        args += [f"-{k}", str(v)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen against {target.name} failed: {out.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw = json.loads(out.stdout)
    target.negotiated = raw.pop("tls", None) or []
    result: dict[str, float] = raw
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def xds_bootstrap(port: int) -> str:
    """A gRPC xDS bootstrap naming the xDS server on loopback ``port`` (docs/xds.md)."""
    server = {
        "server_uri": f"127.0.0.1:{port}",
        "channel_creds": [{"type": "insecure"}],
        "server_features": ["xds_v3", "ignore_resource_deletion"],
    }
    return json.dumps({"xds_servers": [server], "node": {"id": "bench-loadgen"}})


def engine_threads(pid: int) -> dict[str, float]:
    """CPU seconds of a Weighbridge proxy's engine threads (weighbridge-N; before issue 9
    weighbridge-data, which /proc shortens to weighbridge-dat) and of the rest (Python)."""
    out: dict[str, float] = {"python": 0.0}
    for name, s in thread_cpu_seconds(pid).items():
        key = name if re.fullmatch(r"weighbridge-(\d+|data?)", name) else "python"
        out[key] = out.get(key, 0.0) + s
    return out


def thread_counts(metrics_port: int) -> dict[str, dict[str, float]]:
    """Per engine thread: calls and connections accepted (the proxy's /metrics)."""
    out: dict[str, dict[str, float]] = {}
    with contextlib.suppress(OSError):
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for m in re.finditer(
            r'^weighbridge_proxy_thread_(calls|connections)_total\{thread="(\d+)"\} (\S+)$',
            text,
            re.M,
        ):
            out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return out


@dataclass
class Cores:
    """Who used the machine's cores during one run, in cores (CPU seconds per second)."""

    wall: float
    machine0: dict[str, float]
    proxy0: float
    backends0: float
    threads0: dict[str, float]
    counts0: dict[str, dict[str, float]]

    @classmethod
    def start(cls, target: Target, backend_pids: list[int]) -> Cores:
        counts = thread_counts(target.metrics_port) if target.metrics_port else {}
        return cls(
            time.monotonic(),
            machine_cpu_seconds(),
            cpu_seconds(target.pids()),
            cpu_seconds(backend_pids),
            engine_threads(target.proc.pid) if target.metrics_port and target.proc else {},
            counts,
        )

    def stop(self, target: Target, backend_pids: list[int], loadgen_s: float) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        machine = {k: v - self.machine0[k] for k, v in machine_cpu_seconds().items()}
        busy = machine["busy"]
        proxy = cpu_seconds(target.pids()) - self.proxy0
        backends = cpu_seconds(backend_pids) - self.backends0
        out = {
            "cores_proxy": proxy / wall,
            "cores_loadgen": loadgen_s / wall,
            "cores_backends": backends / wall,
            "cores_other": max(busy - proxy - backends - loadgen_s, 0.0) / wall,
            "cores_steal": machine["steal"] / wall,
            "cores_idle": machine["idle"] / wall,
            "proxy_cpu_s": proxy,
        }
        if self.threads0 and target.proc:
            for name, s in engine_threads(target.proc.pid).items():
                out[f"cores_thread_{name}"] = (s - self.threads0.get(name, 0.0)) / wall
        if self.counts0 and target.metrics_port:
            # Which engine thread accepted this run's connections, and carried its calls.
            for thread, now in thread_counts(target.metrics_port).items():
                was = self.counts0.get(thread, {})
                for k in ("connections", "calls"):
                    out[f"{k}_thread_{thread}"] = now.get(k, 0.0) - was.get(k, 0.0)
        return out


LIGHT_RATE = 1000
"""req/s of the second latency run."""


def selection(
    work: Path, baseline: Baseline | None, only: AbstractSet[str] | None, tls: bool
) -> tuple[list[ProxySpec], set[str], TLSFiles | None]:
    """The Weighbridge proxies and the other targets to run: ``only`` those (default: every
    h2c target), and with ``tls`` the TLS targets too; their certificate is made in ``work``."""

    def chosen(name: str) -> bool:
        if only is not None and name in only:
            return True
        return tls if name in TLS_TARGETS else only is None

    files = make_tls(work / "tls") if any(map(chosen, TLS_TARGETS)) else None
    specs = [s for s in weighbridge_specs(baseline, files) if chosen(s.name)]
    return specs, set(filter(chosen, OTHERS)), files


def s_client(target: Target) -> str:
    """What ``openssl s_client -alpn h2`` negotiates with a TLS target when it offers
    OpenSSL's defaults (TLS 1.2 and 1.3, all three TLS 1.3 suites with AES-256 first, X25519
    first): version, suite, key exchange, ALPN, the server's signature, verification."""
    assert target.tls is not None
    out = subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{target.port}", "-alpn", "h2"),
            *("-servername", target.tls.server_name, "-CAfile", str(target.tls.ca)),
        ],
        input="",
        capture_output=True,
        text=True,
        errors="replace",  # it prints what the server sends: HTTP/2 frames
        timeout=30,
    ).stdout
    found = []
    for pattern in (
        r"^New, (\S+), Cipher is (\S+)",
        r"^Server Temp Key: ([^,\n]+)",
        r"^(ALPN protocol: \S+|No ALPN negotiated)",
        r"^Peer signature type: (\S+)",
        r"^Server public key is (\d+) bit",
        r"^\s*Verify return code: (\d+ \([^)]*\))",
    ):
        m = re.search(pattern, out, re.M)
        found.append(" ".join(m.groups()) if m else "?")
    version_suite, group, alpn, signature, bits, verify = found
    return (
        f"{version_suite} {group} {alpn.replace('ALPN protocol: ', 'alpn=')} "
        f"key={signature}-{bits} verify={verify}"
    )


def measure(
    rounds: int,
    seconds: float,
    baseline: Baseline | None,
    only: set[str] | None = None,
    concurrency: int = 64,
    *,
    tls: bool = False,
) -> dict[str, dict[str, object]]:
    bins = build_go(xds=only is None or "xds" in only)
    with (
        tempfile.TemporaryDirectory(prefix="wb-compare-") as tmp,
        environment(Path(tmp), bins, *selection(Path(tmp), baseline, only, tls)) as env,
    ):
        targets, backends = env.targets, env.backends
        backend_pids = [p.pid for p in env.backend_procs]
        for t in targets:
            loadgen(bins, t, backends, 1.0, concurrency=8)  # warm up connections and caches
            t.rss_before = rss_mb(t.pids())
            if t.tls is not None:
                t.s_client = s_client(t)
        rate = 0.0
        for r in range(rounds):
            for t in targets:
                cores = Cores.start(t, backend_pids)
                tp = loadgen(bins, t, backends, seconds, concurrency=concurrency)
                used = cores.stop(t, backend_pids, tp["cpu_s"])
                cpu = used.pop("proxy_cpu_s")
                per_thread = {k: used.pop(k) for k in list(used) if "_thread_" in k}
                if per_thread:
                    used["cores_engine"] = sum(
                        v for k, v in per_thread.items() if k.startswith("cores_thread_weighb")
                    )
                    t.threads.append({k: round(v, 3) for k, v in per_thread.items()})
                t.runs.append(
                    {
                        "rps": tp["rps"],
                        "errors": tp["errors"],
                        "cpu_us_per_request": cpu / max(tp["requests"], 1) * 1e6,
                        **used,
                    }
                )
            if r == 0:  # the fixed rate: half of HAProxy's throughput (else the best proxy's)
                by_name = {t.name: t.runs[0]["rps"] for t in targets if t.port is not None}
                by_name = by_name or {t.name: t.runs[0]["rps"] for t in targets}  # no proxy
                rate = by_name.get("haproxy", by_name.get("haproxy-tls", max(by_name.values())))
                rate /= 2
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
    results: dict[str, dict[str, object]] = {}
    for t in targets:
        keys = dict.fromkeys(k for run in t.runs for k in run)
        med: dict[str, object] = {
            k: round(statistics.median(run.get(k, 0.0) for run in t.runs), 2) for k in keys
        }
        med.update(
            {
                "rss_mb_before": round(t.rss_before, 1),
                "rss_mb_after": round(t.rss_after, 1),
                "rounds": rounds,
                "seconds_per_run": seconds,
                "concurrency": concurrency,
                "connections": CONNECTIONS,
            }
        )
        for k in ("cpu_us_per_request", "rps"):
            med[f"{k}_by_round"] = [round(run[k], 1) for run in t.runs]
        if t.threads:
            med["threads_by_round"] = t.threads
        if t.tls is not None:
            med["tls_loadgen"] = "; ".join(t.negotiated)
            med["tls_s_client"] = t.s_client
        if t.proc is None:
            med["cpu_us_per_request"] = 0.0  # no proxy process
        results[t.name] = med
    return results


def ratios(results: dict[str, dict[str, object]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        row: dict[str, float] = {}
        h2c = name.removesuffix("-tls") if name in TLS_TARGETS else ""
        for other, label in (
            *((o, o) for o in ("haproxy", "haproxy-tls", "direct", "before-1", "weighbridge-1t")),
            (h2c, "h2c"),  # a TLS target against the same proxy without TLS
        ):
            o = results.get(other)
            if o is None or other == name:
                continue
            for key in ("cpu_us_per_request", "rps", "p50_us", "p99_us"):
                a, b = r[key], o[key]
                if isinstance(a, float | int) and isinstance(b, float | int) and b:
                    row[f"{key}_vs_{label}"] = round(a / b, 2)
        out[name] = row
    return out


def haproxy_of(name: str) -> str:
    """The HAProxy a target is compared with: haproxy-tls for a TLS target."""
    return "haproxy-tls" if name in TLS_TARGETS else "haproxy"


def _f(r: dict[str, object], key: str) -> float:
    v = r.get(key, 0.0)
    return float(v) if isinstance(v, float | int) else 0.0


def markdown(results: dict[str, dict[str, object]]) -> str:
    rel = ratios(results)
    before = "before-1" in results
    tls = [n for n in results if n in TLS_TARGETS]
    lines = [
        "| target | CPU µs/req | x HAProxy "
        + ("| x before-1 " if before else "")
        + ("| x h2c " if tls else "")
        + "| req/s (c=64) | x HAProxy | x direct | p50 µs | p99 µs "
        "| p50 added over direct µs | p50 / p99 µs at 1k req/s | RSS MB before → after |",
        "|" + "---|" * (11 + before + bool(tls)),
    ]
    d = results.get("direct", {})
    for name, r in results.items():
        x = rel[name]
        proxy = bool(r.get("cpu_us_per_request"))
        ha = haproxy_of(name)
        cpu_x = x.get(f"cpu_us_per_request_vs_{ha}", "-") if proxy else "-"
        cpu_b = x.get("cpu_us_per_request_vs_before-1", "-") if proxy else "-"
        lines.append(
            f"| {name} | {_f(r, 'cpu_us_per_request'):.1f} | {cpu_x} "
            + (f"| {cpu_b} " if before else "")
            + (f"| {x.get('cpu_us_per_request_vs_h2c', '-')} " if tls else "")
            + f"| {_f(r, 'rps'):.0f} | {x.get(f'rps_vs_{ha}', '-')} "
            f"| {x.get('rps_vs_direct', '-')} "
            f"| {_f(r, 'p50_us'):.0f} | {_f(r, 'p99_us'):.0f} "
            f"| {_f(r, 'p50_us') - _f(d, 'p50_us'):.0f} "
            f"| {_f(r, 'p50_light_us'):.0f} / {_f(r, 'p99_light_us'):.0f} "
            f"| {r['rss_mb_before']} → {r['rss_mb_after']} |"
        )
    first = next(iter(results.values()))
    lines.append(
        f"\nLatency at {_f(first, 'rate'):.0f} req/s (half of HAProxy's throughput) and at "
        f"{LIGHT_RATE} req/s; medians of {first['rounds']} interleaved rounds of "
        f"{first['seconds_per_run']} s, {CONNECTIONS} client connections."
        + (
            " A -tls target's x HAProxy is against haproxy-tls; x h2c is its CPU per call "
            "against the same proxy's without TLS."
            if tls
            else ""
        )
    )
    lines += [
        "",
        f"Who used the {os.cpu_count()} cores during the throughput runs (cores, medians; "
        "other: every other process and the kernel's work not charged to one; steal: taken by "
        "the hypervisor from this VM):",
        "",
        "| target | proxy | of which engine threads | load generator | backends | other | steal "
        "| idle | each round: connections per engine thread (cores each) |",
        "|" + "---|" * 9,
    ]
    for name, r in results.items():
        rounds = r.get("threads_by_round")
        split = "-"
        if isinstance(rounds, list) and any("connections_thread_0" in x for x in rounds):
            split = ", ".join(thread_split(x) for x in rounds)
        engine = f"{_f(r, 'cores_engine'):.2f}" if "cores_engine" in r else "-"
        lines.append(
            f"| {name} | {_f(r, 'cores_proxy'):.2f} | {engine} "
            f"| {_f(r, 'cores_loadgen'):.2f} | {_f(r, 'cores_backends'):.2f} "
            f"| {_f(r, 'cores_other'):.2f} | {_f(r, 'cores_steal'):.2f} "
            f"| {_f(r, 'cores_idle'):.2f} | {split} |"
        )
    if tls:
        lines += [
            "",
            "What each TLS target negotiated (version, suite, key exchange, ALPN, server key):",
            "",
            "| target | load generator (grpc-go; TLS 1.3, X25519 only) "
            "| openssl s_client -alpn h2 (OpenSSL's default offer) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {n} | {results[n].get('tls_loadgen') or '?'} | {results[n].get('tls_s_client')} |"
            for n in tls
        ]
        cpu = rel.get("weighbridge-1t-tls", {}).get("cpu_us_per_request_vs_haproxy-tls")
        if cpu is not None:
            h2c = rel.get("weighbridge-1t", {}).get("cpu_us_per_request_vs_haproxy", "-")
            lines.append(
                f"\nCPU per call, weighbridge-1t-tls / haproxy-tls: **{cpu}x** "
                f"(over h2c in the same run, weighbridge-1t / haproxy: {h2c}x)."
            )
    return "\n".join(lines)


def thread_split(run: dict[str, float]) -> str:
    """'5/3 (0.31/0.18)': connections each engine thread accepted in a run, and its cores."""
    n = sum(1 for k in run if k.startswith("connections_thread_"))
    conns = "/".join(f"{run[f'connections_thread_{i}']:.0f}" for i in range(n))
    cores = "/".join(f"{run.get(f'cores_thread_weighbridge-{i}', 0.0):.2f}" for i in range(n))
    return f"{conns} ({cores})"


def color(name: str) -> str:
    """One colour per kind of target: no proxy, Weighbridge, its baseline, nginx, HAProxy."""
    for part, c in (
        ("before", "#36c"),
        ("weighbridge", "#2a7"),
        ("nginx", "#c63"),
        ("haproxy", "#859"),
    ):
        if part in name:
            return c
    return "#888"


def chart(results: dict[str, dict[str, object]], path: Path) -> None:
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
        ax.bar(names, [_f(results[n], key) for n in names], color=[color(n) for n in names])
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
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick: 2)")
    p.add_argument("--seconds", type=float, help="seconds per run (default 10; --quick: 3)")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure REV's proxy on one engine thread as target before-1",
    )
    p.add_argument(
        "--targets",
        type=lambda s: set(s.split(",")),
        help="only these targets, comma-separated (default: all of the h2c ones)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="also run the TLS targets: " + ", ".join(sorted(TLS_TARGETS)),
    )
    p.add_argument("--json", type=Path, help="write {targets: {NAME: figures}, ratios: …} here")
    p.add_argument("--markdown", type=Path, help="write the Markdown tables here")
    p.add_argument("--png", type=Path, help="write a bar chart here")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    baseline = prepare_baseline(args.baseline) if args.baseline else None
    load0 = os.getloadavg()
    started = time.time()
    results = measure(rounds, seconds, baseline, args.targets, tls=args.tls)
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "targets": results,
                    "ratios": ratios(results),
                    "baseline": baseline.commit if baseline else None,
                    "commit": git("rev-parse", "HEAD"),
                    "machine": {
                        "cores": os.cpu_count(),
                        "uname": " ".join(os.uname()),
                        "loadavg_before": [round(x, 2) for x in load0],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    },
                    "minutes": round((time.time() - started) / 60, 1),
                },
                indent=2,
            )
            + "\n"
        )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.png:
        chart(results, args.png)


if __name__ == "__main__":
    main()
