"""Failover under faults: Weighbridge, nginx and HAProxy side by side (issue 10).

Each run puts one proxy in front of three grpc-go echo backends on loopback (bench/go/echo),
sends unary calls at a fixed rate through it (bench/go/loadgen, open loop, each call with a
deadline, each call's start, latency, status and answering backend recorded), and injects one
fault FAULT_AT (2 s) after the load began:

    a        a backend killed (SIGKILL)
    b        a backend stopped (SIGSTOP) for --stop-seconds (10), then resumed (SIGCONT)
    c        every backend sends GOAWAY to each connection after 2 s (grpc-go's
             MaxConnectionAge, a 60 s grace), while one server-streaming call is held open
             through the proxy for the whole run; the fault begins with the load
    d        rolling restart: each backend in turn stops gracefully (SIGTERM: GOAWAY, calls in
             flight finish) and a new one starts on the same port, 2.5 s apart
    e        a backend starts answering UNAVAILABLE to every call (SIGUSR1), no retries
    e+retry  the same with retries configured where the proxy has them (see docs/failover.md)

Every scenario runs against fresh backends and a fresh proxy, scenario by scenario, target by
target, in one process:

    weighbridge  weighbridge-proxy --threads 1; the Service's set in a real etcd, with
                 options["health-check"] (as HAProxy's checks: 2 s, 1 s timeout, 3 down,
                 2 up) and, for e+retry, options["retry"] = "on: unavailable; attempts: 3",
                 in weighbridge.policy's canonical text, as the controller writes them
    nginx        grpc_pass, failure handling at nginx's defaults (grpc_next_upstream error
                 timeout, max_fails=1, fail_timeout=10s; open-source nginx has no active
                 health checks); e+retry adds grpc_next_upstream http_500..504 non_idempotent
    haproxy      proto h2, as HAProxy's documentation suggests: HTTP/2 health checks of the
                 gRPC health service path (inter 2s fall 3 rise 2, timeout check 1s), retries
                 3, option redispatch; e+retry adds retry-on all-retryable-errors

Per run it reports calls sent, failed calls by status, failed calls that ended after the
fault began, the time from the fault to the start of the last failed call (after which every
call succeeded), calls slower than 0.5 s, and for b the time until the last call sent to the
stopped backend (a call started while it was stopped that failed or was answered by it after
the resume), for c how the held stream ended. The table is printed and written with every
figure to --json.

    bench/run-faults [--scenarios a,b,c,d,e] [--targets weighbridge,nginx,haproxy]
                     [--rate 1000] [--seconds 10] [--stop-seconds 10] [--deadline 2]
                     [--json docs/failover.json] [--markdown PATH]

Everything runs on loopback; every wait is bounded and every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from bench import launch
from devtools import testenv
from weighbridge import policy

FAULT_AT = 2.0
"""Seconds after the load begins that the fault is injected."""
RESTART_EVERY = 2.5
"""Seconds between the rolling restarts of scenario d."""
SLOW_S = 0.5
"""A call this slow is reported as slow: at 1,000 calls/s on loopback a call takes a
millisecond or two, so only a call that waited for a stopped backend or a timeout gets here."""
LEAD_S = 1.5
"""Time between starting the load generator and its first measured call (its warm-up)."""
BACKENDS = 3
CONNECTIONS = 4
"""Client connections from the load generator to the proxy."""
TARGETS = ("weighbridge", "nginx", "haproxy")
STATUS = {s.value[0]: s.name for s in grpc.StatusCode}

RETRY = "on: unavailable; attempts: 3"
HEALTH = "interval: 2s; timeout: 1s; unhealthy-threshold: 3; healthy-threshold: 2"
"""Weighbridge's health checks set as HAProxy's below, so that both detect a dead backend
after the same number of checks."""

HAPROXY_BACKEND = f"""  option httpchk
  http-check send meth POST uri /grpc.health.v1.Health/Check hdr host {launch.AUTHORITY} \
