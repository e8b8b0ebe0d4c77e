"""Prometheus metrics of the proxy, read from the engine's counters at scrape time, so the call
path never touches a metrics library."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dataplane.engine import ENDPOINT_STATES, LATENCY_BOUNDS, BackendStats, Engine
from dataplane.routing import Routes, endpoint_state
from dataplane.subscription import Subscription

Family = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily


class ProxyCollector(Collector):
    def __init__(self, engine: Engine, routes: Routes, subscription: Subscription) -> None:
        self.engine = engine
        self.routes = routes
        self.subscription = subscription

    def collect(self) -> Iterator[Family]:
        stats = self.engine.stats()
        yield from self._backends(stats)
        yield from self._endpoint_states(stats)
        yield from self._failover()
        yield from self._engine()
        yield from self._subscription()

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
        yield from (retries, exhausted, ejections, checks, dropped, tls)

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
