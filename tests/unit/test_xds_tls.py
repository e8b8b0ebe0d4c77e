"""The xDS port's TLS files: read again after the reload interval, handed to gRPC only when they
changed, the old ones kept when they cannot be read."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from dataplane.settings import ProxySettings
from dataplane.xds.tls import _Reloader, server_credentials


def files(tmp_path: Path, content: bytes) -> ProxySettings:
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_bytes(content + name.encode())
    return ProxySettings(
        tls_cert=str(tmp_path / "tls.crt"),
        tls_key=str(tmp_path / "tls.key"),
        tls_client_ca=str(tmp_path / "ca.crt"),
        tls_reload_interval_s=0.05,
    )


def test_changed_files_are_handed_to_grpc_after_the_interval_unchanged_ones_never(
    tmp_path: Path,
) -> None:
    settings = files(tmp_path, b"one")
    first = settings.tls_files()
    assert first is not None and first[2] == b"oneca.crt"
    reload = _Reloader(settings, first)
    assert reload() is None  # within the interval
    time.sleep(0.06)
    assert reload() is None  # read again: unchanged
    files(tmp_path, b"two")
    assert reload() is None  # within the interval again
    time.sleep(0.06)
    assert isinstance(reload(), grpc.ServerCertificateConfiguration)
    assert reload.files[0] == b"twotls.crt"


def test_unreadable_files_keep_the_configuration_in_force(tmp_path: Path) -> None:
    settings = files(tmp_path, b"one")
    first = settings.tls_files()
    assert first is not None
    reload = _Reloader(settings, first)
    (tmp_path / "tls.key").unlink()
    time.sleep(0.06)
    assert reload() is None
    assert reload.files == first


def test_no_certificate_is_plaintext() -> None:
    assert server_credentials(ProxySettings()) is None
