"""Starting what the benchmarks run beside each other, the same way for each benchmark.

The Go tools (bench/go: the echo backend and the load generator) are built once into the cache
outside the checkout; a backend set goes to a real etcd as the controller would write it; a
Weighbridge proxy runs as ``python -m dataplane.main`` of a given tree; nginx (``grpc_pass``)
and HAProxy (``proto h2``) run from their Debian packages (bench/install-proxies) with the base
configuration below, to which a benchmark adds its own lines. :func:`stop` ends what was
started, bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from devtools import testenv
from weighbridge import etcd as store
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint

ROOT = testenv.ROOT
AUTHORITY = "echo.default"
"""The :authority clients send: Service ``echo`` in namespace ``default``."""
PREFIX = "/bench/"


def cache_dir() -> Path:
    return Path(os.environ.get("WEIGHBRIDGE_CACHE", Path.home() / ".cache/weighbridge"))


def build_go() -> Path:
    """The directory of the built Go tools (echo, loadgen); go build skips what is current."""
    out = cache_dir() / "bench"
    subprocess.run(
        ["go", "build", "-o", str(out) + "/", "./..."],
        cwd=ROOT / "bench" / "go",
        check=True,
        env={**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"},
    )
    return out


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@dataclass(frozen=True)
class Baseline:
    commit: str
    python: Path
    src: Path


def prepare_baseline(rev: str) -> Baseline:
    """REV checked out (git worktree) with its own venv and engine, cached by commit."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    home = cache_dir() / "baseline" / commit[:12]
    src, venv, stamp = home / "src", home / "venv", home / "ready"
    python = venv / "bin" / "python"
    if stamp.exists() and stamp.read_text().strip() == commit:
        return Baseline(commit, python, src)
    print(f"bench: preparing baseline {commit[:12]} in {home} (once)", file=sys.stderr)
    home.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        git("worktree", "prune")
        git("worktree", "add", "--detach", str(src), commit)
    elif git("rev-parse", "HEAD", cwd=src) != commit:
        raise SystemExit(f"{src} is not at {commit}; remove it (git worktree remove) and retry")
    if not python.exists():
        py = os.environ.get("PYTHON311") or shutil.which("python3.11") or sys.executable
        subprocess.run([py, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-e", str(src)], check=True)
    subprocess.run(
        [*pip, str(src / "native")],
        check=True,
        env={**os.environ, "CARGO_TARGET_DIR": str(home / "target")},
    )
    stamp.write_text(commit + "\n")
    return Baseline(commit, python, src)


def put_set(
    etcd: str,
    ports: Iterable[int],
    *,
    name: str = "echo",
    options: Mapping[str, str] | None = None,
) -> None:
    """Write Service ``default/<name>`` (round robin over loopback ``ports``) to etcd."""

    async def put() -> None:
        client = store.client(etcd)
        try:
            await store.put_set(
                client,
                KeyScheme(PREFIX),
                BackendSet(
                    namespace="default",
                    name=name,
                    strategy="round_robin",
                    endpoints=tuple(Endpoint("127.0.0.1", p) for p in ports),
                    options=dict(options or {}),
                ),
            )
        finally:
            await client.close()

    asyncio.run(put())


@dataclass
class ProxySpec:
    """A Weighbridge proxy to start: its name, interpreter, flags and where it runs."""

    name: str
    flags: list[str]
    python: Path = Path(sys.executable)
    cwd: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)


def start_weighbridge(
    spec: ProxySpec, etcd: str, port: int, metrics: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    # The spec's directory first, so that a baseline or variant tree imports its own
    # dataplane package whatever the interpreter's site-packages hold.
    path = os.pathsep.join(p for p in (spec.env.get("PYTHONPATH"), str(spec.cwd)) if p)
    # A revision with its own health port (default 0.0.0.0:9503) gets an ephemeral one, so
    # proxies started side by side never contend for it; older revisions have no such flag.
    main = (spec.cwd / "dataplane" / "main.py").read_text()
    health = ["--health-listen", "127.0.0.1:0"] if "--health-listen" in main else []
    return subprocess.Popen(
        [
            str(spec.python),
            "-m",
            "dataplane.main",
            *("--etcd", etcd, "--prefix", PREFIX),
            *("--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"),
            *("--metrics-listen", f"127.0.0.1:{metrics}", "--id", spec.name),
            *health,
            *("--log-level", "warning", "--log-format", "json"),
            *spec.flags,
        ],
        stdout=log,
        stderr=log,
        cwd=spec.cwd,
        env={**os.environ, **spec.env, "PYTHONPATH": path},
    )


def nginx_config(
    work: Path, port: int, backends: list[int], *, server: str = "", location: str = ""
) -> Path:
    """nginx with a worker per core, ``grpc_pass`` to ``backends`` (round robin, 64 idle
    upstream connections kept, as a proxy in front of gRPC backends would be run); ``server``
    is appended to each upstream server line, ``location`` inside the location."""
    conf = work / "nginx.conf"
    servers = "\n".join(f"    server 127.0.0.1:{b}{server};" for b in backends)
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
    location / {{
      grpc_pass grpc://echo;
{location}
    }}
  }}
}}
""")
    return conf


def haproxy_config(
    work: Path, port: int, backends: list[int], *, server: str = "", backend: str = ""
) -> Path:
    """HAProxy with a thread per core, HTTP/2 both ways, round robin over ``backends``;
    ``server`` is appended to each server line, ``backend`` to the backend section."""
    conf = work / "haproxy.cfg"
    servers = "\n".join(
        f"  server s{i} 127.0.0.1:{b} proto h2{server}" for i, b in enumerate(backends)
    )
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
{backend}
{servers}
""")
    return conf


def start_nginx(work: Path, conf: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stdout=log, stderr=log)


def start_haproxy(conf: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["haproxy", "-f", str(conf), "-db"], stdout=log, stderr=log)


def stop(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM (and SIGCONT, for a stopped process) to each, then SIGKILL what is left after
    ``timeout`` seconds; waits for every one."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        p.send_signal(signal.SIGCONT)
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)
