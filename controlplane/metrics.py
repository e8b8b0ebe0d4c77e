"""The controller's Prometheus metrics (one registry per controller, so tests can run two)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric the controller exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "weighbridge_controller_reconciles_total",
            "Service reconciles by result (published, unchanged, deleted, invalid, error).",
            ["result"],
            registry=registry,
        )
        self.invalid_annotations = Counter(
            "weighbridge_controller_invalid_annotations_total",
            "Reconciles refused because of a bad annotation, by Event reason.",
            ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "weighbridge_controller_errors_total",
            "Transient errors, by component (etcd, kubernetes, fence, internal).",
            ["component"],
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "weighbridge_controller_publish_duration_seconds",
            "Duration of one fenced etcd write (put or delete).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.change_to_publish_seconds = Histogram(
            "weighbridge_controller_change_to_publish_seconds",
            "From the first Kubernetes event that queued a Service to its etcd write.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "weighbridge_controller_queue_depth",
            "Service keys waiting to be reconciled.",
            registry=registry,
        )
        self.leader = Gauge(
            "weighbridge_controller_leader",
            "1 while this controller is the leader and writes to etcd.",
            registry=registry,
        )
        self.backend_sets = Gauge(
            "weighbridge_controller_backend_sets",
            "Backend sets this controller knows to be in etcd.",
            registry=registry,
        )
        self.watch_restarts = Counter(
            "weighbridge_controller_watch_errors_total",
            "Kubernetes watches that failed and were restarted, by kind.",
            ["kind"],
            registry=registry,
        )
        self.events = Counter(
            "weighbridge_controller_events_total",
            "Kubernetes Events by result: posted; failed (the API server refused it or did not "
            "answer in time); dropped (the queue of Events to post was full).",
            ["result"],
            registry=registry,
        )
        self.event_queue = Gauge(
            "weighbridge_controller_event_queue_depth",
            "Kubernetes Events waiting to be posted.",
            registry=registry,
        )
        self.grpc_service_names_taken = Gauge(
            "weighbridge_controller_grpc_service_names_taken",
            "Claims of a gRPC service name (weighbridge.io/grpc-services) that lose to an "
            "older Service's claim: one per name and losing Service.",
            registry=registry,
        )
