"""Sends in SQLite: write-ahead `pending` rows (the hot path), settlement, and send facts.

Owns the `sends` table. Idempotency (`Rules.window`, `Rules.is_repeat`), refs (`new_ref`),
report attribution (`Rules.attribute_dlr`) and the state of a reported row whose outcome is
unknown (`settled_state`) are the rules' decisions; this module runs the SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from bc_proxy.store import (
    PlannedRecipient,
    SendIntent,
    SendPlan,
    SendState,
    Settlement,
    StatusRecord,
)
from bc_proxy.store.rules import (
    BLOCKED_ERROR,
    REPLY_WINDOW_SECONDS,
    Rules,
    SendFacts,
    new_ref,
    only_settled,
    settled_state,
)
from bc_proxy.store.sqlite.group import Wakes
from bc_proxy.store.sqlite.records import INSERT, row_values, wake
from bc_proxy.translate import UNKNOWN_OUTCOME

_FACTS = "id, tenant, recipient, sender, legacy_id"
_FACTS_AT = f"{_FACTS}, created_at"
_INSERT_SEND = (
    "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, created_at) "
    "VALUES (?, ?, ?, ?, 'pending', ?, ?)"
)
_CHUNK = 500  # bound parameters per IN list


def find_sends(conn: sqlite3.Connection, message_id: str) -> list[SendFacts]:
    """Send rows a Connexus id or one of our upstream refs names (with their creation time)."""
    # UNION ALL: UNION's temp b-tree cost a third of the look (one per delivery report).
    rows = conn.execute(
        f"SELECT {_FACTS_AT} FROM sends WHERE connexus_id = ? "
        f"UNION ALL SELECT {_FACTS_AT} FROM sends WHERE upstream_ref = ?",
        (message_id, message_id),
    ).fetchall()
    if len(rows) > 1:  # a row both ids name (Connexus echoing our ref as its id) came twice
        rows = list({r[0]: r for r in rows}.values())
    return [SendFacts(*r) for r in rows]


def latest_to(
    conn: sqlite3.Connection, handset: str, tenant: str | None, now: float
) -> SendFacts | None:
    """The latest send to `handset` within the reply window (of `tenant`, when given): by
    time, then id, a range of `sends_recent` however many older sends the handset has."""
    sql = f"SELECT {_FACTS} FROM sends WHERE recipient = ? AND created_at > ?"
    params: list[Any] = [handset, now - REPLY_WINDOW_SECONDS]
    if tenant is not None:
        sql += " AND tenant = ?"
        params.append(tenant)
    row = conn.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT 1", params).fetchone()
    return None if row is None else SendFacts(*row)


def _blocked(conn: sqlite3.Connection, tenant: str, handsets: Sequence[str]) -> set[str]:
    if (
        len(handsets) > 1
        and not conn.execute("SELECT 1 FROM blocked WHERE tenant = ? LIMIT 1", (tenant,)).fetchone()
    ):
        return set()
    out: set[str] = set()
    for i in range(0, len(handsets), _CHUNK):
        chunk = handsets[i : i + _CHUNK]
        out.update(
            r[0]
            for r in conn.execute(
                f"SELECT handset FROM blocked WHERE tenant = ? "
                f"AND handset IN ({','.join('?' * len(chunk))})",
                (tenant, *chunk),
            )
        )
    return out


def begin_sends(
    conn: sqlite3.Connection, wakes: Wakes, rules: Rules, items: list[tuple[SendIntent, float]]
) -> list[SendPlan]:
    """Plan every intent of one group (`Rules.plan`), then write all their pending rows in one
    executemany. Pending rows planned earlier in the group count as earlier sends."""
    send_rows: list[tuple[Any, ...]] = []
    # Pending rows not yet inserted, by key and recipient: their refs.
    in_group: dict[tuple[str, str], dict[str, str]] = {}
    plans: list[SendPlan] = []
    seen_ids: list[tuple[int]] = []  # pending rows a repeat was answered from (marked seen)
    seen_refs: list[tuple[str]] = []  # the same, among this group's own rows
    for intent, now in items:
        latest: dict[str, SendState] = {}
        row_of: dict[str, int] = {}
        grouped: dict[str, str] = {}
        if intent.legacy_id is not None:
            for row_id, recipient, state in conn.execute(
                "SELECT id, recipient, state FROM sends WHERE tenant = ? AND legacy_id = ? "
                "AND created_at > ? ORDER BY id",
                (intent.tenant, intent.legacy_id, now - rules.window(intent.tenant)),
            ):
                latest[recipient] = _state(state)
                row_of[recipient] = row_id
            grouped = in_group.get((intent.tenant, intent.legacy_id), {})
            latest.update(dict.fromkeys(grouped, "pending"))
        decided = rules.plan(
            intent.recipients, latest, _blocked(conn, intent.tenant, intent.recipients)
        )
        for recipient, state in decided.repeats:
            # Answered from an earlier call's pending row: that row must never be rejected as
            # abandoned (reject_abandoned), or the SMS this client was told of never leaves.
            if state == "pending" and recipient in latest:
                if recipient in grouped:
                    seen_refs.append((grouped[recipient],))
                else:
                    seen_ids.append((row_of[recipient],))
        if decided.blocked:  # each blocked handset gets the NUR record a refusal would give
            lid = intent.legacy_id
            nur = [
                StatusRecord(intent.tenant, h, intent.sender, lid, "NUR", BLOCKED_ERROR)
                for h in decided.blocked
            ]
            insert_statuses(conn, wakes, rules, nur, now)
        to_send = tuple(PlannedRecipient(r, new_ref()) for r in decided.to_send)
        for p in to_send:
            send_rows.append(
                (intent.tenant, intent.legacy_id, p.recipient, intent.sender, p.upstream_ref, now)
            )
            if intent.legacy_id is not None:
                in_group.setdefault((intent.tenant, intent.legacy_id), {})[p.recipient] = (
                    p.upstream_ref
                )
        plans.append(SendPlan(to_send, decided.repeats, decided.blocked))
    if send_rows:
        conn.executemany(_INSERT_SEND, send_rows)
    if seen_ids:
        conn.executemany("UPDATE sends SET repeat_seen = 1 WHERE id = ?", seen_ids)
    if seen_refs:
        conn.executemany("UPDATE sends SET repeat_seen = 1 WHERE upstream_ref = ?", seen_refs)
    return plans


def reject_abandoned(conn: sqlite3.Connection, refs: Sequence[str], now: float) -> int:
    """Reject the pending rows of a begin whose caller never got its plan (cancelled after
    the commit): nobody sends them, so a legacy retry must send again, not be answered from
    them, and expiry must not report an outcome unknown for an SMS that never left. A row a
    repeat was already answered from (`repeat_seen`) stays pending: it expires with its ERR
    record, so the client that was answered hears of it. Returns the rows rejected."""
    cur = conn.executemany(
        "UPDATE sends SET state = 'rejected', settled_at = ? "
        "WHERE upstream_ref = ? AND state = 'pending' AND repeat_seen = 0",
        [(now, ref) for ref in refs],
    )
    return cur.rowcount


def _state(state: str) -> SendState:
    if state == "accepted":
        return "accepted"
    if state == "unknown":
        return "unknown"
    if state == "rejected":
        return "rejected"
    return "pending"


def settle(
    conn: sqlite3.Connection,
    wakes: Wakes,
    rules: Rules,
    settlements: Sequence[Settlement],
    statuses: Sequence[StatusRecord],
    now: float,
    match_early: bool,
) -> None:
    """Settle pending rows, add the status records (`Rules.only_settled`: those of rows this
    call changes from `pending`), and match reports that came early. An unknown outcome of a
    row a delivery report names already is settled `accepted` (`settled_state`), without its
    ERR record: looked up for unknown outcomes only."""
    send_ids: dict[str, int] | None = None
    unknown = [s.upstream_ref for s in settlements if s.state == "unknown"]
    reported = reported_refs(conn, rules, unknown) if unknown else set()
    if reported:
        settlements = [
            replace(s, state=settled_state(s.state, s.upstream_ref in reported))
            for s in settlements
        ]
    if statuses:
        settling = {s.upstream_ref for s in settlements}
        named = [st.upstream_ref for st in statuses if st.upstream_ref in settling]
        send_ids = _still_pending(conn, named)
        statuses = only_settled(statuses, lambda st: st.upstream_ref, send_ids, reported)
    conn.executemany(
        "UPDATE sends SET state = ?, connexus_id = coalesce(?, connexus_id), "
        "sender = CASE WHEN sender = '' THEN ? ELSE sender END, settled_at = ? "
        "WHERE upstream_ref = ? AND state = 'pending'",
        [(s.state, s.connexus_id, s.sender, now, s.upstream_ref) for s in settlements],
    )
    insert_statuses(conn, wakes, rules, statuses, now, send_ids)
    if match_early:
        ids = {s.connexus_id for s in settlements if s.connexus_id}
        for cid in ids:
            match_unmatched(conn, wakes, rules, cid, now)


def reported_refs(conn: sqlite3.Connection, rules: Rules, refs: Collection[str]) -> set[str]:
    """Those of `refs` (upstream refs of `pending` rows) that a stored delivery report names:
    a report naming a pending row is attributed to it at once (its ref names that row only,
    and the row is committed before the ref goes upstream). One probe of the event key index
    per ref."""
    found: set[str] = set()
    for ref in refs:
        low, high = rules.dlr_key_range(ref)
        if conn.execute(
            "SELECT 1 FROM records WHERE event_key >= ? AND event_key < ? LIMIT 1", (low, high)
        ).fetchone():
            found.add(ref)
    return found


def _still_pending(conn: sqlite3.Connection, refs: Sequence[str]) -> dict[str, int]:
    """The send ids of the rows among `refs` that are still `pending`, by upstream ref."""
    found: dict[str, int] = {}
    for at in range(0, len(refs), _CHUNK):
        chunk = refs[at : at + _CHUNK]
        found.update(
            conn.execute(
                "SELECT upstream_ref, id FROM sends WHERE state = 'pending' AND upstream_ref IN "
                f"({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
        )
    return found


def insert_statuses(
    conn: sqlite3.Connection,
    wakes: Wakes,
    rules: Rules,
    statuses: Sequence[StatusRecord],
    now: float,
    send_ids: Mapping[str, int] | None = None,
) -> None:
    """Store status records bc-proxy made, placed by the rules; `send_ids` by upstream ref
    when the caller knows them (else looked up)."""
    rows = []
    for st in statuses:
        send_id = None
        if st.upstream_ref is not None:
            if send_ids is not None and st.upstream_ref in send_ids:
                send_id = send_ids[st.upstream_ref]
            else:
                row = conn.execute(
                    "SELECT id FROM sends WHERE upstream_ref = ?", (st.upstream_ref,)
                ).fetchone()
                send_id = None if row is None else int(row[0])
        place = rules.placement(st.tenant, "status", now)
        rows.append(
            row_values(
                tenant=st.tenant,
                kind="status",
                place=place,
                now=now,
                send_id=send_id,
                msisdn_from=st.recipient,
                msisdn_to=st.sender,
                in_reply_to=st.legacy_id or "",
                status_code=st.status_code,
                error=st.error,
            )
        )
        wake(wakes, st.tenant, "status", place)
    if rows:
        conn.executemany(INSERT, rows)


def match_unmatched(
    conn: sqlite3.Connection, wakes: Wakes, rules: Rules, message_id: str, now: float
) -> None:
    """Give unmatched reports naming `message_id` to the one recipient it now names, among the
    sends written before each report was stored (`Rules.attribute_dlr` with its time: an older
    report is about another message that had the same id, and stays unmatched); a report that
    turns out ambiguous loses its id, so it is never attributed later."""
    waiting = conn.execute(
        "SELECT id, created_at FROM records WHERE tenant IS NULL AND ref = ? AND kind = 'status'",
        (message_id,),
    ).fetchall()
    if not waiting:
        return
    sends = find_sends(conn, message_id)
    for rid, stored_at in waiting:
        facts = rules.attribute_dlr(sends, stored_at)
        if facts is None:
            continue
        if facts == "ambiguous":
            conn.execute("UPDATE records SET ref = NULL WHERE id = ?", (rid,))
            continue
        place = rules.placement(facts.tenant, "status", now)
        conn.execute(
            "UPDATE records SET tenant = ?, send_id = ?, msisdn_from = ?, msisdn_to = ?, "
            "in_reply_to = ?, pollable = ?, push_due = ?, push_deadline = ?, ref = NULL "
            "WHERE id = ?",
            (
                facts.tenant,
                facts.id,
                facts.recipient,
                facts.sender,
                facts.legacy_id or "",
                int(place.pollable),
                place.push_due,
                place.push_deadline,
                rid,
            ),
        )
        wake(wakes, facts.tenant, "status", place)


def expire_pending(
    conn: sqlite3.Connection, wakes: Wakes, rules: Rules, before: float, now: float, limit: int
) -> int:
    """Up to `limit` pending rows created before `before` become `unknown`, each with the
    status record a live send writes for an unknown outcome, in the caller's transaction; a
    row a delivery report names becomes `accepted` instead, with no record (`settled_state`)."""
    rows = conn.execute(
        "SELECT id, tenant, recipient, sender, legacy_id, upstream_ref FROM sends "
        "WHERE state = 'pending' AND created_at < ? ORDER BY created_at LIMIT ?",
        (before, limit),
    ).fetchall()
    reported = reported_refs(conn, rules, [r[5] for r in rows])
    conn.executemany(
        "UPDATE sends SET state = ?, settled_at = ? WHERE id = ? AND state = 'pending'",
        [(settled_state("unknown", r[5] in reported), now, r[0]) for r in rows],
    )
    statuses = [
        StatusRecord(tenant, recipient, sender, legacy_id, "ERR", UNKNOWN_OUTCOME, ref)
        for _, tenant, recipient, sender, legacy_id, ref in rows
        if ref not in reported
    ]
    insert_statuses(conn, wakes, rules, statuses, now, {r[5]: int(r[0]) for r in rows})
    return len(rows)
