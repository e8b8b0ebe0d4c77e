"""Prometheus metrics of the proxy, computed at scrape time from plain counters, so the
request path never touches a metrics library."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dataplane.proxying import ProxyCounters
from dataplane.routing import LATENCY_BOUNDS, Router
from dataplane.subscription import Subscription


class ProxyCollector(Collector):
    def __init__(
        self,
        router: Router,
        counters: ProxyCounters,
        subscription: Subscription,
        refresh: Callable[[], None] = lambda: None,
    ) -> None:
        self.router = router
        self.counters = counters
        self.subscription = subscription
        self.refresh = refresh

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        self.refresh()
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
        for key, state in self.router.services.items():
            for hostport, s in state.stats.items():
                lv = [key, hostport]
                requests.add_metric(lv, s.requests)
                errors.add_metric(lv, s.errors)
                in_flight.add_metric(lv, s.in_flight)
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BOUNDS, float("inf")), s.buckets, strict=True):
                    cumulative += n
                    buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
                latency.add_metric(lv, buckets, s.latency_sum)
        yield from (requests, errors, in_flight, latency)
        calls = CounterMetricFamily("weighbridge_proxy_calls", "Calls received by the proxy.")
        calls.add_metric([], self.counters.calls)
        yield calls
        local = CounterMetricFamily(
            "weighbridge_proxy_local_errors",
            "Calls the proxy ended itself, by reason.",
            labels=["reason"],
        )
        for reason, n in self.counters.local_errors.items():
            local.add_metric([reason], n)
        yield local
        sub = self.subscription
        yield GaugeMetricFamily(
            "weighbridge_proxy_applied_revision",
            "etcd revision applied.",
            value=sub.applied_revision,
        )
        yield GaugeMetricFamily(
            "weighbridge_proxy_backend_sets",
            "Backend sets applied.",
            value=len(self.router.services),
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
