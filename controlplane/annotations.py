"""The annotation contract: what users write on Services and Pods, parsed strictly.

Service annotations::

    weighbridge.io/strategy: weighted_round_robin   # opt-in; required
    weighbridge.io/weights: |                       # optional
      version=v1: 90%
      version=v2: 10%
      pod/api-7c9d-x2k4q: 3
    weighbridge.io/port: grpc                       # optional: Service port name or number
    weighbridge.io/grpc-services: helloworld.Greeter, grpc.health.v1.Health   # optional
    weighbridge.io/retry: "on: unavailable; attempts: 3"          # optional failover policies,
    weighbridge.io/outlier-detection: "consecutive-failures: 3"   # see weighbridge.policy
    weighbridge.io/health-check: "service: helloworld.Greeter"
    weighbridge.io/panic-threshold: 50%
    weighbridge.io/backend-tls: "server-name: api.shop.svc; ca: shop-ca"   # optional
    weighbridge.io/debug: "endpoint-override: on"   # optional: x-weighbridge-endpoint allowed

Pod annotation::

    weighbridge.io/weight: "3"                      # relative weight of this pod, default 1

Every parse error is an :class:`AnnotationError` whose ``reason`` becomes the reason of the
Kubernetes Event on the Service and whose message names the offending text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Final

from controlplane.errors import AnnotationError
from weighbridge import policy
from weighbridge.model import STRATEGIES, is_grpc_service_name

PREFIX: Final = "weighbridge.io/"
STRATEGY: Final = PREFIX + "strategy"
WEIGHTS: Final = PREFIX + "weights"
PORT: Final = PREFIX + "port"
GRPC_SERVICES: Final = PREFIX + "grpc-services"
POD_WEIGHT: Final = PREFIX + "weight"
RETRY: Final = PREFIX + policy.RETRY
OUTLIER_DETECTION: Final = PREFIX + policy.OUTLIER_DETECTION
HEALTH_CHECK: Final = PREFIX + policy.HEALTH_CHECK
PANIC_THRESHOLD: Final = PREFIX + policy.PANIC_THRESHOLD
BACKEND_TLS: Final = PREFIX + policy.BACKEND_TLS
STREAM_IDLE_TIMEOUT: Final = PREFIX + policy.STREAM_IDLE_TIMEOUT
SLOW_START: Final = PREFIX + policy.SLOW_START
HASH: Final = PREFIX + policy.HASH
ZONE_AWARE: Final = PREFIX + policy.ZONE_AWARE
DEBUG: Final = PREFIX + policy.DEBUG

POLICIES: Final = {
    RETRY: (policy.RETRY, "InvalidRetry"),
    OUTLIER_DETECTION: (policy.OUTLIER_DETECTION, "InvalidOutlierDetection"),
    HEALTH_CHECK: (policy.HEALTH_CHECK, "InvalidHealthCheck"),
    PANIC_THRESHOLD: (policy.PANIC_THRESHOLD, "InvalidPanicThreshold"),
    BACKEND_TLS: (policy.BACKEND_TLS, "InvalidBackendTLS"),
    STREAM_IDLE_TIMEOUT: (policy.STREAM_IDLE_TIMEOUT, "InvalidStreamIdleTimeout"),
    SLOW_START: (policy.SLOW_START, "InvalidSlowStart"),
    HASH: (policy.HASH, "InvalidHash"),
    ZONE_AWARE: (policy.ZONE_AWARE, "InvalidZoneAware"),
    DEBUG: (policy.DEBUG, "InvalidDebug"),
}
"""Policy annotation → (its ``BackendSet.options`` key, the Event reason of an error)."""

MAX_WEIGHT: Final = 1_000_000
"""Largest per-pod weight a human may write; far beyond any sensible ratio, small enough that
group arithmetic stays exact."""

MAX_ENTRIES: Final = 256

MAX_MESSAGE: Final = 500
"""Longest error message: the text it quotes is cut (see :func:`excerpt`), so an Event or a
log line about a huge annotation stays readable."""

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SET_REQ = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_DIGITS = re.compile(r"[0-9]+")
_SHARE = re.compile(r"[0-9]{1,16}(\.[0-9]{1,4})?")
_BLANKS: Final = " \t\r\n"


@dataclass(frozen=True, slots=True)
class Requirement:
    """One label-selector requirement: ``k=v``, ``k!=v``, ``k in (a,b)``, ``k``, ``!k``."""

    key: str
    op: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # notin (absent key matches, as in k8s)


@dataclass(frozen=True, slots=True)
class Selector:
    """A conjunction of requirements; written as in ``kubectl -l``."""

    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


@dataclass(frozen=True, slots=True)
class Group:
    """A share of traffic for the endpoints whose Pod labels match ``selector``.

    ``selector`` None is the ``*`` group: every endpoint no other group matched.
    """

    selector: Selector | None
    share: Fraction


@dataclass(frozen=True, slots=True)
class WeightSpec:
    """The parsed ``weighbridge.io/weights`` annotation."""

    groups: tuple[Group, ...] = ()
    pod_weights: Mapping[str, int] = field(default_factory=dict)
    percent: bool = False


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """Everything the Service's annotations say."""

    strategy: str
    weights: WeightSpec
    port: str | None
    grpc_services: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    """The failover policies the Service sets, as ``BackendSet.options``: option key → canonical
    text (:mod:`weighbridge.policy`); a policy it does not set is absent (its default)."""


