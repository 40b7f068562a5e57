"""Pending rows nobody will send: the upstream refs of begin_send calls whose caller never got
their plan, and their rejection.

A begin_send call whose caller got an error, or was gone (cancelled) by the time its group
answered, never reaches Connexus: its handler answered 500 or stopped. Its pending rows may
still exist: a group whose COMMIT answer was lost while the database stayed unreachable (so
recovery could not tell), or a group that committed after its caller was cancelled. Left
`pending`, they would answer the legacy retry `upstream.unknown_retry_status` (204 by default)
without sending anything, and expiry would later say "outcome unknown" for an SMS that never
left. So their refs are kept here and the rows made `rejected` (the request was never written:
a retry sends again): on the connection of this replica's next begin group, committed just
before that group starts (so before it reads its facts), and by a background flush with
backoff when no group comes. The rejection takes no lock it must wait for (SKIP LOCKED): a row
another transaction holds is looked at again later.

A retry may read the row while it is still pending (on another replica, or before the refs
got here) and be answered from it. Such an answer marks the row (`mark_seen`, in the retry's
own transaction), and a marked row is never rejected: it expires with its ERR record, so the
client that was answered "unknown" hears of it. The mark and the rejection meet on the row's
lock: a rejection committed first makes the mark find nothing, and the retry reads its facts
again (sends.begin_sends). Only rows still `pending` and unmarked change. A ref with no row yet
is kept for `KEEP_SECONDS` after a rejection first misses it (its group may still be
committing); what is left unflushed when the process stops is expired as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple

from bc_proxy.store.postgres.db import Conn, Db
from bc_proxy.store.postgres.schema import send_key


# Reject the pending, unmarked rows of the refs asked about that nobody holds locked (a row a
# concurrent mark holds is looked at again later); return the refs rejected, the refs whose row
# is settled otherwise (not pending, or marked), and the refs that have a row at all. Joins to
# the arrays probe the unique index on upstream_ref and the primary key (generic plans).
#
# "Pending" is written as a CASE in both statements: a plain `state = 'pending'` lets the planner
# answer them from the partial index of pending rows (`sends_pending`), reading every pending row
# per call, and a generic plan made on a small table keeps doing so (seen in tests/test_pg_plans).
def _pending(table: str) -> str:
    return f"CASE WHEN {table}.state = 'pending' THEN true ELSE false END"


REJECT = f"""
WITH rejected AS (
    UPDATE sends SET state = 'rejected', settled_at = $2
    FROM (SELECT s.id FROM unnest($1::text[]) AS r(ref)
          JOIN sends AS s ON s.upstream_ref = r.ref
          WHERE {_pending("s")} AND NOT s.repeat_seen
          FOR NO KEY UPDATE OF s SKIP LOCKED) AS x
    WHERE sends.id = x.id
    RETURNING sends.upstream_ref),
present AS (
    SELECT s.upstream_ref, s.state <> 'pending' OR s.repeat_seen AS settled
    FROM unnest($1::text[]) AS r(ref) JOIN sends AS s ON s.upstream_ref = r.ref)
SELECT array(SELECT upstream_ref FROM rejected) AS rejected,
    array(SELECT upstream_ref FROM present WHERE settled) AS settled,
    array(SELECT upstream_ref FROM present) AS present
"""
# The latest row of each (tenant, messageId, recipient) inside its window: the row a plan
# answered a retry from when it said "pending". The same key probe as the send facts.
LATEST_ROWS = f"""
SELECT k.id, s.upstream_ref FROM (
    SELECT (SELECT (array_agg(s.id ORDER BY s.id DESC) FILTER (WHERE s.created_at > x.since))[1]
            FROM sends AS s
            WHERE s.legacy_id IS NOT NULL
              AND {send_key("s.tenant", "s.legacy_id", "s.recipient")}
                = {send_key("x.t", "x.l", "x.r")}) AS id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS x(t, l, r, since)) AS k
