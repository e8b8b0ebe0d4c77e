"""Policies of a Service beyond its strategy: configured retries, outlier detection, active
health checks, the panic threshold, TLS to its backends, its stream idle timeout, slow start,
ring_hash's key, zone-aware routing and what its callers may ask for while debugging.

This module is the one home of their defaults and of their text: the annotation syntax the
controller parses (``weighbridge.io/retry``, ``…/outlier-detection``, ``…/health-check``,
``…/panic-threshold``, ``…/backend-tls``, ``…/stream-idle-timeout``, ``…/slow-start``,
``…/hash``, ``…/zone-aware``, ``…/debug``), and the canonical text
it stores in ``BackendSet.options`` under the keys :data:`OPTION_KEYS`, which proxies parse
again. ``format_*`` writes the canonical text and
``parse_*`` reads it back to an equal policy.

Syntax of a policy's text: ``key: value`` entries, one per line or separated by ``;``, ``#``
starts a comment::

    on: unavailable, resource-exhausted; attempts: 3   # retry on two statuses, 3 tries in all

Durations are Go-like, whole milliseconds up to one hour: ``250ms``, ``1s``, ``1.5s``, ``2m``,
``1m30s``. Percentages are whole numbers: ``20%``. gRPC statuses are names in any case, snake
or kebab (``unavailable``, ``RESOURCE_EXHAUSTED``, ``resource-exhausted``) or numbers 1-16.

Every parser raises :class:`ValueError` (and nothing else, whatever the text) with a message
that names the offending text; only printable ASCII is accepted outside comments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, TypeVar

from weighbridge.model import is_grpc_service_name

RETRY: Final = "retry"
OUTLIER_DETECTION: Final = "outlier-detection"
HEALTH_CHECK: Final = "health-check"
PANIC_THRESHOLD: Final = "panic-threshold"
BACKEND_TLS: Final = "backend-tls"
STREAM_IDLE_TIMEOUT: Final = "stream-idle-timeout"
SLOW_START: Final = "slow-start"
HASH: Final = "hash"
ZONE_AWARE: Final = "zone-aware"
DEBUG: Final = "debug"
OPTION_KEYS: Final = (
    RETRY,
    OUTLIER_DETECTION,
    HEALTH_CHECK,
    PANIC_THRESHOLD,
    BACKEND_TLS,
    STREAM_IDLE_TIMEOUT,
    SLOW_START,
    HASH,
    ZONE_AWARE,
    DEBUG,
)
"""``BackendSet.options`` keys of the policies: the annotation names without ``weighbridge.io/``.
An absent key means the policy's default."""

MAX_TEXT_LENGTH: Final = 4096
"""Longest policy text accepted; a policy needs a few dozen characters."""

MAX_DURATION_MS: Final = 3_600_000
"""Longest duration accepted (one hour): beyond it a value is a typo, not a policy; the stream
idle timeout alone goes further (:data:`MAX_STREAM_IDLE_MS`)."""

MAX_STREAM_IDLE_MS: Final = 7 * 24 * 3_600_000
"""Longest stream idle timeout (a week): gRPC streams may rightly be quiet for hours."""

STATUS_CODES: Final[Mapping[str, int]] = {
    "cancelled": 1,
    "unknown": 2,
    "invalid_argument": 3,
    "deadline_exceeded": 4,
    "not_found": 5,
    "already_exists": 6,
    "permission_denied": 7,
    "resource_exhausted": 8,
    "failed_precondition": 9,
    "aborted": 10,
    "out_of_range": 11,
    "unimplemented": 12,
    "internal": 13,
    "unavailable": 14,
    "data_loss": 15,
    "unauthenticated": 16,
}
"""gRPC status names (snake case, as in the gRPC spec) → codes; OK (0) is never a failure."""

_STATUS_NAMES: Final = {code: name.replace("_", "-") for name, code in STATUS_CODES.items()}

