"""etcd locked down, on a real etcd: TLS only, client-certificate auth (the user is the
certificate's CN) and the roles ``wbctl etcd-auth setup`` creates. Only the controller may
write sets; a proxy reads them and writes its own status; no certificate, no access; a rotated
certificate is used at the next reconnect without restarting anything."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aetcd.exceptions
import grpc
import pytest

from devtools import testenv
from tests.integration import kubeobjects as ko
from tests.integration.conftest import (
    Cluster,
    eventually,
    running_controller,
    running_proxy,
    stored_set,
)
from weighbridge import etcd as store
from weighbridge.errors import EtcdPermissionDeniedError, EtcdUnavailableError
from weighbridge.etcdauth import CONTROLLER, PROXY
from weighbridge.keys import KeyScheme
from weighbridge.model import BackendSet, Endpoint
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration
SCHEME = KeyScheme("/wbsec/")


def wbctl(server: testenv.TLSEtcd, files: tuple[Path, Path, Path], *args: str) -> str:
    """wbctl as a user runs it, its TLS files from the environment (as the chart sets them);
    returns stdout, failing with stderr."""
    cacert, cert, key = files
    env = {
        **os.environ,
        "WEIGHBRIDGE_ETCD": server.endpoint,
        "WEIGHBRIDGE_ETCD_CACERT": str(cacert),
        "WEIGHBRIDGE_ETCD_CERT": str(cert),
        "WEIGHBRIDGE_ETCD_KEY": str(key),
    }
    done = subprocess.run(
        [sys.executable, "-m", "weighbridge.wbctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def locked_down(workdir: Path) -> testenv.TLSEtcd:
    server = testenv.TLSEtcd(workdir)
    server.start()
    wbctl(server, server.root, "etcd-auth", "setup", "--prefix", SCHEME.prefix)
    return server


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testenv.TLSEtcd]:
    server = locked_down(tmp_path_factory.mktemp("etcd-security"))
    try:
        yield server
    finally:
        server.stop()


def tls(files: tuple[Path, Path, Path]) -> store.EtcdTLS:
    cacert, cert, key = files
    return store.EtcdTLS(cacert=cacert, cert=cert, key=key)


def backend_set(name: str, generation: int = 1) -> BackendSet:
    return BackendSet(
        namespace="default",
        name=name,
        strategy="round_robin",
        endpoints=(Endpoint(address="10.1.2.3", port=50051),),
        generation=generation,
    )


def test_setup_is_idempotent_and_says_what_it_found(secure_etcd: testenv.TLSEtcd) -> None:
    again = wbctl(secure_etcd, secure_etcd.root, "etcd-auth", "setup", "--prefix", SCHEME.prefix)
    assert again.splitlines() == [
        "role weighbridge-controller: has readwrite on /wbsec/*",
        "role weighbridge-proxy: has read on /wbsec/services/*",
        "role weighbridge-proxy: has readwrite on /wbsec/proxies/*",
        "user weighbridge-controller: has role weighbridge-controller",
        "user weighbridge-proxy: has role weighbridge-proxy",
        "user root: has role root",
        "auth: already enabled",
    ]


async def test_only_the_controller_writes_sets_and_a_proxy_writes_only_its_status(
    secure_etcd: testenv.TLSEtcd,
) -> None:
    controller = store.client(secure_etcd.endpoint, tls=tls(secure_etcd.client_files(CONTROLLER)))
    proxy = store.client(secure_etcd.endpoint, tls=tls(secure_etcd.client_files(PROXY)))
    try:
        await store.put_set(controller, SCHEME, backend_set("cart"))
        found = await store.get_set(proxy, SCHEME, "default/cart")
        assert found is not None and found.backend_set == backend_set("cart")
        _, listed = await store.list_sets(proxy, SCHEME)
        assert [s.key for s in listed] == ["default/cart"]

        # The proxy's user may not write a set, delete one, or take the leader key.
        with pytest.raises(EtcdPermissionDeniedError, match="permission denied"):
            await store.put_set(proxy, SCHEME, backend_set("cart", generation=2))
        with pytest.raises(EtcdPermissionDeniedError):
            await store.delete_set(proxy, SCHEME, "default/cart")
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await proxy.put(SCHEME.leader_key, b"proxy")
        still = await store.get_set(controller, SCHEME, "default/cart")
        assert still is not None and still.backend_set == backend_set("cart")

        # Its lease-bound status key is the one thing it writes.
        lease = await proxy.lease(10)
        await proxy.put(SCHEME.proxy("p-1"), b"status", lease=lease.id)
        assert (await controller.get(SCHEME.proxy("p-1"))).value == b"status"
        # Nothing outside the prefix, for either.
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await controller.put(b"/elsewhere", b"x")
    finally:
        await store.close(controller)
        await store.close(proxy)


async def test_without_a_trusted_client_certificate_etcd_refuses(
    secure_etcd: testenv.TLSEtcd, tmp_path: Path
) -> None:
    cacert, _, _ = secure_etcd.root
    no_cert = store.client(
        secure_etcd.endpoint, tls=store.EtcdTLS(cacert=cacert, cert=None, key=None)
    )
    plaintext = store.client(secure_etcd.endpoint)
    other_ca = testenv.CertificateAuthority(tmp_path / "other", "other-ca")
    foreign = tls(secure_etcd.client_files("foreign-controller", other_ca))
    foreign_client = store.client(secure_etcd.endpoint, tls=foreign)
    try:
        with pytest.raises(EtcdUnavailableError, match="TLS handshake"):
            await store.list_sets(no_cert, SCHEME)
        with pytest.raises(EtcdUnavailableError):
            await store.list_sets(plaintext, SCHEME)
        with pytest.raises(EtcdUnavailableError, match="TLS handshake"):
            await store.list_sets(foreign_client, SCHEME)
    finally:
        for c in (no_cert, plaintext, foreign_client):
            await store.close(c)


async def test_a_proxy_with_the_proxy_certificate_serves_what_the_controller_wrote(
    secure_etcd: testenv.TLSEtcd,
) -> None:
    controller = store.client(secure_etcd.endpoint, tls=tls(secure_etcd.client_files(CONTROLLER)))
    try:
        revision = await store.put_set(controller, SCHEME, backend_set("shop"))
        async with running_proxy(
            secure_etcd.endpoint,
            SCHEME,
            proxy_id="p-secure",
            etcd_tls=tls(secure_etcd.client_files(PROXY)),
        ) as proxy:
            async with asyncio.timeout(15):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.admin_port}") as admin:
                    listing = await admin_pb2_grpc.AdminStub(admin).ListBackendSets(
                        admin_pb2.ListBackendSetsRequest()
                    )
            assert listing.applied_revision >= revision
            assert "default/shop" in {
                f"{s.backend_set.namespace}/{s.backend_set.name}" for s in listing.services
            }
            # It published its status under proxies/, which its role allows.
            await eventually(
                lambda: store.list_proxy_statuses(controller, SCHEME),
                lambda found: "p-secure" in {s.id for s in found[0]},
                what="the proxy's status key",
            )
            # A later write by the controller reaches it through the watch.
            later = await store.put_set(controller, SCHEME, backend_set("shop", generation=2))
            await eventually(
                lambda: _applied(proxy),
                lambda applied: applied >= later,
                what=f"proxy applied revision {later}",
            )
    finally:
        await store.close(controller)


async def _applied(proxy: object) -> int:
    return proxy.subscription.applied_revision  # type: ignore[attr-defined,no-any-return]


async def test_a_rotated_client_certificate_is_used_at_the_next_reconnect(
    tmp_path: Path,
) -> None:
    server = locked_down(tmp_path / "rotation")
    try:
        files = server.client_files(PROXY)
        client = store.client(server.endpoint, tls=tls(files))
        controller = store.client(server.endpoint, tls=tls(server.client_files(CONTROLLER)))
        stale_dir = tmp_path / "stale"
        stale_dir.mkdir()
        stale = (files[0], stale_dir / "tls.crt", stale_dir / "tls.key")
        shutil.copy(files[1], stale[1])
        shutil.copy(files[2], stale[2])
        stale_client = store.client(server.endpoint, tls=tls(stale))
        try:
            async with running_proxy(
                server.endpoint, SCHEME, proxy_id="p-rotated", etcd_tls=tls(files)
            ) as proxy:
                await store.list_sets(client, SCHEME)
                await store.list_sets(stale_client, SCHEME)

                # The CA that signs client certificates is replaced: new files at the same
                # paths (as a Secret update swaps them), and etcd, restarted, trusts only it.
                new_ca = testenv.CertificateAuthority(tmp_path / "ca2", "ca2")
                for user in (PROXY, CONTROLLER):
                    server.client_files(user, new_ca)
                server.root = server.client_files("root", new_ca)
                server.trusted_ca_file.write_bytes(new_ca.cert.read_bytes())
                await asyncio.to_thread(server.restart)

                # The same client objects reconnect with the new certificates ...
                await eventually(
                    lambda: store.list_sets(client, SCHEME),
                    lambda listed: True,
                    what="a list with the rotated certificate",
                )
                later = await eventually(
                    lambda: store.put_set(controller, SCHEME, backend_set("rotated")),
                    lambda revision: True,
                    what="a write with the controller's rotated certificate",
                )
                # ... the running proxy too: its watch, broken by the restart, resumes.
                await eventually(
                    lambda: _applied(proxy),
                    lambda applied: applied >= later,
                    what=f"the proxy applied revision {later}",
                )
                # ... while the old certificate is refused now.
                with pytest.raises(EtcdUnavailableError):
                    await store.list_sets(stale_client, SCHEME)
        finally:
            for c in (client, controller, stale_client):
                await store.close(c)
    finally:
        server.stop()


async def test_several_ip_endpoints_connect_over_tls(secure_etcd: testenv.TLSEtcd) -> None:
    # One gRPC target over all members: the certificate is checked against the first address.
    endpoints = f"{secure_etcd.endpoint},{secure_etcd.endpoint}"
    client = store.client(endpoints, tls=tls(secure_etcd.client_files(CONTROLLER)))
    try:
        await store.list_sets(client, SCHEME)
    finally:
        await store.close(client)


async def test_a_controller_with_its_certificate_leads_and_publishes(
    secure_etcd: testenv.TLSEtcd, apiserver: testenv.KubeAPIServer, k8s: Cluster
) -> None:
    # A prefix of its own (a second `setup` adds its grants), since a controller's resync
    # removes every set it does not manage.
    scheme = KeyScheme("/wbsec-controller/")
    wbctl(secure_etcd, secure_etcd.root, "etcd-auth", "setup", "--prefix", scheme.prefix)
    proxy = store.client(secure_etcd.endpoint, tls=tls(secure_etcd.client_files(PROXY)))
    try:
        async with running_controller(
            apiserver.kubeconfig,
            secure_etcd.endpoint,
            scheme,
            etcd_tls=tls(secure_etcd.client_files(CONTROLLER)),
        ):
            await k8s.create(
                ko.service(k8s.ns, "api", {"weighbridge.io/strategy": "weighted_random"})
            )
            await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-1", [ko.Ep(ko.address(1))]))
            published = await eventually(
                lambda: stored_set(proxy, scheme, f"{k8s.ns}/api"),
                lambda found: found is not None,
                what="the set the controller published, read with the proxy's certificate",
            )
            assert published is not None and published.strategy == "weighted_random"
    finally:
        await store.close(proxy)
