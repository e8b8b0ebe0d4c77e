"""TLS on the proxy's client port, on real parts: certificates made by the openssl CLI, a real
etcd, the proxy and its engine, a real grpc.aio backend, and grpc.aio secure channels (and
Python's ssl module, to see which certificate a new connection gets)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import grpc
import pytest

from devtools import testenv
from tests.echo import EchoBackend, echo_backends
from tests.integration.conftest import eventually, running_proxy
from tests.integration.test_proxy import applied, channel, put, who
from weighbridge.keys import KeyScheme
from weighbridge.policy import canonical_option

pytestmark = pytest.mark.integration
AUTHORITY = "echo.default"


class Pki:
    """A CA (devtools' openssl-made one) and the certificates it signs, as PEM files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.authority = testenv.CertificateAuthority(root)
        self.ca = self.authority.cert

    def issue(self, name: str, cn: str, san: str, *, server: bool = True) -> tuple[Path, Path]:
        """(certificate, key) for subject CN ``cn`` with subjectAltName ``san``."""
        cert, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        self.authority.issue(cn, cert, key, server=server, san=san)
        return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    return Pki(tmp_path_factory.mktemp("pki"))


@contextlib.asynccontextmanager
async def secure(
    port: int, pki: Pki, client: tuple[Path, Path] | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.default_authority", AUTHORITY)]
    ) as ch:
        yield ch


async def answer(ch: grpc.aio.Channel) -> str:
    """The backend that answered a unary call, or the status code's name if it failed."""
    call = ch.unary_unary("/test.Echo/Unary")(b"", timeout=5)
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return str(dict(await call.initial_metadata())["x-backend"])


def served_certificate(port: int, pki: Pki) -> bytes:
    """The DER certificate a new TLS connection to the proxy gets (ALPN h2)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=AUTHORITY) as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


async def test_tls_on_the_client_port_and_plaintext_refused(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, pki: Pki
) -> None:
    cert, key = pki.issue("server", "proxy", f"DNS:{AUTHORITY},IP:127.0.0.1")
    async with (
        echo_backends("a") as (a,),
        running_proxy(etcd_server.endpoint, scheme, tls_cert=str(cert), tls_key=str(key)) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        async with secure(proxy.port, pki) as ch:
            assert [await answer(ch) for _ in range(3)] == ["a"] * 3
        async with channel(proxy) as plain:
            assert await answer(plain) == "UNAVAILABLE"
        assert proxy.engine.tls_failures()["plaintext"] >= 1


async def test_h2c_beside_tls_when_allowed(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, pki: Pki
) -> None:
    cert, key = pki.issue("server-h2c", "proxy", f"DNS:{AUTHORITY}")
    async with (
        echo_backends("a") as (a,),
        running_proxy(
            etcd_server.endpoint, scheme, tls_cert=str(cert), tls_key=str(key), allow_h2c=True
        ) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        async with secure(proxy.port, pki) as ch:
            assert await answer(ch) == "a"
        async with channel(proxy) as plain:
            assert await answer(plain) == "a"


async def test_mtls_lets_in_only_allowed_client_identities(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, pki: Pki
) -> None:
    cert, key = pki.issue("server-mtls", "proxy", f"DNS:{AUTHORITY}")
    allowed = pki.issue("client-a", "client-a", "URI:spiffe://test/ns/shop/sa/api", server=False)
    other = pki.issue("client-b", "client-b", "URI:spiffe://test/ns/evil/sa/x", server=False)
    async with (
        echo_backends("a") as (a,),
        running_proxy(
            etcd_server.endpoint,
            scheme,
            tls_cert=str(cert),
            tls_key=str(key),
            tls_client_ca=str(pki.ca),
            tls_allowed_identities=("spiffe://test/ns/shop/sa/api",),
        ) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        async with secure(proxy.port, pki, allowed) as ch:
            assert await answer(ch) == "a"
        async with secure(proxy.port, pki) as ch:
            assert await answer(ch) == "UNAVAILABLE", "no client certificate"
        async with secure(proxy.port, pki, other) as ch:
            assert await answer(ch) == "UNAVAILABLE", "a certificate the CA signed, not allowed"
        assert a.calls == 1
        assert proxy.engine.tls_failures()["handshake_failed"] >= 2


async def test_a_rotated_certificate_is_served_without_a_restart(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, pki: Pki, tmp_path: Path
) -> None:
    """As a mounted Secret changes: new files swapped in by a symlink (the kubelet's ..data)."""
    first = pki.issue("rot-1", "proxy", f"DNS:{AUTHORITY}")
    second = pki.issue("rot-2", "proxy", f"DNS:{AUTHORITY}")
    mounted = tmp_path / "secret"
    mounted.mkdir()

    def publish(pair: tuple[Path, Path], version: str) -> None:
        data = mounted / version
        data.mkdir()
        shutil.copy(pair[0], data / "tls.crt")
        shutil.copy(pair[1], data / "tls.key")
        link = mounted / "..data_tmp"
        link.symlink_to(version)
        link.replace(mounted / "..data")

    publish(first, "v1")
    for name in ("tls.crt", "tls.key"):
        (mounted / name).symlink_to(f"..data/{name}")
    async with (
        echo_backends("a") as (a,),
        running_proxy(
            etcd_server.endpoint,
            scheme,
            tls_cert=str(mounted / "tls.crt"),
            tls_key=str(mounted / "tls.key"),
            tls_reload_interval_s=0.1,
        ) as proxy,
    ):
        await applied(proxy, await put(etcd, scheme, "round_robin", [a]))
        assert served_certificate(proxy.port, pki) == der_of(first[0])
        async with secure(proxy.port, pki) as ch:
            assert await answer(ch) == "a"
            publish(second, "v2")
            await eventually(
                lambda: asyncio.to_thread(served_certificate, proxy.port, pki),
                lambda der: der == der_of(second[0]),
                what="the new certificate served",
            )
            # The connection opened before the rotation still carries calls.
            assert await answer(ch) == "a"


async def test_tls_only_backends_reached_by_a_services_annotation(
    etcd: aetcd.Client, scheme: KeyScheme, etcd_server: testenv.Etcd, pki: Pki
) -> None:
    """weighbridge.io/backend-tls (as the controller stores it in the set's options): a
    backend that serves TLS only and requires client certificates, reached through the proxy;
    without the client certificate its handshake refuses the proxy."""
    cert, key = pki.issue("backend", "backend", "DNS:echo.default.svc")
    proxy_cert, proxy_key = pki.issue(
        "proxy-client", "weighbridge-proxy", "DNS:proxy", server=False
    )
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    b = EchoBackend("secure", tls=credentials)
    await b.start()
    try:
        async with running_proxy(
            etcd_server.endpoint,
            scheme,
            backend_ca=str(pki.ca),
            backend_client_cert=str(proxy_cert),
            backend_client_key=str(proxy_key),
        ) as proxy:
            # The server name defaults to the Service's, echo.default.svc.
            on = {"backend-tls": canonical_option("backend-tls", "client-certificate: on")}
            await applied(proxy, await put(etcd, scheme, "round_robin", [b], options=on))
            async with channel(proxy) as ch:
                assert [await who(ch) for _ in range(3)] == ["secure"] * 3

            # Plaintext to a TLS-only backend: its connection fails, the call UNAVAILABLE.
            await applied(proxy, await put(etcd, scheme, "round_robin", [b]))
            async with channel(proxy) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/test.Echo/Unary")(b"", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            # TLS without the client certificate: the backend's handshake refuses it.
            off = {"backend-tls": canonical_option("backend-tls", "client-certificate: off")}
            await applied(proxy, await put(etcd, scheme, "round_robin", [b], options=off))
            async with channel(proxy) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/test.Echo/Unary")(b"", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            calls = b.calls

            # A CA bundle this proxy does not have: the set is not applied, the last one stays.
            missing = {"backend-tls": canonical_option("backend-tls", "ca: shop-ca")}
            revision = await put(etcd, scheme, "round_robin", [b], options=missing)

            async def not_applied() -> int:
                failure = proxy.routes.unapplied.get("default/echo")
                return 0 if failure is None else int(failure.mod_revision)

            await eventually(not_applied, lambda r: r == revision, what="the set rejected")
            async with channel(proxy) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/test.Echo/Unary")(b"", timeout=5)
            assert b.calls == calls
    finally:
        await b.stop(0)


async def test_rotated_backend_tls_files_are_used_without_a_restart(
    etcd: aetcd.Client,
    scheme: KeyScheme,
    etcd_server: testenv.Etcd,
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The proxy trusts the wrong CA, then its mounted CA file is replaced by the right one:
    calls get through without the set being written again or the proxy restarting."""
    cert, key = pki.issue("backend-rot", "backend", "DNS:echo.default.svc")
    stranger = Pki(tmp_path_factory.mktemp("other-pki"))
    trusted = tmp_path_factory.mktemp("trust") / "ca.crt"
    shutil.copy(stranger.ca, trusted)
    b = EchoBackend(
        "secure", tls=grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    )
    await b.start()
    try:
        async with running_proxy(
            etcd_server.endpoint, scheme, backend_ca=str(trusted), tls_reload_interval_s=0.1
        ) as proxy:
            on = {"backend-tls": canonical_option("backend-tls", "on")}
            await applied(proxy, await put(etcd, scheme, "round_robin", [b], options=on))
            async with channel(proxy) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/test.Echo/Unary")(b"", timeout=5)
                assert "TLS" in (info.value.details() or ""), info.value
                shutil.copy(pki.ca, trusted)

                async def answered() -> str:
                    return await who(ch)

                await eventually(answered, lambda w: w == "secure", what="the right CA used")
    finally:
        await b.stop(0)
