"""Fenced writes of backend sets to etcd (see leading.py for the fence)."""

from __future__ import annotations

import aetcd

from controlplane.errors import NotLeaderError
from controlplane.leading import Term
from weighbridge.etcd import CLIENT_ERRORS, wrap_error
from weighbridge.keys import KeyScheme, ServiceKey


class Publisher:
    """Writes and deletes backend-set keys only while ``term`` is current in etcd."""

    def __init__(self, etcd: aetcd.Client, scheme: KeyScheme, term: Term) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.term = term

    async def put(self, key: ServiceKey, value: bytes) -> int:
        """Write one set; returns the etcd revision of the write."""
        tx = self.etcd.transactions
        return await self._txn(key, tx.put(self.scheme.service(key), value))

    async def delete(self, key: ServiceKey) -> int:
        tx = self.etcd.transactions
        return await self._txn(key, tx.delete(self.scheme.service(key)))

    async def _txn(self, key: ServiceKey, op: object) -> int:
        tx = self.etcd.transactions
        try:
            ok, responses = await self.etcd.transaction(
                compare=[tx.create(self.scheme.leader_key) == self.term.fence],
                success=[op],
                failure=[],
            )
        except CLIENT_ERRORS as exc:
            raise wrap_error(f"writing {key}", exc) from exc
        if not ok:
            raise NotLeaderError(
                f"etcd refused the write of {key}: leadership fence {self.term.fence} is stale"
            )
        response = responses[0]
        inner = (
            response.response_put
            if response.HasField("response_put")
            else response.response_delete_range
        )
        return int(inner.header.revision)