hdr content-type application/grpc
  http-check expect status 200
  timeout check 1s
  retries 3
  option redispatch
  log stderr format raw local0
  option log-health-checks"""
"""HAProxy's checks are HTTP/2 requests to the gRPC health service's path: a check's body is
a C string, so it cannot carry the gRPC frame of the empty request (five zero bytes), and the
server answers INTERNAL in a 200 response, nor can a check read the grpc-status trailer. What
the check shows is that the backend answers HTTP/2 within 1 s (a TCP connect check would pass
against a stopped process, whose kernel still accepts connections)."""
HAPROXY_SERVER = " check inter 2s fall 3 rise 2"
HAPROXY_RETRY = "  retry-on all-retryable-errors"
NGINX_RETRY = (
    "      grpc_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;\n"
    "      grpc_next_upstream_tries 3;"
)

CONFIG = {
    "weighbridge": "health-check: 2s, timeout 1s, 3 down, 2 up; outlier detection at its default",
    "nginx": "grpc_pass, keepalive 64; failure handling at nginx's defaults",
    "haproxy": "HTTP/2 health checks 2s/1s, fall 3 rise 2; retries 3; option redispatch",
}
RETRY_CONFIG = {
    "weighbridge": f"retry {RETRY!r}",
    "nginx": "grpc_next_upstream … http_503 non_idempotent, tries 3 (acts on HTTP statuses: "
    "a gRPC UNAVAILABLE is an HTTP 200)",
    "haproxy": "retry-on all-retryable-errors (HTTP statuses and connection failures only: a "
    "gRPC UNAVAILABLE is an HTTP 200)",
}


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    echo_flags: tuple[str, ...] = ()
    retry: bool = False
    hold_stream: bool = False


SCENARIOS = (
    Scenario("a", "backend killed (SIGKILL) at 2 s"),
    Scenario("b", "backend stopped (SIGSTOP) at 2 s, resumed (SIGCONT) after {stop:g} s"),
    Scenario(
        "c",
        "GOAWAY: backends' MaxConnectionAge 2 s (grace 60 s), one stream held open",
        echo_flags=("-max-connection-age=2s", "-max-connection-age-grace=60s"),
        hold_stream=True,
    ),
    Scenario("d", f"rolling restart from 2 s, one backend every {RESTART_EVERY:g} s"),
    Scenario("e", "backend answers UNAVAILABLE from 2 s, no retries"),
    Scenario("e+retry", "backend answers UNAVAILABLE from 2 s, retries configured", retry=True),
)


def seconds_of(scenario: Scenario, base: float, stop: float) -> float:
    """How long the load of ``scenario`` runs: ``base``, or longer when its faults need it."""
    if scenario.key == "b":
        return FAULT_AT + stop + 3
    if scenario.key == "d":
        return max(base, FAULT_AT + (BACKENDS - 1) * RESTART_EVERY + 3)
    return base


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


class Backends:
    """The echo backends of one run, b0..b2, each restartable on its own port."""

    STOP_TIMEOUT = 5.0
    """-stop-timeout of each backend: the bound of its graceful stop."""

    def __init__(
        self,
        bins: Path,
        log: Path,
        flags: tuple[str, ...],
        each: Sequence[tuple[str, ...]] = (),
    ) -> None:
        """``flags`` go to every backend, ``each[i]`` after them to backend i only."""
        self.bins, self.log, self.flags, self.each = bins, log, flags, each
        self.ports = [testenv.free_port() for _ in range(BACKENDS)]
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(BACKENDS):
                self.procs.append(self._start(i))
        except BaseException:
            self.stop()
            raise

    def name(self, i: int) -> str:
        return f"b{i}"

    def _start(self, i: int) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [
                    str(self.bins / "echo"),
                    f"-listen=127.0.0.1:{self.ports[i]}",
                    f"-name={self.name(i)}",
                    f"-stop-timeout={self.STOP_TIMEOUT}s",
                    *self.flags,
                    *(self.each[i] if i < len(self.each) else ()),
                ],
                stdout=log,
                stderr=log,
            )
        wait_listening(self.ports[i], proc)
        return proc

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def restart(self, i: int) -> None:
        """Graceful stop (SIGTERM), then a new backend on the same port."""
        self.procs[i].terminate()
        self.procs[i].wait(timeout=self.STOP_TIMEOUT + 5)
        self.procs[i] = self._start(i)

    def stop(self) -> None:
        launch.stop(self.procs, timeout=self.STOP_TIMEOUT + 5)


@dataclass
class Fault:
    """When the fault began (Unix seconds), on which backend, and when a stop ended."""

    at: float
    backend: str = ""
    resumed: float = 0.0


def sleep_until(t: float) -> None:
    time.sleep(max(t - time.time(), 0.0))


def inject(scenario: Scenario, backends: Backends, start: float, stop_s: float) -> Fault:
    """Carry out the scenario's faults on the timeline that began at ``start``."""
    if scenario.key == "c":  # the connections' age counts from their start: no action
        return Fault(start)
    sleep_until(start + FAULT_AT)
    fault = Fault(time.time(), backends.name(0))
    if scenario.key == "a":
        backends.signal(0, signal.SIGKILL)
    elif scenario.key == "b":
        backends.signal(0, signal.SIGSTOP)
        sleep_until(fault.at + stop_s)
        backends.signal(0, signal.SIGCONT)
        fault.resumed = time.time()
    elif scenario.key == "d":
        fault.backend = "all, one at a time"
        for i in range(BACKENDS):
            sleep_until(fault.at + i * RESTART_EVERY)
            backends.restart(i)
    elif scenario.key.startswith("e"):
        backends.signal(0, signal.SIGUSR1)
    return fault


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    metrics: int | None = None