_BLANKS: Final = " \t\r"
_PRINTABLE = re.compile(r"[\t\x20-\x7e]*")
_WHOLE = re.compile(r"[0-9]{1,9}")
_PERCENT = re.compile(r"([0-9]{1,9})[ \t]*%")
_DURATION = re.compile(r"(?:[0-9]{1,9}(?:\.[0-9]{1,9})?(?:ms|s|m|h)){1,4}")
_DURATION_PART = re.compile(r"([0-9]+)(?:\.([0-9]+))?(ms|s|m|h)")
_MS_PER_UNIT: Final = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
_BUDGET = re.compile(r"([0-9]{1,9})[ \t]*%[ \t]*\+[ \t]*([0-9]{1,9})[ \t]*/[ \t]*s")
_SEPARATORS = re.compile(r"[ \t,]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Configured retries (``weighbridge.io/retry``): which statuses earn another try, how many,
    how soon, and how many retries the Service may add to its traffic.

    The engine retries only a call whose response has not begun (the backend answered with
    trailers only) and whose request still fits its retry buffer.
    """

    on: tuple[int, ...]
    """gRPC status codes (1-16) worth another try, ascending; there is no default, since which
    failures are safe to repeat is the Service's to say."""
    attempts: int = 2
    """Tries in all, the first included (2-5): one retry rides out one bad backend; more
    multiply load exactly when backends are struggling."""
    per_try_timeout_ms: int | None = None
    """Time a try has to get its response headers before the next one starts; None: only the
    call's deadline bounds a try, since a good value depends on the method."""
    backoff_base_ms: int = 25
    """Retry n waits random(0, min(base * 2^(n-1), max)), as gRPC's retry policy: 25 ms moves to
    another backend at once for a human, yet spreads a burst of retries."""
    backoff_max_ms: int = 250
    """Cap of the backoff above: a retry after more than a quarter second rarely helps a call."""
    budget_percent: int = 20
    """Retries may add at most this share of the Service's calls (over a 10 s window), so
    retries cannot multiply an overload: 20% as linkerd's retry budget."""
    budget_per_second: int = 10
    """Retries allowed per second beyond the share, so a Service with little traffic can still
    retry. ``0% + 0/s`` allows none: a call then fails with the first try's status and a
    message naming the budget."""

    def __post_init__(self) -> None:
        if not self.on:
            raise ValueError("on: at least one gRPC status is required")
        if any(not 1 <= c <= 16 for c in self.on) or list(self.on) != sorted(set(self.on)):
            raise ValueError(f"on: {self.on} is not ascending distinct status codes from 1 to 16")
        _check_range("attempts", self.attempts, 2, 5)
        if self.per_try_timeout_ms is not None:
            _check_duration("per-try-timeout", self.per_try_timeout_ms, minimum=1)
        _check_duration("backoff", self.backoff_base_ms, minimum=1)
        _check_duration("backoff", self.backoff_max_ms, minimum=1)
        if self.backoff_max_ms < self.backoff_base_ms:
            raise ValueError(
                f"backoff: the maximum {format_duration(self.backoff_max_ms)} is below the "
                f"base {format_duration(self.backoff_base_ms)}"
            )
        _check_range("budget", self.budget_percent, 0, 100, unit="%")
        _check_range("budget", self.budget_per_second, 0, 100_000, unit="/s")

    def engine_args(self) -> tuple[list[int], int, float, float, float, float, float]:
        """The engine's ``retry``: (codes, attempts, per-try timeout s (0 = none), backoff base
        s, backoff max s, budget ratio, budget per second)."""
        return (
            list(self.on),
            self.attempts,
            (self.per_try_timeout_ms or 0) / 1000,
            self.backoff_base_ms / 1000,
            self.backoff_max_ms / 1000,
            self.budget_percent / 100,
            float(self.budget_per_second),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    """Passive health (``weighbridge.io/outlier-detection``): an endpoint whose calls keep
    failing is ejected (gets no new calls) for a while, longer each time it happens again."""

    consecutive_failures: int = 5
    """Failures in a row that eject (1-1000): failed connects, resets, UNAVAILABLE, per-try
    timeouts. Five, as Envoy: one unlucky call is not a broken backend."""
    base_ejection_ms: int = 30_000
    """An ejection lasts base * (times ejected so far): 30 s, as Envoy, gives a crashed pod time
    to restart without probing it with real calls."""
    max_ejection_ms: int = 300_000
    """Cap of an ejection, so a flapping endpoint comes back within five minutes."""
    max_ejected_percent: int = 10
    """Share of the Service's endpoints that may be ejected at once (at least one always may):
    10%, as Envoy, so a failure that is really the client's cannot empty the Service."""

    def __post_init__(self) -> None:
        _check_range("consecutive-failures", self.consecutive_failures, 1, 1000)
        _check_duration("base-ejection-time", self.base_ejection_ms, minimum=1)
        _check_duration("max-ejection-time", self.max_ejection_ms, minimum=1)
        if self.max_ejection_ms < self.base_ejection_ms:
            raise ValueError(
                f"max-ejection-time: {format_duration(self.max_ejection_ms)} is below "
                f"base-ejection-time {format_duration(self.base_ejection_ms)}"
            )
        _check_range("max-ejected", self.max_ejected_percent, 0, 100, unit="%")

    def engine_args(self) -> tuple[int, float, float, int]:
        """The engine's ``outlier``: (consecutive failures, base ejection s, max ejection s,
        max ejected percent)."""
        return (
            self.consecutive_failures,
            self.base_ejection_ms / 1000,
            self.max_ejection_ms / 1000,
            self.max_ejected_percent,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowStart:
    """Slow start (``weighbridge.io/slow-start``): an endpoint new to the Service, or whose
    weight went up, takes a part of its share that grows over ``window``:
    from + (1 - from) * max(min, (elapsed / window) ** (1 / aggression)), ``from`` being 0 for
    a new endpoint and old/new weight for an increase (Envoy's curve)."""

    window_ms: int = 30_000
    """How long the ramp lasts: 30 s warms a JIT or a cache without starving the pod."""
    aggression: float = 1.0
    """1: linear; above 1 the part rises faster at first (2: the square root)."""
    min_weight_percent: int = 10
    """The least part taken, so a new endpoint gets some calls from the start."""

    def __post_init__(self) -> None:
        _check_duration("window", self.window_ms, minimum=1000)
        if not MIN_AGGRESSION <= self.aggression <= MAX_AGGRESSION:
            raise ValueError(
                f"aggression: {self.aggression:g} is not from {MIN_AGGRESSION:g} to "
                f"{MAX_AGGRESSION:g}"
            )
        _check_range("min-weight", self.min_weight_percent, 0, 100, unit="%")

    def engine_args(self) -> tuple[float, float, int]:
        """The engine's ``slow_start``: (window s, aggression, min weight percent)."""
        return (self.window_ms / 1000, self.aggression, self.min_weight_percent)


MIN_AGGRESSION: Final = 0.1
MAX_AGGRESSION: Final = 10.0
_DECIMAL = re.compile(r"[0-9]{1,2}(?:\.[0-9]{1,3})?")


@dataclass(frozen=True, slots=True, kw_only=True)
class HashKey:
    """What ``ring_hash`` hashes (``weighbridge.io/hash``): a request header, and the load
    bound that keeps one hot key from piling onto one endpoint."""

    header: str
    """A request header (lowercase, as HTTP/2 sends it), like ``x-user-id``; a call without
    it is a weighted random draw."""
    bound_percent: int = 125
    """c of consistent hashing with bounded loads, as a percentage: an endpoint takes a key's
    calls while its calls in flight stay within c x (all in flight + 1) x its weight's share;
    125%, as the paper's and Envoy's examples, moves few keys and caps a hot one."""

    def __post_init__(self) -> None:
        if not _HEADER.fullmatch(self.header):
            raise ValueError(
                f"header: {self.header!r} is not a request header name (lowercase letters, "
                "digits, '-', '_' or '.', like x-user-id)"
            )
        _check_range("bound", self.bound_percent, 100, 1000, unit="%")

    def engine_args(self) -> tuple[str, int]:
        """The engine's ``hash``: (header, bound percent)."""
        return (self.header, self.bound_percent)


_HEADER = re.compile(r"[a-z0-9][-a-z0-9_.]{0,127}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ZoneAware:
    """Zone-aware routing (``weighbridge.io/zone-aware``): which zone's endpoints a proxy
    keeps calls to. The rule lives in the engine (``native/src/locality.rs``)."""

    prefer: bool = False
    """Envoy's zone-aware routing: keep calls in the proxy's zone while its endpoints can carry
    that zone's proxies' share, and spill the rest by residual capacity. Off by default: it
    moves calls away from the weights a Service's annotations spell out."""
    min_endpoints: int = 6
    """Zone preference applies from this many eligible endpoints on (Envoy's
    min_cluster_size): with fewer, a zone's one or two endpoints would take all its calls."""
    hints: bool = True
    """Follow EndpointSlice hints where the cluster set them (a Service's
    ``trafficDistribution``), as kube-proxy does; they win over ``prefer``."""

    def __post_init__(self) -> None:
        _check_range("min-endpoints", self.min_endpoints, 1, 10_000)

    def engine_args(self) -> tuple[bool, int, bool]:
        """The engine's ``zone_aware``: (prefer, min endpoints, hints)."""
        return (self.prefer, self.min_endpoints, self.hints)


_ON_OFF: Final = {"on": True, "off": False}


@dataclass(frozen=True, slots=True, kw_only=True)
class Debug:
    """What a Service's callers may ask of the proxy while debugging (``weighbridge.io/debug``).
    The per-call behaviour lives in the engine (``native/src/proxy.rs``, ``routing.rs``)."""

    metadata: bool = True
    """A call carrying ``x-weighbridge-debug: 1`` gets response metadata naming the backend it
    reached, its pod, the strategy, the set's generation and revision, and why that backend.
    On by default: it answers "where did my call go" without access to the admin API. It tells
    a caller one pod's address and name; a Service whose callers must not learn them turns it
    off."""
    endpoint_override: bool = False
    """A call carrying ``x-weighbridge-endpoint: POD`` goes to that pod, past the strategy,
    weights, slow start, outlier detection and health checks. Off by default: any caller could
    otherwise pin load onto one pod or reach one the Service keeps from calls."""

    def engine_args(self) -> tuple[bool, bool]:
        """The engine's ``debug``: (metadata, endpoint override)."""
        return (self.metadata, self.endpoint_override)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """Active health checks (``weighbridge.io/health-check``): the proxy asks every endpoint
    ``grpc.health.v1.Health/Check`` on its own and sends no new calls to one that is unhealthy."""

    service: str = ""
    """The service name asked about; "" asks about the server overall, which every server
    with the standard health service answers."""
    interval_ms: int = 5_000
    """Time between checks of one endpoint (100 ms to 1 h): 5 s finds a hung pod within
    seconds at a negligible cost to it."""
    timeout_ms: int = 1_000
    """A check not answered within this has failed; at most the interval (text that gives a
    shorter interval and no timeout gets the interval). A health check is cheap, so a second
    means trouble."""
    unhealthy_threshold: int = 3
    """Failed checks in a row that mark an endpoint unhealthy (1-100): one lost check is noise."""
    healthy_threshold: int = 2
    """Passed checks in a row that mark it healthy again (1-100), so a flapping endpoint is not
    taken back on its first good answer."""

    def __post_init__(self) -> None:
        if self.service and not is_grpc_service_name(self.service):
            raise ValueError(
                f"service: {self.service!r} is not a fully qualified gRPC service name "
                "(like helloworld.Greeter)"
            )
        _check_duration("interval", self.interval_ms, minimum=100)
        _check_duration("timeout", self.timeout_ms, minimum=1)
        if self.timeout_ms > self.interval_ms:
            raise ValueError(
                f"timeout: {format_duration(self.timeout_ms)} is longer than the interval "
                f"{format_duration(self.interval_ms)}"
            )
        _check_range("unhealthy-threshold", self.unhealthy_threshold, 1, 100)
        _check_range("healthy-threshold", self.healthy_threshold, 1, 100)

    def engine_args(self) -> tuple[str, float, float, int, int]:
        """The engine's ``health_check``: (service, interval s, timeout s, unhealthy threshold,
        healthy threshold)."""
        return (
            self.service,
            self.interval_ms / 1000,
            self.timeout_ms / 1000,
            self.unhealthy_threshold,
            self.healthy_threshold,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PanicThreshold:
    """``weighbridge.io/panic-threshold``, as Envoy's: when fewer than ``percent`` of a
    Service's endpoints can take calls (the rest ejected, unhealthy or failing to connect), the
    proxy spreads calls over all of them, rather than piling everything onto the few left."""

    percent: int = 50
    """0-100; 0: never panic. 50%, as Envoy: past half lost, health information is more likely
    wrong than the remaining endpoints able to carry everything."""

    def __post_init__(self) -> None:
        _check_range(None, self.percent, 0, 100, unit="%")

    def engine_args(self) -> int:
        """The engine's ``panic_threshold``: a whole percentage."""
        return self.percent


# --- parsing -------------------------------------------------------------------------------


def parse_retry(text: str) -> RetryPolicy | None:
    """``weighbridge.io/retry``: ``on`` (required), ``attempts``, ``per-try-timeout``,
    ``backoff: BASE..MAX``, ``budget: PERCENT% + N/s``; ``off`` is None."""
    entries = _entries(text)
    if entries == ["off"]:
        return None
    if entries == ["on"]:
        raise ValueError("'on' needs the gRPC statuses to retry, like 'on: unavailable'")
    fields = _fields(entries, ("on", "attempts", "per-try-timeout", "backoff", "budget"))
    if "on" not in fields:
        raise ValueError("'on' is required: the gRPC statuses to retry, like 'on: unavailable'")
    kw: dict[str, Any] = {"on": _parse_statuses(fields["on"])}
    if "attempts" in fields:
        kw["attempts"] = _parse_whole("attempts", fields["attempts"])
    if "per-try-timeout" in fields:
        kw["per_try_timeout_ms"] = _parse_field_duration(
            "per-try-timeout", fields["per-try-timeout"]
        )
    if "backoff" in fields:
        base, sep, cap = fields["backoff"].partition("..")
        if not sep:
            raise ValueError(
                f"backoff: {fields['backoff']!r} is not 'BASE..MAX' (like 25ms..250ms)"
            )
        kw["backoff_base_ms"] = _parse_field_duration("backoff", base.strip(_BLANKS))
        kw["backoff_max_ms"] = _parse_field_duration("backoff", cap.strip(_BLANKS))
    if "budget" in fields:
        m = _BUDGET.fullmatch(fields["budget"])
        if not m:
            raise ValueError(
                f"budget: {fields['budget']!r} is not 'PERCENT% + N/s' (like 20% + 10/s)"
            )
        kw["budget_percent"], kw["budget_per_second"] = int(m[1]), int(m[2])
    return RetryPolicy(**kw)


def parse_outlier_detection(text: str) -> OutlierDetection | None:
    """``weighbridge.io/outlier-detection``: ``consecutive-failures``, ``base-ejection-time``,
    ``max-ejection-time``, ``max-ejected: PERCENT%``; ``on`` is the defaults, ``off`` None."""
    entries = _entries(text)
    if entries == ["off"]:
        return None
    if entries == ["on"]:
        return OutlierDetection()
    fields = _fields(
        entries,
        ("consecutive-failures", "base-ejection-time", "max-ejection-time", "max-ejected"),
    )
    kw: dict[str, Any] = {}
    if "consecutive-failures" in fields:
        kw["consecutive_failures"] = _parse_whole(
            "consecutive-failures", fields["consecutive-failures"]
        )
    for key, attr in (
        ("base-ejection-time", "base_ejection_ms"),
        ("max-ejection-time", "max_ejection_ms"),
    ):
        if key in fields:
            kw[attr] = _parse_field_duration(key, fields[key])
    if "max-ejected" in fields:
        kw["max_ejected_percent"] = _parse_percent("max-ejected", fields["max-ejected"])
    return OutlierDetection(**kw)


def parse_slow_start(text: str) -> SlowStart | None:
    """``weighbridge.io/slow-start``: ``window``, ``aggression`` (a decimal like 1.5),
    ``min-weight: PERCENT%``; ``on`` is the defaults, ``off`` None."""
    entries = _entries(text)
    if entries == ["off"]:
        return None
    if entries == ["on"]:
        return SlowStart()
    fields = _fields(entries, ("window", "aggression", "min-weight"))
    kw: dict[str, Any] = {}
    if "window" in fields:
        kw["window_ms"] = _parse_field_duration("window", fields["window"])
    if "aggression" in fields:
        if not _DECIMAL.fullmatch(fields["aggression"]):
            raise ValueError(
                f"aggression: {fields['aggression']!r} is not a decimal number (like 1 or 1.5)"
            )
        kw["aggression"] = float(fields["aggression"])
    if "min-weight" in fields:
        kw["min_weight_percent"] = _parse_percent("min-weight", fields["min-weight"])
    return SlowStart(**kw)


def format_slow_start(policy: SlowStart | None) -> str:
    if policy is None:
        return "off"
    return "; ".join(
        (
            f"window: {format_duration(policy.window_ms)}",
            f"aggression: {policy.aggression:g}",
            f"min-weight: {policy.min_weight_percent}%",
        )
    )


def parse_hash(text: str) -> HashKey:
    """``weighbridge.io/hash``: ``header: NAME`` (required), ``bound: PERCENT%``."""
    fields = _fields(_entries(text), ("header", "bound"))
    if "header" not in fields:
        raise ValueError(
            "'header' is required: the request header to hash, like 'header: x-user-id'"
        )
    kw: dict[str, Any] = {"header": fields["header"]}
    if "bound" in fields:
        kw["bound_percent"] = _parse_percent("bound", fields["bound"])
    return HashKey(**kw)


def format_hash(policy: HashKey) -> str:
    return f"header: {policy.header}; bound: {policy.bound_percent}%"


def parse_zone_aware(text: str) -> ZoneAware:
    """``weighbridge.io/zone-aware``: ``on`` (prefer the proxy's zone, follow hints), ``off``
    (neither), or fields ``prefer: on|off``, ``min-endpoints: N``, ``hints: on|off``, which
    start from ``on``."""
    entries = _entries(text)
    if entries == ["on"]:
        return ZoneAware(prefer=True)
    if entries == ["off"]:
        return ZoneAware(prefer=False, hints=False)
    fields = _fields(entries, ("prefer", "min-endpoints", "hints"))
    kw: dict[str, Any] = {"prefer": True}
    for key, name in (("prefer", "prefer"), ("hints", "hints")):
        if key in fields:
            if fields[key] not in _ON_OFF:
                raise ValueError(f"{key}: {fields[key]!r} is not 'on' or 'off'")
            kw[name] = _ON_OFF[fields[key]]
    if "min-endpoints" in fields:
        kw["min_endpoints"] = _parse_whole("min-endpoints", fields["min-endpoints"])
    return ZoneAware(**kw)


def format_zone_aware(policy: ZoneAware) -> str:
    on = {True: "on", False: "off"}
    return (
        f"prefer: {on[policy.prefer]}; min-endpoints: {policy.min_endpoints}; "
        f"hints: {on[policy.hints]}"
    )


def parse_debug(text: str) -> Debug:
    """``weighbridge.io/debug``: fields ``metadata: on|off`` (default on) and
    ``endpoint-override: on|off`` (default off); ``on`` turns both on, ``off`` both off."""
    entries = _entries(text)
    if entries == ["on"]:
        return Debug(metadata=True, endpoint_override=True)
    if entries == ["off"]:
        return Debug(metadata=False, endpoint_override=False)
    fields = _fields(entries, ("metadata", "endpoint-override"))
    kw: dict[str, Any] = {}
    for key, name in (("metadata", "metadata"), ("endpoint-override", "endpoint_override")):
        if key in fields:
            if fields[key] not in _ON_OFF:
                raise ValueError(f"{key}: {fields[key]!r} is not 'on' or 'off'")
            kw[name] = _ON_OFF[fields[key]]
    return Debug(**kw)


def format_debug(policy: Debug) -> str:
    on = {True: "on", False: "off"}
    return f"metadata: {on[policy.metadata]}; endpoint-override: {on[policy.endpoint_override]}"


def parse_health_check(text: str) -> HealthCheck | None:
    """``weighbridge.io/health-check``: ``service``, ``interval``, ``timeout``,
    ``unhealthy-threshold``, ``healthy-threshold``; ``on`` is the defaults, ``off`` None."""
    entries = _entries(text)
    if entries == ["off"]:
        return None
    if entries == ["on"]:
        return HealthCheck()
    fields = _fields(
        entries,
        ("service", "interval", "timeout", "unhealthy-threshold", "healthy-threshold"),
    )
    kw: dict[str, Any] = {}
    if "service" in fields:
        kw["service"] = "" if fields["service"] == '""' else fields["service"]
    for key, attr in (("interval", "interval_ms"), ("timeout", "timeout_ms")):
        if key in fields:
            kw[attr] = _parse_field_duration(key, fields[key])
    if "interval_ms" in kw and "timeout_ms" not in kw:  # a short interval shortens the timeout
        kw["timeout_ms"] = min(kw["interval_ms"], HealthCheck().timeout_ms)
    for key, attr in (
        ("unhealthy-threshold", "unhealthy_threshold"),
        ("healthy-threshold", "healthy_threshold"),
    ):
        if key in fields:
            kw[attr] = _parse_whole(key, fields[key])
    return HealthCheck(**kw)


_CA_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SERVER_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendTls:
    """TLS from the proxies to the Service's endpoints (``weighbridge.io/backend-tls``)."""

    server_name: str = ""
    """The name the endpoints' certificates must carry, also sent as SNI; "" means the
    Service's own DNS name, NAME.NAMESPACE.svc, which a cluster's certificates usually hold."""
    ca: str = ""
    """The CA bundle that signs them: a name under the proxies' ``--backend-ca-dir`` (the chart
    mounts a Secret there per name); "" means the proxies' ``--backend-ca``."""
    client_certificate: bool = False
    """Present the proxies' own certificate (``--backend-client-cert``), for endpoints that
    require client certificates (mTLS)."""

    def __post_init__(self) -> None:
        if self.server_name and not _SERVER_NAME.fullmatch(self.server_name):
            raise ValueError(f"server-name: {self.server_name!r} is not a DNS name")
        if self.ca and not _CA_NAME.fullmatch(self.ca):
            raise ValueError(
                f"ca: {self.ca!r} is not a name of a CA bundle (lower-case letters, digits, "
                "'-' and '.', like shop-ca)"
            )


def parse_backend_tls(text: str) -> BackendTls | None:
    """``weighbridge.io/backend-tls``: ``server-name``, ``ca``, ``client-certificate`` (on or
    off); ``on`` is TLS with the defaults, ``off`` None (plaintext h2c)."""
    entries = _entries(text)
    if entries == ["off"]:
        return None
    if entries == ["on"]:
        return BackendTls()
    fields = _fields(entries, ("server-name", "ca", "client-certificate"))
    kw: dict[str, Any] = {}
    if "server-name" in fields:
        kw["server_name"] = fields["server-name"]
    if "ca" in fields:
        kw["ca"] = fields["ca"]
    if "client-certificate" in fields:
        value = fields["client-certificate"]
        if value not in ("on", "off"):
            raise ValueError(f"client-certificate: {value!r} is not on or off")
        kw["client_certificate"] = value == "on"
    return BackendTls(**kw)


def format_backend_tls(policy: BackendTls | None) -> str:
    if policy is None:
        return "off"
    parts = [f"server-name: {policy.server_name}"] if policy.server_name else []
    parts += [f"ca: {policy.ca}"] if policy.ca else []
    parts.append(f"client-certificate: {'on' if policy.client_certificate else 'off'}")
    return "; ".join(parts)


def parse_panic_threshold(text: str) -> PanicThreshold:
    """``weighbridge.io/panic-threshold``: one percentage, like ``50%``."""
    entries = _entries(text)
    if len(entries) != 1:
        raise ValueError(f"{text!r} is not one percentage (like 50%)")
    return PanicThreshold(percent=_parse_percent(None, entries[0]))


def parse_stream_idle_timeout(text: str) -> int:
    """``weighbridge.io/stream-idle-timeout``: a duration from 1s to a week (``30m``, ``6h``),
    or ``off``; whole milliseconds, 0 for off."""
    entries = _entries(text)
    if len(entries) != 1:
        raise ValueError(f"{text!r} is not one duration (like 30m or 6h) or off")
    if entries[0] == "off":
        return 0
    ms = parse_duration(entries[0], maximum_ms=MAX_STREAM_IDLE_MS)
    if ms < 1000:
        raise ValueError(f"{entries[0]!r} is shorter than 1s")
    return ms


def format_stream_idle_timeout(ms: int) -> str:
    return format_duration(ms) if ms else "off"


def parse_duration(text: str, *, maximum_ms: int = MAX_DURATION_MS) -> int:
    """Go-like duration → whole milliseconds: ``250ms``, ``1.5s``, ``2m``, ``1m30s``, ``1h``;
    at most ``maximum_ms``."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration (like 250ms, 1s, 1.5s or 2m)")
    total = Fraction(0)
    for whole, decimals, unit in _DURATION_PART.findall(text):
        value = Fraction(int(whole)) + (
            Fraction(int(decimals), 10 ** len(decimals)) if decimals else 0
        )
        total += value * _MS_PER_UNIT[unit]
    if total.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of milliseconds")
    if total > maximum_ms:
        raise ValueError(f"{text!r} is longer than {format_duration(maximum_ms)}")
    return int(total)


def _entries(text: str) -> list[str]:
    """The non-empty entries of a policy's text: split at newlines and ``;``, comments gone."""
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError(f"text of {len(text)} characters is longer than {MAX_TEXT_LENGTH}")
    entries: list[str] = []
    for line in text.split("\n"):
        for raw in line.split("#", 1)[0].split(";"):
            entry = raw.strip(_BLANKS)
            if not entry:
                continue
            if not _PRINTABLE.fullmatch(entry):
                raise ValueError(f"{entry!r} holds a character that is not printable ASCII")
            entries.append(entry)
    if not entries:
        raise ValueError("nothing given (only blanks or comments)")
    return entries


def _fields(entries: list[str], known: tuple[str, ...]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition(":")
        key, value = key.strip(_BLANKS), value.strip(_BLANKS)
        if not sep or not key or not value:
            raise ValueError(f"{entry!r} is not 'KEY: VALUE' (like '{known[0]}: …')")
        if key not in known:
            raise ValueError(f"{key!r} is not a key here; use {', '.join(known)}")
        if key in fields:
            raise ValueError(f"{key!r} is given twice")
        fields[key] = value
    return fields


def _parse_statuses(text: str) -> tuple[int, ...]:
    codes: list[int] = []
    for item in _SEPARATORS.split(text):
        if not item:
            continue
        code = _parse_status(item)
        if code in codes:
            raise ValueError(f"on: {_STATUS_NAMES[code]} is given twice (as {item!r})")
        codes.append(code)
    return tuple(sorted(codes))


def _parse_status(text: str) -> int:
    """A gRPC status by name (any case, snake or kebab) or number (1-16) → its code."""
    if _WHOLE.fullmatch(text):
        code = int(text)
    else:
        name = text.lower().replace("-", "_")
        code = STATUS_CODES.get("cancelled" if name == "canceled" else name, -1)
        if name == "ok":
            code = 0
    if code == 0:
        raise ValueError(f"on: {text!r} is OK, which is never retried")
    if not 1 <= code <= 16:
        raise ValueError(
            f"on: {text!r} is not a gRPC status (a name like unavailable or "
            "RESOURCE_EXHAUSTED, or a number from 1 to 16)"
        )
    return code


def _parse_whole(key: str, text: str) -> int:
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"{key}: {text!r} is not a whole number")
    return int(text)


def _parse_percent(key: str | None, text: str) -> int:
    m = _PERCENT.fullmatch(text)
    if not m:
        raise ValueError(f"{_label(key)}{text!r} is not a whole percentage (like 10%)")
    return int(m[1])


def _parse_field_duration(key: str, text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _check_range(key: str | None, value: int, low: int, high: int, *, unit: str = "") -> None:
    if not low <= value <= high:
        raise ValueError(f"{_label(key)}{value}{unit} is not from {low}{unit} to {high}{unit}")


def _label(key: str | None) -> str:
    """How a message names the entry it is about (nothing for a one-value policy)."""
    return f"{key}: " if key else ""


def _check_duration(key: str, ms: int, *, minimum: int) -> None:
    if not minimum <= ms <= MAX_DURATION_MS:
        raise ValueError(
            f"{key}: {format_duration(ms) if ms >= 0 else f'{ms}ms'} is not from "
            f"{format_duration(minimum)} to {format_duration(MAX_DURATION_MS)}"
        )


# --- canonical text ------------------------------------------------------------------------


def format_retry(policy: RetryPolicy | None) -> str:
    if policy is None:
        return "off"
    parts = [
        f"on: {', '.join(_STATUS_NAMES[c] for c in policy.on)}",
        f"attempts: {policy.attempts}",
    ]
    if policy.per_try_timeout_ms is not None:
        parts.append(f"per-try-timeout: {format_duration(policy.per_try_timeout_ms)}")
    parts.append(
        f"backoff: {format_duration(policy.backoff_base_ms)}"
        f"..{format_duration(policy.backoff_max_ms)}"
    )
    parts.append(f"budget: {policy.budget_percent}% + {policy.budget_per_second}/s")
    return "; ".join(parts)


def format_outlier_detection(policy: OutlierDetection | None) -> str:
    if policy is None:
        return "off"
    return "; ".join(
        (
            f"consecutive-failures: {policy.consecutive_failures}",
            f"base-ejection-time: {format_duration(policy.base_ejection_ms)}",
            f"max-ejection-time: {format_duration(policy.max_ejection_ms)}",
            f"max-ejected: {policy.max_ejected_percent}%",
        )
    )


def format_health_check(policy: HealthCheck | None) -> str:
    if policy is None:
        return "off"
    parts = [f"service: {policy.service}"] if policy.service else []
    parts += [
        f"interval: {format_duration(policy.interval_ms)}",
        f"timeout: {format_duration(policy.timeout_ms)}",
        f"unhealthy-threshold: {policy.unhealthy_threshold}",
        f"healthy-threshold: {policy.healthy_threshold}",
    ]
    return "; ".join(parts)


def format_panic_threshold(policy: PanicThreshold) -> str:
    return f"{policy.percent}%"


def format_duration(ms: int) -> str:
    """Whole milliseconds as the shortest of ``2h``, ``5m``, ``30s``, ``1.5s``, ``250ms``."""
    for unit in ("h", "m", "s"):
        per = _MS_PER_UNIT[unit]
        if ms and ms % per == 0:
            return f"{ms // per}{unit}"
    if ms > 1000:
        return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0") + "s"
    return f"{ms}ms"


# --- BackendSet.options --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover:
    """A Service's policies beyond its strategy (failover, and TLS to its backends), each field
    defaulting to the policy's default."""

    retry: RetryPolicy | None = None
    """None: no configured retries (the engine's transparent retries always happen)."""
    outlier_detection: OutlierDetection | None = OutlierDetection()
    """On by default: ejecting a dead endpoint is right for every Service. None: off."""
    health_check: HealthCheck | None = None
    """None: off, since not every backend serves grpc.health.v1."""
    panic_threshold: PanicThreshold = PanicThreshold()
    backend_tls: BackendTls | None = None
    """None: plaintext h2c to the endpoints."""
    stream_idle_timeout_ms: int | None = None
    """None: the proxy's ``--stream-idle-timeout``; 0: none for this Service."""
    slow_start: SlowStart | None = None
    """None: a new endpoint takes its whole share at once (off, as Envoy's default)."""
    hash: HashKey | None = None
    """ring_hash's key; None: no key (every call a weighted random draw)."""
    zone_aware: ZoneAware = ZoneAware()
    """By default EndpointSlice hints are followed and no zone is preferred otherwise."""
    debug: Debug = Debug()
    """By default debug metadata is given and endpoint overrides are refused."""


DEFAULTS: Final = Failover()


_CANONICAL: Final[Mapping[str, Callable[[str], str]]] = {
    RETRY: lambda text: format_retry(parse_retry(text)),
    OUTLIER_DETECTION: lambda text: format_outlier_detection(parse_outlier_detection(text)),
    HEALTH_CHECK: lambda text: format_health_check(parse_health_check(text)),
    PANIC_THRESHOLD: lambda text: format_panic_threshold(parse_panic_threshold(text)),
    BACKEND_TLS: lambda text: format_backend_tls(parse_backend_tls(text)),
    STREAM_IDLE_TIMEOUT: lambda text: format_stream_idle_timeout(parse_stream_idle_timeout(text)),
    SLOW_START: lambda text: format_slow_start(parse_slow_start(text)),
    HASH: lambda text: format_hash(parse_hash(text)),
    ZONE_AWARE: lambda text: format_zone_aware(parse_zone_aware(text)),
    DEBUG: lambda text: format_debug(parse_debug(text)),
}


def canonical_option(key: str, text: str) -> str:
    """The canonical text of policy ``key`` (one of :data:`OPTION_KEYS`) written as ``text``;
    raises ValueError when ``text`` is not a valid policy."""
    return _CANONICAL[key](text)


T = TypeVar("T")


def failover_from_options(options: Mapping[str, str]) -> tuple[Failover, dict[str, str]]:
    """A set's policies from its options (absent keys: the defaults), and the error of each
    key whose text is invalid, which keeps its default instead."""
    errors: dict[str, str] = {}

    def read(key: str, parse: Callable[[str], T], default: T) -> T:
        text = options.get(key)
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError as exc:
            errors[key] = str(exc)
            return default

    failover = Failover(
        retry=read(RETRY, parse_retry, DEFAULTS.retry),
        outlier_detection=read(
            OUTLIER_DETECTION, parse_outlier_detection, DEFAULTS.outlier_detection
        ),
        health_check=read(HEALTH_CHECK, parse_health_check, DEFAULTS.health_check),
        panic_threshold=read(PANIC_THRESHOLD, parse_panic_threshold, DEFAULTS.panic_threshold),
        backend_tls=read(BACKEND_TLS, parse_backend_tls, DEFAULTS.backend_tls),
        stream_idle_timeout_ms=read(
            STREAM_IDLE_TIMEOUT, parse_stream_idle_timeout, DEFAULTS.stream_idle_timeout_ms
        ),
        slow_start=read(SLOW_START, parse_slow_start, DEFAULTS.slow_start),
        hash=read(HASH, parse_hash, DEFAULTS.hash),
        zone_aware=read(ZONE_AWARE, parse_zone_aware, DEFAULTS.zone_aware),
        debug=read(DEBUG, parse_debug, DEFAULTS.debug),
    )
    return failover, errors


__all__ = [
    "BACKEND_TLS",
    "DEBUG",
    "DEFAULTS",
    "HASH",
    "HEALTH_CHECK",
    "OPTION_KEYS",
    "OUTLIER_DETECTION",
    "PANIC_THRESHOLD",
    "RETRY",
    "SLOW_START",
    "STATUS_CODES",
    "STREAM_IDLE_TIMEOUT",
    "ZONE_AWARE",
    "BackendTls",
    "Debug",
    "Failover",
    "HashKey",
    "HealthCheck",
    "OutlierDetection",
    "PanicThreshold",
    "RetryPolicy",
    "SlowStart",
    "ZoneAware",
    "canonical_option",
    "failover_from_options",
    "format_backend_tls",
    "format_debug",
    "format_duration",
    "format_hash",
    "format_health_check",
    "format_outlier_detection",
    "format_panic_threshold",
    "format_retry",
    "format_slow_start",
    "format_stream_idle_timeout",
    "format_zone_aware",
    "parse_backend_tls",
    "parse_debug",
    "parse_duration",
    "parse_hash",
    "parse_health_check",
    "parse_outlier_detection",
    "parse_panic_threshold",
    "parse_retry",
    "parse_slow_start",
    "parse_stream_idle_timeout",
    "parse_zone_aware",
]
