"""PostgresStore: the `Store` Protocol on PostgreSQL, for any number of replicas.

Owns the lifecycle (pools, migrations, the LISTEN connection, releasing this replica's leases at
close) and hands each operation to the module that owns its SQL: sends, dlr and mo (through
group commit), inbound, records (polling) and push.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from bc_proxy.errors import StoreError
from bc_proxy.store import (
    DlrEvent,
    IngestResult,
    LegacyRecord,
    MoEvent,
    RejectedWebhook,
    SendIntent,
    SendPlan,
    Settlement,
    StatusRecord,
    SweepMark,
    WaitingStat,
    new_replica_id,
)
from bc_proxy.store.postgres import fresh, inbound, matching, push, records, schema, sends
from bc_proxy.store.postgres.abandoned import PER_GROUP, Abandoned
from bc_proxy.store.postgres.db import DRIVER_ERRORS, Db, store_error
from bc_proxy.store.postgres.dlr import DlrStored, DlrWrite, store_dlrs
from bc_proxy.store.postgres.group import Batcher
from bc_proxy.store.postgres.listener import Listener
from bc_proxy.store.postgres.mo import MoWrite, store_mos
from bc_proxy.store.rules import Kind, Rules
from bc_proxy.store.waker import LocalWaker, Waker

POOL_MIN = 1
POOL_MAX = 10
COMMAND_TIMEOUT = 5.0
URL_OPTIONS = ("pool_min", "pool_max", "command_timeout")
SEND_WRITERS = 4


def pool_options(url: str) -> tuple[str, dict[str, float]]:
    """Take `pool_min`, `pool_max` and `command_timeout` out of the URL's query (the rest of it
    goes to the driver): store.url alone can size the pool. Raises StoreError on a bad value."""
    parts = urlsplit(url)
    kept, options = [], {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in URL_OPTIONS:
            try:
                options[name] = float(value)
            except ValueError:
                raise StoreError(f"store url: {name}={value!r} is not a number") from None
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote))), options


class PostgresStore:
    """Records, sends and leases in one PostgreSQL database shared by every replica.

    `url`: postgresql://user:pw@host/db, optionally with `?pool_min=1&pool_max=10&
    command_timeout=5` (these override the keyword arguments) and libpq options.
    """

    def __init__(
        self,
        url: str,
        rules: Rules,
        *,
        replica: str | None = None,
        lease_seconds: float = 10.0,
        pool_min: int = POOL_MIN,
        pool_max: int = POOL_MAX,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.url = url
        dsn, options = pool_options(url)
        pool_max = max(1, int(options.get("pool_max", pool_max)))
        pool_min = min(pool_max, int(options.get("pool_min", pool_min)))
        command_timeout = options.get("command_timeout", command_timeout)
        self.rules = rules
        self.replica = replica or new_replica_id()
        self.lease_seconds = lease_seconds
        waker = LocalWaker()
        self.waker: Waker = waker
        self._db = Db(
            dsn, waker, pool_min=pool_min, pool_max=pool_max, command_timeout=command_timeout
        )
        self.listener = Listener(dsn, waker, timeout=command_timeout)
        # Send groups in flight at once, per phase (begin, settle): each holds a connection,
        # so together they take at most two thirds of the pool. Measured at 32 connections:
        # 1 -> 4 writers took sends from ~490 to ~870/s on a VM with a slow WAL disk (and the
        # plans of that time); on a faster one, with index-only plans, 1, 2 and 4 writers
        # differed less than run-to-run scatter (docs/performance.md).
        send_writers = max(1, min(SEND_WRITERS, pool_max // 3))
        self._polling = records.Polling(self._db, self._rules, self._owner, lease_seconds)
        self._pushing = push.Pushing(self._db, self._rules, self._owner, lease_seconds)
        self._dlrs: Batcher[DlrWrite, DlrStored] = Batcher(
            self._db, "add dlr", None, key=lambda w: w.key, run=self._store_dlrs
        )
        self._mos: Batcher[MoWrite, IngestResult] = Batcher(
            self._db, "add mo", None, key=lambda w: w.key, run=self._store_mos
        )
        self._rejects: Batcher[inbound.RejectWrite, None] = Batcher(
            self._db, "reject webhook", inbound.store_rejects, key=id
        )
        self._abandoned = Abandoned(self._db)
        self._seen = fresh.SeenKeys()  # keys begun lately: their retries skip the fresh try
        self._begins: Batcher[sends.BeginWrite, SendPlan] = Batcher(
            self._db,
            "begin send",
            None,
            key=sends.BeginWrite.key,
            max_group=128,
            run=self._begin_sends,
            droppable=True,
            writers=send_writers,
            recover=self._recover_begins,
            abandoned=lambda w: self._abandoned.add(w.refs_tried),
        )
        self._settles: Batcher[sends.SettleWrite, None] = Batcher(
            self._db,
            "settle send",
            None,
            key=id,
            max_group=128,
            run=self._settle_sends,
            writers=send_writers,
            recover=self._recover_settles,
        )
        self._opened = False
        self._closed = False

    async def _store_dlrs(self, w: list[DlrWrite]) -> list[DlrStored]:
        return await store_dlrs(self._db, self.rules, w)

    async def _begin_sends(self, w: list[sends.BeginWrite]) -> list[SendPlan]:
        """One group (postgres/fresh.py), after the rows of abandoned calls are rejected
        (committed first, so a retry of one of them planned here cannot find its rows
        pending)."""
        if self._abandoned.fresh:  # on failure the flush tries again; a retry's mark is safe
            await self._abandoned.reject(PER_GROUP, fresh_only=True)
        return await fresh.begin_group(self._db, self.rules, w, self._seen)

    async def _recover_begins(self, w: list[sends.BeginWrite]) -> list[SendPlan] | None:
        return await sends.recover_begins(self._db, w)

    async def _settle_sends(self, w: list[sends.SettleWrite]) -> list[None]:
        return await sends.settle_sends(self._db, self.rules, w)

    async def _recover_settles(self, w: list[sends.SettleWrite]) -> list[None] | None:
        return await sends.recover_settles(self._db, self.rules, w)

    async def _store_mos(self, w: list[MoWrite]) -> list[IngestResult]:
        return await store_mos(self._db, self.rules, w)

    def _owner(self) -> str:
        return self.replica

    def _rules(self) -> Rules:
        return self.rules  # read at each call: a reload replaces `rules`

    # -- lifecycle --

    async def open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")
        await self._db.start()
        try:
            async with self._db.conn("migrate", session=True) as conn:
                await schema.migrate(conn)
            await self.place_stranded()
            try:
                await self.listener.start()
            except DRIVER_ERRORS as exc:
                raise store_error(exc, "listen") from exc
        except BaseException:
            await self._db.stop()
            raise
        self._opened = True

    async def place_stranded(self) -> None:
        await push.place_stranded(self._db, self.rules, time.time())

    async def migrate(self) -> tuple[int, int]:
        """Apply pending schema migrations (without opening the store); (from, to) versions."""
        db = self._db
        if not db.started:  # the CLI: a pool of its own, closed again below
            db = Db(self._db.dsn, LocalWaker(), pool_min=1, pool_max=1, command_timeout=60.0)
            await db.start()
        try:
            async with db.conn("migrate", session=True) as conn:
                return await schema.migrate(conn)
        finally:
            if db is not self._db:
                await db.stop()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for batcher in (self._begins, self._settles, self._dlrs, self._mos, self._rejects):
            await batcher.drain()
        await self._abandoned.stop()
        self.waker.close()
        await self.listener.stop()
        if self._opened:
            with contextlib.suppress(StoreError):
                await self._polling.release_all()
        await self._db.stop()

    async def ping(self) -> None:
        async with self._db.conn("ping") as conn:
            await conn.fetchval("SELECT 1")

    # -- sends --

    async def begin_send(self, intent: SendIntent, now: float) -> SendPlan:
        return await self._begins.submit(sends.BeginWrite(intent, now))

    async def settle_send(
        self, settlements: Sequence[Settlement], statuses: Sequence[StatusRecord] = ()
    ) -> None:
        if settlements or statuses:
            await self._settles.submit(sends.SettleWrite(tuple(settlements), tuple(statuses)))

    async def expire_pending(self, before: float) -> int:
        return await sends.expire_pending(self._db, self.rules, before)

    async def match_waiting_reports(self) -> int:
        return await matching.match_waiting(self._db, self.rules)

    # -- inbound --

    async def add_dlr(self, event: DlrEvent) -> IngestResult:
        stored = await self._dlrs.submit(
            DlrWrite(event, self.rules.dlr_key(event.message_id, event.status))
        )
        result = stored.result
        # Committed unmatched: did its settle commit meanwhile? Asked again by each repeat
        # while the row stays unmatched: a failure here answers 503, and Connexus's retry of
        # the report is the only call that brings it back here.
        if stored.unmatched:
            tenant = await matching.recheck_unmatched(self._db, self.rules, event.message_id)
            if tenant is not None:
                outcome = "stored" if result.outcome == "unmatched" else result.outcome
                return IngestResult(outcome, tenant)
        return result

    async def add_mo(self, event: MoEvent, *, account: str | None) -> IngestResult:
        return await self._mos.submit(MoWrite(event, account, self.rules.mo_key(event.message_id)))

    async def reject_webhook(self, body: bytes, reason: str) -> None:
        await self._rejects.submit(inbound.RejectWrite(body, reason))

    async def rejected_webhooks(self, limit: int = 100) -> list[RejectedWebhook]:
        return await inbound.rejected_webhooks(self._db, limit)

    async def sweep_mark(self, tenant: str) -> SweepMark | None:
        return await inbound.sweep_mark(self._db, tenant)

    async def set_sweep_mark(self, mark: SweepMark) -> None:
        await inbound.set_sweep_mark(self._db, mark)

    async def blocked(self, tenant: str) -> list[str]:
        return await inbound.blocked(self._db, tenant)

    # -- polling --

    async def claim(self, tenant: str, kind: Kind) -> LegacyRecord | None:
        return await self._polling.claim(tenant, kind)

    async def ack(self, record: LegacyRecord) -> bool:
        return await self._polling.ack(record)

    async def release(self, record: LegacyRecord) -> None:
        await self._polling.release(record)

    async def queue_depth(self, tenant: str) -> tuple[int, int]:
        return await records.queue_depth(self._db, tenant)

    async def waiting(self) -> list[WaitingStat]:
        return await records.waiting(self._db)

    # -- push --

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        return await self._pushing.claim_pushes(now, limit)

    async def push_done(self, record: LegacyRecord) -> None:
        await self._pushing.push_done(record)

    async def push_failed(self, record: LegacyRecord, *, next_at: float | None, error: str) -> None:
        await self._pushing.push_failed(record, next_at=next_at, error=error)

    async def dead_letters(self, limit: int | None = None) -> list[LegacyRecord]:
        return await push.dead_letters(self._db, limit)

    async def dead_letter_count(self) -> int:
        return await push.dead_letter_count(self._db)

    async def replay(self, ids: Sequence[int] | None, now: float) -> int:
        return await push.replay(self._db, self.rules, ids, now)

    # -- housekeeping --

    async def purge(self, before: float) -> int:
        return await records.purge(self._db, before)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """A session advisory lock, keyed by schema and name, on a connection held meanwhile.

        The caller's job runs outside the store's error mapping: its own exceptions pass as
        they are. A connection that fails to unlock is terminated, which frees the lock.
        """
        key = "hashtext(current_schema() || '.' || $1)"
        conn = await self._db.acquire("exclusive")
        try:
            try:
                got = bool(await conn.fetchval(f"SELECT pg_try_advisory_lock({key})", name))
            except DRIVER_ERRORS as exc:
                raise store_error(exc, "exclusive") from exc
            try:
                yield got
            finally:
                if got:
                    try:
                        await conn.execute(f"SELECT pg_advisory_unlock({key})", name)
                    except DRIVER_ERRORS:
                        conn.terminate()
        finally:
            await self._db.release(conn)
