"""The proxy's admin gRPC service (weighbridge.v1.Admin): what it applied, and why it routes."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from dataplane.native import NativeDataPath
from dataplane.routing import NoRouteError, Router, ServiceState
from dataplane.strategies import NoBackendError
from dataplane.subscription import Subscription
from weighbridge.keys import ServiceKey
from weighbridge.model import endpoint_to_proto, to_proto
from weighbridge.v1 import admin_pb2 as api
from weighbridge.v1 import admin_pb2_grpc as api_grpc


def service_status(state: ServiceState) -> api.ServiceStatus:
    bs = state.backend_set
    shares = bs.probabilities()
    backends = {t.endpoint.hostport: t.backend for t in state.targets}
    out = api.ServiceStatus(
        backend_set=to_proto(bs),
        mod_revision=state.mod_revision,
    )
    for e in bs.endpoints:
        stats = state.stats.get(e.hostport)
        backend = backends.get(e.hostport)
        done = sum(stats.buckets) if stats else 0
        out.backends.append(
            api.BackendStatus(
                endpoint=endpoint_to_proto(e),
                eligible=e.eligible,
                share=float(shares.get(e.hostport, 0)),
                requests=stats.requests if stats else 0,
                errors=stats.errors if stats else 0,
                in_flight=stats.in_flight if stats else 0,
                latency_mean_ms=(stats.latency_sum / done * 1000) if stats and done else 0.0,
                latency_p50_ms=stats.quantile(0.5) * 1000 if stats else 0.0,
                latency_p99_ms=stats.quantile(0.99) * 1000 if stats else 0.0,
                connected=backend.connected if backend else False,
                last_error=backend.last_error if backend else "",
            )
        )
    return out


class AdminService(api_grpc.AdminServicer):
    def __init__(
        self,
        proxy_id: str,
        router: Router,
        subscription: Subscription,
        refresh: Callable[[ServiceKey | None], None] = lambda key: None,
        native: NativeDataPath | None = None,
    ) -> None:
        self.proxy_id = proxy_id
        self.router = router
        self.subscription = subscription
        self.refresh = refresh
        self.native = native

    async def ListBackendSets(
        self, request: api.ListBackendSetsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api.ListBackendSetsResponse:
        self.refresh(ServiceKey(request.service) if request.service else None)
        sub = self.subscription
        response = api.ListBackendSetsResponse(
            proxy_id=self.proxy_id,
            applied_revision=sub.applied_revision,
            etcd_connected=sub.connected,
            etcd_last_error=sub.last_error,
            relists=sub.relists,
        )
        services = self.router.services
        keys = [request.service] if request.service else sorted(services)
        for key in keys:
            state = services.get(key)  # type: ignore[call-overload]
            if state is not None:
                response.services.append(service_status(state))
        if request.service and not response.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no backend set for {request.service}")
        return response

    async def Explain(
        self, request: api.ExplainRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api.ExplainResponse:
        cursor = None
        try:
            if self.native is not None:  # the engine's routing table and rotation are the truth
                key, matched = self.native.route(request.authority, request.method)
                state = self.router.services[key]
                cursor = self.native.cursor(key)
            else:
                state, matched = self.router.route(
                    request.authority.encode(), request.method.encode()
                )
        except NoRouteError as exc:
            return api.ExplainResponse(error=f"weighbridge: {exc}")
        response = api.ExplainResponse(
            service=state.key, matched_by=matched, strategy=state.backend_set.strategy
        )
        try:
            explanation = state.picker.explain(cursor)
        except NoBackendError as exc:
            response.error = f"weighbridge: {exc}"
            return response
        response.endpoint.CopyFrom(endpoint_to_proto(explanation.backend.endpoint))
        response.reason = explanation.reason
        return response
