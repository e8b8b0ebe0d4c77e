"""The annotation parser: named cases and a fuzz test (it must never raise anything else)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.annotations import (
    GRPC_SERVICES,
    POLICIES,
    PORT,
    STRATEGY,
    WEIGHTS,
    parse_grpc_services,
    parse_pod_weight,
    parse_policies,
    parse_selector,
    parse_service,
    parse_weights,
)
from controlplane.errors import AnnotationError


def test_group_shares_in_percent() -> None:
    spec = parse_weights("version=v1: 90%\nversion=v2: 10%")
    assert spec.percent
    assert [g.share for g in spec.groups] == [90, 10]
    assert spec.groups[0].selector is not None
    assert spec.groups[0].selector.matches({"version": "v1", "app": "x"})
    assert not spec.groups[0].selector.matches({"version": "v2"})


def test_single_line_with_semicolons_comments_and_pods() -> None:
    spec = parse_weights("track=stable: 3; track=canary: 1  # 75/25\npod/api-0: 7")
    assert [g.share for g in spec.groups] == [3, 1]
    assert not spec.percent
    assert spec.pod_weights == {"api-0": 7}


def test_rest_group_and_decimal_percent() -> None:
    spec = parse_weights("version=v2: 12.5%\n*: 87.5%")
    assert spec.groups[1].selector is None
    assert spec.groups[0].share == Fraction(25, 2)


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("app=a,version!=v2", {"app": "a", "version": "v1"}, True),
        ("app=a,version!=v2", {"app": "a", "version": "v2"}, False),
        ("version in (v1, v3)", {"version": "v3"}, True),
        ("version notin (v1,v3)", {}, True),
        ("canary", {"canary": ""}, True),
        ("!canary", {"canary": "yes"}, False),
        ("example.com/track==beta", {"example.com/track": "beta"}, True),
    ],
)
def test_selectors(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version=v1 90%", "is not 'TARGET: VALUE'"),
        ("version=v1: 90%\nversion=v2: 5%", "add up to 95%"),
        ("version=v1: 50%\nversion=v2: 50", "mix of percentages"),
        ("version=v1: 1\nversion=v1: 2", "given twice"),
        ("pod/a: 1\npod/a: 2", "given twice"),
        ("pod/A_B: 1", "is not a pod name"),
        ("pod/a: -1", "is not a whole number"),
        ("version=v1: abc", "is not a number"),
        ("version=v1: 1e3", "is not a number"),
        ("version=v1: 0\nversion=v2: 0", "every group share is 0"),
        ("version in (v1: 1", "unbalanced"),
        ("ver sion=v1: 1", "is not a label key"),
        ("version=v 1: 1", "is not a label value"),
        (": 1", "is not 'TARGET: VALUE'"),
    ],
)
def test_bad_weights_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(AnnotationError, match=r"weighbridge\.io/weights") as info:
        parse_weights(text)
    assert info.value.reason == "InvalidWeights"
    assert message in info.value.message


def test_strategy_is_required_and_checked() -> None:
    assert parse_service({"weighbridge.io/strategy": " random "}).strategy == "random"
    with pytest.raises(AnnotationError) as info:
        parse_service({"weighbridge.io/strategy": "fastest"})
    assert info.value.reason == "InvalidStrategy"
    assert "round_robin" in info.value.message


def test_ring_hash_needs_a_hash_key() -> None:
    with pytest.raises(AnnotationError) as info:
        parse_service({"weighbridge.io/strategy": "ring_hash"})
    assert info.value.reason == "InvalidHash"
    assert "weighbridge.io/hash" in info.value.message
    spec = parse_service(
        {"weighbridge.io/strategy": "ring_hash", "weighbridge.io/hash": "header: x-user-id"}
    )
    assert spec.options == {"hash": "header: x-user-id; bound: 125%"}


def test_zone_aware_routing_does_not_combine_with_ring_hash() -> None:
    ring = {"weighbridge.io/strategy": "ring_hash", "weighbridge.io/hash": "header: x-user-id"}
    with pytest.raises(AnnotationError) as info:
        parse_service({**ring, "weighbridge.io/zone-aware": "on"})
    assert info.value.reason == "InvalidZoneAware"
    assert "ring_hash keeps each key on one endpoint" in info.value.message
    spec = parse_service({**ring, "weighbridge.io/zone-aware": "prefer: off"})
    assert spec.options["zone-aware"] == "prefer: off; min-endpoints: 6; hints: on"
    spec = parse_service({"weighbridge.io/strategy": "random", "weighbridge.io/zone-aware": "on"})
    assert spec.options == {"zone-aware": "prefer: on; min-endpoints: 6; hints: on"}


def test_grpc_services_and_port() -> None:
    spec = parse_service(
        {
            "weighbridge.io/strategy": "round_robin",
            "weighbridge.io/grpc-services": "helloworld.Greeter, grpc.health.v1.Health helloworld.Greeter",
            "weighbridge.io/port": "grpc",
        }
    )
    assert spec.grpc_services == ("helloworld.Greeter", "grpc.health.v1.Health")
    assert spec.port == "grpc"
    with pytest.raises(AnnotationError, match="not a fully qualified"):
        parse_grpc_services("hello/world")


@pytest.mark.parametrize("value", ["-1", "1.5", "x", "", "1000001"])
def test_bad_pod_weight(value: str) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_pod_weight("api-0", {"weighbridge.io/weight": value})
    assert info.value.reason == "InvalidPodWeight"
    assert "pod api-0" in info.value.message


def test_pod_weight() -> None:
    assert parse_pod_weight("p", {"weighbridge.io/weight": " 3 "}) == 3
    assert parse_pod_weight("p", {}) is None
    assert parse_pod_weight("p", None) is None


def test_failover_policies_become_canonical_options() -> None:
    spec = parse_service(
        {
            "weighbridge.io/strategy": "round_robin",
            "weighbridge.io/retry": "on: UNAVAILABLE, resource-exhausted\nattempts: 3  # at most\n",
            "weighbridge.io/outlier-detection": "off",
            "weighbridge.io/health-check": "on",
            "weighbridge.io/panic-threshold": " 25% ",
        }
    )
    assert spec.options == {
        "retry": "on: resource-exhausted, unavailable; attempts: 3; backoff: 25ms..250ms; "
        "budget: 20% + 10/s",
        "outlier-detection": "off",
        "health-check": "interval: 5s; timeout: 1s; unhealthy-threshold: 3; healthy-threshold: 2",
        "panic-threshold": "25%",
    }


def test_debug_allows_the_endpoint_override_only_when_annotated() -> None:
    base = {"weighbridge.io/strategy": "random"}
    assert "debug" not in parse_service(base).options
    for text, canonical in (
        ("endpoint-override: on", "metadata: on; endpoint-override: on"),
        ("on", "metadata: on; endpoint-override: on"),
        (
            "metadata: off  # callers must not learn pod addresses",
            "metadata: off; endpoint-override: off",
        ),
        ("off", "metadata: off; endpoint-override: off"),
    ):
        spec = parse_service({**base, "weighbridge.io/debug": text})
        assert spec.options == {"debug": canonical}, text


def test_absent_policies_are_absent_options() -> None:
    assert parse_service({"weighbridge.io/strategy": "random"}).options == {}
    assert parse_policies({"weighbridge.io/panic-threshold": "0%"}) == {"panic-threshold": "0%"}


@pytest.mark.parametrize(
    ("annotation", "text", "reason", "message"),
    [
        ("retry", "attempts: 3", "InvalidRetry", "weighbridge.io/retry: 'on' is required"),
        ("retry", "on: ok", "InvalidRetry", "weighbridge.io/retry: on: 'ok' is OK"),
        (
            "outlier-detection",
            "max-ejected: 200%",
            "InvalidOutlierDetection",
            "weighbridge.io/outlier-detection: max-ejected: 200% is not from 0% to 100%",
        ),
        (
            "health-check",
            "interval: 5",
            "InvalidHealthCheck",
            "weighbridge.io/health-check: interval: '5' is not a duration",
        ),
        (
            "panic-threshold",
            "half",
            "InvalidPanicThreshold",
            "weighbridge.io/panic-threshold: 'half' is not a whole percentage (like 10%)",
        ),
        (
            "debug",
            "endpoint-override: yes",
            "InvalidDebug",
            "weighbridge.io/debug: endpoint-override: 'yes' is not 'on' or 'off'",
        ),
        (
            "debug",
            "allow-endpoint-override",
            "InvalidDebug",
            "weighbridge.io/debug: 'allow-endpoint-override' is not 'KEY: VALUE'",
        ),
    ],
)
def test_bad_policies_are_annotation_errors_naming_the_annotation(
    annotation: str, text: str, reason: str, message: str
) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_service({"weighbridge.io/strategy": "random", f"weighbridge.io/{annotation}": text})
    assert info.value.reason == reason
    assert info.value.message.startswith(message), info.value.message


ALPHABET = st.sampled_from(
    list("av1=!,:%;#*() \n/.-_0123456789pod") + ["pod/", "in", "notin", "version"]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(ALPHABET, max_size=40).map("".join))
def test_fuzz_weights_parser_only_raises_annotation_errors(text: str) -> None:
    try:
        spec = parse_weights(text)
    except AnnotationError as exc:
        assert exc.reason == "InvalidWeights"
        assert exc.message
        return
    if spec.percent:
        assert sum(g.share for g in spec.groups) == 100
    assert all(g.share >= 0 for g in spec.groups)
    assert all(0 <= w <= 1_000_000 for w in spec.pod_weights.values())


@settings(max_examples=1000, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "weighbridge.io/strategy",
                "weighbridge.io/weights",
                "weighbridge.io/port",
                "weighbridge.io/grpc-services",
                "weighbridge.io/retry",
                "weighbridge.io/outlier-detection",
                "weighbridge.io/health-check",
                "weighbridge.io/panic-threshold",
                "other",
            ]
        ),
        st.text(max_size=30),
    )
)
def test_fuzz_service_annotations(annotations: dict[str, str]) -> None:
    try:
        parse_service(annotations)
    except AnnotationError as exc:
        assert exc.reason.startswith("Invalid")


# --- hostile input: every parser either parses or raises AnnotationError, nothing else ------

UNICODE_DIGITS = [
    *"\u00b2\u00b3\u00b9",  # superscripts: str.isdigit() says yes, int() raises ValueError
    *"\u0663\u06f7\u096b\u0e53\uff11\U0001d7d7",  # Arabic, Persian, Devanagari, Thai, fullwidth, math
    *"\u2464\u00bd\u216b\u3007",  # circled 5, one half, Roman twelve, ideographic zero
]
CONTROL = ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\u200b", "\ufeff", "\r", "\t"]
HUGE = ["9" * 4301, "1" * 5000, "1" + "0" * 30, "1e999999", "-1", "1.5", "+3"]

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(UNICODE_DIGITS + CONTROL + HUGE),
    st.lists(
        st.sampled_from(
            [*UNICODE_DIGITS, *CONTROL, *HUGE, "0" * 5000, *"0123456789 .,:;%=#()/*-!\n"]
        ),
        max_size=12,
    ).map("".join),
)
"""Text built from what broke parsers elsewhere: other scripts' digits (int() and Decimal()
take them, ``str.isdigit`` says yes to superscripts that int() refuses), numbers past int()'s
4300-digit limit, control and invisible characters, and syntax fragments around them."""


def annotation_errors_only(parse: object, *args: object) -> object:
    """``parse(*args)``, or None when it raised AnnotationError; anything else fails."""
    try:
        return parse(*args)  # type: ignore[operator]
    except AnnotationError as exc:
        assert exc.reason.startswith("Invalid"), exc.reason
        assert exc.message
        assert len(exc.message) <= 500, "a message quoting hostile text stays short"
        return None


@pytest.mark.parametrize("value", [*UNICODE_DIGITS, *HUGE, "3\x00", "\u20033", "0x10", "1_000"])
def test_a_pod_weight_is_ascii_digits_in_range_or_invalid(value: str) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_pod_weight("api-0", {"weighbridge.io/weight": value})
    assert info.value.reason == "InvalidPodWeight"
    assert len(info.value.message) < 200


def test_pod_weight_bounds_and_leading_zeros() -> None:
    assert parse_pod_weight("p", {"weighbridge.io/weight": "1000000"}) == 1_000_000
    assert parse_pod_weight("p", {"weighbridge.io/weight": "0"}) == 0
    assert parse_pod_weight("p", {"weighbridge.io/weight": "0" * 5000 + "7"}) == 7
    assert parse_pod_weight("p", {"weighbridge.io/weight": "\t7\n"}) == 7


@pytest.mark.parametrize(
    "text",
    [f"pod/a: {v}" for v in ["\u00b2", "\u0663", "9" * 5000]]
    + [f"v=1: {v}%" for v in ["\u0661\u0660\u0660", "\uff1100", "1_00", "1" * 5000, "99.\u0665"]]
    + [f"v=1: {v}" for v in ["1e3", "NaN", "Infinity", "-0", "1" * 5000]],
)
def test_weights_take_ascii_numbers_only(text: str) -> None:
    with pytest.raises(AnnotationError) as info:
        parse_weights(text)
    assert info.value.reason == "InvalidWeights"
    assert len(info.value.message) < 300


@settings(max_examples=2000, deadline=None)
@given(HOSTILE_TEXT)
def test_fuzz_pod_weight(value: str) -> None:
    weight = annotation_errors_only(parse_pod_weight, "p", {"weighbridge.io/weight": value})
    if weight is not None:
        assert isinstance(weight, int)
        assert 0 <= weight <= 1_000_000
        assert value.strip(" \t\r\n").isascii()


TEMPLATES = st.sampled_from(
    [
        "{}",
        "pod/a: {}",
        "pod/{}: 1",
        "v=1: {}%\n*: 50%",
        "v=1: {}",
        "{}: 1",
        "v in ({}): 1",
        "v=1,{}: 1; w=2: 1",
    ]
)


@settings(max_examples=3000, deadline=None)
@given(TEMPLATES, HOSTILE_TEXT)
def test_fuzz_weights_with_hostile_values(template: str, value: str) -> None:
    spec = annotation_errors_only(parse_weights, template.format(value))
    if spec is not None:
        assert all(0 <= w <= 1_000_000 for w in spec.pod_weights.values())  # type: ignore[attr-defined]


@settings(max_examples=1000, deadline=None)
@given(HOSTILE_TEXT)
def test_fuzz_selector_and_grpc_services(text: str) -> None:
    annotation_errors_only(parse_selector, text)
    names = annotation_errors_only(parse_grpc_services, text)
    if names is not None:
        assert all(n.isascii() and n.isprintable() for n in names)  # type: ignore[attr-defined]


SERVICE_ANNOTATIONS = [STRATEGY, WEIGHTS, PORT, GRPC_SERVICES, *POLICIES]
"""Every Service annotation the controller reads, a policy added later included."""
POLICY_TEMPLATES = st.sampled_from(
    [
        "{}",
        "on: {}",
        "on: unavailable; attempts: {}",
        "on: 14; per-try-timeout: {}s",
        "on: 14; backoff: {}ms..1s",
        "on: 14; budget: {}% + 1/s",
        "consecutive-failures: {}",
        "max-ejected: {}%",
        "interval: {}",
        "service: {}",
        "{}%",
        "server-name: {}; ca: {}",
    ]
)


@settings(max_examples=3000, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(SERVICE_ANNOTATIONS),
        st.one_of(
            HOSTILE_TEXT,
            st.tuples(POLICY_TEMPLATES, HOSTILE_TEXT).map(lambda t: t[0].format(t[1], t[1])),
        ),
    )
)
def test_fuzz_every_service_annotation(annotations: dict[str, str]) -> None:
    """parse_service runs every Service parser, the failover policies' too."""
    annotation_errors_only(parse_service, {"weighbridge.io/strategy": "random", **annotations})
    annotation_errors_only(parse_policies, annotations)
