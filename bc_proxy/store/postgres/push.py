"""Pushes in PostgreSQL: due records claimed under leases, in order per send, and dead letters.

Owns claim_pushes (`FOR UPDATE SKIP LOCKED`, only tenants that push the kind, never past an
earlier record of the same send and kind still awaiting its push), done / failed conditional
on this replica's lease, the dead-letter list and replay, and placing again the records
another configuration placed (push to poll, and poll to push).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from bc_proxy.store import KINDS, LegacyRecord
from bc_proxy.store.postgres.db import DB_NOW, Db
from bc_proxy.store.postgres.records import RECORD_COLUMNS, to_record
from bc_proxy.store.rules import Rules

PUSH_ERROR_CHARS = 200

MAX_PAGES = 16  # claim statements one claim runs at most
AHEAD = 1024  # due records one look ahead reads at most
MAX_AHEAD = 2  # looks ahead one claim makes at most

# Due records of pushing tenants ($1 due by, $2/$3 tenants pushing `in`/`status`), not leased.
_DUE = f"""r.push_due IS NOT NULL AND r.push_due <= $1 AND NOT r.dead
      AND ((r.kind = 'in' AND r.tenant = ANY($2::text[]))
           OR (r.kind = 'status' AND r.tenant = ANY($3::text[])))
      AND (r.push_until IS NULL OR r.push_until < {DB_NOW})"""
# In order per send: `b.blocker`, the due time of the latest earlier record of r's send (same
# kind) awaiting its push, NULL when there is none (r may go). One probe of
# `records_push_send`, however long the send's queue: the records before that one are before
# it in the same way (a deferred record is examined again when its new time comes).
_BLOCKER = """LEFT JOIN LATERAL (
        SELECT e.push_due AS blocker FROM records e
        WHERE e.send_id = r.send_id AND e.id < r.id AND e.kind = r.kind
          AND e.push_due IS NOT NULL AND NOT e.dead
        ORDER BY e.send_id DESC, e.id DESC LIMIT 1) AS b ON true"""
# A record whose blocker is due no later than itself (being pushed now, or leased by a replica
# that died) can neither go nor be deferred: it is passed over, and takes no place in a page.
_MOVABLE = "(b.blocker IS NULL OR b.blocker > r.push_due)"
# A record held back by an earlier record of its send that is due later (waiting for its
# retry) gets that record's due time: it cannot go before it, claims until then do not read it
# again (a push target's outage would otherwise make every claim read its whole backlog), and
# from then on it sorts right behind it.
_DEFER = (
    "UPDATE records SET push_due = p.blocker FROM p WHERE records.id = p.id "
    "AND p.blocker IS NOT NULL"
)
# One page of due records after ($7, $8), oldest due first, as many as the caller still wants
# ($4), locked (SKIP LOCKED: a concurrent claim of another replica takes the next ones; a page
# of free records larger than that would lock rows this claim does not take, and starve it).
# Its free records are leased ($5 owner, $6 lease seconds), its held-back ones deferred. Per
# record of the page: the leased record's columns (or NULLs), its place (the next page starts
# after the last) and whether it was held back.
CLAIM = f"""
WITH p AS (
    SELECT r.id, r.push_due, b.blocker FROM records r {_BLOCKER}
    WHERE {_DUE} AND (r.push_due, r.id) > ($7, $8) AND {_MOVABLE}
    ORDER BY r.push_due, r.id LIMIT $4
    FOR UPDATE OF r SKIP LOCKED
), deferred AS ({_DEFER}
), claimed AS (
    UPDATE records SET push_owner = $5, push_until = {DB_NOW} + $6
    FROM p WHERE records.id = p.id AND p.blocker IS NULL
    RETURNING {", ".join("records." + c.strip() for c in RECORD_COLUMNS.split(","))},
        records.push_until AS lease_end
)
SELECT claimed.*, p.id AS page_id, p.push_due AS page_due, p.blocker IS NOT NULL AS held
FROM p LEFT JOIN claimed ON claimed.id = p.id
"""
# After a page that met held-back records, more of them are likely ahead (an outage's
# backlog): of the next $4 due records after ($5, $6), the held-back ones are deferred at once
# (and only they are locked), so that the claim reaches the free ones behind them instead of
# returning nothing.
DEFER_AHEAD = f"""
WITH ahead AS (
    SELECT r.id FROM records r
    WHERE {_DUE} AND (r.push_due, r.id) > ($5, $6)
    ORDER BY r.push_due, r.id LIMIT $4
), p AS (
    SELECT r.id, r.push_due, b.blocker FROM ahead JOIN records r ON r.id = ahead.id {_BLOCKER}
    WHERE {_DUE} AND b.blocker > r.push_due
    FOR UPDATE OF r SKIP LOCKED
) {_DEFER}
"""

# The claim that returned the record ($1 id) still holds it: its owner ($2) and its lease end
# ($3; a later claim of the same record by the same owner, after this lease expired or a
# reload placed it again, sets another).
_HELD = "id = $1 AND push_owner = $2 AND push_until = $3"


class Pushing:
    """Push claims of one replica."""

    def __init__(
        self, db: Db, rules: Callable[[], Rules], owner: Callable[[], str], lease_seconds: float
    ) -> None:
        self.db = db
        self.rules = rules  # the store's rules, read at each call (a reload replaces them)
        self.owner = owner  # the store's replica id, read at each call
        self.lease_seconds = lease_seconds

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        rules = self.rules()
        tenants_in = rules.push_tenants("in")
        tenants_status = rules.push_tenants("status")
        if limit <= 0 or not (tenants_in or tenants_status):
            return []
        claimed: list[LegacyRecord] = []
        after: tuple[float, int] = (float("-inf"), 0)
        ahead = MAX_AHEAD
        async with self.db.conn("claim pushes", lease=True) as conn:
            for _ in range(MAX_PAGES):
                want = limit - len(claimed)
                rows = await conn.fetch(
                    CLAIM,
                    now,
                    tenants_in,
                    tenants_status,
                    want,
                    self.owner(),
                    self.lease_seconds,
                    *after,
                )
                claimed += (
                    replace(to_record(r), lease_end=r["lease_end"])
                    for r in rows
                    if r["id"] is not None
                )
                if len(claimed) >= limit or len(rows) < want:
                    break
                after = max((r["page_due"], r["page_id"]) for r in rows)
                if ahead and any(r["held"] for r in rows):
                    ahead -= 1
                    await conn.execute(DEFER_AHEAD, now, tenants_in, tenants_status, AHEAD, *after)
        return sorted(claimed, key=lambda r: r.id)

    async def push_done(self, record: LegacyRecord) -> None:
        async with self.db.tx("push done", lease=True) as (conn, wakes):
            # Whichever claim holds it now: a success landing after its lease expired (and
            # the record was claimed again, here or by another replica) still finishes it; the
            # attempt in flight then changes nothing.
            done = await conn.fetchval(
                "UPDATE records SET push_due = NULL, push_attempts = push_attempts + 1, "
                "push_error = '', push_owner = NULL, push_until = NULL "
                "WHERE id = $1 AND push_due IS NOT NULL RETURNING id",
                record.id,
            )
            if done is not None:
                wakes.add((record.tenant, record.kind))  # the send's next record is due now

    async def push_failed(self, record: LegacyRecord, *, next_at: float | None, error: str) -> None:
        async with self.db.tx("push failed", lease=True) as (conn, wakes):
            done = await conn.fetchval(
                "UPDATE records SET push_due = $4, dead = $5, push_attempts = push_attempts + 1, "
                f"push_error = $6, push_owner = NULL, push_until = NULL WHERE {_HELD} RETURNING id",
                record.id,
                self.owner(),
                record.lease_end,
                next_at,
                next_at is None,
                error[:PUSH_ERROR_CHARS],
            )
            if done is not None and next_at is None:
                wakes.add((record.tenant, record.kind))  # a dead letter frees its send's next


async def dead_letters(db: Db, limit: int | None = None) -> list[LegacyRecord]:
    async with db.conn("dead letters") as conn:
        rows = await conn.fetch(  # LIMIT NULL: no limit
            f"SELECT {RECORD_COLUMNS} FROM records WHERE dead ORDER BY id LIMIT $1::int", limit
        )
    return [to_record(r) for r in rows]


async def dead_letter_count(db: Db) -> int:
    async with db.conn("dead letters") as conn:
        return int(await conn.fetchval("SELECT count(*) FROM records WHERE dead"))


async def replay(db: Db, rules: Rules, ids: Sequence[int] | None, now: float) -> int:
    if ids is not None and not ids:
        return 0
    async with db.tx("replay") as (conn, wakes):
        rows = await conn.fetch(
            "SELECT id, tenant, kind FROM records WHERE dead "
            "AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[])) ORDER BY id FOR UPDATE",
            None if ids is None else list(ids),
        )
        if not rows:
            return 0
        # Placed again by the rules: pushed afresh, or polled if the tenant no longer pushes
        # that kind (a reload may have turned it off since the record died).
        places = [rules.placement(r["tenant"], r["kind"], now) for r in rows]
        await conn.execute(
            "UPDATE records SET dead = false, push_due = d.due, push_deadline = d.deadline, "
            "pollable = records.pollable OR (d.due IS NULL AND NOT records.polled), "
            "push_attempts = 0, "
            "push_error = '', push_owner = NULL, push_until = NULL "
            "FROM unnest($1::bigint[], $2::float8[], $3::float8[]) AS d(id, due, deadline) "
            "WHERE records.id = d.id",
            [r["id"] for r in rows],
            [p.push_due for p in places],
            [p.push_deadline for p in places],
        )
        wakes.update((r["tenant"], r["kind"]) for r in rows if r["tenant"] is not None)
        return len(rows)


async def place_stranded(db: Db, rules: Rules, now: float) -> None:
    """Records of configured tenants placed by another configuration, placed again: waiting
    for a push this one no longer makes (or dead-lettered by it) become pollable; waiting for
    a poll (never pushed, not being handed over) where this one only pushes their kind are
    pushed instead. (Where it pushes and keeps records for polling, a poll still takes them:
    not stranded, and not read, however many a tenant keeps.)"""
    places = [(t, k, rules.placement(t, k, now)) for t in rules.tenants for k in KINDS]
    polling = [(t, k) for t, k, p in places if p.push_due is None]
    pushed = [(t, k, p) for t, k, p in places if p.push_only]
    async with db.tx("place stranded") as (conn, wakes):
        if polling:
            rows = await conn.fetch(
                "UPDATE records SET pollable = NOT records.polled, push_due = NULL, dead = false, "
                "push_attempts = 0, push_error = '', push_owner = NULL, push_until = NULL "
                "FROM unnest($1::text[], $2::text[]) AS p(tenant, kind) "
                "WHERE records.tenant = p.tenant AND records.kind = p.kind "
                "AND (records.push_due IS NOT NULL OR records.dead) "
                "RETURNING records.tenant, records.kind",
                [t for t, _ in polling],
                [k for _, k in polling],
            )
            wakes.update((r["tenant"], r["kind"]) for r in rows)
        if pushed:
            rows = await conn.fetch(
                "UPDATE records SET push_due = p.due, push_deadline = p.deadline, "
                "pollable = false "
                "FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[]) "
                "AS p(tenant, kind, due, deadline) "
                "WHERE records.tenant = p.tenant AND records.kind = p.kind "
                "AND records.pollable AND records.push_due IS NULL AND NOT records.dead "
                f"AND records.push_attempts = 0 AND (records.lease_owner IS NULL "
                f"OR records.lease_until < {DB_NOW}) "
                "RETURNING records.tenant, records.kind",
                [t for t, _, _ in pushed],
                [k for _, k, _ in pushed],
                [p.push_due for _, _, p in pushed],
                [p.push_deadline for _, _, p in pushed],
            )
            wakes.update((r["tenant"], r["kind"]) for r in rows)
