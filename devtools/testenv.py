"""A real control plane on loopback: etcd 3.6 and kube-apiserver, for tests and for humans.

    python -m devtools.testenv            # or scripts/dev-cluster

builds what is missing (scripts/build-testbin, cached outside the checkout), starts an etcd
for Weighbridge, an etcd for Kubernetes and a kube-apiserver on free loopback ports, prints
the kubeconfig path and etcd endpoint, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "weighbridge-test-admin-token"


def build(target: str) -> Path:
    """Path to the cached binary for ``target``, building it first when missing."""
    out = (
        subprocess.run(
            [str(ROOT / "scripts" / "build-testbin"), target],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    return Path(out[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    what: str, check: object, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{log.read_text()[-4000:]}")


class Etcd:
    """One real etcd member on loopback; start/stop/kill/restart keep its ports and data."""

    def __init__(self, workdir: Path, name: str = "etcd") -> None:
        self.binary = build("etcd")
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log = self.dir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    scheme = "http"

    def _tls_args(self) -> list[str]:
        """Extra etcd flags for TLS; none for this plaintext member."""
        return []

    def _health_context(self) -> ssl.SSLContext | None:
        return None

    def start(self, timeout: float = 30) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"{self.scheme}://{self.endpoint}"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--name={self.name}",
                    f"--data-dir={self.dir / 'data'}",
                    f"--listen-client-urls={client}",
                    f"--advertise-client-urls={client}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster={self.name}={peer}",
                    "--log-level=warn",
                    "--unsafe-no-fsync",
                    *self._tls_args(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(f"etcd {self.name}", self._healthy, self.proc, self.log, timeout)

    def _healthy(self) -> bool:
        try:
            url = f"{self.scheme}://{self.endpoint}/health"
            with urllib.request.urlopen(url, timeout=1, context=self._health_context()) as r:
                return bool(json.load(r).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


class CertificateAuthority:
    """A throwaway CA made with the ``openssl`` CLI (no Python dependency): EC P-256 keys,
    certificates valid for two days, issued into files the caller names."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = self.dir / f"{name}.crt"
        self.key = self.dir / f"{name}.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", self.key, "-out", self.cert, "-days", "2",
            "-subj", f"/CN=weighbridge-test-{name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(
        self, cn: str, cert: Path, key: Path, *, server: bool = False, san: str | None = None
    ) -> None:
        """A certificate with common name ``cn`` and its key, written to ``cert`` and ``key``
        by a rename each, as a Secret update swaps files: a reader sees the old file or the new
        one, never half of one. ``san`` is its subjectAltName (like ``DNS:a.b,URI:spiffe://x``;
        default: for a server IP:127.0.0.1 and DNS:localhost, for a client none)."""
        work = Path(tempfile.mkdtemp(dir=self.dir))
        ext = work / "ext.cnf"
        usage = "serverAuth" if server else "clientAuth"
        if san is None and server:
            san = "IP:127.0.0.1,DNS:localhost"
        san = f"subjectAltName={san}\n" if san else ""
        ext.write_text(
            f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\n{san}"
        )
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", work / "key.pem", "-out", work / "req.csr", "-subj", f"/CN={cn}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", work / "req.csr", "-CA", self.cert, "-CAkey", self.key,
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
            "-extfile", ext, "-out", work / "cert.pem",
        )  # fmt: skip
        cert.parent.mkdir(parents=True, exist_ok=True)
        key.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / "key.pem", key)
        os.replace(work / "cert.pem", cert)
        shutil.rmtree(work)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


class TLSEtcd(Etcd):
    """An etcd member that serves TLS only and requires a client certificate signed by a CA in
    ``trusted_ca_file`` (``--client-cert-auth``): with auth enabled, the certificate's CN is
    the user. ``ca`` issued its serving certificate (SAN 127.0.0.1, localhost) and issues
    client certificates with :meth:`client_files`; rewrite ``trusted_ca_file`` and restart it
    to change which CAs it trusts."""

    scheme = "https"

    def __init__(self, workdir: Path, name: str = "etcd-tls") -> None:
        super().__init__(workdir, name)
        self.pki = self.dir / "pki"
        self.ca = CertificateAuthority(self.pki)
        self.server_cert, self.server_key = self.pki / "server.crt", self.pki / "server.key"
        self.ca.issue("etcd", self.server_cert, self.server_key, server=True)
        self.trusted_ca_file = self.pki / "trusted-ca.pem"
        self.trusted_ca_file.write_bytes(self.ca.cert.read_bytes())
        self.root = self.client_files("root")

    def client_files(
        self, cn: str, ca: CertificateAuthority | None = None
    ) -> tuple[Path, Path, Path]:
        """(CA bundle that verifies this etcd, client certificate, key) for user ``cn``, issued
        by ``ca`` (default: this etcd's own CA) into ``pki/<cn>/``."""
        cert, key = self.pki / cn / "tls.crt", self.pki / cn / "tls.key"
        (ca or self.ca).issue(cn, cert, key)
        return self.ca.cert, cert, key

    def _tls_args(self) -> list[str]:
        return [
            f"--cert-file={self.server_cert}",
            f"--key-file={self.server_key}",
            "--client-cert-auth",
            f"--trusted-ca-file={self.trusted_ca_file}",
        ]

    def _health_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        _, cert, key = self.root
        context.load_cert_chain(str(cert), str(key))
        return context