def opted_in(annotations: Mapping[str, str] | None) -> bool:
    """A Service takes part only when it carries ``weighbridge.io/strategy``."""
    return bool(annotations) and STRATEGY in annotations  # type: ignore[operator]


def parse_service(annotations: Mapping[str, str]) -> ServiceSpec:
    """Parse a Service's Weighbridge annotations; raises AnnotationError."""
    strategy = annotations.get(STRATEGY, "").strip()
    if strategy not in STRATEGIES:
        raise AnnotationError(
            "InvalidStrategy",
            f"{STRATEGY}: {excerpt(strategy)} is not a strategy; "
            f"use one of {', '.join(STRATEGIES)}",
        )
    weights = parse_weights(annotations.get(WEIGHTS, ""))
    port = annotations.get(PORT)
    if port is not None:
        port = port.strip()
        if not port:
            raise AnnotationError("InvalidPort", f"{PORT} is empty; give a port name or number")
    options = parse_policies(annotations)
    if strategy == "ring_hash" and policy.HASH not in options:
        raise AnnotationError(
            "InvalidHash",
            f"{STRATEGY}: ring_hash needs {HASH} naming the request header to hash "
            "(like 'header: x-user-id')",
        )
    if (
        strategy == "ring_hash"
        and policy.ZONE_AWARE in options
        and policy.parse_zone_aware(options[policy.ZONE_AWARE]).prefer
    ):
        raise AnnotationError(
            "InvalidZoneAware",
            f"{ZONE_AWARE}: ring_hash keeps each key on one endpoint whatever the zone; "
            "zone preference does not combine with it (use 'off', or 'prefer: off' to follow "
            "EndpointSlice hints only)",
        )
    return ServiceSpec(
        strategy=strategy,
        weights=weights,
        port=port,
        grpc_services=parse_grpc_services(annotations.get(GRPC_SERVICES, "")),
        options=options,
    )


def parse_policies(annotations: Mapping[str, str]) -> dict[str, str]:
    """The failover policy annotations present, validated, as canonical option texts."""
    options: dict[str, str] = {}
    for annotation, (key, reason) in POLICIES.items():
        text = annotations.get(annotation)
        if text is None:
            continue
        try:
            options[key] = policy.canonical_option(key, text)
        except ValueError as exc:
            message = f"{annotation}: {exc}"
            if len(message) > MAX_MESSAGE:
                message = f"{message[: MAX_MESSAGE - 1]}…"
            raise AnnotationError(reason, message) from exc
    return options


def parse_grpc_services(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in re.split(r"[,\s]+", text) if n.strip()]
    for n in names:
        if not is_grpc_service_name(n):
            raise AnnotationError(
                "InvalidGrpcServices",
                f"{GRPC_SERVICES}: {excerpt(n)} is not a fully qualified gRPC service name "
                "(like helloworld.Greeter)",
            )
    return tuple(dict.fromkeys(names))


def parse_pod_weight(pod: str, annotations: Mapping[str, str] | None) -> int | None:
    """The Pod's ``weighbridge.io/weight``, or None when absent; raises AnnotationError
    (reason ``InvalidPodWeight``) for anything but ASCII digits from 0 to :data:`MAX_WEIGHT`."""
    if not annotations or POD_WEIGHT not in annotations:
        return None
    value = annotations[POD_WEIGHT]
    weight = _whole_number(value.strip(_BLANKS))
    if weight is None:
        raise AnnotationError(
            "InvalidPodWeight",
            f"pod {pod}: {POD_WEIGHT}={excerpt(value)} is not a whole number "
            f"from 0 to {MAX_WEIGHT}",
        )
    return weight


def _whole_number(text: str) -> int | None:
    """``text`` as an int when it is ASCII digits only and at most :data:`MAX_WEIGHT`.

    Checked before ``int()``, which would accept other scripts' digits and raise ValueError
    (not AnnotationError) past 4300 digits."""
    digits = text.lstrip("0") or "0"
    if not _DIGITS.fullmatch(text) or len(digits) > len(str(MAX_WEIGHT)):
        return None
    value = int(digits)
    return value if value <= MAX_WEIGHT else None


