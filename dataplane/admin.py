"""The proxy's admin gRPC service (weighbridge.v1.Admin): what it applied, and why it routes."""

from __future__ import annotations

import grpc

from dataplane.engine import BackendStats, Engine, NoBackendError
from dataplane.routing import Routes, ServiceState, endpoint_state
from dataplane.subscription import Subscription
from weighbridge.keys import ServiceKey
from weighbridge.model import endpoint_to_proto, to_proto
from weighbridge.v1 import admin_pb2 as api
from weighbridge.v1 import admin_pb2_grpc as api_grpc


def service_status(state: ServiceState, stats: list[BackendStats]) -> api.ServiceStatus:
    """One applied set with the engine's counters and state of each endpoint."""
    bs = state.backend_set
    shares = bs.probabilities()
    by_hostport = {s.hostport: s for s in stats}
    out = api.ServiceStatus(backend_set=to_proto(bs), mod_revision=state.mod_revision)
    for e in bs.endpoints:
        s = by_hostport.get(e.hostport)
        done = sum(s.buckets) if s else 0
        now = endpoint_state(e, s)
        out.backends.append(
            api.BackendStatus(
                endpoint=endpoint_to_proto(e),
                eligible=e.eligible,
                share=float(shares.get(e.hostport, 0)),
                requests=s.requests if s else 0,
                errors=s.errors if s else 0,
                in_flight=s.in_flight if s else 0,
                latency_mean_ms=(s.latency_sum / done * 1000) if s and done else 0.0,
                latency_p50_ms=s.quantile(0.5) * 1000 if s else 0.0,
                latency_p99_ms=s.quantile(0.99) * 1000 if s else 0.0,
                connected=s.connected if s else False,
                last_error=s.last_error if s else "",
                state=now.state,
                state_reason=now.reason,
                state_since_unix=now.since_unix,
                ejections=s.ejections if s else 0,
            )
        )
    return out


class AdminService(api_grpc.AdminServicer):
    def __init__(
        self, proxy_id: str, routes: Routes, engine: Engine, subscription: Subscription
    ) -> None:
        self.proxy_id = proxy_id
        self.routes = routes
        self.engine = engine
        self.subscription = subscription

    async def ListBackendSets(
        self, request: api.ListBackendSetsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api.ListBackendSetsResponse:
        sub = self.subscription
        response = api.ListBackendSetsResponse(
            proxy_id=self.proxy_id,
            applied_revision=sub.applied_revision,
            etcd_connected=sub.connected,
            etcd_last_error=sub.last_error,
            relists=sub.relists,
        )
        services = self.routes.services
        wanted = ServiceKey(request.service) if request.service else None
        stats: dict[ServiceKey, list[BackendStats]] = {}
        for s in self.engine.stats(wanted):  # one Service's counters only, when asked for one
            stats.setdefault(s.service, []).append(s)
        for key in [wanted] if wanted else sorted(services):
            state = services.get(key)
            if state is not None:
                response.services.append(service_status(state, stats.get(key, [])))
        if wanted and not response.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no backend set for {wanted}")
        return response

    async def Explain(
        self, request: api.ExplainRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api.ExplainResponse:
        """Asks the engine: its routing table and its pickers are the truth."""
        try:
            key, matched = self.engine.route(request.authority, request.method)
        except NoBackendError as exc:
            return api.ExplainResponse(error=f"weighbridge: {exc}")
        state = self.routes.services.get(key)
        response = api.ExplainResponse(
            service=key,
            matched_by=matched,
            strategy=state.backend_set.strategy if state else "",
        )
        try:
            hostport, reason = self.engine.explain(key, request.headers)
        except NoBackendError as exc:
            response.error = f"weighbridge: {exc}"
            return response
        endpoints = state.backend_set.endpoints if state else ()
        endpoint = next((e for e in endpoints if e.hostport == hostport), None)
        if endpoint is not None:
            response.endpoint.CopyFrom(endpoint_to_proto(endpoint))
        response.reason = reason
        return response
