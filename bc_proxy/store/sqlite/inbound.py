"""Incoming events in SQLite: delivery reports, incoming SMS (with STOP/START), sweep marks,
blocked handsets and rejected webhooks.

Dedupe keys, routing, attribution, placement and opt-out detection are `Rules` decisions.
"""

from __future__ import annotations

import sqlite3

from bc_proxy.store import DlrEvent, IngestResult, MoEvent, RejectedWebhook, SweepMark
from bc_proxy.store.rules import Rules
from bc_proxy.store.sqlite.group import Wakes
from bc_proxy.store.sqlite.records import INSERT, row_values, wake
from bc_proxy.store.sqlite.sends import find_sends, latest_to

REJECTED_CAP = 10_000


def add_dlr(
    conn: sqlite3.Connection, wakes: Wakes, rules: Rules, event: DlrEvent, now: float
) -> IngestResult:
    """Store a report once per (message id, status), attributed to its one recipient.

    A report kept unmatched under the same key is the same event, unless `Rules.other_message`
    says it is another (this one names a send written after it was stored, or names no send
    yet and it is long past): that one gives up its key (and, naming no send, its ref: it is
    never matched) and stays, unmatched, beside this one."""
    key = rules.dlr_key(event.message_id, event.status)
    existing = conn.execute(
        "SELECT id, tenant, ref, created_at FROM records WHERE event_key = ?", (key,)
    ).fetchone()
    if existing is not None and (existing[1] is not None or existing[2] is None):
        return IngestResult("duplicate", existing[1])  # matched, or ambiguous
    facts = rules.attribute_dlr(find_sends(conn, event.message_id))
    if existing is not None:
        if not rules.other_message(facts, existing[3], now):
            return IngestResult("duplicate", None)
        keep_ref = facts is not None  # naming no send, the new one carries the ref on
        conn.execute(
            "UPDATE records SET event_key = NULL, ref = CASE WHEN ? THEN ref END WHERE id = ?",
            (keep_ref, existing[0]),
        )
    if facts is None or facts == "ambiguous":
        place = rules.placement(None, "status", now)
        ref = event.message_id if facts is None else None  # ambiguous: never matched later
        conn.execute(
            INSERT,
            row_values(
                tenant=None,
                kind="status",
                place=place,
                now=now,
                event_key=key,
                ref=ref,
                dlr_status=event.status,
                error=event.status_text,
            ),
        )
        return IngestResult("unmatched" if facts is None else "ambiguous", None)
    place = rules.placement(facts.tenant, "status", now)
    conn.execute(
        INSERT,
        row_values(
            tenant=facts.tenant,
            kind="status",
            place=place,
            now=now,
            send_id=facts.id,
            msisdn_from=facts.recipient,
            msisdn_to=facts.sender,
            in_reply_to=facts.legacy_id or "",
            event_key=key,
            dlr_status=event.status,
            error=event.status_text,
        ),
    )
    wake(wakes, facts.tenant, "status", place)
    return IngestResult("stored", facts.tenant)


def add_mo(
    conn: sqlite3.Connection,
    wakes: Wakes,
    rules: Rules,
    event: MoEvent,
    account: str | None,
    now: float,
) -> IngestResult:
    """Store an incoming SMS once per messageId, routed by `Rules.route_mo`."""
    key = rules.mo_key(event.message_id)
    existing = conn.execute("SELECT id, tenant FROM records WHERE event_key = ?", (key,)).fetchone()
    if existing is not None and existing[1] is not None:
        return IngestResult("duplicate", existing[1])
    related = None
    if event.related_id:
        candidates = find_sends(conn, event.related_id)
        related = max(candidates, key=lambda c: c.id) if candidates else None
    latest = latest_to(conn, event.sender, rules.owner(event.to), now)
    route = rules.route_mo(event.to, related=related, latest=latest, account=account)
    if existing is not None:  # stored unmatched: the same rule, with today's facts, may route it
        if route.tenant is None:
            return IngestResult("duplicate", None)
        place = rules.placement(route.tenant, "in", now)
        conn.execute(
            "UPDATE records SET tenant = ?, pollable = ?, push_due = ?, push_deadline = ? "
            "WHERE id = ?",
            (route.tenant, int(place.pollable), place.push_due, place.push_deadline, existing[0]),
        )
        wake(wakes, route.tenant, "in", place)
        _opt_out(conn, rules, route.tenant, event, now)
        return IngestResult("assigned", route.tenant)
    place = rules.placement(route.tenant, "in", now)
    conn.execute(
        INSERT,
        row_values(
            tenant=route.tenant,
            kind="in",
            place=place,
            now=now,
            event_key=key,
            send_id=route.send_id,
            msisdn_from=event.sender,
            msisdn_to=event.to,
            body=event.body,
            in_reply_to=route.in_reply_to,
        ),
    )
    wake(wakes, route.tenant, "in", place)
    _opt_out(conn, rules, route.tenant, event, now)
    return IngestResult("stored" if route.tenant is not None else "unmatched", route.tenant)


def _opt_out(
    conn: sqlite3.Connection, rules: Rules, tenant: str | None, event: MoEvent, now: float
) -> None:
    command = rules.opt_out_command(tenant, event.body)
    if command == "stop":
        conn.execute(
            "INSERT OR IGNORE INTO blocked (tenant, handset, since, message_id) VALUES (?,?,?,?)",
            (tenant, event.sender, now, event.message_id),
        )
    elif command == "start":
        conn.execute("DELETE FROM blocked WHERE tenant = ? AND handset = ?", (tenant, event.sender))


def blocked(conn: sqlite3.Connection, tenant: str) -> list[str]:
    rows = conn.execute(
        "SELECT handset FROM blocked WHERE tenant = ? ORDER BY handset", (tenant,)
    ).fetchall()
    return [r[0] for r in rows]


def reject_webhook(conn: sqlite3.Connection, body: bytes, reason: str, now: float) -> None:
    cur = conn.execute(
        "INSERT INTO rejected_webhooks (received_at, reason, body) VALUES (?, ?, ?)",
        (now, reason, body),
    )
    conn.execute(
        "DELETE FROM rejected_webhooks WHERE id <= ?", (int(cur.lastrowid or 0) - REJECTED_CAP,)
    )


def rejected_webhooks(conn: sqlite3.Connection, limit: int) -> list[RejectedWebhook]:
    rows = conn.execute(
        "SELECT id, received_at, reason, body FROM rejected_webhooks ORDER BY id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [RejectedWebhook(r[0], r[1], r[2], bytes(r[3])) for r in rows]


def sweep_mark(conn: sqlite3.Connection, tenant: str) -> SweepMark | None:
    row = conn.execute(
        "SELECT tenant, last_time, last_id, updated_at FROM sweep_marks WHERE tenant = ?",
        (tenant,),
    ).fetchone()
    return None if row is None else SweepMark(*row)


def set_sweep_mark(conn: sqlite3.Connection, mark: SweepMark) -> None:
    conn.execute(
        "INSERT INTO sweep_marks (tenant, last_time, last_id, updated_at) VALUES (?,?,?,?) "
        "ON CONFLICT (tenant) DO UPDATE SET last_time = excluded.last_time, "
        "last_id = excluded.last_id, updated_at = excluded.updated_at",
        (mark.tenant, mark.last_time, mark.last_id, mark.updated_at),
    )