class KubeAPIServer:
    """A real kube-apiserver on loopback, backed by its own real etcd."""

    def __init__(self, workdir: Path, etcd: Etcd, name: str = "kube-apiserver") -> None:
        self.binary = build("kube-apiserver")
        self.etcd = etcd
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "kube-apiserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kubeconfig = self.dir / "kubeconfig"
        self._prepare()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _prepare(self) -> None:
        (self.dir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')
        key, pub = self.dir / "sa.key", self.dir / "sa.pub"
        if not key.exists():
            subprocess.run(
                ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
            )
            subprocess.run(
                ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                check=True,
                capture_output=True,
            )

    def start(self, timeout: float = 90) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--etcd-servers=http://{self.etcd.endpoint}",
                    f"--cert-dir={self.dir / 'certs'}",
                    f"--secure-port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    # The "kubernetes" Service endpoints would have to be a non-loopback IP.
                    "--endpoint-reconciler-type=none",
                    "--service-cluster-ip-range=10.96.0.0/16",
                    "--authorization-mode=RBAC",
                    f"--token-auth-file={self.dir / 'tokens.csv'}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={self.dir / 'sa.pub'}",
                    f"--service-account-signing-key-file={self.dir / 'sa.key'}",
                    # No controller-manager runs, so nothing creates "default" ServiceAccounts.
                    "--disable-admission-plugins=ServiceAccount",
                    "--allow-privileged=true",
                    "--profiling=false",
                    "--v=0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait("kube-apiserver", self._ready, self.proc, self.log, timeout)
        self._write_kubeconfig()

    def _ready(self) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(
            f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def _write_kubeconfig(self) -> None:
        ca = self.dir / "certs" / "apiserver.crt"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "weighbridge-test",
                            "cluster": {"server": self.url, "certificate-authority": str(ca)},
                        }
                    ],
                    "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
                    "contexts": [
                        {
                            "name": "weighbridge-test",
                            "context": {"cluster": "weighbridge-test", "user": "admin"},
                        }
                    ],
                    "current-context": "weighbridge-test",
                },
                indent=2,
            )
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def control_plane(workdir: Path | None = None) -> Iterator[tuple[Etcd, KubeAPIServer]]:
    """Weighbridge's etcd and a kube-apiserver (with its own etcd), stopped on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="weighbridge-env-")) if workdir is None else workdir
    kube_etcd = Etcd(tmp, "kube-etcd")
    wb_etcd = Etcd(tmp, "etcd")
    apiserver = KubeAPIServer(tmp, kube_etcd)
    try:
        kube_etcd.start()
        wb_etcd.start()
        apiserver.start()
        yield wb_etcd, apiserver
    finally:
        apiserver.stop()
        wb_etcd.stop()
        kube_etcd.stop()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    with control_plane() as (etcd, apiserver):
        print(f"etcd endpoint:  {etcd.endpoint}")
        print(f"kubeconfig:     {apiserver.kubeconfig}")
        print(f"kube-apiserver: {apiserver.url}")
        print()
        print("Try:")
        print(f"  export WEIGHBRIDGE_ETCD={etcd.endpoint} KUBECONFIG={apiserver.kubeconfig}")
        print("  weighbridge-controller --kubeconfig $KUBECONFIG --etcd $WEIGHBRIDGE_ETCD")
        print("Ctrl-C stops everything.", flush=True)
        stop = {"now": False}

        def _stop(*_: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, _stop)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop["now"]:
                time.sleep(0.5)
    sys.stdout.write("stopped\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()


def start_controller(
    kubeconfig: Path,
    etcd_endpoint: str,
    log: Path,
    *,
    prefix: str = "/weighbridge/v1/",
    identity: str = "controller",
    lease_ttl: int | None = None,
    log_level: str = "info",
) -> subprocess.Popen[bytes]:
    """A weighbridge-controller process on ephemeral admin, health and metrics ports, JSON
    logs to ``log``; ``lease_ttl`` None: the controller's default."""
    tuning = [] if lease_ttl is None else ["--lease-ttl", str(lease_ttl)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.main",
                "--kubeconfig",
                str(kubeconfig),
                "--etcd",
                etcd_endpoint,
                "--prefix",
                prefix,
                "--id",
                identity,
                *tuning,
                "--admin-listen",
                "127.0.0.1:0",
                "--health-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-level",
                log_level,
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_proxy(
    etcd_endpoint: str,
    log: Path,
    *,
    port: int,
    admin_port: int,
    prefix: str = "/weighbridge/v1/",
    identity: str = "proxy",
    log_level: str = "info",
) -> subprocess.Popen[bytes]:
    """A weighbridge-proxy process on loopback, JSON logs to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataplane.main",
                "--etcd",
                etcd_endpoint,
                "--prefix",
                prefix,
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin_port}",
                "--health-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--id",
                identity,
                "--log-level",
                log_level,
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
