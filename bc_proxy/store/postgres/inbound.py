"""Inbound events in PostgreSQL: delivery reports, incoming SMS, STOP/START, rejected payloads.

Owns the SQL of add_dlr / add_mo (facts fetched, `Rules` decides, one insert deduped by event
key with its NOTIFY in the same statement), sweep marks, the blocked list and the bounded table
of rejected webhooks. The hot path is two round trips and needs no explicit transaction.
"""

from __future__ import annotations

import time
from typing import Any

from bc_proxy.store import DlrEvent, IngestResult, MoEvent, RejectedWebhook, SweepMark
from bc_proxy.store.postgres.db import CHANNEL, Conn, Db
from bc_proxy.store.postgres.records import INSERT_ONE, NewRecord
from bc_proxy.store.postgres.sends import FACTS, LOCK_REPORT_IDS, candidates
from bc_proxy.store.rules import REPLY_WINDOW_SECONDS, Rules, SendFacts

REJECTED_CAP = 10_000  # rejected webhook payloads kept (the newest)

_F = [c.strip() for c in FACTS.split(",")]
_MO_FACTS = f"""
SELECT e.id AS e_id, e.tenant AS e_tenant,
    {", ".join(f"r.{c} AS r_{c}" for c in _F)},
    {", ".join(f"l.{c} AS l_{c}" for c in _F)}
FROM (SELECT 1) AS one
LEFT JOIN records AS e ON e.event_key = $1
LEFT JOIN LATERAL (
    SELECT * FROM (
        SELECT {FACTS} FROM sends WHERE connexus_id = $2
        UNION ALL SELECT {FACTS} FROM sends WHERE upstream_ref = $2) AS x
    ORDER BY id DESC LIMIT 1) AS r ON true
LEFT JOIN LATERAL (
    SELECT {FACTS} FROM sends WHERE recipient = $3 AND created_at > $4
    ORDER BY id DESC LIMIT 1) AS l ON true
"""


def _dlr_record(event: DlrEvent, key: str, found: SendFacts | None, ambiguous: bool) -> NewRecord:
    return NewRecord(
        found.tenant if found else None,
        "status",
        event_key=key,
        ref=event.message_id,
        send_id=found.id if found else None,
        msisdn_from=found.recipient if found else "",
        msisdn_to=found.sender if found else "",
        in_reply_to=(found.legacy_id or "") if found else "",
        dlr_status=event.status,
        error=event.status_text,
        ambiguous=ambiguous,
    )


async def add_dlr(db: Db, rules: Rules, event: DlrEvent) -> IngestResult:
    key = rules.dlr_key(event.message_id, event.status)
    now = time.time()
    async with db.conn("add dlr") as conn:
        found = rules.attribute_dlr(await candidates(conn, event.message_id))
        if found is None:
            # No send yet: decide again under the id's lock, which a settle making the id
            # known also takes, so the report is either matched now or found by that settle.
            async with conn.transaction():
                await conn.fetchval(LOCK_REPORT_IDS, [event.message_id])
                found = rules.attribute_dlr(await candidates(conn, event.message_id))
                inserted = await _insert_dlr(conn, event, key, found, rules, now)
        else:
            inserted = await _insert_dlr(conn, event, key, found, rules, now)
    tenant = found.tenant if isinstance(found, SendFacts) else None
    if not inserted:
        return IngestResult("duplicate", tenant)
    if tenant is not None:
        db.fire([(tenant, "status")])
        return IngestResult("stored", tenant)
    return IngestResult("ambiguous" if found == "ambiguous" else "unmatched", None)


async def _insert_dlr(
    conn: Conn,
    event: DlrEvent,
    key: str,
    found: SendFacts | str | None,
    rules: Rules,
    now: float,
) -> bool:
    record = _dlr_record(
        event, key, found if isinstance(found, SendFacts) else None, found == "ambiguous"
    )
    return await conn.fetchrow(INSERT_ONE, *record.values(rules, now)) is not None


def _facts(row: Any, prefix: str) -> SendFacts | None:
    """The send facts `_MO_FACTS` returned under one prefix (r: related, l: latest)."""
    if row[f"{prefix}_id"] is None:
        return None
    return SendFacts(*(row[f"{prefix}_{c}"] for c in _F))