def excerpt(text: str, limit: int = 40) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters with its length when longer, so a
    message (an Event, a log line) quoting a huge annotation stays short."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def parse_weights(text: str) -> WeightSpec:
    """Parse ``weighbridge.io/weights``.

    One entry per line (or separated by ``;``), ``TARGET: VALUE``, ``#`` starts a comment:

    - ``SELECTOR: SHARE`` — a group share for pods matching a label selector (``k=v``,
      ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``, comma-joined = all of them).
      Shares are all percentages adding up to 100 (``90%``), or all plain relative numbers.
    - ``*: SHARE`` — the share of pods no other group matched (otherwise they get none).
    - ``pod/NAME: WEIGHT`` — a whole-number relative weight for one pod.
    """
    groups: list[Group] = []
    pod_weights: dict[str, int] = {}
    seen_selectors: set[str] = set()
    kinds: set[bool] = set()
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(";")]
    entries = [e for e in entries if e]
    if len(entries) > MAX_ENTRIES:
        raise AnnotationError("InvalidWeights", f"{WEIGHTS}: more than {MAX_ENTRIES} entries")
    for entry in entries:
        target, sep, value = entry.rpartition(":")
        target, value = target.strip(), value.strip()
        if not sep or not target or not value:
            raise AnnotationError(
                "InvalidWeights",
                f"{WEIGHTS}: {excerpt(entry)} is not 'TARGET: VALUE' (e.g. 'version=v1: 90%')",
            )
        if target.startswith("pod/"):
            pod = target[4:].strip()
            if not _POD_NAME.match(pod):
                raise AnnotationError(
                    "InvalidWeights", f"{WEIGHTS}: {excerpt(pod)} is not a pod name"
                )
            if pod in pod_weights:
                raise AnnotationError("InvalidWeights", f"{WEIGHTS}: pod/{pod} is given twice")
            weight = _whole_number(value)
            if weight is None:
                raise AnnotationError(
                    "InvalidWeights",
                    f"{WEIGHTS}: weight {excerpt(value)} of pod/{pod} is not a whole number "
                    f"from 0 to {MAX_WEIGHT}",
                )
            pod_weights[pod] = weight
            continue
        percent = value.endswith("%")
        share = _parse_share(value.removesuffix("%").strip(), entry)
        kinds.add(percent)
        selector = None if target == "*" else parse_selector(target)
        canonical = "*" if selector is None else target
        if canonical in seen_selectors:
            raise AnnotationError(
                "InvalidWeights", f"{WEIGHTS}: group {excerpt(target)} is given twice"
            )
        seen_selectors.add(canonical)
        groups.append(Group(selector, share))
    if len(kinds) > 1:
        raise AnnotationError(
            "InvalidWeights",
            f"{WEIGHTS}: mix of percentages and plain numbers; write all shares one way",
        )
    is_percent = kinds == {True}
    if is_percent:
        total = sum((g.share for g in groups), Fraction(0))
        if total != 100:
            raise AnnotationError(
                "InvalidWeights",
                f"{WEIGHTS}: group shares add up to {float(total):g}%, not 100%",
            )
    if groups and sum(g.share for g in groups) == 0:
        raise AnnotationError("InvalidWeights", f"{WEIGHTS}: every group share is 0")
    return WeightSpec(tuple(groups), pod_weights, is_percent)


def _parse_share(text: str, entry: str) -> Fraction:
    # The pattern first: Decimal() would take other scripts' digits, underscores and exponents.
    value = Decimal(text) if _SHARE.fullmatch(text) else None
    if value is None or value > MAX_WEIGHT:
        raise AnnotationError(
            "InvalidWeights",
            f"{WEIGHTS}: share {excerpt(text)} in {excerpt(entry, 80)} is not a number from 0 "
            f"to {MAX_WEIGHT} with at most 4 decimals",
        )
    return Fraction(value)


def parse_selector(text: str) -> Selector:
    """Parse an equality- or set-based label selector, as ``kubectl get -l`` takes it."""
    requirements: list[Requirement] = []
    for part in _split_requirements(text):
        requirements.append(_parse_requirement(part, text))
    if not requirements:
        raise AnnotationError("InvalidWeights", f"{WEIGHTS}: empty selector in {excerpt(text)}")
    return Selector(text, tuple(requirements))


def _split_requirements(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise AnnotationError(
                    "InvalidWeights", f"{WEIGHTS}: unbalanced ')' in {excerpt(text)}"
                )
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth:
        raise AnnotationError("InvalidWeights", f"{WEIGHTS}: unbalanced '(' in {excerpt(text)}")
    parts.append("".join(current).strip())
    return parts


def _parse_requirement(part: str, whole: str) -> Requirement:
    def bad(why: str) -> AnnotationError:
        return AnnotationError("InvalidWeights", f"{WEIGHTS}: selector {excerpt(whole)}: {why}")

    def key(k: str) -> str:
        k = k.strip()
        if not _LABEL_KEY.match(k):
            raise bad(f"{excerpt(k)} is not a label key")
        return k

    def value(v: str) -> str:
        v = v.strip()
        if not _LABEL_VALUE.match(v):
            raise bad(f"{excerpt(v)} is not a label value")
        return v

    if not part:
        raise bad("empty requirement")
    if m := _SET_REQ.match(part):
        values = frozenset(value(v) for v in m["values"].split(","))
        return Requirement(key(m["key"]), m["op"], values)
    for op, name in (("!=", "notin"), ("==", "in"), ("=", "in")):
        if op in part:
            k, _, v = part.partition(op)
            return Requirement(key(k), name, frozenset({value(v)}))
    if part.startswith("!"):
        return Requirement(key(part[1:]), "!exists")
    return Requirement(key(part), "exists")
