"""Prometheus metrics of the proxy, read from the engine's counters at scrape time, so the call
path never touches a metrics library."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dataplane.engine import ENDPOINT_STATES, LATENCY_BOUNDS, BackendStats, Engine
from dataplane.health import in_sync
from dataplane.routing import APPLY_FAILURE_REASONS, Routes, endpoint_state
from dataplane.subscription import Subscription

if TYPE_CHECKING:
    from dataplane.xds.server import XdsServer

Family = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily

COLLECT_TIMEOUT: Final = 5.0
"""Seconds a scrape waits for the event loop to run the collection; a loop that busy is itself
the news, and the scrape fails (HTTP 500) rather than hang."""


class ProxyCollector(Collector):
    """The proxy's metrics, collected on its event loop.

    The applied sets and the subscription's state belong to the event loop, which changes them
    between its callbacks, while prometheus_client's HTTP server calls :meth:`collect` on a
    thread of its own. So, given ``loop``, :meth:`collect` runs the whole collection on that
    loop, as one callback, and waits for it: a scrape reads one moment of the loop's state
    (never a Service counted in one family and gone from the next, never a dict changing
    under an iteration), and only the finished families, which nothing else holds, cross to the
    server's thread to be written out there. Without ``loop`` (or called on it) it collects
    where it is called."""

    def __init__(
        self,
        engine: Engine,
        routes: Routes,
        subscription: Subscription,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = COLLECT_TIMEOUT,
        xds: XdsServer | None = None,
    ) -> None:
        self.engine = engine
        self.xds = xds
        self.routes = routes
        self.subscription = subscription
        self.loop = loop
        self.timeout = timeout

    def collect(self) -> list[Family]:
        if self.loop is None or _running_loop() is self.loop:
            return self._families()
        future = asyncio.run_coroutine_threadsafe(self._on_loop(), self.loop)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the proxy's event loop did not collect the metrics within {self.timeout}s"
            ) from None

    async def _on_loop(self) -> list[Family]:
        return self._families()

    def _families(self) -> list[Family]:
        """Every family, read without a pause (call it on the loop that owns the state)."""
        stats = self.engine.stats()
        return [
            *self._backends(stats),
            *self._endpoint_states(stats),
            *self._failover(),
            *self._engine(),
            *self._subscription(),
            *self._xds(),
        ]

    def _backends(self, stats: list[BackendStats]) -> Iterator[Family]:
        labels = ["service", "backend"]
        requests = CounterMetricFamily(
            "weighbridge_proxy_backend_requests", "Calls sent to a backend.", labels=labels
        )
        errors = CounterMetricFamily(
            "weighbridge_proxy_backend_errors",
            "Calls to a backend that ended non-OK.",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "weighbridge_proxy_backend_in_flight", "Calls to a backend in flight.", labels=labels
        )
        latency = HistogramMetricFamily(
            "weighbridge_proxy_backend_duration_seconds",
            "Duration of calls through the proxy, by backend.",
            labels=labels,
        )
        bounds = [str(b) for b in LATENCY_BOUNDS] + ["+Inf"]
        for s in stats:
            lv = [s.service, s.hostport]
            requests.add_metric(lv, s.requests)
            errors.add_metric(lv, s.errors)
            in_flight.add_metric(lv, s.in_flight)
            cumulative, buckets = 0, []
            for bound, n in zip(bounds, s.buckets, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric(lv, buckets, s.latency_sum)
        yield from (requests, errors, in_flight, latency)

    def _endpoint_states(self, stats: list[BackendStats]) -> Iterator[Family]:
        """Endpoints of each applied set by state (every state, 0 included)."""
        endpoints = GaugeMetricFamily(
            "weighbridge_proxy_endpoints",
            "Endpoints of each Service by state: healthy, connect_failing, ejected, unhealthy, "
            "draining.",
            labels=["service", "state"],
        )
        by_endpoint = {(s.service, s.hostport): s for s in stats}
        for key, applied in sorted(self.routes.services.items()):
            counts = dict.fromkeys(ENDPOINT_STATES, 0)
            for e in applied.backend_set.endpoints:
                state = endpoint_state(e, by_endpoint.get((key, e.hostport))).state
                if state in counts:
                    counts[state] += 1
            for state, n in counts.items():
                endpoints.add_metric([key, state], n)
        yield endpoints

    def _failover(self) -> Iterator[Family]:
        retries = CounterMetricFamily(
            "weighbridge_proxy_retries",
            "Retries: transparent (the call never reached a backend) and configured "
            "(weighbridge.io/retry).",
            labels=["service", "kind"],
        )
        exhausted = CounterMetricFamily(
            "weighbridge_proxy_retry_budget_exhausted",
            "Configured retries not made because the Service's retry budget was spent.",
            labels=["service"],
        )
        ejections = CounterMetricFamily(
            "weighbridge_proxy_ejections",
            "Endpoints ejected by outlier detection.",
            labels=["service"],
        )
        checks = CounterMetricFamily(
            "weighbridge_proxy_health_checks",
            "Active health checks, by result.",
            labels=["service", "result"],
        )
        debug = CounterMetricFamily(
            "weighbridge_proxy_debug_calls",
            "Calls given a debugging aid, by kind: metadata (x-weighbridge-debug), "
            "endpoint_override (sent to the pod x-weighbridge-endpoint named).",
            labels=["service", "kind"],
        )
        debug_kinds = {"debug_metadata": "metadata", "endpoint_overrides": "endpoint_override"}
        kinds = {"transparent_retries": "transparent", "retries": "configured"}
        results = {"health_checks_passed": "passed", "health_checks_failed": "failed"}
        for row in self.engine.failover_counters():  # counters a newer engine adds are skipped
            if row.counter in kinds:
                retries.add_metric([row.service, kinds[row.counter]], row.value)
            elif row.counter in results:
                checks.add_metric([row.service, results[row.counter]], row.value)
            elif row.counter == "retry_budget_exhausted":
                exhausted.add_metric([row.service], row.value)
            elif row.counter == "ejections":
                ejections.add_metric([row.service], row.value)
            elif row.counter in debug_kinds:
                debug.add_metric([row.service, debug_kinds[row.counter]], row.value)
        dropped = CounterMetricFamily(
            "weighbridge_proxy_state_events_dropped",
            "Endpoint state changes the engine dropped, unread (their log lines are missing).",
        )
        dropped.add_metric([], self.engine.events_dropped)
        tls = CounterMetricFamily(
            "weighbridge_proxy_tls_failures",
            "Client connections refused at TLS, by reason: plaintext on a TLS-only port, "
            "no_handshake in time, handshake_failed (a refused client certificate among them).",
            labels=["reason"],
        )
        for reason, n in self.engine.tls_failures().items():
            tls.add_metric([reason], n)
        limits = CounterMetricFamily(
            "weighbridge_proxy_client_limit_hits",
            "Client connections that hit a limit, by limit: handshake_timeout, invalid_preface, "
            "max_connections, idle_timeout, keepalive_timeout, streams_refused (streams, not "
            "connections), rapid_reset, flood, protocol_error (docs/proxy.md).",
            labels=["limit"],
        )
        for limit, n in self.engine.client_limits().items():
            limits.add_metric([limit], n)
        connections = GaugeMetricFamily(
            "weighbridge_proxy_client_connections",
            "Client connections open now (at most --max-client-connections).",
        )
        connections.add_metric([], self.engine.client_connections)
        yield from (
            retries,
            exhausted,
            ejections,
            checks,
            debug,
            dropped,
            tls,
            limits,
            connections,
        )

    def _engine(self) -> Iterator[Family]:
        counters = self.engine.counters()
        calls = CounterMetricFamily("weighbridge_proxy_calls", "Calls received by the proxy.")
        calls.add_metric([], counters.calls)
        yield calls
        local = CounterMetricFamily(
            "weighbridge_proxy_local_errors",
            "Calls the proxy ended itself, by reason.",
            labels=["reason"],
        )
        for reason, n in counters.local_errors.items():
            local.add_metric([reason], n)
        yield local
        threads = self.engine.thread_stats()
        yield GaugeMetricFamily(
            "weighbridge_proxy_threads", "Engine threads carrying calls.", value=len(threads)
        )
        accepted = CounterMetricFamily(
            "weighbridge_proxy_thread_connections",
            "Client connections accepted, by engine thread.",
            labels=["thread"],
        )
        open_now = GaugeMetricFamily(
            "weighbridge_proxy_thread_connections_open",
            "Client connections open, by engine thread.",
            labels=["thread"],
        )
        thread_calls = CounterMetricFamily(
            "weighbridge_proxy_thread_calls",
            "Calls received, by engine thread.",
            labels=["thread"],
        )
        for i, t in enumerate(threads):
            accepted.add_metric([str(i)], t.connections)
            open_now.add_metric([str(i)], t.open)
            thread_calls.add_metric([str(i)], t.calls)
        yield from (accepted, open_now, thread_calls)

    def _subscription(self) -> Iterator[Family]:
        sub = self.subscription
        yield GaugeMetricFamily(
            "weighbridge_proxy_applied_revision",
            "etcd revision applied.",
            value=sub.applied_revision,
        )
        yield GaugeMetricFamily(
            "weighbridge_proxy_backend_sets",
            "Backend sets applied.",
            value=len(self.routes.services),
        )
        yield GaugeMetricFamily(
            "weighbridge_proxy_etcd_connected",
            "1 while the etcd watch is up.",
            value=int(sub.connected),
        )
        relists = CounterMetricFamily(
            "weighbridge_proxy_etcd_relists", "Times the proxy re-listed etcd."
        )
        relists.add_metric([], sub.relists)
        yield relists
        yield GaugeMetricFamily(
            "weighbridge_proxy_in_sync",
            "1 while the etcd watch is up and every set read is applied (health service "
            "weighbridge.sync SERVING).",
            value=int(in_sync(sub, self.routes)),
        )
        failures = CounterMetricFamily(
            "weighbridge_proxy_backend_set_apply_failures",
            "Backend sets (or deletions) that failed to apply, by reason: rejected (the set asks "
            "for what this proxy cannot do), error (an unexpected exception: a bug).",
            labels=["reason"],
        )
        unapplied = GaugeMetricFamily(
            "weighbridge_proxy_backend_sets_unapplied",
            "Services whose latest set (or deletion) is not applied (calls get the set applied "
            "before), by reason of the last failure.",
            labels=["reason"],
        )
        now = dict.fromkeys(APPLY_FAILURE_REASONS, 0)
        for failure in self.routes.unapplied.values():
            now[failure.reason] += 1
        for reason in APPLY_FAILURE_REASONS:
            failures.add_metric([reason], self.routes.apply_failures[reason])
            unapplied.add_metric([reason], now[reason])
        yield from (failures, unapplied)
        crashes = CounterMetricFamily(
            "weighbridge_proxy_subscription_failures",
            "Times the etcd subscription failed (an unexpected exception) and started over.",
        )
        crashes.add_metric([], sub.failures)
        yield crashes

    def _xds(self) -> Iterator[Family]:
        """The xDS server's, when it is on (--xds-listen)."""
        if self.xds is None:
            return
        from dataplane.xds.resources import TYPES  # loaded already: the server is on

        yield GaugeMetricFamily(
            "weighbridge_proxy_xds_streams",
            "xDS streams open (one per proxyless gRPC client process).",
            value=self.xds.streams,
        )
        refused = CounterMetricFamily(
            "weighbridge_proxy_xds_streams_refused",
            "xDS streams refused at --xds-max-streams.",
        )
        refused.add_metric([], self.xds.refused)
        responses = CounterMetricFamily(
            "weighbridge_proxy_xds_responses",
            "xDS responses sent, by resource type (listener, cluster, endpoints, route).",
            labels=["type"],
        )
        nacks = CounterMetricFamily(
            "weighbridge_proxy_xds_nacks",
            "xDS responses a client rejected (NACK; it keeps what it had), by resource type; "
            "the log line xds_nack names the client and its reason.",
            labels=["type"],
        )
        for kind in TYPES.values():
            responses.add_metric([kind], self.xds.responses[kind])
            nacks.add_metric([kind], self.xds.nacks[kind])
        yield from (refused, responses, nacks)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
