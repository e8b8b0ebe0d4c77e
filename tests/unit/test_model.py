"""The wire contract: codec round trip, validation, key scheme, and generated code in sync."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weighbridge.errors import DecodeError
from weighbridge.keys import KeyScheme, ServiceKey, parse_service_key
from weighbridge.model import STRATEGIES, BackendSet, Endpoint, decode, encode
from weighbridge.wbctl import parse_endpoint

ROOT = Path(__file__).resolve().parents[2]

endpoints = st.builds(
    Endpoint,
    address=st.ip_addresses().map(str),
    port=st.integers(1, 65535),
    weight=st.integers(0, 2**32 - 1),
    zone=st.text(max_size=5),
    pod=st.text(max_size=5),
    serving=st.booleans(),
    terminating=st.booleans(),
)


@given(
    st.builds(
        BackendSet,
        namespace=st.just("default"),
        name=st.just("api"),
        strategy=st.sampled_from(STRATEGIES),
        endpoints=st.lists(endpoints, max_size=5).map(tuple),
        generation=st.integers(0, 2**64 - 1),
        options=st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
        grpc_services=st.lists(st.text(max_size=5), max_size=2).map(tuple),
    )
)
def test_codec_round_trip(bs: BackendSet) -> None:
    assert decode(encode(bs)) == bs


def test_decode_rejects_garbage_and_invalid_content() -> None:
    with pytest.raises(DecodeError):
        decode(b"\xff\xff garbage")
    bad = encode(BackendSet(namespace="default", name="api", strategy="random")).replace(
        b"random", b"rand0m"
    )
    with pytest.raises(DecodeError, match="unknown strategy"):
        decode(bad)


def test_probabilities_follow_the_strategy() -> None:
    eps = (
        Endpoint("198.18.0.1", 1, weight=3),
        Endpoint("198.18.0.2", 1, weight=1),
        Endpoint("198.18.0.3", 1, weight=5, terminating=True),
        Endpoint("198.18.0.4", 1, weight=0),
    )
    wrr = BackendSet(namespace="ns", name="a", strategy="weighted_round_robin", endpoints=eps)
    assert wrr.probabilities() == {"198.18.0.1:1": Fraction(3, 4), "198.18.0.2:1": Fraction(1, 4)}
    rr = BackendSet(namespace="ns", name="a", strategy="round_robin", endpoints=eps)
    assert set(rr.probabilities().values()) == {Fraction(1, 2)}


def test_same_content_ignores_bookkeeping() -> None:
    a = BackendSet(namespace="ns", name="a", strategy="random", generation=1, built_unix_nanos=5)
    b = BackendSet(namespace="ns", name="a", strategy="random", generation=2, built_unix_nanos=9)
    assert a.same_content(b)
    assert not a.same_content(None)


def test_key_scheme() -> None:
    scheme = KeyScheme("/wb/")
    assert scheme.service(ServiceKey("ns/a")) == b"/wb/services/ns/a"
    assert scheme.service_key_of(b"/wb/services/ns/a") == "ns/a"
    with pytest.raises(ValueError, match="start and end"):
        KeyScheme("wb")
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        parse_service_key("nope")
    with pytest.raises(ValueError, match="DNS-1035"):
        parse_service_key("ns/Bad_Name")


def test_wbctl_endpoint_syntax() -> None:
    assert parse_endpoint("198.18.0.1:80=3") == Endpoint("198.18.0.1", 80, 3)
    assert parse_endpoint("[::1]:80") == Endpoint("::1", 80, 1)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_endpoint("198.18.0.1")
    with pytest.raises(ValueError, match=r"'example\.com' is not an IP address"):
        parse_endpoint("example.com:80")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        check=True,
    )
    for generated in tmp_path.rglob("*.py*"):
        committed = ROOT / generated.relative_to(tmp_path)
        assert committed.read_text() == generated.read_text(), (
            f"{committed} is stale: run scripts/gen-proto"
        )
