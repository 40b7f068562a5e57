"""`SQLiteStore`: the `Store` Protocol on one SQLite file, wiring the engine to the queries.

Each method is one engine call (a grouped write, a loop-thread read or a reader-thread count)
around a function of `sends`, `inbound`, `records`, `push` or `upkeep`. No SQL and no rules here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from bc_proxy.errors import StoreError
from bc_proxy.store import (
    LEASE_SECONDS,
    DlrEvent,
    IngestResult,
    Kind,
    LegacyRecord,
    MoEvent,
    RejectedWebhook,
    Rules,
    SendIntent,
    SendPlan,
    Settlement,
    StatusRecord,
    SweepMark,
    WaitingStat,
    new_replica_id,
)
from bc_proxy.store.sqlite import inbound, push, records, sends, upkeep
from bc_proxy.store.sqlite.engine import Engine
from bc_proxy.store.sqlite.group import Wakes
from bc_proxy.store.sqlite.helpers import in_use_lock, moved_problem
from bc_proxy.store.waker import LocalWaker, Waker

log = logging.getLogger(__name__)

REJECT_RETRY_FIRST = 0.5  # a failed rejection of abandoned rows is tried again after this,
REJECT_RETRY_MAX = 5.0  # doubling up to this
MAX_ABANDONED = 100_000  # refs of abandoned begins kept for rejection (beyond: left to expiry)
EXPIRE_CHUNK = 500  # pending rows expired per write (each gets a status record)


class SQLiteStore:
    """The embedded store: one SQLite file (WAL), one process, group-committed writes."""

    def __init__(
        self,
        path: str,
        rules: Rules,
        *,
        fsync: bool = False,
        replica: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.path = path
        self.rules = rules
        self.replica = replica or new_replica_id()
        self.lease_seconds = lease_seconds
        self.waker: Waker = LocalWaker()
        self._engine = Engine(
            path, fsync=fsync, on_wakes=self._notify, on_rollback=self._forget_probe
        )
        self._maybe_unmatched = True  # reports may wait for a Connexus id (cleared by a probe)
        self._in_use: int | None = None  # the file's shared in-use lock while open
        self._closed = False
        self._to_reject: set[str] = set()  # refs of abandoned begins, rejected by _reject
        self._rejecting = False  # a rejection write, or its retry, is under way

    def _notify(self, wakes: Wakes) -> None:
        for tenant, kind in wakes:
            self.waker.notify(tenant, kind)

    # -- lifecycle -----------------------------------------------------------------------------

    def _lock(self) -> None:
        """The file's shared in-use lock (migrate-store waits for it to go)."""
        if self._in_use is None:
            try:
                self._in_use = in_use_lock(self.path, exclusive=False)
            except BlockingIOError:
                raise StoreError(
                    f"sqlite {self.path}: bc-proxy migrate-store is copying this file"
                ) from None

    async def open(self) -> None:
        problem = moved_problem(self.path)
        if problem is not None:
            raise StoreError(f"sqlite {problem}")
        self._lock()
        try:
            await self._engine.open()
        except BaseException:
            self._unlock()
            raise
        await self.place_stranded()

    def _unlock(self) -> None:
        if self._in_use is not None:
            os.close(self._in_use)
            self._in_use = None

    async def place_stranded(self) -> None:
        await self._engine.write(lambda c, w: push.place_stranded(c, w, self.rules, time.time()))

    async def migrate(self) -> tuple[int, int]:
        """Apply pending schema migrations (the `bc-proxy migrate` command): (from, to)."""
        held = self._in_use is not None
        self._lock()
        try:
            return await self._engine.migrate()
        finally:
            if not held:
                self._unlock()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.waker.close()
        if self._engine.conn is not None and not self._engine.closed:
            release = self._engine.write(lambda c, w: records.release_all(c, self.replica))
            await asyncio.gather(release, return_exceptions=True)
        await self._engine.close()
        self._unlock()  # after the engine's connections: nobody writes any more

    async def ping(self) -> None:
        self._engine.read_now(lambda c: c.execute("SELECT 1").fetchone())

    # -- sends ---------------------------------------------------------------------------------

    def _begin_batch(self, conn: sqlite3.Connection, wakes: Wakes, items: list[Any]) -> list[Any]:
        return sends.begin_sends(conn, wakes, self.rules, items)

    async def begin_send(self, intent: SendIntent, now: float) -> SendPlan:
        plan: SendPlan = await self._engine.write_batched(
            self._begin_batch, (intent, now), droppable=True, abandoned=self._abandoned
        )
        return plan

    def _abandoned(self, item: tuple[SendIntent, float], plan: SendPlan) -> None:
        """A begin whose caller never acts on its plan (cancelled after the commit, or told of
        a failed fsync): its rows are rejected in the next group, after any repeat queued
        meanwhile (which marks the row it was answered from). One write at a time for every
        ref waiting, however many begins were abandoned (a failing disk abandons many)."""
        refs = [p.upstream_ref for p in plan.to_send]
        if len(self._to_reject) + len(refs) > MAX_ABANDONED:
            log.warning("abandoned sends: %d refs kept, more left to expiry", MAX_ABANDONED)
            return
        self._to_reject.update(refs)
        if refs and not self._rejecting:
            self._reject(REJECT_RETRY_FIRST)

    def _reject(self, retry_in: float) -> None:
        """Reject the waiting refs' abandoned rows; a failed write is tried again with backoff
        until the store closes (what is left pending then expires as before)."""
        self._rejecting = False
        if not self._to_reject or self._closed or self._engine.closed:
            return
        refs, now = list(self._to_reject), time.time()
        try:
            done = self._engine.submit(lambda c, w: sends.reject_abandoned(c, refs, now))
        except StoreError:
            return
        self._rejecting = True

        def after(done: asyncio.Future[int]) -> None:
            exc = None if done.cancelled() else done.exception()
            if done.cancelled() or exc is not None:
                log.warning("abandoned sends: rejection failed (%s); again in %gs", exc, retry_in)
                again = min(retry_in * 2, REJECT_RETRY_MAX)
                asyncio.get_running_loop().call_later(retry_in, self._reject, again)
                return
            self._to_reject.difference_update(refs)
            if done.result():
                log.info("abandoned sends: %d pending rows rejected", done.result())
            self._reject(REJECT_RETRY_FIRST)  # refs that came meanwhile

        done.add_done_callback(after)

    async def settle_send(
        self, settlements: Sequence[Settlement], statuses: Sequence[StatusRecord] = ()
    ) -> None:
        now = time.time()

        def op(conn: sqlite3.Connection, wakes: Wakes) -> None:
            sends.settle(
                conn, wakes, self.rules, settlements, statuses, now, self._probe_unmatched(conn)
            )

        await self._engine.write(op)

    def _forget_probe(self) -> None:
        """A transaction was rolled back: what `_probe_unmatched` saw in it may be undone (a
        report another write of it matched is waiting again), so probe afresh."""
        self._maybe_unmatched = True

    def _probe_unmatched(self, conn: sqlite3.Connection) -> bool:
        """Whether any report waits for its Connexus id: one cheap probe, remembered."""
        if self._maybe_unmatched:
            self._maybe_unmatched = (
                conn.execute(
                    "SELECT 1 FROM records WHERE tenant IS NULL AND ref IS NOT NULL LIMIT 1"
                ).fetchone()
                is not None
            )
        return self._maybe_unmatched

    async def match_waiting_reports(self) -> int:
        # None can wait: a settle matches the reports waiting for its ids in its own
        # transaction, and an ingest looks for its send in its own (one writer).
        return 0

    async def expire_pending(self, before: float) -> int:
        """In chunks, each its own short write, so a large backlog never holds the loop."""
        total = 0
        while True:
            n: int = await self._engine.write(
                lambda c, w: sends.expire_pending(
                    c, w, self.rules, before, time.time(), EXPIRE_CHUNK
                )
            )
            total += n
            if n < EXPIRE_CHUNK:
                return total

    # -- inbound -------------------------------------------------------------------------------

    async def add_dlr(self, event: DlrEvent) -> IngestResult:
        now = time.time()

        def op(conn: sqlite3.Connection, wakes: Wakes) -> IngestResult:
            result = inbound.add_dlr(conn, wakes, self.rules, event, now)
            if result.outcome == "unmatched":
                self._maybe_unmatched = True
            return result

        return await self._engine.write(op)

    async def add_mo(self, event: MoEvent, *, account: str | None) -> IngestResult:
        now = time.time()
        return await self._engine.write(
            lambda c, w: inbound.add_mo(c, w, self.rules, event, account, now)
        )

    async def reject_webhook(self, body: bytes, reason: str) -> None:
        now = time.time()
        await self._engine.write(lambda c, w: inbound.reject_webhook(c, body, reason, now))

    async def rejected_webhooks(self, limit: int = 100) -> list[RejectedWebhook]:
        return await self._engine.read(lambda c: inbound.rejected_webhooks(c, limit))

    async def sweep_mark(self, tenant: str) -> SweepMark | None:
        return self._engine.read_now(lambda c: inbound.sweep_mark(c, tenant))

    async def set_sweep_mark(self, mark: SweepMark) -> None:
        await self._engine.write(lambda c, w: inbound.set_sweep_mark(c, mark))

    async def blocked(self, tenant: str) -> list[str]:
        return await self._engine.read(lambda c: inbound.blocked(c, tenant))

    # -- polling -------------------------------------------------------------------------------

    async def claim(self, tenant: str, kind: Kind) -> LegacyRecord | None:
        def op(conn: sqlite3.Connection, wakes: Wakes) -> LegacyRecord | None:
            now = time.time()
            return records.claim(conn, tenant, kind, self.replica, now, now + self.lease_seconds)

        return await self._engine.write(op)

    async def ack(self, record: LegacyRecord) -> bool:
        return await self._engine.write(lambda c, w: records.ack(c, record, self.replica))

    async def release(self, record: LegacyRecord) -> None:
        now = time.time()
        await self._engine.write(
            lambda c, w: records.release(c, w, self.rules, record, self.replica, now)
        )
        self.waker.notify(record.tenant, record.kind)

    async def queue_depth(self, tenant: str) -> tuple[int, int]:
        return await self._engine.read(lambda c: upkeep.queue_depth(c, tenant))

    async def waiting(self) -> list[WaitingStat]:
        return await self._engine.read(upkeep.waiting)

    # -- push ----------------------------------------------------------------------------------

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        def op(conn: sqlite3.Connection, wakes: Wakes) -> list[LegacyRecord]:
            clock = time.time()
            until = clock + self.lease_seconds
            return push.claim_pushes(conn, self.rules, self.replica, now, clock, until, limit)

        return await self._engine.write(op)

    async def push_done(self, record: LegacyRecord) -> None:
        await self._engine.write(lambda c, w: push.push_done(c, w, record))

    async def push_failed(self, record: LegacyRecord, *, next_at: float | None, error: str) -> None:
        await self._engine.write(
            lambda c, w: push.push_failed(c, w, record, self.replica, next_at, error)
        )

    async def dead_letters(self, limit: int | None = None) -> list[LegacyRecord]:
        return await self._engine.read(lambda c: push.dead_letters(c, limit))

    async def dead_letter_count(self) -> int:
        return await self._engine.read(upkeep.dead_letter_count)

    async def replay(self, ids: Sequence[int] | None, now: float) -> int:
        n: int = await self._engine.write(lambda c, w: push.replay(c, w, self.rules, ids, now))
        return n

    # -- housekeeping --------------------------------------------------------------------------

    async def purge(self, before: float) -> int:
        """Delete in chunks, each its own short write, so a large purge never holds the loop."""
        records_below, sends_below = await self._engine.read(
            lambda c: upkeep.purge_bounds(c, before)
        )
        total = 0
        while True:
            n: int = await self._engine.write(
                lambda c, w: upkeep.purge_chunk(c, w, records_below, sends_below)
            )
            total += n
            if n == 0:
                return total
            await asyncio.sleep(0)

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """One process per SQLite file: the lock is always ours."""
        yield True
