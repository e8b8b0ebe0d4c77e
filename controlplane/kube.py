"""A thin JSON client for the Kubernetes API on top of ``kubernetes.aio``.

``kubernetes.aio`` loads the configuration (kubeconfig or in-cluster), authenticates and pools
connections; this module speaks plain JSON dicts on top of it, because the controller only
needs a handful of fields and typed models cost memory and CPU at 10,000 Services.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from kubernetes.aio import client as k8s_client
from kubernetes.aio import config as k8s_config

from controlplane.errors import ControllerError

Obj = dict[str, Any]

CLOSE_GRACE = 1.0
"""Seconds Kube.close() lets connections finish their TLS close before aborting them."""


class KubeError(ControllerError):
    """The API server could not be reached, or answered with an error status."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class _Connector(aiohttp.TCPConnector):
    """A TCPConnector whose ``close()`` returns only once every connection it handed out has
    closed its socket.

    aiohttp closes a connection it will not pool (a watch we stop reading, a request or a
    body read cancelled mid-way) at once but gracefully: over TLS the socket stays open until
    the server answers the close_notify, and the connector forgets the connection meanwhile,
    so ``TCPConnector.close()`` does not wait for it. An event loop closed in that window
    leaks the socket ("unclosed transport" / "unclosed <socket.socket>" ResourceWarnings).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Transports, not protocols: a closed protocol drops its transport, and its transport
        # is what must be aborted if the close never completes. Weak: closed ones just go.
        self._handed_out: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        if conn.transport is not None:
            self._handed_out.add(conn.transport)
        return conn

    async def close(self, *, abort_ssl: bool = False) -> None:
        transports = list(self._handed_out)
        await super().close(abort_ssl=abort_ssl)  # closes (and waits for) pooled and in use
        closing: list[tuple[asyncio.BaseTransport, asyncio.Future[None]]] = []
        for transport in transports:
            protocol = transport.get_protocol()
            if not isinstance(protocol, ResponseHandler):
                continue
            # ``closed`` is None once the connection is lost (unless someone was waiting).
            if (f := protocol.closed) is not None and not f.done():
                closing.append((transport, f))
        if not closing:
            return
        futures = [f for _, f in closing]
        _, pending = await asyncio.wait(futures, timeout=CLOSE_GRACE)
        if pending:  # the server never answered the close_notify: drop the TCP connection
            for transport, future in closing:
                if not future.done() and isinstance(transport, asyncio.Transport):
                    transport.abort()
            await asyncio.wait(pending, timeout=CLOSE_GRACE)
        for future in futures:  # retrieve errors (a lost connection is no news here)
            if future.done() and not future.cancelled():
                future.exception()


class Kube:
    """JSON requests and watch streams against one API server."""

    def __init__(self, api: Any, connector: aiohttp.BaseConnector | None = None) -> None:
        self._api = api
        self._connector = connector

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        """Load ``kubeconfig`` (or in-cluster config when None and running in a Pod)."""
        configuration = k8s_client.Configuration()
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        api = k8s_client.ApiClient(configuration)
        # Our own connector (the session does not own it), so that close() waits for every
        # connection's socket to close; see _Connector.
        connector = _Connector(
            limit=configuration.connection_pool_maxsize, ssl=api.rest_client.ssl_context
        )
        configuration.client_session_kwargs = {"connector": connector}
        return cls(api, connector)

    async def close(self) -> None:
        """Close the session and every connection it opened; returns once their sockets are
        closed, so the event loop can be closed right after."""
        try:
            await self._api.close()
        finally:
            if self._connector is not None:
                await self._connector.close()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None,
        body: Any,
        timeout: aiohttp.ClientTimeout,
        content_type: str,
    ) -> Any:
        query_params = [(k, v) for k, v in (query or {}).items() if v is not None]
        prepared = await self._api.param_serialize(
            method,
            path,
            query_params=query_params,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        m, url, headers, data, _ = prepared
        try:
            return await self._api.call_api(m, url, headers, data, _request_timeout=timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(f"{method} {path}: {exc!r}") from exc

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float = 30.0,
        content_type: str = "application/json",
    ) -> Obj:
        """One request; returns the decoded JSON body; raises KubeError on any failure."""
        resp = await self._send(
            method,
            path,
            query=query,
            body=body,
            timeout=aiohttp.ClientTimeout(total=timeout),
            content_type=content_type,
        )
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(f"{method} {path}: {exc!r}") from exc
        doc: Obj = json.loads(raw) if raw else {}
        if resp.status >= 400:
            raise KubeError(
                f"{method} {path}: {resp.status} {doc.get('message', resp.reason)}",
                status=resp.status,
                reason=str(doc.get("reason", "")),
            )
        return doc

    @asynccontextmanager
    async def watch(
        self, path: str, query: Mapping[str, Any], *, idle_timeout: float
    ) -> AsyncIterator[AsyncIterator[Obj]]:
        """Open a watch stream; yields an iterator of watch events (``{type, object}``).

        ``idle_timeout`` bounds the silence between two chunks, so a black-holed connection
        is noticed (the API server sends bookmarks about once a minute).
        """
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=idle_timeout)
        resp = await self._send(
            "GET",
            path,
            query={**query, "watch": "true"},
            body=None,
            timeout=timeout,
            content_type="application/json",
        )
        try:
            if resp.status >= 400:
                raw = await resp.read()
                doc = json.loads(raw) if raw else {}
                raise KubeError(
                    f"watch {path}: {resp.status} {doc.get('message', resp.reason)}",
                    status=resp.status,
                    reason=str(doc.get("reason", "")),
                )
            events = _events(resp.response, path)
            try:
                yield events
            finally:
                await events.aclose()
        finally:
            # A watch's body never ends, so its connection is never reusable: close it now,
            # not whenever the garbage collector finds it (after the session may be closed).
            resp.response.close()


async def _events(response: aiohttp.ClientResponse, path: str) -> AsyncGenerator[Obj, None]:
    buffer = b""
    try:
        async for chunk in response.content.iter_any():
            buffer += chunk
            while (nl := buffer.find(b"\n")) >= 0:
                line, buffer = buffer[:nl], buffer[nl + 1 :]
                if line.strip():
                    yield json.loads(line)
    except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise KubeError(f"watch {path}: {exc!r}") from exc
