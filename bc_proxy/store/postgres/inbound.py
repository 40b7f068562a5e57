"""Operator-facing inbound state in PostgreSQL: rejected payloads, sweep marks, blocked list.

Owns the bounded table of rejected webhooks (written a group at a time, the newest
REJECTED_CAP kept), the missed-webhook sweep's marks, and reading the blocked list (STOP/START
change it in mo.py). Delivery reports and incoming SMS live in dlr.py and mo.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bc_proxy.store import RejectedWebhook, SweepMark
from bc_proxy.store.postgres.db import Conn, Db, Wakes

REJECTED_CAP = 10_000  # rejected webhook payloads kept (the newest)


@dataclass(frozen=True, slots=True)
class RejectWrite:
    """One reject_webhook call waiting for its group."""

    body: bytes
    reason: str
    now: float = field(default_factory=time.time)


async def store_rejects(conn: Conn, _wakes: Wakes, writes: list[RejectWrite]) -> list[None]:
    """Keep a group of payloads, in submission order, and drop all but the newest cap."""
    newest = await conn.fetchval(
        "WITH ins AS (INSERT INTO rejected_webhooks (received_at, reason, body) "
        "SELECT received_at, reason, body FROM unnest($1::float8[], $2::text[], $3::bytea[]) "
        "WITH ORDINALITY AS w(received_at, reason, body, i) ORDER BY i RETURNING id) "
        "SELECT max(id) FROM ins",
        [w.now for w in writes],
        [w.reason for w in writes],
        [w.body for w in writes],
    )
    # Ids only grow: rows REJECTED_CAP ids back are older than the newest REJECTED_CAP.
    await conn.execute("DELETE FROM rejected_webhooks WHERE id <= $1", newest - REJECTED_CAP)
    return [None] * len(writes)


async def blocked(db: Db, tenant: str) -> list[str]:
    async with db.conn("blocked") as conn:
        rows = await conn.fetch(
            "SELECT handset FROM blocked WHERE tenant = $1 ORDER BY handset", tenant
        )
    return [r["handset"] for r in rows]


async def rejected_webhooks(db: Db, limit: int) -> list[RejectedWebhook]:
    async with db.conn("rejected webhooks") as conn:
        rows = await conn.fetch(
            "SELECT id, received_at, reason, body FROM rejected_webhooks ORDER BY id DESC LIMIT $1",
            limit,
        )
    return [RejectedWebhook(r["id"], r["received_at"], r["reason"], bytes(r["body"])) for r in rows]


async def sweep_mark(db: Db, tenant: str) -> SweepMark | None:
    async with db.conn("sweep mark") as conn:
        row = await conn.fetchrow(
            "SELECT tenant, last_time, last_id, updated_at FROM sweep_marks WHERE tenant = $1",
            tenant,
        )
    return None if row is None else SweepMark(*row)


async def set_sweep_mark(db: Db, mark: SweepMark) -> None:
    async with db.conn("set sweep mark") as conn:
        await conn.execute(
            "INSERT INTO sweep_marks (tenant, last_time, last_id, updated_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (tenant) DO UPDATE SET "
            "last_time = excluded.last_time, last_id = excluded.last_id, "
            "updated_at = excluded.updated_at",
            mark.tenant,
            mark.last_time,
            mark.last_id,
            mark.updated_at,
        )
