"""The etcd TLS settings: flags and environment, the errors a user sees for wrong files, and
the key ranges the etcd roles cover. (TLS itself is tested on a real etcd in
tests/integration/test_etcd_security.py.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from weighbridge import etcd as store
from weighbridge.cli import add_etcd_arguments, etcd_tls
from weighbridge.errors import EtcdCredentialsError, EtcdPermissionDeniedError
from weighbridge.etcdauth import grants, prefix_range_end
from weighbridge.keys import KeyScheme

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def parse(*argv: str) -> store.EtcdTLS | None:
    parser = argparse.ArgumentParser()
    add_etcd_arguments(parser)
    return etcd_tls(parser.parse_args(argv))


def test_no_tls_flag_means_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("WEIGHBRIDGE_ETCD_CACERT", "WEIGHBRIDGE_ETCD_CERT", "WEIGHBRIDGE_ETCD_KEY"):
        monkeypatch.delenv(env, raising=False)
    assert parse() is None


def test_tls_files_come_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHBRIDGE_ETCD_CACERT", "/env/ca.crt")
    monkeypatch.setenv("WEIGHBRIDGE_ETCD_CERT", "/env/tls.crt")
    monkeypatch.setenv("WEIGHBRIDGE_ETCD_KEY", "/env/tls.key")
    assert parse("--etcd-cert", "/flag/tls.crt", "--etcd-key", "/flag/tls.key") == store.EtcdTLS(
        cacert=Path("/env/ca.crt"), cert=Path("/flag/tls.crt"), key=Path("/flag/tls.key")
    )


def test_a_certificate_without_its_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEIGHBRIDGE_ETCD_KEY", raising=False)
    with pytest.raises(ValueError, match="--etcd-cert and --etcd-key go together"):
        parse("--etcd-cacert", "/ca.crt", "--etcd-cert", "/tls.crt")


def test_an_unreadable_file_is_named_with_its_flag(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(PEM)
    (tmp_path / "tls.key").write_bytes(b"not a key")
    with pytest.raises(
        EtcdCredentialsError, match=f"cannot read --etcd-cert {tmp_path}/nope: No such file"
    ):
        store.EtcdTLS(cacert=None, cert=tmp_path / "nope", key=tmp_path / "tls.key").read()
    with pytest.raises(
        EtcdCredentialsError, match=f"cannot read --etcd-key {tmp_path}/tls.key: not a PEM"
    ):
        store.EtcdTLS(cacert=None, cert=tmp_path / "ca.crt", key=tmp_path / "tls.key").read()
    with pytest.raises(EtcdCredentialsError, match="--etcd-cacert"):
        store.client(
            "127.0.0.1:2379", tls=store.EtcdTLS(cacert=tmp_path / "x", cert=None, key=None)
        )


def test_several_ip_endpoints_verify_the_first_address(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(PEM)
    tls = store.EtcdTLS(cacert=tmp_path / "ca.crt", cert=None, key=None)
    client = store.client("10.0.0.1:2379,10.0.0.2:2379", tls=tls)
    assert client._options["grpc.ssl_target_name_override"] == "10.0.0.1"
    assert "grpc.ssl_target_name_override" not in store.client("etcd:2379", tls=tls)._options


def test_permission_denied_is_told_apart_from_an_unreachable_etcd() -> None:
    denied = grpc.aio.AioRpcError(
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="etcdserver: permission denied",
    )
    wrapped = Exception("etcdserver: permission denied")
    wrapped.__cause__ = denied
    error = store.wrap_error("writing default/echo", wrapped)
    assert isinstance(error, EtcdPermissionDeniedError)
    assert "certificate (its CN) has no role" in str(error)


def test_roles_cover_exactly_their_prefixes() -> None:
    assert prefix_range_end(b"/weighbridge/v1/") == b"/weighbridge/v10"
    assert prefix_range_end(b"a\xff") == b"b"
    by_role = {(g.role, g.describe()): (g.prefix, g.range_end) for g in grants(KeyScheme())}
    assert by_role == {
        ("weighbridge-controller", "readwrite on /weighbridge/v1/*"): (
            b"/weighbridge/v1/",
            b"/weighbridge/v10",
        ),
        ("weighbridge-proxy", "read on /weighbridge/v1/services/*"): (
            b"/weighbridge/v1/services/",
            b"/weighbridge/v1/services0",
        ),
        ("weighbridge-proxy", "readwrite on /weighbridge/v1/proxies/*"): (
            b"/weighbridge/v1/proxies/",
            b"/weighbridge/v1/proxies0",
        ),
    }