def start_proxy(
    target: str,
    scenario: Scenario,
    backends: Backends,
    etcd: str,
    work: Path,
    spec: launch.ProxySpec,
) -> Proxy:
    port = testenv.free_port()
    with (work / "proxy.log").open("ab") as log:  # the proxy writes to its own copy
        if target == "weighbridge":
            # As the controller writes them: the canonical text of weighbridge.policy.
            options = {policy.HEALTH_CHECK: policy.canonical_option(policy.HEALTH_CHECK, HEALTH)}
            if scenario.retry:
                options[policy.RETRY] = policy.canonical_option(policy.RETRY, RETRY)
            launch.put_set(etcd, backends.ports, options=options)
            metrics = testenv.free_port()
            proc = launch.start_weighbridge(spec, etcd, port, metrics, log)
            return Proxy(target, port, proc, metrics)
        if target == "nginx":
            location = NGINX_RETRY if scenario.retry else ""
            conf = launch.nginx_config(work, port, backends.ports, location=location)
            return Proxy(target, port, launch.start_nginx(work, conf, log))
        backend = HAPROXY_BACKEND + ("\n" + HAPROXY_RETRY if scenario.retry else "")
        conf = launch.haproxy_config(
            work, port, backends.ports, server=HAPROXY_SERVER, backend=backend
        )
        return Proxy(target, port, launch.start_haproxy(conf, log))