async def add_mo(db: Db, rules: Rules, event: MoEvent, account: str | None) -> IngestResult:
    key = rules.mo_key(event.message_id)
    now = time.time()
    async with db.conn("add mo") as conn:
        row = await conn.fetchrow(
            _MO_FACTS, key, event.related_id, event.sender, now - REPLY_WINDOW_SECONDS
        )
        route = rules.route_mo(
            event.to, related=_facts(row, "r"), latest=_facts(row, "l"), account=account
        )
        if row["e_id"] is not None:
            if row["e_tenant"] is not None or route.tenant is None:
                return IngestResult("duplicate", row["e_tenant"])
            return await _assign(db, conn, rules, event, row["e_id"], route.tenant, now)
        record = NewRecord(
            route.tenant,
            "in",
            event_key=key,
            ref=event.message_id,
            send_id=route.send_id,
            msisdn_from=event.sender,
            msisdn_to=event.to,
            body=event.body,
            in_reply_to=route.in_reply_to,
        )
        command = rules.opt_out_command(route.tenant, event.body)
        if command is None or route.tenant is None:
            inserted = await conn.fetchrow(INSERT_ONE, *record.values(rules, now))
        else:
            async with conn.transaction():  # the message and its STOP/START commit together
                inserted = await conn.fetchrow(INSERT_ONE, *record.values(rules, now))
                if inserted is not None:
                    await _opt_out(conn, route.tenant, event, command, now)
    if inserted is None:
        return IngestResult("duplicate", route.tenant)
    if route.tenant is None:
        return IngestResult("unmatched", None)
    if record.wakes(rules, now):
        db.fire([(route.tenant, "in")])
    return IngestResult("stored", route.tenant)


async def _assign(
    db: Db, conn: Conn, rules: Rules, event: MoEvent, record_id: int, tenant: str, now: float
) -> IngestResult:
    """An unmatched incoming message whose account is now known goes to that tenant."""
    p = rules.placement(tenant, "in", now)
    command = rules.opt_out_command(tenant, event.body)
    async with conn.transaction():
        done = await conn.fetchval(
            "UPDATE records SET tenant = $2, pollable = $3, push_due = $4, push_deadline = $5 "
            "WHERE id = $1 AND tenant IS NULL RETURNING id",
            record_id,
            tenant,
            p.pollable,
            p.push_due,
            p.push_deadline,
        )
        if done is None:
            return IngestResult("duplicate", None)
        if command is not None:
            await _opt_out(conn, tenant, event, command, now)
        if p.pollable or p.push_due is not None:
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", f"{tenant}:in")
    if p.pollable or p.push_due is not None:
        db.fire([(tenant, "in")])
    return IngestResult("assigned", tenant)


async def _opt_out(conn: Conn, tenant: str, event: MoEvent, command: str, now: float) -> None:
    if command == "stop":
        await conn.execute(
            "INSERT INTO blocked (tenant, handset, since, by_message) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (tenant, handset) DO NOTHING",
            tenant,
            event.sender,
            now,
            event.message_id,
        )
    else:
        await conn.execute(
            "DELETE FROM blocked WHERE tenant = $1 AND handset = $2", tenant, event.sender
        )


async def blocked(db: Db, tenant: str) -> list[str]:
    async with db.conn("blocked") as conn:
        rows = await conn.fetch(
            "SELECT handset FROM blocked WHERE tenant = $1 ORDER BY handset", tenant
        )
    return [r["handset"] for r in rows]


async def reject_webhook(db: Db, body: bytes, reason: str) -> None:
    async with db.tx("reject webhook") as (conn, _):
        new_id = await conn.fetchval(
            "INSERT INTO rejected_webhooks (received_at, reason, body) VALUES ($1, $2, $3) "
            "RETURNING id",
            time.time(),
            reason,
            body,
        )
        # Ids only grow: everything REJECTED_CAP ids back is older than the newest cap rows.
        await conn.execute("DELETE FROM rejected_webhooks WHERE id <= $1", new_id - REJECTED_CAP)


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
