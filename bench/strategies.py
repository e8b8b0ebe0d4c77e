"""Strategies against a slow backend: Weighbridge's against HAProxy's and nginx's (issue 13).

One run puts each target in front of the same three grpc-go echo backends on loopback
(bench/go/echo, b0 the odd one) and sends unary calls at a fixed rate through it
(bench/go/loadgen, open loop, 4 client connections, each call with a 2 s deadline, each
call's latency, status and answering backend, its ``x-backend`` response header, recorded):

    round_robin        weighbridge-proxy --threads 1, the Service's strategy round_robin
    least_request      the same, least_request
    peak_ewma          the same, peak_ewma
    haproxy-leastconn  HAProxy, proto h2, ``balance leastconn``, a thread per core
    nginx-least_conn   nginx grpc_pass, ``least_conn;`` with a shared ``zone`` (so that the
                       workers, one per core, count each other's calls), keepalive 64

in two variants, each with its own backends:

    slow  b0 takes 5 ms per call (echo -delay 5ms), b1 and b2 answer at once; 1000 calls/s
    half  every backend takes 4 ms per call and serves at most that many calls at once, the
          others waiting in line (echo -workers, a server's worker threads): b1 and b2 have 4
          workers (1000 calls/s each), b0 has 2 (500 calls/s, half the capacity); 1350
          calls/s, so that an even third (450/s) keeps b0 90% busy and b1, b2 45%

Each variant starts its backends and the five proxies once, warms each target with --warmup
seconds of the same load (peak_ewma learns latencies, HAProxy and nginx open their
connections), then runs --rounds interleaved rounds, each target once per round, the order
rotated by one each round. Per target it reports the medians over rounds of p50 and p99
latency of every call (a failed call counts at its latency), calls, errors and each
backend's share of the calls, and the p99 of each round; then peak_ewma's p99 against the
best anchor's (the lower of HAProxy's and nginx's), the issue's target being ≤ 1.

    bench/run-strategies [--rounds 3] [--seconds 5] [--warmup 2] [--variants slow,half]
                         [--targets round_robin,…] [--json PATH] [--markdown PATH] [--keep DIR]

Everything runs on loopback; every wait is bounded and every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

from bench import launch
from bench.faults import Backends, Proxy, etcd_running, wait_ready
from devtools import testenv

CONNECTIONS = 4
"""Client connections from the load generator to each proxy."""
DEADLINE_S = 2.0
"""Each call's deadline."""
WEIGHBRIDGE = ("round_robin", "least_request", "peak_ewma")
ANCHORS = ("haproxy-leastconn", "nginx-least_conn")
TARGETS = (*WEIGHBRIDGE, *ANCHORS)
NAMES = ("b0", "b1", "b2")


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    rate: float
    each: tuple[tuple[str, ...], ...]
    """Echo flags of b0, b1, b2."""


VARIANTS = (
    Variant(
        "slow",
        "one backend 5 ms slower: b0 takes 5 ms per call, b1 and b2 answer at once",
        1000.0,
        (("-delay=5ms",), (), ()),
    ),
    Variant(
        "half",
        "one backend with half the capacity: every backend takes 4 ms per call, b1 and b2 "
        "serve 4 calls at once (1000/s), b0 2 (500/s), the others waiting in line",
        1350.0,
        (
            ("-delay=4ms", "-workers=2"),
            ("-delay=4ms", "-workers=4"),
            ("-delay=4ms", "-workers=4"),
        ),
    ),
)


def service(target: str) -> str:
    """The Service (in namespace default) whose set has Weighbridge strategy ``target``."""
    return "echo-" + target.replace("_", "-")


def authority(target: str) -> str:
    return f"{service(target)}.default" if target in WEIGHBRIDGE else launch.AUTHORITY


def start_targets(
    targets: list[str], backends: Backends, etcd: str, work: Path, spec: launch.ProxySpec
) -> dict[str, Proxy]:
    """Every target, started and ready (calls through it reached every backend). The
    Weighbridge proxies share the etcd prefix, so each holds the three Services; each is sent
    only its own strategy's."""
    proxies: dict[str, Proxy] = {}
    for t in targets:
        if t in WEIGHBRIDGE:
            launch.put_set(etcd, backends.ports, name=service(t), strategy=t)
    try:
        for t in targets:
            home = work / t
            home.mkdir(parents=True)
            port = testenv.free_port()
            with (home / "proxy.log").open("ab") as log:
                if t in WEIGHBRIDGE:
                    proc = launch.start_weighbridge(spec, etcd, port, testenv.free_port(), log)
                elif t.startswith("haproxy"):
                    conf = launch.haproxy_config(home, port, backends.ports, balance="leastconn")
                    proc = launch.start_haproxy(conf, log)
                else:
                    conf = launch.nginx_config(
                        home, port, backends.ports, upstream="    least_conn;\n    zone echo 64k;"
                    )
                    proc = launch.start_nginx(home, conf, log)
            proxies[t] = Proxy(t, port, proc)
        for t, proxy in proxies.items():
            wait_ready(proxy, set(NAMES), work / t, authority=authority(t))
    except BaseException:
        launch.stop([p.proc for p in proxies.values()])
        raise
    return proxies


