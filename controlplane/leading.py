"""Leader election on etcd, and the fence every write of the leader carries.

The leader holds ``<prefix>controller/leader`` bound to its lease. Its *fence* is that key's
create revision: every write is a transaction that first compares
``create_revision(leader_key) == fence``. A leader that lost its lease (paused, partitioned,
killed) no longer matches: the key is gone or was re-created by the new leader with a higher
create revision, so etcd refuses the write. No clock is trusted for safety; the local
deadline below only makes a deposed leader stop trying sooner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aetcd
import structlog

from weighbridge.etcd import CLIENT_ERRORS
from weighbridge.keys import KeyScheme

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Term:
    """One continuous leadership: the fence to write with and the lease behind it."""

    fence: int
    lease_id: int


class Leadership:
    """Campaign for leadership and keep it; calls back when a term starts and ends."""

    def __init__(
        self,
        etcd: aetcd.Client,
        scheme: KeyScheme,
        identity: str,
        *,
        ttl: int,
        retry_interval: float = 1.0,
    ) -> None:
        self.etcd = etcd
        self.scheme = scheme
        self.identity = identity
        self.ttl = ttl
        """Lease TTL in seconds: how long after the leader dies a follower may take over."""
        self.retry_interval = retry_interval
        """How often a follower checks whether the leader key is free."""
        self.term: Term | None = None
        self.log = log.bind(identity=identity)
        self._step_down = asyncio.Event()

    def step_down(self) -> None:
        """End the current term now (a fenced write was refused: someone else leads)."""
        self._step_down.set()

    async def run(
        self,
        on_elected: Callable[[Term], Awaitable[None]],
        on_deposed: Callable[[Term], Awaitable[None]],
    ) -> None:
        """Campaign, lead, and campaign again after losing, until cancelled."""
        lease_id: int | None = None
        try:
            while True:
                try:
                    lease_id = await self._fresh_lease(lease_id)
                    term = await self._campaign(lease_id)
                except CLIENT_ERRORS as exc:
                    self.log.warning("campaign_failed", error=str(exc))
                    await asyncio.sleep(self.retry_interval)
                    continue
                if term is None:
                    await asyncio.sleep(self.retry_interval)
                    continue
                self.term = term
                self.log.info("leadership_acquired", fence=term.fence, lease=term.lease_id)
                try:
                    await on_elected(term)
                    await self._hold(term)
                    self.log.warning("leadership_lost", fence=term.fence)
                    lease_id = None  # expired or unconfirmable: campaign with a new one
                finally:
                    self.term = None
                    await on_deposed(term)
                # Deposed (lease lost or unconfirmable): leave the next term to a follower that
                # is campaigning already, rather than racing it with a fresh lease at once.
                await asyncio.sleep(self.retry_interval)
        finally:
            await self._resign(lease_id)

    async def _fresh_lease(self, lease_id: int | None) -> int:
        if lease_id is not None:
            reply = await self.etcd.refresh_lease(lease_id)
            if reply is not None and reply.TTL > 0:
                return lease_id
        lease = await self.etcd.lease(self.ttl)
        return int(lease.id)

    async def _campaign(self, lease_id: int) -> Term | None:
        key = self.scheme.leader_key
        tx = self.etcd.transactions
        await self.etcd.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, self.identity.encode(), lease=lease_id)],
            failure=[],
        )
        kv = await self.etcd.get(key)
        if kv is None or kv.lease != lease_id:
            return None
        return Term(fence=int(kv.create_revision), lease_id=lease_id)

    async def _hold(self, term: Term) -> None:
        """Keep the lease alive; return when it is lost or cannot be confirmed in time."""
        interval = self.ttl / 3
        confirmed_until = time.monotonic() + self.ttl
        self._step_down.clear()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._step_down.wait(), timeout=interval)
                return
            try:
                reply = await asyncio.wait_for(
                    self.etcd.refresh_lease(term.lease_id), timeout=interval
                )
            except (*CLIENT_ERRORS, TimeoutError) as exc:
                if time.monotonic() + interval >= confirmed_until:
                    self.log.warning("lease_unconfirmed", error=str(exc))
                    return
                continue
            if reply is None or reply.TTL <= 0:
                return
            # Count from when the refresh was sent, not received: stay on the safe side.
            confirmed_until = time.monotonic() - interval + reply.TTL

    async def _resign(self, lease_id: int | None) -> None:
        """Give leadership up at once on shutdown, so a follower need not wait for the TTL."""
        if lease_id is None:
            return
        with contextlib.suppress(*CLIENT_ERRORS, TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.etcd.revoke_lease(lease_id), timeout=2)
            self.log.info("leadership_resigned")
