"""The proxy's settings: one frozen dataclass, the one home of every default.

``weighbridge-proxy``'s flags take their defaults from :data:`DEFAULTS`; the Helm chart passes
a flag only when its value is set, so a default is never written twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from weighbridge.keys import check_namespaces
from weighbridge.policy import BackendTls


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    listen: str = "0.0.0.0:8080"
    """Where clients connect (gRPC over h2c): every interface, since clients are elsewhere."""
    admin_listen: str | None = "127.0.0.1:9501"
    """Admin gRPC API (ListBackendSets, Explain) and reflection; None to disable. Loopback: it
    tells anyone who reaches it every backend of every Service, so it is reached by entering the
    pod (``kubectl port-forward``), never from the network."""
    health_listen: str | None = "0.0.0.0:9503"
    """gRPC health (grpc.health.v1 only), for the kubelet's gRPC probes; None to disable. Every
    interface, since the kubelet connects to the pod's IP; it tells nothing but SERVING or
    NOT_SERVING, and has its own port so that a probe never waits behind client traffic."""
    metrics_listen: str | None = "0.0.0.0:9502"
    """Prometheus /metrics over HTTP; None to disable."""
    threads: int | None = None
    """Engine threads carrying calls; None: the CPUs this process may use (affinity and cgroup
    quota), since one thread keeps one CPU busy and more only contend."""
    max_connection_age: float = 0.0
    """Seconds (±10%) after which a client connection gets GOAWAY and the client reconnects,
    spreading long-lived clients over threads and proxies; 0: never, as gRPC servers default
    to, because reconnecting costs a handshake and most clients open enough connections."""
    max_backend_connections: int = 8
    """Connections per endpoint and engine thread at most. A second opens only while every
    connection has as many calls as the backend allows at once (its MAX_CONCURRENT_STREAMS:
    Go's net/http2 250, nginx 128; grpc-go and grpc-java set none), so a backend that limits
    streams still takes more calls at once instead of the proxy queueing them
    (docs/performance.md measures it); 8 bounds what one proxy opens to one pod."""
    handshake_timeout_s: float = 3.0
    """Seconds a new backend connection has for its HTTP/2 handshake, a PING round trip
    included: a pod whose kernel accepts TCP but whose process does not answer (stopped,
    overloaded) is given up on this soon, while a live one answers in milliseconds."""
    keepalive_time_s: float = 5.0
    """A backend connection with calls open that has been silent this long gets a PING; 0: no
    PINGs. A vanished pod (node gone, partition: no RST ever comes) is then noticed within
    seconds rather than TCP's minutes, and PINGs only while calls wait cost an idle pod nothing."""
    keepalive_timeout_s: float = 3.0
    """A PING unanswered this long means the connection is dead: its calls fail (retried where
    they can be) and the endpoint counts a connection failure. 3 s is far beyond a live pod's
    round trip, even under load."""
    retry_buffer_bytes: int = 256 << 10
    """Request bytes kept per call, until its response begins, so that a retry (transparent or
    configured) can send them again; a call whose request outgrows this is not retried. 256 KiB
    holds nearly every unary request and bounds what retries make the proxy hold per call."""
    tls_cert: str | None = None
    """PEM certificate (chain) for TLS with ALPN h2 on the client port; None: h2c only. The
    files are read again every ``tls_reload_interval_s``, so a rotated Secret is served without
    a restart (mounted Secrets change by a symlink swap, which watching a file would miss)."""
    tls_key: str | None = None
    """The certificate's PEM private key."""
    tls_client_ca: str | None = None
    """With TLS: require client certificates signed by this PEM CA bundle (mTLS)."""
    tls_allowed_identities: tuple[str, ...] = ()
    """With mTLS: the client identities allowed in (SAN DNS names, SAN URIs such as SPIFFE IDs,
    or the subject CN); empty: any certificate the CA signed."""
    allow_h2c: bool = False
    """With TLS: accept plaintext h2c on the same port too (told apart by the first byte), for
    a migration; off, since a TLS port that also takes plaintext protects nothing."""
    tls_reload_interval_s: float = 10.0
    """Seconds between reads of the TLS files: a Secret's change reaches the pod about a minute
    late anyway, and reading three small files costs nothing."""
    backend_ca: str | None = None
    """PEM CA bundle that signs backends' certificates, for Services whose
    ``weighbridge.io/backend-tls`` names no ``ca``."""
    backend_ca_dir: str | None = None
    """Directory of named CA bundles (``NAME/ca.crt``), for ``ca: NAME`` in
    ``weighbridge.io/backend-tls``; the chart mounts one Secret per name here."""
    backend_client_cert: str | None = None
    """PEM certificate the proxy presents to backends that require client certificates
    (``client-certificate: on`` in ``weighbridge.io/backend-tls``)."""
    backend_client_key: str | None = None
    """Its PEM private key."""
    client_handshake_timeout_s: float = 10.0
    """Seconds a client connection has, from accept, to finish its TLS handshake and send the
    HTTP/2 preface; then it is closed. Envoy's and nginx's edge defaults are of this order (10
    s, 60 s): a real client needs milliseconds, a connection that never speaks holds a file
    descriptor and memory for nothing."""
    client_idle_timeout_s: float = 3600.0
    """Seconds a client connection may go without calls before it gets GOAWAY; 0: never. One
    hour, as Envoy's edge guidance sets, so idle clients give back what they hold while a
    client between bursts keeps its connection."""
    max_client_connections: int = 10_000
    """Client connections open at once on this proxy; beyond, a new connection is closed at
    once (and counted). Bounds the memory and descriptors clients can take (about 30 KB each
    while idle); a gRPC client opens one or a few, so 10,000 is far above real use."""
    client_max_concurrent_streams: int = 1000
    """Calls one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS,
    advertised and enforced: REFUSED_STREAM beyond). Envoy's edge guidance says 100 and nginx
    128 for browsers at the edge; gRPC clients multiplex all their calls on one connection
    and queue beyond the limit, so 1000 (at 2000 in flight it held less memory than 4096 and
    answered sooner, docs/performance.md). Set 100 for a proxy facing the internet."""
    client_max_header_list_size: int = 64 << 10
    """Largest request header list (SETTINGS_MAX_HEADER_LIST_SIZE, names and values plus 32
    bytes each, advertised and enforced: HTTP 431 beyond); 64 KiB, like Envoy's 60 KiB."""
    stream_idle_timeout_s: float = 3600.0
    """Seconds a call may go without a frame either way before the proxy ends it (UNAVAILABLE
    to the client, the backend's stream reset); 0: never. Per Service with
    ``weighbridge.io/stream-idle-timeout``. One hour, not Envoy's 5 minutes: gRPC streams (watches,
    subscriptions) are often quiet for long, and a call's deadline is the client's to set."""
    client_keepalive_time_s: float = 7200.0
    """Seconds between PINGs to each client connection; 0: none. Two hours, gRPC servers'
    default: a client that vanished without FIN or RST (node lost, NAT entry expired) is then
    noticed and what it held freed."""
    client_keepalive_timeout_s: float = 20.0
    """A PING to a client unanswered this long closes its connection (gRPC servers' default)."""
    backend_stream_wait_s: float = 10.0
    """Seconds a call waits for a free stream on an endpoint whose connections all carry as many
    calls as it allows (``max_backend_connections`` of them); then it goes to another endpoint
    (a transparent retry) or fails UNAVAILABLE, rather than queueing without bound."""
    zone: str = ""
    """This proxy's zone (``topology.kubernetes.io/zone``), for zone-aware routing and
    EndpointSlice hints; "": unknown (no zone preference). The chart passes the pod's label,
    which Kubernetes copies from its node (PodTopologyLabels, on by default since 1.35)."""
    node: str = ""
    """This proxy's node name, for EndpointSlice node hints; "": unknown. The chart passes
    ``spec.nodeName``."""
    proxy_zones_refresh_s: float = 10.0
    """Seconds between counts of the live proxies per zone (their etcd status keys), which
    zone-aware routing weighs endpoints against: a proxy that comes or goes changes the plans
    within this, and a count costs etcd one small list."""
    max_message_bytes: int = 16 << 20
    """Largest gRPC message either way: 16 MiB holds what real APIs send (gRPC's own default
    of 4 MiB is often raised) while bounding what one call can make the proxy forward."""
    grace: float = 10.0
    """Seconds calls in flight get on shutdown: longer than a typical call, shorter than
    Kubernetes' 30 s termination grace."""
    eager_connections: bool = True
    """Connect to endpoints when they appear, so first calls pay no connection set-up; off
    (``--lazy-connect``) for very large sets that mostly idle."""
    xds_listen: str | None = None
    """The xDS server for proxyless gRPC clients (docs/xds.md); None: off, as it publishes
    endpoint addresses and only clusters that use it should open it. With ``tls_cert`` it
    serves TLS with the client port's certificate (and with ``tls_client_ca``, mTLS)."""
    xds_namespaces: tuple[str, ...] = ()
    """Namespaces whose Services every xDS client may see (``*``: all). Empty: none, so that
    without mTLS nothing is published until an operator says to whom; with mTLS a client also
    sees the namespace of its certificate's SPIFFE ID (``spiffe://…/ns/NAMESPACE/…``)."""
    xds_max_streams: int = 1000
    """xDS streams open at once; beyond, a new one is refused (RESOURCE_EXHAUSTED, counted).
    A gRPC client holds one per xDS server (its XdsClient is per process), so 1000 covers a
    thousand client processes per proxy; each stream holds its subscriptions' resources."""
    publish_status: bool = True
    """Publish the lease-bound status key <prefix>proxies/<id>, for ``wbctl proxies``."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        if not (self.max_connection_age >= 0 and math.isfinite(self.max_connection_age)):
            raise ValueError(f"max connection age must be ≥ 0 s, not {self.max_connection_age}")
        if self.max_backend_connections < 1:
            raise ValueError(
                f"max backend connections must be ≥ 1, not {self.max_backend_connections}"
            )
        for name, value, minimum in (
            ("backend handshake timeout", self.handshake_timeout_s, 0.0),
            ("backend keepalive timeout", self.keepalive_timeout_s, 0.0),
        ):
            if not (value > minimum and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0 s, not {value}")
        if not (self.keepalive_time_s >= 0 and math.isfinite(self.keepalive_time_s)):
            raise ValueError(f"backend keepalive time must be ≥ 0 s, not {self.keepalive_time_s}")
        for name, value in (
            ("client handshake timeout", self.client_handshake_timeout_s),
            ("client keepalive timeout", self.client_keepalive_timeout_s),
            ("backend stream wait", self.backend_stream_wait_s),
            ("proxy zones refresh", self.proxy_zones_refresh_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0 s, not {value}")
        for name, value in (
            ("client idle timeout", self.client_idle_timeout_s),
            ("stream idle timeout", self.stream_idle_timeout_s),
            ("client keepalive time", self.client_keepalive_time_s),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be ≥ 0 s, not {value}")
        for name, count, minimum in (
            ("max client connections", self.max_client_connections, 1),
            ("client max concurrent streams", self.client_max_concurrent_streams, 1),
            ("client max header list size", self.client_max_header_list_size, 1024),
        ):
            if not minimum <= count < 2**32:
                raise ValueError(f"{name} must be from {minimum} to 2³²-1, not {count}")
        if self.xds_max_streams < 1:
            raise ValueError(f"xDS max streams must be ≥ 1, not {self.xds_max_streams}")
        check_namespaces("xDS namespaces", self.xds_namespaces)
        if self.xds_namespaces and self.xds_listen is None:
            raise ValueError("--xds-namespaces needs --xds-listen")
        if self.retry_buffer_bytes < 1:
            raise ValueError(f"retry buffer bytes must be ≥ 1, not {self.retry_buffer_bytes}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max message bytes must be ≥ 1, not {self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is None and (self.tls_client_ca or self.allow_h2c):
            raise ValueError("--tls-client-ca and --allow-h2c need --tls-cert and --tls-key")
        if self.tls_allowed_identities and not self.tls_client_ca:
            raise ValueError("--tls-allowed-identities needs --tls-client-ca (mTLS)")
        if (self.backend_client_cert is None) != (self.backend_client_key is None):
            raise ValueError("--backend-client-cert and --backend-client-key go together")
        if not (self.tls_reload_interval_s > 0 and math.isfinite(self.tls_reload_interval_s)):
            raise ValueError(f"TLS reload interval must be > 0 s, not {self.tls_reload_interval_s}")

    def backend_tls(self, key: str, policy: BackendTls) -> tuple[str, str, str, str]:
        """The engine's ``tls`` for Service ``key`` (NAMESPACE/NAME) under ``policy``: (server
        name, CA file, client certificate file or "", its key or ""). Raises ValueError when
        this proxy lacks what the policy asks for."""
        namespace, _, name = key.partition("/")
        server_name = policy.server_name or f"{name}.{namespace}.svc"
        if policy.ca:
            if self.backend_ca_dir is None:
                raise ValueError(
                    f"backend TLS names CA bundle {policy.ca!r}, but this proxy has no "
                    "--backend-ca-dir"
                )
            ca = str(Path(self.backend_ca_dir) / policy.ca / "ca.crt")
        elif self.backend_ca is not None:
            ca = self.backend_ca
        else:
            raise ValueError("backend TLS names no CA bundle, and this proxy has no --backend-ca")
        cert, key_file = "", ""
        if policy.client_certificate:
            if self.backend_client_cert is None or self.backend_client_key is None:
                raise ValueError(
                    "backend TLS asks for a client certificate, but this proxy has no "
                    "--backend-client-cert and --backend-client-key"
                )
            cert, key_file = self.backend_client_cert, self.backend_client_key
        return server_name, ca, cert, key_file

    def backend_tls_files(self) -> list[Path]:
        """The backend TLS files this proxy was given, and the named CA bundles found now in
        ``backend_ca_dir`` (listed too, so that a bundle mounted later counts as a change)."""
        given = (self.backend_ca, self.backend_client_cert, self.backend_client_key)
        files = [Path(f) for f in given if f]
        if self.backend_ca_dir:
            files.append(Path(self.backend_ca_dir))
            files += sorted(Path(self.backend_ca_dir).glob("*/ca.crt"))
        return files

    def backend_tls_fingerprint(self) -> tuple[tuple[str, bytes | None], ...]:
        """What the backend TLS files hold now (None for one that cannot be read); blocking."""
        out: list[tuple[str, bytes | None]] = []
        for path in self.backend_tls_files():
            try:
                out.append((str(path), path.read_bytes() if path.is_file() else None))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    def tls_files(self) -> tuple[bytes, bytes, bytes | None] | None:
        """The client port's certificate chain, key and client CA bundle as they are now (the
        xDS port serves the same); None without TLS. Blocking; raises OSError."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return Path(self.tls_cert).read_bytes(), Path(self.tls_key).read_bytes(), ca

    @property
    def engine_tls(self) -> tuple[str, str, str, list[str], bool, float] | None:
        """The engine's ``tls`` argument, None without TLS."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return (
            self.tls_cert,
            self.tls_key,
            self.tls_client_ca or "",
            list(self.tls_allowed_identities),
            self.allow_h2c,
            self.tls_reload_interval_s,
        )

    @property
    def engine_threads(self) -> int:
        """``threads``, or the CPUs this process may use."""
        return self.threads if self.threads is not None else available_cpus()


DEFAULTS = ProxySettings()


def available_cpus(
    *, proc_self_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int:
    """CPUs this process may use: its affinity, capped by its cgroup's CPU quota (rounded up),
    as a container's ``resources.limits.cpu`` sets it; cgroup v2 and v1."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(proc_self_cgroup=proc_self_cgroup, root=root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def cgroup_cpu_quota(*, proc_self_cgroup: Path, root: Path) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, or None."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"; limits in cpu.max as "QUOTA PERIOD" or "max …"
            for d in _cgroup_dirs(root, path):
                quotas += _read_quota(d / "cpu.max", None)
        elif "cpu" in controllers.split(","):  # v1: cfs quota and period in two files
            for mount in (root / controllers, root / "cpu"):
                if mount.is_dir():
                    for d in _cgroup_dirs(mount, path):
                        quotas += _read_quota(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
                    break
    return min(quotas) if quotas else None


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and its ancestors under ``mount``; in a container with its own
    cgroup namespace the path is "/" and the mount is the container's cgroup."""
    parts = [p for p in path.split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read_quota(quota_file: Path, period_file: Path | None) -> list[float]:
    try:
        fields = quota_file.read_text().split()
        if period_file is not None:
            fields.append(period_file.read_text().strip())
    except OSError:
        return []
    if len(fields) != 2 or fields[0] in ("max", "-1"):
        return []
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []
