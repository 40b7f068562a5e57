"""Legacy records in PostgreSQL: inserting them placed by the rules, polling under leases.

Owns the `records` row shape, claim / ack / release of pollable records (leases owned by a
replica, `FOR UPDATE SKIP LOCKED`), queue depth, waiting stats and the chunked purge. Pushes
live in push.py, ingest decisions in inbound.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bc_proxy.store import KINDS, LegacyRecord, WaitingStat
from bc_proxy.store.postgres.db import CHANNEL, DB_NOW, Conn, Db, Wakes, wake_payloads
from bc_proxy.store.rules import Kind, Rules, receipt_id

PURGE_CHUNK = 2000

RECORD_COLUMNS = (
    "id, tenant, kind, receipt_id, msisdn_from, msisdn_to, body, rate_code, in_reply_to, "
    "status_code, dlr_status, error, created_at, push_attempts, push_error, push_deadline"
)
_INSERT_COLUMNS = (
    "tenant, kind, event_key, ref, send_id, ambiguous, receipt_id, msisdn_from, msisdn_to, "
    "body, in_reply_to, status_code, dlr_status, error, created_at, pollable, push_due, "
    "push_deadline"
)
_TYPES: tuple[str, ...] = ("text",) * 4 + ("int8", "bool") + ("text",) * 6
_TYPES += ("int4", "text", "float8", "bool", "float8", "float8")
# Many rows in one statement: one array per column.
INSERT_ARRAYS = (
    f"INSERT INTO records ({_INSERT_COLUMNS}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1))
    + ")"
)
INSERT_KEYED = f"{INSERT_ARRAYS} ON CONFLICT (event_key) DO NOTHING RETURNING event_key"


def with_notify(insert: str, returned: str) -> str:
    """`insert` (of INSERT_ARRAYS' parameters) and the NOTIFY of its wake-ups (one more
    parameter, text[]) in one statement: both scalar subqueries of a one-row SELECT are
    evaluated, whether anything was inserted or not. Its value: `returned` of each row the
    insert returned, as an array."""
    return (
        f"WITH ins AS ({insert}), n AS (SELECT count(pg_notify('{CHANNEL}', w)) AS c "
        f"FROM unnest(${len(_TYPES) + 1}::text[]) AS w) "
        f"SELECT array(SELECT {returned} FROM ins) AS stored, (SELECT c FROM n) AS notified"
    )


_INSERT_KEYED_NOTIFY = with_notify(INSERT_KEYED, "event_key")


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A record about to be stored; placement and receipt id are added by `values`."""

    tenant: str | None
    kind: Kind
    event_key: str | None = None
    ref: str | None = None  # the id a delivery report carried (matched later when unmatched)
    send_id: int | None = None
    msisdn_from: str = ""
    msisdn_to: str = ""
    body: str = ""
    in_reply_to: str = ""
    status_code: str = ""
    dlr_status: int | None = None
    error: str = ""
    ambiguous: bool = False

    def values(self, rules: Rules, now: float) -> tuple[Any, ...]:
        p = rules.placement(self.tenant, self.kind, now)
        return (
            self.tenant,
            self.kind,
            self.event_key,
            self.ref,
            self.send_id,
            self.ambiguous,
            receipt_id(),
            self.msisdn_from,
            self.msisdn_to,
            self.body,
            self.in_reply_to,
            self.status_code,
            self.dlr_status,
            self.error,
            now,
            p.pollable,
            p.push_due,
            p.push_deadline,
        )

    def wakes(self, rules: Rules, now: float) -> bool:
        return self.tenant is not None and rules.placement(self.tenant, self.kind, now).waiting


def columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows of `NewRecord.values` as one list per column (for INSERT_ARRAYS)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in _TYPES]


async def insert_keyed(
    conn: Conn, rows: Sequence[tuple[Any, ...]], *, notify: Wakes | None = None
) -> set[str]:
    """Insert rows with event keys; the keys actually inserted (the others were stored before).

    `notify`: wake-ups to NOTIFY in the same statement (outside an explicit transaction the
    statement is the transaction: they are delivered at its commit)."""
    if not rows:
        return set()
    if notify is None:
        return {r["event_key"] for r in await conn.fetch(INSERT_KEYED, *columns(rows))}
    keys = await conn.fetchval(_INSERT_KEYED_NOTIFY, *columns(rows), wake_payloads(notify))
    return set(keys)


async def insert_many(
    conn: Conn, rules: Rules, records: Sequence[NewRecord], now: float, wakes: Wakes
) -> None:
    """Insert records without event keys inside the caller's transaction."""
    await insert_timed(conn, rules, [(r, now) for r in records], wakes)


async def insert_timed(
    conn: Conn, rules: Rules, records: Sequence[tuple[NewRecord, float]], wakes: Wakes
) -> None:
    """Insert records without event keys, each made at its own time, in one statement."""
    if not records:
        return
    await conn.execute(INSERT_ARRAYS, *columns([r.values(rules, now) for r, now in records]))
    for r, now in records:
        if r.tenant is not None and r.wakes(rules, now):
            wakes.add((r.tenant, r.kind))


def to_record(row: Any) -> LegacyRecord:
    return LegacyRecord(*tuple(row)[:16])


CLAIM_POLL = f"""
UPDATE records SET lease_owner = $3, lease_until = {DB_NOW} + $4
WHERE id = (
    SELECT id FROM records
    WHERE tenant = $1 AND kind = $2 AND pollable
      AND (lease_until IS NULL OR lease_until < {DB_NOW})
    ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING {RECORD_COLUMNS}, lease_until AS lease_end"""
# The claim that returned the record ($1) still holds it: this replica ($2) and its lease end
# ($3; a later claim by the same replica, after this lease expired, sets another).
_HELD = "id = $1 AND lease_owner = $2 AND lease_until = $3"


class Polling:
    """Poll claims of one replica: the lease (owner, expiry) lives in the row."""

    def __init__(
        self, db: Db, rules: Callable[[], Rules], owner: Callable[[], str], lease_seconds: float
    ) -> None:
        self.db = db
        self.rules = rules  # the store's rules, read at each call (a reload replaces them)
        self.owner = owner  # the store's replica id, read at each call
        self.lease_seconds = lease_seconds

    async def claim(self, tenant: str, kind: Kind) -> LegacyRecord | None:
        async with self.db.conn("claim", lease=True) as conn:
            row = await conn.fetchrow(CLAIM_POLL, tenant, kind, self.owner(), self.lease_seconds)
        return None if row is None else replace(to_record(row), lease_end=row["lease_end"])

    async def ack(self, record: LegacyRecord) -> bool:
        async with self.db.conn("ack", lease=True) as conn:
            done = await conn.fetchval(
                "UPDATE records SET pollable = false, polled = true, lease_owner = NULL, "
                f"lease_until = NULL WHERE {_HELD} AND pollable RETURNING id",
                record.id,
                self.owner(),
                record.lease_end,
            )
        return done is not None

    async def release(self, record: LegacyRecord) -> None:
        async with self.db.tx("release", lease=True) as (conn, wakes):
            released = await conn.fetchrow(
                f"UPDATE records SET lease_owner = NULL, lease_until = NULL WHERE {_HELD} "
                "RETURNING tenant, kind",
                record.id,
                self.owner(),
                record.lease_end,
            )
            if released is not None:
                wakes.add((record.tenant, record.kind))
                # Its tenant only pushes its kind since the claim (a reload; placing again
                # skipped it while this poll held it): pushed now, as placing would have.
                place = self.rules().placement(released["tenant"], released["kind"], time.time())
                if place.push_only:
                    await conn.execute(
                        "UPDATE records SET push_due = $2, push_deadline = $3, pollable = false "
                        "WHERE id = $1 AND pollable AND push_due IS NULL AND NOT dead "
                        "AND push_attempts = 0",
                        record.id,
                        place.push_due,
                        place.push_deadline,
                    )
        # Wake local polls even if the lease had already gone: they re-check.
        self.db.fire([(record.tenant, record.kind)])

    async def release_all(self) -> None:
        """Give back this replica's poll claims (close). Its push leases are kept: an attempt
        abandoned at shutdown may have reached its receiver, so its record is pushed again
        (here after a restart, or by another replica) only once the lease expires."""
        async with self.db.tx("release leases", lease=True) as (conn, wakes):
            rows = await conn.fetch(
                "UPDATE records SET lease_owner = NULL, lease_until = NULL "
                "WHERE pollable AND lease_owner = $1 RETURNING tenant, kind",
                self.owner(),
            )
            wakes.update((r["tenant"], r["kind"]) for r in rows if r["tenant"] is not None)


async def queue_depth(db: Db, tenant: str) -> tuple[int, int]:
    async with db.conn("queue depth") as conn:
        rows = await conn.fetch(
            "SELECT kind, count(*) AS n FROM records WHERE tenant = $1 AND pollable GROUP BY kind",
            tenant,
        )
    counts = {r["kind"]: int(r["n"]) for r in rows}
    return counts.get("in", 0), counts.get("status", 0)


async def waiting(db: Db) -> list[WaitingStat]:
    # Two queries, each served by its partial index (one OR would read the whole table).
    sqls = (
        "SELECT tenant, kind, count(*) AS n, min(created_at) AS oldest FROM records "
        "WHERE pollable GROUP BY tenant, kind",
        "SELECT tenant, kind, count(*) AS n, min(created_at) AS oldest FROM records "
        "WHERE push_due IS NOT NULL AND NOT pollable GROUP BY tenant, kind",
    )
    groups: dict[tuple[str, Kind], tuple[int, float | None]] = {}
    async with db.conn("waiting") as conn:
        for sql in sqls:
            for r in await conn.fetch(sql):
                kind = r["kind"]
                if r["tenant"] is None or kind not in KINDS:
                    continue
                n, oldest = groups.get((r["tenant"], kind), (0, None))
                first = r["oldest"] if oldest is None else min(oldest, r["oldest"])
                groups[(r["tenant"], kind)] = (n + int(r["n"]), first)
    return [WaitingStat(t, k, n, oldest) for (t, k), (n, oldest) in sorted(groups.items())]


async def purge(db: Db, before: float) -> int:
    """Consumed records and settled sends created before `before`, deleted in chunks."""
    total = 0
    # The finished-record test is repeated outside the subquery: a row another transaction
    # holds (an unmatched record being assigned, pollable once it commits) is re-checked
    # against the outer WHERE alone when its lock is released, never against the subquery.
    for sql in (
        "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE created_at < $1 "
        "AND NOT pollable AND push_due IS NULL AND NOT dead ORDER BY created_at LIMIT $2) "
        "AND NOT pollable AND push_due IS NULL AND NOT dead",
        "DELETE FROM sends WHERE id IN (SELECT id FROM sends WHERE created_at < $1 "
        "AND state <> 'pending' ORDER BY created_at LIMIT $2)",
    ):
        while True:
            async with db.conn("purge") as conn:
                status = await conn.execute(sql, before, PURGE_CHUNK)
            n = int(status.split()[-1])
            total += n
            if n < PURGE_CHUNK:
                break
    return total
