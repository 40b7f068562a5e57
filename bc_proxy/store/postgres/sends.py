"""Sends in PostgreSQL: write-ahead `pending` rows, their settlement, and expiry of lost calls.

Owns the SQL of begin_send (idempotency looked up under a transaction-scoped advisory lock on
the (tenant, legacy messageId) pair, so two replicas never both write a pending row for one
key), settle_send (and late matching of delivery reports), expire_pending. Rules decide.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bc_proxy.store import (
    PlannedRecipient,
    SendIntent,
    SendPlan,
    SendState,
    Settlement,
    StatusRecord,
)
from bc_proxy.store.postgres.db import Conn, Db, Wakes
from bc_proxy.store.postgres.records import NewRecord, insert_many
from bc_proxy.store.postgres.schema import LOCK_CLASS_REPORT, LOCK_CLASS_SEND
from bc_proxy.store.rules import BLOCKED_ERROR, Rules, SendFacts, new_ref

FACTS = "id, tenant, recipient, sender, legacy_id"
_S_FACTS = ", ".join(f"s.{c.strip()}" for c in FACTS.split(","))
_CANDIDATES = (
    f"SELECT m, {_S_FACTS} FROM unnest($1::text[]) AS m JOIN sends AS s ON s.connexus_id = m "
    f"UNION SELECT m, {_S_FACTS} FROM unnest($1::text[]) AS m JOIN sends AS s "
    "ON s.upstream_ref = m"
)
# Report ids are locked (sorted, each once) by a settle that makes them known and by an
# ingest that finds no send for one: whichever commits second sees the other's rows.
LOCK_REPORT_IDS = (
    f"SELECT count(pg_advisory_xact_lock({LOCK_CLASS_REPORT}, h)) FROM "
    "(SELECT DISTINCT hashtext(i) AS h FROM unnest($1::text[]) AS i ORDER BY h) AS s"
)


def facts(row: Any) -> SendFacts:
    return SendFacts(row["id"], row["tenant"], row["recipient"], row["sender"], row["legacy_id"])


async def candidates(conn: Conn, message_ids: Sequence[str]) -> dict[str, list[SendFacts]]:
    """Send rows each report id may name: by Connexus id or by our upstream ref."""
    out: dict[str, list[SendFacts]] = {}
    for r in await conn.fetch(_CANDIDATES, list(message_ids)):
        out.setdefault(r["m"], []).append(facts(r))
    return out


async def begin_send(db: Db, rules: Rules, intent: SendIntent, now: float) -> SendPlan:
    tenant = intent.tenant
    async with db.tx("begin send") as (conn, wakes):
        latest: dict[str, SendState] = {}
        if intent.legacy_id is not None:
            # Serialises begin_send of one (tenant, messageId) across replicas until commit:
            # the second sees the first's pending rows and answers them as repeats.
            await conn.execute(
                f"SELECT pg_advisory_xact_lock({LOCK_CLASS_SEND}, hashtext($1 || chr(1) || $2))",
                tenant,
                intent.legacy_id,
            )
            rows = await conn.fetch(
                "SELECT DISTINCT ON (recipient) recipient, state FROM sends "
                "WHERE tenant = $1 AND legacy_id = $2 AND recipient = ANY($3::text[]) "
                "AND created_at > $4 ORDER BY recipient, id DESC",
                tenant,
                intent.legacy_id,
                list(intent.recipients),
                now - rules.window(tenant),
            )
            latest = {r["recipient"]: r["state"] for r in rows}
        blocked = {
            r["handset"]
            for r in await conn.fetch(
                "SELECT handset FROM blocked WHERE tenant = $1 AND handset = ANY($2::text[])",
                tenant,
                list(intent.recipients),
            )
        }
        to_send: list[PlannedRecipient] = []
        repeats: list[tuple[str, SendState]] = []
        blocked_out: list[str] = []
        for recipient in intent.recipients:
            state = latest.get(recipient)
            if state is not None and rules.is_repeat(state):
                repeats.append((recipient, state))
            elif recipient in blocked:
                blocked_out.append(recipient)
            else:
                to_send.append(PlannedRecipient(recipient, new_ref()))
                if intent.legacy_id is not None:
                    latest[recipient] = "pending"  # the same number twice in one call
        if to_send:
            await conn.executemany(
                "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, "
                "created_at) VALUES ($1, $2, $3, $4, 'pending', $5, $6)",
                [
                    (tenant, intent.legacy_id, p.recipient, intent.sender, p.upstream_ref, now)
                    for p in to_send
                ],
            )
        statuses = [
            NewRecord(
                tenant,
                "status",
                msisdn_from=handset,
                msisdn_to=intent.sender,
                in_reply_to=intent.legacy_id or "",
                status_code="NUR",
                error=BLOCKED_ERROR,
            )
            for handset in blocked_out
        ]
        await insert_many(conn, rules, statuses, now, wakes)
    return SendPlan(tuple(to_send), tuple(repeats), tuple(blocked_out))


async def settle_send(
    db: Db, rules: Rules, settlements: Sequence[Settlement], statuses: Sequence[StatusRecord]
) -> None:
    now = time.time()
    async with db.tx("settle send") as (conn, wakes):
        known: list[str] = []
        if settlements:
            rows = await conn.fetch(
                "UPDATE sends SET state = s.state, settled_at = $5, "
                "connexus_id = coalesce(s.connexus_id, sends.connexus_id), "
                "sender = CASE WHEN sends.sender = '' THEN s.sender ELSE sends.sender END "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
                "AS s(ref, state, connexus_id, sender) WHERE sends.upstream_ref = s.ref "
                "RETURNING sends.connexus_id",
                [s.upstream_ref for s in settlements],
                [s.state for s in settlements],
                [s.connexus_id for s in settlements],
                [s.sender for s in settlements],
                now,
            )
            known = sorted({r["connexus_id"] for r in rows if r["connexus_id"]})
        send_ids: dict[str, int] = {}
        refs = sorted({s.upstream_ref for s in statuses if s.upstream_ref})
        if refs:
            rows = await conn.fetch(
                "SELECT id, upstream_ref FROM sends WHERE upstream_ref = ANY($1::text[])", refs
            )
            send_ids = {r["upstream_ref"]: r["id"] for r in rows}
        records = [
            NewRecord(
                s.tenant,
                "status",
                send_id=send_ids.get(s.upstream_ref or ""),
                msisdn_from=s.recipient,
                msisdn_to=s.sender,
                in_reply_to=s.legacy_id or "",
                status_code=s.status_code,
                error=s.error,
            )
            for s in statuses
        ]
        await insert_many(conn, rules, records, now, wakes)
        if known:
            await match_reports(conn, rules, known, now, wakes)


async def match_reports(
    conn: Conn, rules: Rules, message_ids: list[str], now: float, wakes: Wakes
) -> None:
    """Give delivery reports kept unmatched under these ids to the one send they name."""
    await conn.fetchval(LOCK_REPORT_IDS, message_ids)
    waiting = await conn.fetch(
        "SELECT id, ref FROM records WHERE tenant IS NULL AND NOT ambiguous AND kind = 'status' "
        "AND ref = ANY($1::text[]) ORDER BY id",
        message_ids,
    )
    sends = await candidates(conn, sorted({row["ref"] for row in waiting}))
    for row in waiting:
        found = rules.attribute_dlr(sends.get(row["ref"], []))
        if found is None:
            continue
        if found == "ambiguous":
            await conn.execute("UPDATE records SET ambiguous = true WHERE id = $1", row["id"])
            continue
        p = rules.placement(found.tenant, "status", now)
        await conn.execute(
            "UPDATE records SET tenant = $2, send_id = $3, msisdn_from = $4, msisdn_to = $5, "
            "in_reply_to = $6, pollable = $7, push_due = $8, push_deadline = $9 WHERE id = $1",
            row["id"],
            found.tenant,
            found.id,
            found.recipient,
            found.sender,
            found.legacy_id or "",
            p.pollable,
            p.push_due,
            p.push_deadline,
        )
        if p.pollable or p.push_due is not None:
            wakes.add((found.tenant, "status"))


async def expire_pending(db: Db, before: float) -> int:
    async with db.conn("expire pending") as conn:
        status = await conn.execute(
            "UPDATE sends SET state = 'unknown', settled_at = $2 "
            "WHERE state = 'pending' AND created_at < $1",
            before,
            time.time(),
        )
    return int(status.split()[-1])
