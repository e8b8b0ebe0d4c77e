"""TLS on the xDS port: the client port's certificate, key and client CA, reloaded alike.

gRPC asks :class:`_Reloader` before every handshake; it reads the files again at most every
``tls_reload_interval_s`` (mounted Secrets change by a symlink swap), and hands gRPC a new
configuration only when their content changed. A file that cannot be read then keeps the
configuration in force (logged), as the engine does on the client port.
"""

from __future__ import annotations

import threading
import time

import grpc
import structlog

from dataplane.settings import ProxySettings

log = structlog.get_logger(__name__)

Files = tuple[bytes, bytes, bytes | None]


def _configuration(files: Files) -> grpc.ServerCertificateConfiguration:
    cert, key, ca = files
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class _Reloader:
    def __init__(self, settings: ProxySettings, files: Files) -> None:
        self.settings = settings
        self.files = files
        self.read_at = time.monotonic()
        self.lock = threading.Lock()  # gRPC may call from its own threads

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self.lock:
            now = time.monotonic()
            if now - self.read_at < self.settings.tls_reload_interval_s:
                return None
            self.read_at = now
            try:
                files = self.settings.tls_files()
            except OSError as exc:
                log.error("xds_tls_files_unreadable", error=str(exc), kept="the files read before")
                return None
            if files is None or files == self.files:
                return None
            self.files = files
            log.info("xds_tls_files_changed")
            return _configuration(files)


def server_credentials(settings: ProxySettings) -> grpc.ServerCredentials | None:
    """The xDS port's credentials: None without ``tls_cert`` (plaintext); TLS with it; client
    certificates required, signed by ``tls_client_ca``, with it. Raises OSError when a file
    cannot be read at start."""
    files = settings.tls_files()
    if files is None:
        return None
    return grpc.dynamic_ssl_server_credentials(
        _configuration(files),
        _Reloader(settings, files),  # type: ignore[arg-type]  # None means "no change"
        require_client_authentication=files[2] is not None,
    )
