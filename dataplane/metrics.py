"""Prometheus metrics of the proxy, read from the engine's counters at scrape time, so the call
path never touches a metrics library."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dataplane.engine import LATENCY_BOUNDS, Engine
from dataplane.routing import Routes
from dataplane.subscription import Subscription

Family = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily


class ProxyCollector(Collector):
    def __init__(self, engine: Engine, routes: Routes, subscription: Subscription) -> None:
        self.engine = engine
        self.routes = routes
        self.subscription = subscription

    def collect(self) -> Iterator[Family]:
        yield from self._backends()
        yield from self._engine()
        yield from self._subscription()

    def _backends(self) -> Iterator[Family]:
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
        for s in self.engine.stats():
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