JOIN sends AS s ON s.id = k.id
"""
# Mark those rows that are still pending, in the order given (upstream_ref order: as a settle,
# which sorts its refs, so that a mark and a settle of several rows cannot deadlock).
MARK_SEEN = f"""
UPDATE sends SET repeat_seen = true
FROM unnest($1::bigint[]) AS k(id)
WHERE sends.id = k.id AND {_pending("sends")}
RETURNING sends.tenant, sends.legacy_id, sends.recipient
"""
MAX_REFS = 100_000  # refs kept at most (a long outage under load); the rest expire instead
PER_GROUP = 1_000  # refs rejected inside one begin group at most; the flush takes the rest
KEEP_SECONDS = 30.0  # a ref with no row when a rejection looked: kept this long after that
# (its group may still be committing on the server), then dropped
FIRST_RETRY_SECONDS = 0.2
MAX_RETRY_SECONDS = 2.0

log = logging.getLogger(__name__)


class SeenKey(NamedTuple):
    """A (tenant, messageId, recipient) a plan answered from a pending row, and its window."""

    tenant: str
    legacy_id: str
    recipient: str
    since: float


async def mark_seen(conn: Conn, keys: list[SeenKey]) -> set[SeenKey]:
    """Mark the pending rows `keys` were answered from; the keys whose row was still pending
    (a key missing: its row changed meanwhile, so the plan must be made again). Inside the
    planning transaction, whose key locks keep new rows for these keys out meanwhile."""
    rows = await conn.fetch(
        LATEST_ROWS,
        [k.tenant for k in keys],
        [k.legacy_id for k in keys],
        [k.recipient for k in keys],
        [k.since for k in keys],
    )
    ids = [r["id"] for r in sorted(rows, key=lambda r: str(r["upstream_ref"]))]
    marked_rows = await conn.fetch(MARK_SEEN, ids) if ids else []
    marked = {(r["tenant"], r["legacy_id"], r["recipient"]) for r in marked_rows}
    return {k for k in keys if (k.tenant, k.legacy_id, k.recipient) in marked}


class Abandoned:
    """The refs of begin_send calls whose caller never got the plan, until rejected."""

    def __init__(self, db: Db, *, keep_seconds: float = KEEP_SECONDS) -> None:
        self._db = db
        self._keep = keep_seconds
        self.fresh: set[str] = set()  # refs not looked for yet (a begin group looks for these)
        self._missed: dict[str, float] = {}  # ref -> when a rejection first found no row
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False
        self._warned = False  # MAX_REFS reached (logged once)
        self.rejected = 0  # rows made `rejected` (diagnostics, tests)

    def __len__(self) -> int:
        return len(self.fresh) + len(self._missed)

    def add(self, refs: Iterable[str]) -> None:
        for ref in refs:
            if len(self) >= MAX_REFS:
                if not self._warned:
                    log.warning("abandoned sends: %d refs kept, more left to expiry", MAX_REFS)
                    self._warned = True
                break
            self._missed.pop(ref, None)
            self.fresh.add(ref)
        if self._stopped:
            return
        if len(self) and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def reject(self, limit: int = MAX_REFS, *, fresh_only: bool = False) -> bool:
        """Reject the rows of up to `limit` refs kept (with `fresh_only`, of those not looked
        for yet: a begin group does not pay for refs already missed), in autocommit on a
        connection of its own; forget the refs it settled (rejected, or found not pending or
        marked). A ref with no row is kept for `keep_seconds` from the first time it is
        missed; a row locked by someone else is looked at next time. False when the database
        could not be reached (logged; tried again later)."""
        refs = list(self.fresh) if fresh_only else [*self.fresh, *self._missed]
        refs = refs[:limit]
        if not refs:
            return True
        try:
            async with self._db.conn("reject abandoned sends") as conn:
                row = await conn.fetchrow(REJECT, refs, time.time())
        except Exception as exc:  # unreachable, restarting: again, later
            log.info("abandoned sends: rejection of %d failed (%s)", len(refs), exc)
            return False
        self.rejected += len(row["rejected"])
        present = set(row["present"])
        settled = {*row["rejected"], *row["settled"]}
        now = time.monotonic()
        for ref in refs:
            self.fresh.discard(ref)
            if ref in settled:
                self._missed.pop(ref, None)
                continue
            # No row yet (its group may still be committing), or one locked by someone else:
            # the flush looks again; a ref still without a row after keep_seconds is dropped.
            first = self._missed.setdefault(ref, now)
            if ref not in present and now - first > self._keep:
                del self._missed[ref]
        return True

    async def _flush(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while len(self):
            await asyncio.sleep(delay)
            await self.reject()
            delay = min(delay * 2, MAX_RETRY_SECONDS)  # what is left: look again, less often

    async def stop(self) -> None:
        """The store is closing: one last rejection (callers cancelled by the shutdown), then
        no more; what is left expires at the next start."""
        self._stopped = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.reject()
