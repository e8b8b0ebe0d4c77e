"""Failover policies: the annotation syntax, the canonical text that round-trips through etcd,
the engine's tuples, and fuzzing (a policy parser raises ValueError and nothing else)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weighbridge.policy import (
    DEFAULTS,
    MAX_DURATION_MS,
    OPTION_KEYS,
    HealthCheck,
    OutlierDetection,
    PanicThreshold,
    RetryPolicy,
    canonical_option,
    failover_from_options,
    format_duration,
    format_health_check,
    format_outlier_detection,
    format_panic_threshold,
    format_retry,
    parse_duration,
    parse_health_check,
    parse_outlier_detection,
    parse_panic_threshold,
    parse_retry,
)

SPEC_RETRY = """\
on: unavailable, resource-exhausted   # gRPC status names or numbers
attempts: 3                            # tries in all
per-try-timeout: 1s
backoff: 25ms..250ms
budget: 20% + 10/s
"""


def test_retry_as_the_docs_write_it() -> None:
    policy = parse_retry(SPEC_RETRY)
    assert policy == RetryPolicy(on=(8, 14), attempts=3, per_try_timeout_ms=1000)
    assert format_retry(policy) == (
        "on: resource-exhausted, unavailable; attempts: 3; per-try-timeout: 1s; "
        "backoff: 25ms..250ms; budget: 20% + 10/s"
    )
    assert policy.engine_args() == ([8, 14], 3, 1.0, 0.025, 0.25, 0.2, 10.0)


def test_a_budget_of_nothing_is_allowed() -> None:
    policy = parse_retry("on: 14; budget: 0% + 0/s")
    assert policy is not None
    assert policy.engine_args()[5:] == (0.0, 0.0)


def test_retry_on_one_line_with_defaults() -> None:
    policy = parse_retry("on: UNAVAILABLE; attempts: 2")
    assert policy == RetryPolicy(on=(14,))
    assert policy.engine_args() == ([14], 2, 0.0, 0.025, 0.25, 0.2, 10.0), "0 = no per-try timeout"
    assert parse_retry(" off  # for now") is None
    assert format_retry(None) == "off"


def test_comments_may_hold_anything() -> None:
    assert parse_retry("on: 14  # d\u00e9faut \u2264 5; not: a key\n") == RetryPolicy(on=(14,))


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("unavailable", 14),
        ("RESOURCE_EXHAUSTED", 8),
        ("resource-exhausted", 8),
        ("Deadline_Exceeded", 4),
        ("canceled", 1),
        ("cancelled", 1),
        ("16", 16),
        ("1", 1),
    ],
)
def test_statuses_by_name_in_any_spelling_or_number(text: str, code: int) -> None:
    policy = parse_retry(f"on: {text}")
    assert policy is not None
    assert policy.on == (code,)


def test_outlier_detection_defaults_on_and_off() -> None:
    assert DEFAULTS.outlier_detection == OutlierDetection()
    assert parse_outlier_detection("on") == OutlierDetection()
    assert parse_outlier_detection("off") is None
    policy = parse_outlier_detection(
        "consecutive-failures: 5\nbase-ejection-time: 30s\nmax-ejection-time: 300s\nmax-ejected: 10%"
    )
    assert policy == OutlierDetection()
    assert format_outlier_detection(policy) == (
        "consecutive-failures: 5; base-ejection-time: 30s; max-ejection-time: 5m; max-ejected: 10%"
    )
    assert policy is not None
    assert policy.engine_args() == (5, 30.0, 300.0, 10)
    assert parse_outlier_detection("consecutive-failures: 2") == OutlierDetection(
        consecutive_failures=2
    )


def test_health_check_on_off_and_service() -> None:
    assert DEFAULTS.health_check is None
    assert parse_health_check("on") == HealthCheck()
    assert parse_health_check("off") is None
    policy = parse_health_check("service: helloworld.Greeter; interval: 2s; timeout: 500ms")
    assert policy == HealthCheck(service="helloworld.Greeter", interval_ms=2000, timeout_ms=500)
    assert policy.engine_args() == ("helloworld.Greeter", 2.0, 0.5, 3, 2)
    assert parse_health_check('service: ""') == HealthCheck()
    assert parse_health_check("interval: 200ms") == HealthCheck(interval_ms=200, timeout_ms=200)
    assert format_health_check(HealthCheck()) == (
        "interval: 5s; timeout: 1s; unhealthy-threshold: 3; healthy-threshold: 2"
    )


def test_panic_threshold() -> None:
    assert DEFAULTS.panic_threshold == PanicThreshold(percent=50)
    assert parse_panic_threshold(" 0% ") == PanicThreshold(percent=0)
    assert parse_panic_threshold("100 %").engine_args() == 100
    assert format_panic_threshold(PanicThreshold(percent=25)) == "25%"


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("1s", 1000),
        ("1.5s", 1500),
        ("2m", 120_000),
        ("1m30s", 90_000),
        ("1h", 3_600_000),
        ("0.001s", 1),
    ],
)
def test_durations_are_go_like(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_retry, "attempts: 3", "'on' is required"),
        (parse_retry, "on", "'on' needs the gRPC statuses"),
        (parse_retry, "on: ok", "'ok' is OK, which is never retried"),
        (parse_retry, "on: 0", "'0' is OK"),
        (parse_retry, "on: 17", "'17' is not a gRPC status"),
        (parse_retry, "on: unavailble", "'unavailble' is not a gRPC status"),
        (parse_retry, "on: unavailable, 14", "unavailable is given twice (as '14')"),
        (parse_retry, "on: 14; attempts: 6", "attempts: 6 is not from 2 to 5"),
        (parse_retry, "on: 14; attempts: 1", "attempts: 1 is not from 2 to 5"),
        (parse_retry, "on: 14; attempts: three", "attempts: 'three' is not a whole number"),
        (parse_retry, "on: 14; attempts: ²", "'attempts: ²' holds a character that is not"),
        (parse_retry, "on: 14; attempts: ٣", "not printable ASCII"),
        (parse_retry, "on: 14; per-try-timeout: 1", "'1' is not a duration"),
        (parse_retry, "on: 14; per-try-timeout: 0s", "per-try-timeout: 0ms is not from 1ms"),
        (parse_retry, "on: 14; per-try-timeout: 0.5ms", "not a whole number of milliseconds"),
        (parse_retry, "on: 14; per-try-timeout: 2h", "'2h' is longer than 1h"),
        (parse_retry, "on: 14; per-try-timeout: 1e3s", "'1e3s' is not a duration"),
        (parse_retry, "on: 14; backoff: 25ms", "backoff: '25ms' is not 'BASE..MAX'"),
        (parse_retry, "on: 14; backoff: 1s..100ms", "the maximum 100ms is below the base 1s"),
        (parse_retry, "on: 14; budget: 20%", "budget: '20%' is not 'PERCENT% + N/s'"),
        (parse_retry, "on: 14; budget: 120% + 1/s", "budget: 120% is not from 0% to 100%"),
        (parse_retry, "on: 14\non: 8", "'on' is given twice"),
        (parse_retry, "on: 14; retries: 3", "'retries' is not a key here; use on, attempts"),
        (parse_retry, "on 14", "'on 14' is not 'KEY: VALUE'"),
        (parse_retry, "on: 14\x00", "not printable ASCII"),
        (parse_retry, "# nothing", "nothing given"),
        (parse_retry, "on: 14; " * 1000, "longer than 4096"),
        (parse_outlier_detection, "consecutive-failures: 0", "1 to 1000"),
        (parse_outlier_detection, "max-ejected: 10", "'10' is not a whole percentage"),
        (parse_outlier_detection, "max-ejection-time: 10s", "max-ejection-time: 10s is below"),
        (parse_outlier_detection, "yes", "'yes' is not 'KEY: VALUE'"),
        (parse_health_check, "service: hello/world", "'hello/world' is not a fully qualified"),
        (parse_health_check, "interval: 10ms", "interval: 10ms is not from 100ms to 1h"),
        (parse_health_check, "interval: 1s; timeout: 2s", "timeout: 2s is longer than the"),
        (parse_health_check, "healthy-threshold: 101", "from 1 to 100"),
        (parse_panic_threshold, "50", "'50' is not a whole percentage"),
        (parse_panic_threshold, "101%", "101% is not from 0% to 100%"),
        (parse_panic_threshold, "10%; 20%", "is not one percentage"),
        (parse_panic_threshold, "0.5%", "'0.5%' is not a whole percentage"),
    ],
)
def test_bad_policies_name_the_problem(
    parse: Callable[[str], object], text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text)


durations = st.integers(1, MAX_DURATION_MS)

retry_policies = st.builds(
    lambda on, attempts, per_try, backoff, pct, per_s: RetryPolicy(
        on=on,
        attempts=attempts,
        per_try_timeout_ms=per_try,
        backoff_base_ms=min(backoff),
        backoff_max_ms=max(backoff),
        budget_percent=pct,
        budget_per_second=per_s,
    ),
    st.lists(st.integers(1, 16), min_size=1, max_size=16, unique=True).map(sorted).map(tuple),
    st.integers(2, 5),
    st.none() | durations,
    st.tuples(durations, durations),
    st.integers(0, 100),
    st.integers(0, 100_000),
)
outlier_policies = st.builds(
    lambda failures, ejection, pct: OutlierDetection(
        consecutive_failures=failures,
        base_ejection_ms=min(ejection),
        max_ejection_ms=max(ejection),
        max_ejected_percent=pct,
    ),
    st.integers(1, 1000),
    st.tuples(durations, durations),
    st.integers(0, 100),
)
health_policies = st.builds(
    lambda service, times, unhealthy, healthy: HealthCheck(
        service=service,
        interval_ms=max(times),
        timeout_ms=min(times),
        unhealthy_threshold=unhealthy,
        healthy_threshold=healthy,
    ),
    st.sampled_from(["", "helloworld.Greeter", "grpc.health.v1.Health", "_x.Y_1"]),
    st.tuples(st.integers(100, MAX_DURATION_MS), st.integers(1, MAX_DURATION_MS)),
    st.integers(1, 100),
    st.integers(1, 100),
)


@settings(max_examples=500, deadline=None)
@given(st.none() | retry_policies)
def test_canonical_retry_text_reads_back_identically(policy: RetryPolicy | None) -> None:
    assert parse_retry(format_retry(policy)) == policy


@settings(max_examples=300, deadline=None)
@given(st.none() | outlier_policies)
def test_canonical_outlier_detection_text_reads_back_identically(
    policy: OutlierDetection | None,
) -> None:
    assert parse_outlier_detection(format_outlier_detection(policy)) == policy


@settings(max_examples=300, deadline=None)
@given(st.none() | health_policies)
def test_canonical_health_check_text_reads_back_identically(policy: HealthCheck | None) -> None:
    assert parse_health_check(format_health_check(policy)) == policy


@given(st.integers(0, 100))
def test_canonical_panic_threshold_reads_back_identically(percent: int) -> None:
    policy = PanicThreshold(percent=percent)
    assert parse_panic_threshold(format_panic_threshold(policy)) == policy


@given(st.integers(1, MAX_DURATION_MS))
def test_canonical_durations_read_back_identically(ms: int) -> None:
    assert parse_duration(format_duration(ms)) == ms


PARSERS: list[Callable[[str], object]] = [
    parse_retry,
    parse_outlier_detection,
    parse_health_check,
    parse_panic_threshold,
    parse_duration,
]

TOKENS = st.sampled_from(
    [
        *'0123456789:;,.%+/ \t\n\r#"-_',
        *["on", "off", "attempts", "per-try-timeout", "backoff", "budget", "..", "ms", "s", "m"],
        *["h", "unavailable", "RESOURCE_EXHAUSTED", "ok", "service", "interval", "timeout"],
        *["consecutive-failures", "base-ejection-time", "max-ejected", "healthy-threshold"],
        *["²", "٣", "\uff19", "\x00", "\x0b", "\x1c", "\x85", "\u2028", "\ufeff", "1e309", "nan"],
        *["9" * 30, "inf", "-1", "\uff11"],
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(PARSERS), st.lists(TOKENS, max_size=30).map("".join) | st.text())
def test_fuzz_parsers_only_raise_value_error(parse: Callable[[str], object], text: str) -> None:
    try:
        parse(text)
    except ValueError as exc:
        assert str(exc)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(OPTION_KEYS), st.lists(TOKENS, max_size=30).map("".join))
def test_fuzz_canonical_text_is_a_fixed_point(key: str, text: str) -> None:
    try:
        canonical = canonical_option(key, text)
    except ValueError:
        return
    assert canonical.isascii() and "\n" not in canonical
    assert canonical_option(key, canonical) == canonical


def test_options_absent_keys_are_defaults_and_bad_keys_keep_theirs() -> None:
    assert failover_from_options({}) == (DEFAULTS, {})
    failover, errors = failover_from_options(
        {
            "retry": "on: unavailable",
            "outlier-detection": "off",
            "health-check": "interval: 1ms",
            "panic-threshold": "20%",
            "unrelated": "x",
        }
    )
    assert failover.retry == RetryPolicy(on=(14,))
    assert failover.outlier_detection is None
    assert failover.health_check is DEFAULTS.health_check
    assert failover.panic_threshold == PanicThreshold(percent=20)
    assert list(errors) == ["health-check"]
    assert "interval: 1ms" in errors["health-check"]


def test_stream_idle_timeout_reads_durations_up_to_a_week_and_off() -> None:
    from weighbridge.policy import format_stream_idle_timeout, parse_stream_idle_timeout

    assert parse_stream_idle_timeout("6h") == 6 * 3_600_000
    assert parse_stream_idle_timeout("90s") == 90_000
    assert parse_stream_idle_timeout(" off ") == 0
    assert parse_stream_idle_timeout("168h") == 7 * 24 * 3_600_000
    for text in ("6h", "90m", "off", "1s"):
        assert format_stream_idle_timeout(parse_stream_idle_timeout(text)) == text
    for text, message in (
        ("500ms", "'500ms' is shorter than 1s"),
        ("169h", "is longer than 168h"),
        ("forever", "not a duration"),
        ("1h; 2h", "not one duration"),
        ("", "nothing given"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_stream_idle_timeout(text)


def test_the_stream_idle_timeout_option_defaults_to_the_proxys() -> None:
    failover, errors = failover_from_options({})
    assert failover.stream_idle_timeout_ms is None and not errors
    failover, errors = failover_from_options({"stream-idle-timeout": "off"})
    assert failover.stream_idle_timeout_ms == 0
    failover, errors = failover_from_options({"stream-idle-timeout": "soon"})
    assert failover.stream_idle_timeout_ms is None and "stream-idle-timeout" in errors


def test_slow_start_text_round_trips_and_refuses_nonsense() -> None:
    from weighbridge.policy import SlowStart, format_slow_start, parse_slow_start

    assert parse_slow_start("off") is None
    assert parse_slow_start("on") == SlowStart()
    policy = parse_slow_start("window: 1m; aggression: 1.5; min-weight: 5%")
    assert policy == SlowStart(window_ms=60_000, aggression=1.5, min_weight_percent=5)
    assert policy is not None and policy.engine_args() == (60.0, 1.5, 5)
    assert parse_slow_start(format_slow_start(policy)) == policy
    assert format_slow_start(SlowStart()) == "window: 30s; aggression: 1; min-weight: 10%"
    for text, message in (
        ("window: 500ms", "window: 500ms is not from 1s"),
        ("aggression: 0", "aggression: 0 is not from 0.1 to 10"),
        ("aggression: 1e3", "not a decimal number"),
        ("aggression: \u0661", "not printable ASCII"),  # an Arabic-Indic 1
        ("min-weight: 150%", "150% is not from 0% to 100%"),
        ("ramp: 3s", "ramp"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_slow_start(text)


def test_zone_aware_text() -> None:
    from weighbridge.policy import (
        DEFAULTS,
        ZoneAware,
        failover_from_options,
        format_zone_aware,
        parse_zone_aware,
    )

    assert DEFAULTS.zone_aware == ZoneAware(prefer=False, min_endpoints=6, hints=True)
    assert parse_zone_aware("on") == ZoneAware(prefer=True)
    assert parse_zone_aware("off") == ZoneAware(prefer=False, hints=False)
    policy = parse_zone_aware("min-endpoints: 3; hints: off")
    assert policy == ZoneAware(prefer=True, min_endpoints=3, hints=False)
    assert policy.engine_args() == (True, 3, False)
    assert parse_zone_aware(format_zone_aware(policy)) == policy
    assert parse_zone_aware("prefer: off") == ZoneAware()
    for text, message in (
        ("min-endpoints: 0", "0 is not from 1 to 10000"),
        ("min-endpoints: \u0663", "not printable ASCII"),  # an Arabic-Indic 3
        ("prefer: yes", "'yes' is not 'on' or 'off'"),
        ("zones: a", "zones"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_zone_aware(text)
    failover, errors = failover_from_options({"zone-aware": "sometimes"})
    assert failover.zone_aware == DEFAULTS.zone_aware and "zone-aware" in errors


def test_debug_text() -> None:
    from weighbridge.policy import (
        DEFAULTS,
        Debug,
        failover_from_options,
        format_debug,
        parse_debug,
    )

    assert DEFAULTS.debug == Debug(metadata=True, endpoint_override=False)
    assert DEFAULTS.debug.engine_args() == (True, False)
    assert parse_debug("on") == Debug(metadata=True, endpoint_override=True)
    assert parse_debug("off") == Debug(metadata=False, endpoint_override=False)
    policy = parse_debug("endpoint-override: on")
    assert policy == Debug(metadata=True, endpoint_override=True)
    assert parse_debug(format_debug(policy)) == policy
    assert parse_debug("metadata: off").engine_args() == (False, False)
    for text, message in (
        ("endpoint-override: yes", "'yes' is not 'on' or 'off'"),
        ("metadata: on; metadata: off", "'metadata' is given twice"),
        ("pods: a", "'pods' is not a key here; use metadata, endpoint-override"),
        ("", "nothing given"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_debug(text)
    failover, errors = failover_from_options({"debug": "sometimes"})
    assert failover.debug == DEFAULTS.debug and "debug" in errors


def test_hash_key_text() -> None:
    from weighbridge.policy import HashKey, format_hash, parse_hash

    key = parse_hash("header: x-user-id")
    assert key == HashKey(header="x-user-id", bound_percent=125)
    assert parse_hash(format_hash(key)) == key
    assert parse_hash("header: tenant; bound: 150%").engine_args() == ("tenant", 150)
    for text, message in (
        ("bound: 150%", "'header' is required"),
        ("header: X-User", "is not a request header name"),
        ("header: :path", "is not a request header name"),
        ("header: a; bound: 90%", "90% is not from 100% to 1000%"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_hash(text)
