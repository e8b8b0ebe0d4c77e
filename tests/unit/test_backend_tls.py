"""weighbridge.io/backend-tls: its text, and how a proxy turns it into the engine's files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.settings import ProxySettings
from weighbridge.policy import (
    BackendTls,
    canonical_option,
    failover_from_options,
    format_backend_tls,
    parse_backend_tls,
)


def test_text_and_its_canonical_form() -> None:
    assert parse_backend_tls("off") is None
    assert parse_backend_tls("on") == BackendTls()
    policy = parse_backend_tls(
        "server-name: api.shop.svc\nca: shop-ca   # a Secret mounted under --backend-ca-dir\n"
        "client-certificate: on"
    )
    assert policy == BackendTls(server_name="api.shop.svc", ca="shop-ca", client_certificate=True)
    text = format_backend_tls(policy)
    assert text == "server-name: api.shop.svc; ca: shop-ca; client-certificate: on"
    assert parse_backend_tls(text) == policy
    assert canonical_option("backend-tls", "on") == "client-certificate: off"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("ca: ../../etc", "is not a name of a CA bundle"),
        ("ca: Shop", "is not a name of a CA bundle"),
        ("server-name: a b", "is not a DNS name"),
        ("client-certificate: yes", "is not on or off"),
        ("sni: x", "is not a key here"),
        ("ca: a; ca: b", "given twice"),
    ],
)
def test_bad_text_is_refused_with_the_reason(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_backend_tls(text)


@given(st.text(max_size=80))
def test_any_text_is_a_policy_or_a_value_error(text: str) -> None:
    try:
        policy = parse_backend_tls(text)
    except ValueError:
        return
    assert parse_backend_tls(format_backend_tls(policy)) == policy


def test_a_set_without_the_option_is_plaintext() -> None:
    failover, errors = failover_from_options({})
    assert failover.backend_tls is None and not errors
    failover, errors = failover_from_options({"backend-tls": "ca: /etc"})
    assert failover.backend_tls is None and "backend-tls" in errors


def test_the_proxy_resolves_files_or_says_what_it_lacks() -> None:
    bare = ProxySettings()
    with pytest.raises(ValueError, match="no --backend-ca"):
        bare.backend_tls("shop/api", BackendTls())
    with pytest.raises(ValueError, match="no --backend-ca-dir"):
        bare.backend_tls("shop/api", BackendTls(ca="shop-ca"))
    s = ProxySettings(
        backend_ca="/ca/default.crt",
        backend_ca_dir="/ca/named",
        backend_client_cert="/me/tls.crt",
        backend_client_key="/me/tls.key",
    )
    assert s.backend_tls("shop/api", BackendTls()) == ("api.shop.svc", "/ca/default.crt", "", "")
    assert s.backend_tls(
        "shop/api", BackendTls(server_name="x.example", ca="shop-ca", client_certificate=True)
    ) == ("x.example", "/ca/named/shop-ca/ca.crt", "/me/tls.crt", "/me/tls.key")
    with pytest.raises(ValueError, match="no --backend-client-cert"):
        ProxySettings(backend_ca="/ca").backend_tls("a/b", BackendTls(client_certificate=True))
    with pytest.raises(ValueError, match="go together"):
        ProxySettings(backend_client_cert="/me/tls.crt")


def test_the_controller_stores_the_annotation_canonically_or_posts_its_error() -> None:
    from controlplane.annotations import parse_policies
    from controlplane.errors import AnnotationError

    assert parse_policies({"weighbridge.io/backend-tls": "ca: shop-ca"}) == {
        "backend-tls": "ca: shop-ca; client-certificate: off"
    }
    with pytest.raises(AnnotationError) as info:
        parse_policies({"weighbridge.io/backend-tls": "client-certificate: yes"})
    assert info.value.reason == "InvalidBackendTLS"
