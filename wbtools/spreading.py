"""``wbctl spread``: how the live proxies have spread one Service's calls, against the shares
its set promises.

The counters are each proxy's per-endpoint ``requests`` (calls sent to the endpoint, retries
included), read from its admin API (``ListBackendSets``, as ``wbctl backends`` reads them:
through ``kubectl port-forward``, one per proxy, since the admin API listens on the pod's
loopback). The expected share of each endpoint is the one the proxy reports for the set it
applied (:meth:`weighbridge.model.BackendSet.probabilities`, what ``wbctl get`` shows); when
proxies applied different versions of the set, the newest one's.

With ``interval`` > 0 the counters are read twice and only the calls in between count, so
calls made under an earlier set do not blur the comparison. Each endpoint's deviation is in
binomial standard deviations: (calls - n*p) / sqrt(n*p*(1 - p)) for n calls in all and expected
share p. A rotation (round_robin, weighted_round_robin) deviates far less than a draw; the
load-aware strategies move away from the weights on purpose when loads differ.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from weighbridge.errors import WeighbridgeError
from weighbridge.keys import ServiceKey
from weighbridge.model import join_hostport
from weighbridge.v1 import admin_pb2
from weighbridge.wbctl import list_backend_sets, write_table

WITHIN: Final = 3.0
"""Standard deviations within which an endpoint's share is ``ok``: 0.3% of honest endpoints land
beyond by chance."""

OFF: Final = 5.0
"""Beyond this many standard deviations an endpoint's share is ``off``: by chance less than
once in a million. Between :data:`WITHIN` and this it is ``unlikely``."""


@dataclass(frozen=True, slots=True)
class Row:
    """One endpoint: its calls (per proxy, and in all) against its expected share."""

    hostport: str
    pod: str
    calls: int
    per_proxy: tuple[int, ...]
    expected: float

    def deviation(self, total: int) -> float:
        """(calls - n*p) / sqrt(n*p*(1 - p)), n = ``total``; ±inf when the expected share is 0 or 1
        and the calls say otherwise."""
        mean = total * self.expected
        sigma = math.sqrt(total * self.expected * (1 - self.expected))
        if sigma > 0:
            return (self.calls - mean) / sigma
        return 0.0 if math.isclose(self.calls, mean) else math.copysign(math.inf, self.calls - mean)

    def verdict(self, total: int) -> str:
        if total == 0:
            return "no calls"
        z = abs(self.deviation(total))
        return "ok" if z <= WITHIN else "unlikely" if z <= OFF else "off"


@dataclass(frozen=True, slots=True)
class Spread:
    service: ServiceKey
    strategy: str
    proxies: tuple[str, ...]
    """The proxies' ids, in the order of ``Row.per_proxy``."""
    revisions: tuple[int, ...]
    """The etcd revision of the set each proxy applied."""
    rows: tuple[Row, ...]
    interval: float

    @property
    def total(self) -> int:
        return sum(r.calls for r in self.rows)

    @property
    def verdict(self) -> str:
        """The worst of the endpoints' verdicts."""
        verdicts = {r.verdict(self.total) for r in self.rows}
        return next((v for v in ("off", "unlikely", "ok") if v in verdicts), "no calls")


def _status(
    response: admin_pb2.ListBackendSetsResponse, key: ServiceKey
) -> admin_pb2.ServiceStatus:
    for s in response.services:
        if f"{s.backend_set.namespace}/{s.backend_set.name}" == key:
            return s
    raise WeighbridgeError(f"proxy {response.proxy_id} has no backend set for {key}")


def _requests(status: admin_pb2.ServiceStatus) -> dict[str, int]:
    return {join_hostport(b.endpoint.address, b.endpoint.port): b.requests for b in status.backends}