def quantile(sorted_values: list[float], q: float) -> float:
    """As the load generator reports them: the value at rank round(q * (n - 1))."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


@dataclass
class Run:
    """One target's calls in one round."""

    calls: int
    errors: int
    p50_ms: float
    p99_ms: float
    share: dict[str, float]
    """Backend name → its share of the calls answered by a backend (x-backend)."""
    start_late_s: float


def load(
    bins: Path,
    proxy: Proxy,
    variant: Variant,
    seconds: float,
    record: Path | None,
    log: Path,
) -> dict[str, float]:
    """One load generator run through ``proxy``; its JSON summary."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                str(bins / "loadgen"),
                f"-targets=127.0.0.1:{proxy.port}",
                f"-authority={authority(proxy.name)}",
                f"-connections={CONNECTIONS}",
                f"-rate={variant.rate:g}",
                f"-duration={seconds:g}s",
                f"-call-timeout={DEADLINE_S:g}s",
                *([f"-record={record}"] if record else []),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        out, _ = proc.communicate(timeout=seconds + DEADLINE_S + 30)
    finally:
        launch.stop([proc])
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen through {proxy.name} failed ({proc.returncode}): {log}")
    summary: dict[str, float] = json.loads(out)
    return summary


def measure(
    bins: Path,
    proxy: Proxy,
    variant: Variant,
    seconds: float,
    work: Path,
) -> Run:
    record = work / "calls.csv"
    began = time.time()
    summary = load(bins, proxy, variant, seconds, record, work / "loadgen.log")
    with record.open() as f:
        rows = list(csv.reader(f))
    latencies = sorted(int(us) / 1000 for _, us, _, _ in rows)
    answered = Counter(b for _, _, _, b in rows if b)
    total = sum(answered.values()) or 1
    return Run(
        calls=len(rows),
        errors=sum(1 for _, _, code, _ in rows if code != "0"),
        p50_ms=round(quantile(latencies, 0.5), 3),
        p99_ms=round(quantile(latencies, 0.99), 3),
        share={n: round(answered[n] / total, 4) for n in NAMES},
        start_late_s=round(summary["start_unix_ns"] / 1e9 - began, 3),
    )


@dataclass
class Result:
    variant: str
    target: str
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs)

    def share(self, name: str) -> float:
        return statistics.median(r.share[name] for r in self.runs)


def run_variant(
    variant: Variant,
    targets: list[str],
    bins: Path,
    etcd: str,
    top: Path,
    spec: launch.ProxySpec,
    args: argparse.Namespace,
) -> list[Result]:
    work = top / variant.key
    work.mkdir(parents=True)
    results = {t: Result(variant.key, t) for t in targets}
    with contextlib.ExitStack() as stack:
        backends = Backends(bins, work / "backends.log", (), variant.each)
        stack.callback(backends.stop)
        proxies = start_targets(targets, backends, etcd, work, spec)
        stack.callback(launch.stop, [p.proc for p in proxies.values()])
        if args.warmup > 0:
            for t in targets:
                say(f"{variant.key}: warming {t} ({args.warmup:g} s)")
                load(bins, proxies[t], variant, args.warmup, None, work / "loadgen.log")
        for r in range(args.rounds):
            for t in targets[r % len(targets) :] + targets[: r % len(targets)]:
                say(f"{variant.key}: round {r + 1}/{args.rounds}, {t}")
                home = work / f"r{r}-{t}"
                home.mkdir()
                results[t].runs.append(measure(bins, proxies[t], variant, args.seconds, home))
    return list(results.values())


def say(text: str) -> None:
    print(f"strategies: {text}", file=sys.stderr, flush=True)


def verdict(results: list[Result]) -> str:
    """peak_ewma's p99 against the best anchor's, over the medians and round by round."""
    by = {r.target: r for r in results}
    anchors = [by[a] for a in ANCHORS if a in by]
    if "peak_ewma" not in by or not anchors:
        return ""
    pe = by["peak_ewma"]
    best = min(anchors, key=lambda a: a.median("p99_ms"))
    ratio = pe.median("p99_ms") / best.median("p99_ms")
    met = sum(
        1 for i, run in enumerate(pe.runs) if run.p99_ms <= min(a.runs[i].p99_ms for a in anchors)
    )
    return (
        f"peak_ewma p99 {pe.median('p99_ms'):.2f} ms against the best anchor's, {best.target} "
        f"{best.median('p99_ms'):.2f} ms: **{ratio:.2f}x** (target ≤ 1: "
        f"{'met' if ratio <= 1 else 'missed'}); at or below the best anchor in "
        f"{met} of {len(pe.runs)} rounds."
    )


def markdown(results: list[Result], args: argparse.Namespace) -> str:
    lines: list[str] = []
    for variant in VARIANTS:
        mine = [r for r in results if r.variant == variant.key]
        if not mine:
            continue
        lines += [
            f"**{variant.key}**: {variant.title}; {variant.rate:g} calls/s.",
            "",
            "| target | p50 ms | p99 ms | p99 each round, ms | share b0 | b1 | b2 "
            "| calls | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            rounds = " ".join(f"{run.p99_ms:.2f}" for run in r.runs)
            shares = " | ".join(f"{r.share(n):.1%}" for n in NAMES)
            lines.append(
                f"| {r.target} | {r.median('p50_ms'):.2f} | {r.median('p99_ms'):.2f} "
                f"| {rounds} | {shares} | {r.median('calls'):.0f} | {r.median('errors'):.0f} |"
            )
        if text := verdict(mine):
            lines += ["", text]
        late = [r.target for r in mine if any(run.start_late_s > 2 for run in r.runs)]
        if late:
            lines += ["", f"Load began more than 2 s late for: {', '.join(late)}."]
        lines.append("")
    lines.append(
        f"Medians of {args.rounds} interleaved rounds of {args.seconds:g} s after a "
        f"{args.warmup:g} s warm-up per target; {CONNECTIONS} client connections, deadline "
        f"{DEADLINE_S:g} s; shares are each backend's median share of the answered calls."
    )
    return "\n".join(lines)


def _terminated(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # so that every process is stopped on the way out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="bench/run-strategies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, 1-20 (3)")
    p.add_argument("--seconds", type=float, default=5.0, help="load per run, 1-60 s (5)")
    p.add_argument("--warmup", type=float, default=2.0, help="per target and variant, 0-30 s (2)")
    p.add_argument("--variants", default="slow,half", help="comma-separated (default: both)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: all)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument(
        "--keep",
        type=Path,
        help="keep each run's calls (calls.csv), configuration and logs under this directory "
        "(default: a temporary directory, removed)",
    )
    args = p.parse_args(argv)
    if not (1 <= args.rounds <= 20 and 1 <= args.seconds <= 60 and 0 <= args.warmup <= 30):
        raise SystemExit("--rounds 1-20, --seconds 1-60, --warmup 0-30")
    targets = args.targets.split(",")
    if bad := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown targets {sorted(bad)}; known: {', '.join(TARGETS)}")
    variants = [v for v in VARIANTS if v.key in args.variants.split(",")]
    if not variants:
        raise SystemExit("--variants: slow, half or both")
    for tool in ("nginx", "haproxy"):
        if any(t.startswith(tool) for t in targets) and shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run bench/install-proxies")
    signal.signal(signal.SIGTERM, _terminated)
    started = time.time()
    spec = launch.ProxySpec("weighbridge", ["--threads", "1"])
    bins = launch.build_go()
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        top = launch.work_dir(stack, args.keep, "strategies")
        etcd = stack.enter_context(etcd_running(top))
        for variant in variants:
            results += run_variant(variant, targets, bins, etcd, top, spec, args)
    table = markdown(results, args)
    print(table)
    minutes = round((time.time() - started) / 60, 1)
    say(f"{minutes} minutes")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [asdict(r) for r in results],
                    "variants": {v.key: asdict(v) for v in variants},
                    "settings": {
                        "rounds": args.rounds,
                        "seconds": args.seconds,
                        "warmup": args.warmup,
                        "client_connections": CONNECTIONS,
                        "deadline_s": DEADLINE_S,
                    },
                    "commit": launch.git("describe", "--always", "--dirty"),
                    "machine": {"cores": os.cpu_count(), "uname": " ".join(os.uname())},
                    "loadavg_after": os.getloadavg(),
                    "minutes": minutes,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
