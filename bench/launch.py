"""Starting what the benchmarks run beside each other, the same way for each benchmark.

The Go tools (bench/go: the echo backend and the load generator) are built once into the cache
outside the checkout; a backend set goes to a real etcd as the controller would write it; a
Weighbridge proxy runs as ``python -m dataplane.main`` of a given tree; nginx (``grpc_pass``)
and HAProxy (``proto h2``) run from their Debian packages (bench/install-proxies) with the base
configuration below, to which a benchmark adds its own lines. With :class:`TLSFiles` (made by
:func:`make_tls`) each of the three terminates TLS on its client port instead, configured
alike: TLS 1.3 only, TLS_AES_128_GCM_SHA256, X25519, ALPN h2, an ECDSA P-256 certificate
(backends stay plaintext). :func:`stop` ends what was started, bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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

TLS_VERSION = "TLSv1.3"
TLS_SUITE = "TLS_AES_128_GCM_SHA256"
"""The one TLS 1.3 suite nginx and HAProxy accept. Weighbridge (rustls) cannot be told which
suites to offer and follows the client's order, which for grpc-go on a CPU with AES
instructions puts this one first; the benchmark reports what each connection negotiated."""
TLS_GROUP = "X25519"
"""Key exchange: the proxies' OpenSSL and rustls (ring) both have it, and grpc-go would otherwise
lead with X25519MLKEM768, which neither OpenSSL 3.0 nor ring has."""


@dataclass(frozen=True)
class TLSFiles:
    """A CA and the ECDSA P-256 server certificate it issued (SAN 127.0.0.1 and
    ``server_name``), as PEM files; ``pem`` holds certificate and key together (HAProxy)."""

    ca: Path
    cert: Path
    key: Path
    pem: Path
    server_name: str = "localhost"


def work_dir(stack: contextlib.ExitStack, keep: Path | None, prefix: str) -> Path:
    """A directory for one run's files: a new one under ``keep`` (left for reading), else a
    temporary one that ``stack`` removes at the end."""
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=keep))
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"wb-{prefix}-")))


def make_tls(work: Path) -> TLSFiles:
    """A throwaway CA and server certificate made by the openssl CLI in ``work``."""
    ca = testenv.CertificateAuthority(work, "bench-ca")
    cert, key = work / "server.crt", work / "server.key"
    ca.issue("weighbridge-bench", cert, key, server=True)
    pem = work / "server.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return TLSFiles(ca.cert, cert, key, pem)


def cache_dir() -> Path:
    return Path(os.environ.get("WEIGHBRIDGE_CACHE", Path.home() / ".cache/weighbridge"))


def build_go(*, xds: bool = False) -> Path:
    """The directory of the built Go tools (echo, loadgen; with ``xds``, loadgen-xds too: the
    load generator built with grpc-go's xDS client, which takes a while to compile once); go
    build skips what is current."""
    out = cache_dir() / "bench"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    go = ROOT / "bench" / "go"
    subprocess.run(["go", "build", "-o", str(out) + "/", "./..."], cwd=go, check=True, env=env)
    if xds:
        subprocess.run(
            ["go", "build", "-tags", "xds", "-o", str(out / "loadgen-xds"), "./loadgen"],
            cwd=go,
            check=True,
            env=env,
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
    strategy: str = "round_robin",
    options: Mapping[str, str] | None = None,
) -> None:
    """Write Service ``default/<name>`` (``strategy`` over loopback ``ports``) to etcd."""

    async def put() -> None:
        client = store.client(etcd)
        try:
            await store.put_set(
                client,
                KeyScheme(PREFIX),
                BackendSet(
                    namespace="default",
                    name=name,
                    strategy=strategy,
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
    tls: TLSFiles | None = None
    """Serve TLS on the client port with this certificate (--tls-cert/--tls-key)."""


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
    tls = ["--tls-cert", str(spec.tls.cert), "--tls-key", str(spec.tls.key)] if spec.tls else []
    return subprocess.Popen(
        [
            str(spec.python),
            "-m",
            "dataplane.main",
            *("--etcd", etcd, "--prefix", PREFIX),
            *("--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"),
            *("--metrics-listen", f"127.0.0.1:{metrics}", "--id", spec.name),
            *health,
            *tls,
            *("--log-level", "warning", "--log-format", "json"),
            *spec.flags,
        ],
        stdout=log,
        stderr=log,
        cwd=spec.cwd,
        env={**os.environ, **spec.env, "PYTHONPATH": path},
    )


def nginx_config(
    work: Path,
    port: int,
    backends: list[int],
    *,
    server: str = "",
    location: str = "",
    upstream: str = "",
    tls: TLSFiles | None = None,
) -> Path:
    """nginx with a worker per core, ``grpc_pass`` to ``backends`` (round robin, 64 idle
    upstream connections kept, as a proxy in front of gRPC backends would be run); ``server``
    is appended to each upstream server line, ``location`` inside the location, ``upstream``
    inside the upstream block (e.g. ``least_conn;``); with ``tls``, TLS on the client port."""
    conf = work / "nginx.conf"
    servers = "\n".join(f"    server 127.0.0.1:{b}{server};" for b in backends)
    listen = f"listen 127.0.0.1:{port} http2;"
    if tls:
        listen = f"""listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {tls.cert};
    ssl_certificate_key {tls.key};
    ssl_protocols {TLS_VERSION};
    ssl_conf_command Ciphersuites {TLS_SUITE};
    ssl_ecdh_curve {TLS_GROUP};"""
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
{upstream}
  }}
  server {{
    {listen}
    location / {{
      grpc_pass grpc://echo;
{location}
    }}
  }}
}}
""")
    return conf


def haproxy_config(
    work: Path,
    port: int,
    backends: list[int],
    *,
    server: str = "",
    backend: str = "",
    balance: str = "roundrobin",
    tls: TLSFiles | None = None,
) -> Path:
    """HAProxy with a thread per core, HTTP/2 both ways, ``balance`` (round robin) over
    ``backends``; ``server`` is appended to each server line, ``backend`` to the backend
    section; with ``tls``, TLS on the client port (HTTP/2 by ALPN)."""
    conf = work / "haproxy.cfg"
    bind = f"bind 127.0.0.1:{port} proto h2"
    if tls:
        bind = (
            f"bind 127.0.0.1:{port} ssl crt {tls.pem} alpn h2 ssl-min-ver {TLS_VERSION} "
            f"ssl-max-ver {TLS_VERSION} ciphersuites {TLS_SUITE} curves {TLS_GROUP}"
        )
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
  {bind}
  default_backend echo
backend echo
  balance {balance}
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