def wait_ready(
    proxy: Proxy,
    names: set[str],
    work: Path,
    timeout: float = 30,
    authority: str = launch.AUTHORITY,
) -> None:
    """Until calls through the proxy (to ``authority``) have reached every backend."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    options = [("grpc.default_authority", authority)]
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=options) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        while time.monotonic() < deadline and not names <= seen:
            if proxy.proc.poll() is not None:
                break
            try:
                _, call = unary.with_call(b"ready?", timeout=1)
                seen.add(dict(call.initial_metadata()).get("x-backend", ""))
            except grpc.RpcError:
                time.sleep(0.1)
    if not names <= seen:
        log = (work / "proxy.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{proxy.name} reached only {sorted(seen)} of {sorted(names)}:\n{log}")


def proxy_counters(proxy: Proxy) -> dict[str, float]:
    """Weighbridge's failure counters from /metrics (local errors, and retries, ejections and
    health checks once the engine reports them)."""
    if proxy.metrics is None:
        return {}
    with contextlib.suppress(OSError):
        url = f"http://127.0.0.1:{proxy.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return {
            m.group(1): float(m.group(2))
            for m in re.finditer(
                r"^(weighbridge_proxy_\S*?(?:error|retr|eject|health)\S*) (\S+)$", text, re.M
            )
        }
    return {}


@dataclass
class Call:
    start: float  # Unix seconds
    latency: float  # seconds
    code: int
    backend: str

    @property
    def end(self) -> float:
        return self.start + self.latency


def read_calls(path: Path) -> list[Call]:
    with path.open() as f:
        return [Call(int(s) / 1e9, int(us) / 1e6, int(c), b) for s, us, c, b in csv.reader(f)]


@dataclass
class Result:
    scenario: str
    target: str
    config: str
    seconds: float
    rate: float
    calls: int = 0
    failed: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    failed_after_fault: int = 0
    last_failure_s: float | None = None
    """From the fault to the start of the last failed call; None: no call failed after it."""
    recovered: bool = True
    """False when calls still failed in the last second of the run."""
    slow: int = 0
    stopped_backend_until_s: float | None = None
    """b: from the SIGSTOP to the start of the last call, started while the backend was
    stopped, that was answered by it (after the resume) or failed (a call sent to it waits for
    the resume or its deadline; a proxy that also delays calls to the other backends past
    their deadline counts those too)."""
    stream: dict[str, Any] | None = None
    calls_after_fault_by_backend: dict[str, int] = field(default_factory=dict)
    start_late_s: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)


def summarize(result: Result, calls: list[Call], fault: Fault, end: float) -> None:
    failed = [c for c in calls if c.code != 0]
    after = [c for c in failed if c.end >= fault.at]
    result.calls, result.failed, result.failed_after_fault = len(calls), len(failed), len(after)
    result.failed_by_code = dict(Counter(STATUS.get(c.code, str(c.code)) for c in failed))
    if after:
        last = max(c.start for c in after)
        result.last_failure_s = round(max(last - fault.at, 0.0), 3)
        result.recovered = last < end - 1.0
    result.slow = sum(1 for c in calls if c.latency >= SLOW_S)
    result.calls_after_fault_by_backend = dict(
        sorted(Counter(c.backend for c in calls if c.start >= fault.at and c.code == 0).items())
    )
    if fault.resumed:
        stuck = [
            c.start
            for c in calls
            if fault.at <= c.start < fault.resumed and (c.code != 0 or c.backend == fault.backend)
        ]
        result.stopped_backend_until_s = round(max(stuck) - fault.at, 3) if stuck else 0.0


def run_one(
    scenario: Scenario,
    target: str,
    bins: Path,
    etcd: str,
    work: Path,
    spec: launch.ProxySpec,
    args: argparse.Namespace,
) -> Result:
    work.mkdir(parents=True)
    seconds = seconds_of(scenario, args.seconds, args.stop_seconds)
    config = CONFIG[target] + ("; " + RETRY_CONFIG[target] if scenario.retry else "")
    result = Result(scenario.key, target, config, seconds, args.rate)
    record = work / "calls.csv"
    with contextlib.ExitStack() as stack:
        backends = Backends(bins, work / "backends.log", scenario.echo_flags)
        stack.callback(backends.stop)
        proxy = start_proxy(target, scenario, backends, etcd, work, spec)
        stack.callback(launch.stop, [proxy.proc])
        wait_ready(proxy, {backends.name(i) for i in range(BACKENDS)}, work)
        start = time.time() + LEAD_S
        with (work / "loadgen.log").open("ab") as log:
            load = subprocess.Popen(
                [
                    str(bins / "loadgen"),
                    f"-targets=127.0.0.1:{proxy.port}",
                    f"-authority={launch.AUTHORITY}",
                    f"-connections={CONNECTIONS}",
                    f"-rate={args.rate}",
                    f"-duration={seconds}s",
                    f"-call-timeout={args.deadline}s",
                    f"-start-at={int(start * 1e9)}",
                    f"-record={record}",
                    *(["-hold-stream"] if scenario.hold_stream else []),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        stack.callback(launch.stop, [load])
        fault = inject(scenario, backends, start, args.stop_seconds)
        out, _ = load.communicate(timeout=LEAD_S + seconds + args.deadline + 30)
        if load.returncode != 0:
            raise RuntimeError(
                f"loadgen failed ({load.returncode}): {work / 'loadgen.log'} (--keep)"
            )
        summary = json.loads(out)
        result.counters = proxy_counters(proxy)
    began = summary["start_unix_ns"] / 1e9
    result.start_late_s = round(began - start, 3)
    if scenario.key == "c":
        fault.at = began
    if summary.get("stream") is not None:
        stream = summary["stream"]
        stream["code"] = STATUS.get(stream.get("code", 0), str(stream.get("code")))
        result.stream = stream
    summarize(result, read_calls(record), fault, began + seconds)
    return result


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def note(r: Result) -> str:
    parts = []
    if r.stopped_backend_until_s is not None:
        parts.append(
            f"calls failing or sent to the stopped backend until {_s(r.stopped_backend_until_s)} s"
        )
    if r.stream is not None:
        s = r.stream
        if s["ended_s"] < 0:
            parts.append(f"held stream: open to the end ({s['messages']} messages)")
        else:
            parts.append(
                f"held stream: {s['code']} at {s['ended_s']:.2f} s ({s['messages']} messages)"
            )
    if r.start_late_s > 0.2:
        parts.append(f"load began {r.start_late_s:.2f} s late")
    return "; ".join(parts)


def markdown(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        "| scenario | target | calls | failed (by status) | failed after the fault "
        "| fault → last failure, s | slow ≥ 0.5 s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r.failed_by_code.items()))
        last = _s(r.last_failure_s) + ("" if r.recovered else " (still failing at the end)")
        lines.append(
            f"| {r.scenario} | {r.target} | {r.calls} | {r.failed}"
            + (f" ({codes})" if codes else "")
            + f" | {r.failed_after_fault} | {last} | {r.slow} | {note(r)} |"
        )
    titles = "; ".join(
        f"{s.key}: {s.title.format(stop=args.stop_seconds)}"
        for s in SCENARIOS
        if s.key in {r.scenario for r in results}
    )
    lines.append(
        f"\n{args.rate:g} calls/s, deadline {args.deadline:g} s, {BACKENDS} backends, "
        f"{CONNECTIONS} client connections. {titles}."
    )
    return "\n".join(lines)


def selected(wanted: str) -> list[Scenario]:
    keys = set(wanted.split(","))
    unknown = keys - {s.key for s in SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; known: a, b, c, d, e, e+retry")
    # "e" selects both of its variants.
    return [s for s in SCENARIOS if s.key in keys or s.key.split("+")[0] in keys]


def _terminated(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # so that every process is stopped on the way out


@contextlib.contextmanager
def etcd_running(work: Path) -> Iterator[str]:
    etcd = testenv.Etcd(work)
    etcd.start()
    try:
        yield etcd.endpoint
    finally:
        etcd.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="bench/run-faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenarios", default="a,b,c,d,e", help="comma-separated (default: all)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: all)")
    p.add_argument("--rate", type=float, default=1000.0, help="calls per second (1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="load per scenario (10)")
    p.add_argument("--stop-seconds", type=float, default=10.0, help="b: SIGSTOP to SIGCONT (10)")
    p.add_argument("--deadline", type=float, default=2.0, help="each call's deadline (2 s)")
    p.add_argument(
        "--rev",
        help="run REV's Weighbridge proxy (a git worktree with its own venv and engine, cached "
        "as bench/run --baseline does); default: this checkout's, with this venv's engine",
    )
    p.add_argument("--json", type=Path, default=launch.ROOT / "docs" / "failover.json")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument(
        "--keep",
        type=Path,
        help="keep each run's calls (calls.csv), configuration and logs under this directory "
        "(default: a temporary directory, removed)",
    )
    args = p.parse_args(argv)
    scenarios = selected(args.scenarios)
    targets = args.targets.split(",")
    if bad := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown targets {sorted(bad)}; known: {', '.join(TARGETS)}")
    for t in ("nginx", "haproxy"):
        if t in targets and shutil.which(t) is None:
            raise SystemExit(f"{t} is not installed: run bench/install-proxies (bench/run-faults)")
    signal.signal(signal.SIGTERM, _terminated)
    started = time.time()
    spec = launch.ProxySpec("weighbridge", ["--threads", "1"])
    rev = launch.prepare_baseline(args.rev) if args.rev else None
    if rev is not None:
        spec.python, spec.cwd = rev.python, rev.src
    bins = launch.build_go()
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        top = launch.work_dir(stack, args.keep, "faults")
        etcd = stack.enter_context(etcd_running(top))
        for scenario in scenarios:
            for target in targets:
                print(f"faults: {scenario.key} through {target}", file=sys.stderr, flush=True)
                work = top / f"{scenario.key}-{target}"
                results.append(run_one(scenario, target, bins, etcd, work, spec, args))
    table = markdown(results, args)
    print(table)
    minutes = round((time.time() - started) / 60, 1)
    print(f"\n{minutes} minutes", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    args.json.write_text(
        json.dumps(
            {
                "runs": [asdict(r) for r in results],
                "settings": {
                    "rate": args.rate,
                    "seconds": args.seconds,
                    "stop_seconds": args.stop_seconds,
                    "deadline_s": args.deadline,
                    "fault_at_s": FAULT_AT,
                    "backends": BACKENDS,
                    "client_connections": CONNECTIONS,
                },
                "scenarios": {s.key: s.title.format(stop=args.stop_seconds) for s in scenarios},
                "commit": launch.git("describe", "--always", "--dirty"),
                "weighbridge": rev.commit if rev else "this checkout",
                "machine": {"cores": os.cpu_count(), "uname": " ".join(os.uname())},
                "minutes": minutes,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