def compare(
    key: ServiceKey,
    before: Sequence[admin_pb2.ListBackendSetsResponse] | None,
    after: Sequence[admin_pb2.ListBackendSetsResponse],
    *,
    interval: float = 0.0,
) -> Spread:
    """The spread of ``key``'s calls over the proxies' answers ``after`` (minus ``before``,
    the same proxies' earlier answers, when given)."""
    statuses = [_status(r, key) for r in after]
    newest = max(statuses, key=lambda s: s.mod_revision)
    calls = [_requests(s) for s in statuses]
    if before is not None:
        for counts, earlier in zip(calls, before, strict=True):
            old = _requests(_status(earlier, key))
            for hostport in counts:
                counts[hostport] = max(0, counts[hostport] - old.get(hostport, 0))
    endpoints = {
        join_hostport(b.endpoint.address, b.endpoint.port): (b.endpoint.pod, b.share)
        for b in newest.backends
    }
    # Endpoints some proxy still counts that left the newest set: they were expected nothing.
    for counts in calls:
        for hostport in counts:
            endpoints.setdefault(hostport, ("", 0.0))
    rows = tuple(
        Row(
            hostport=hostport,
            pod=pod,
            calls=sum(c.get(hostport, 0) for c in calls),
            per_proxy=tuple(c.get(hostport, 0) for c in calls),
            expected=share,
        )
        for hostport, (pod, share) in endpoints.items()
    )
    return Spread(
        service=key,
        strategy=newest.backend_set.strategy,
        proxies=tuple(r.proxy_id for r in after),
        revisions=tuple(s.mod_revision for s in statuses),
        rows=rows,
        interval=interval,
    )


async def measure(key: ServiceKey, admins: Sequence[str], *, interval: float = 0.0) -> Spread:
    """Ask every proxy (admin API addresses ``admins``) for ``key``'s counters, twice
    ``interval`` seconds apart when ``interval`` > 0."""

    async def ask() -> list[admin_pb2.ListBackendSetsResponse]:
        return list(await asyncio.gather(*(list_backend_sets(a, key) for a in admins)))

    before = None
    if interval > 0:
        before = await ask()
        await asyncio.sleep(interval)
    return compare(key, before, await ask(), interval=interval)


def _sigma(z: float) -> str:
    return f"{z:+.1f}σ" if math.isfinite(z) else ("+∞σ" if z > 0 else "-∞σ")  # noqa: RUF001


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json(spread: Spread) -> dict[str, Any]:
    total = spread.total
    return {
        "service": spread.service,
        "strategy": spread.strategy,
        "proxies": [
            {"id": p, "setRevision": r}
            for p, r in zip(spread.proxies, spread.revisions, strict=True)
        ],
        "intervalSeconds": spread.interval,
        "calls": total,
        "verdict": spread.verdict,
        "endpoints": [
            {
                "endpoint": r.hostport,
                "pod": r.pod,
                "calls": r.calls,
                "callsPerProxy": list(r.per_proxy),
                "observedShare": r.calls / total if total else 0.0,
                "expectedShare": r.expected,
                # JSON has no infinity: null when a share of 0 (or 1) was not kept.
                "deviationSigma": _finite(r.deviation(total)) if total else 0.0,
                "verdict": r.verdict(total),
            }
            for r in spread.rows
        ],
    }


def print_spread(spread: Spread, out: TextIO) -> None:
    total = spread.total
    during = f" in {spread.interval:g}s" if spread.interval > 0 else ""
    out.write(
        f"Service {spread.service}: {spread.strategy}, {total} calls{during} through "
        f"{len(spread.proxies)} prox{'y' if len(spread.proxies) == 1 else 'ies'} "
        f"({', '.join(spread.proxies)}); verdict: {spread.verdict}\n"
    )
    if len(set(spread.revisions)) > 1:
        out.write(
            "warning: the proxies applied different versions of the set (revisions "
            f"{', '.join(map(str, spread.revisions))}); expected shares are the newest's\n"
        )
    out.write("\n")
    rows = [("POD", "ENDPOINT", "CALLS", "OBSERVED", "EXPECTED", "DEVIATION", "VERDICT")]
    for r in spread.rows:
        rows.append(
            (
                r.pod or "-",
                r.hostport,
                str(r.calls),
                f"{r.calls / total:.2%}" if total else "-",
                f"{r.expected:.2%}",
                _sigma(r.deviation(total)) if total else "-",
                r.verdict(total),
            )
        )
    write_table(rows, out)


def write_json(spread: Spread, out: TextIO) -> None:
    out.write(json.dumps(to_json(spread), indent=2) + "\n")
