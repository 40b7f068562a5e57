"""Incoming SMS in PostgreSQL, stored a group at a time (group commit), and STOP/START.

Owns the SQL of add_mo: the facts `Rules.route_mo` needs for every message of the group in one
query (already stored? the send it relates to, the latest send to the handset), one insert
deduped by event key, the assignment of an unmatched message once its account is known, and
the blocked-list change of a STOP/START in the same transaction as the message.

Another replica may store the same message between this group's read and its insert (the
webhook, with no account, and the sweep or pull, with one): the insert then meets that row,
and gives it this route's tenant when it has none, as `_assign` does to one read as stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bc_proxy.store import IngestResult, MoEvent
from bc_proxy.store.postgres.db import NOTIFY, Conn, Db, Wakes, wake_payloads
from bc_proxy.store.postgres.matching import FACTS
from bc_proxy.store.postgres.records import INSERT_ARRAYS, NewRecord, columns, with_notify
from bc_proxy.store.rules import REPLY_WINDOW_SECONDS, Route, Rules, SendFacts


@dataclass(frozen=True, slots=True)
class MoWrite:
    """One add_mo call waiting for its group."""

    event: MoEvent
    account: str | None
    key: str
    now: float = field(default_factory=time.time)


_F = [c.strip() for c in FACTS.split(",")]
# Per message: the stored record with its key, the send it relates to (by Connexus id or our
# ref), the latest send to the handset inside the reply window (of the number's owner, when it
# has one: the only facts route_mo takes from it then), by time: one entry of `sends_recent`
# (migration 4), the only index that gives that order for one handset.
MO_FACTS = f"""
SELECT x.i, e.id AS e_id, e.tenant AS e_tenant,
    {", ".join(f"r.{c} AS r_{c}" for c in _F)},
    {", ".join(f"l.{c} AS l_{c}" for c in _F)}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[])
    WITH ORDINALITY AS x(key, related, handset, owner, since, i)
LEFT JOIN records AS e ON e.event_key = x.key
LEFT JOIN LATERAL (
    SELECT * FROM (
        SELECT {FACTS} FROM sends WHERE connexus_id = x.related
        UNION ALL SELECT {FACTS} FROM sends WHERE upstream_ref = x.related) AS y
    ORDER BY id DESC LIMIT 1) AS r ON true
LEFT JOIN LATERAL (
    SELECT {FACTS} FROM sends
    WHERE recipient = x.handset AND created_at > x.since
      AND (x.owner IS NULL OR tenant = x.owner)
    ORDER BY created_at DESC, id DESC LIMIT 1) AS l ON true
ORDER BY x.i
"""


# The insert. A key stored by another replica after this group's facts were read conflicts:
# ON CONFLICT DO UPDATE locks that row and sees its latest version, committed after this
# statement's snapshot or not (a read, even in the same statement, would not see it), and
# assigns it when it is unmatched and this route has a tenant: the placement columns `_assign`
# sets. No extra statement: only a conflicting key pays (its row lock). A row returned with
# another receipt id than the one sent for it is that assigned row, not a new one.
MO_INSERT = (
    f"{INSERT_ARRAYS} ON CONFLICT (event_key) DO UPDATE SET tenant = excluded.tenant, "
    "pollable = excluded.pollable, push_due = excluded.push_due, "
    "push_deadline = excluded.push_deadline "
    "WHERE records.tenant IS NULL AND excluded.tenant IS NOT NULL "
    "RETURNING event_key, receipt_id"
)
# The same and its wake-ups in one statement (as records.insert_keyed).
MO_INSERT_NOTIFY = with_notify(MO_INSERT, "ARRAY[event_key, receipt_id]")
_KEY, _RECEIPT = 2, 6  # positions of event_key and receipt_id in `NewRecord.values`


def _facts(row: Any, prefix: str) -> SendFacts | None:
    if row[f"{prefix}_id"] is None:
        return None
    return SendFacts(*(row[f"{prefix}_{c}"] for c in _F))


async def store_mos(db: Db, rules: Rules, writes: list[MoWrite]) -> list[IngestResult]:
    """Store a group of incoming messages (distinct keys). The facts are read first; a group
    that only inserts is then one statement (insert and NOTIFY, atomic by itself), and one
    with an assignment or a STOP/START runs its writes in one transaction. A message another
    replica stored meanwhile is assigned by the insert itself (module docstring); a route with
    a STOP/START is in a transaction already (`_needs_tx`), so the blocked-list change commits
    with the assignment."""
    wakes: Wakes = set()
    async with db.conn("add mo") as conn:
        rows = await conn.fetch(
            MO_FACTS,
            [w.key for w in writes],
            [w.event.related_id for w in writes],
            [w.event.sender for w in writes],
            [rules.owner(w.event.to) for w in writes],
            [w.now - REPLY_WINDOW_SECONDS for w in writes],
        )
        routes = [
            rules.route_mo(
                w.event.to, related=_facts(row, "r"), latest=_facts(row, "l"), account=w.account
            )
            for w, row in zip(writes, rows, strict=True)
        ]
        if any(_needs_tx(rules, w, row, r) for w, row, r in zip(writes, rows, routes, strict=True)):
            async with conn.transaction():
                results = await _write(conn, wakes, rules, writes, rows, routes, in_tx=True)
                if wakes:
                    await conn.fetchval(NOTIFY, wake_payloads(wakes))
        else:
            results = await _write(conn, wakes, rules, writes, rows, routes, in_tx=False)
    db.fire(wakes)
    return results


def _needs_tx(rules: Rules, w: MoWrite, row: Any, route: Route) -> bool:
    """An assignment of a stored unmatched message, or a STOP/START of a new one."""
    if row["e_id"] is not None:
        return row["e_tenant"] is None and route.tenant is not None
    return rules.opt_out_command(route.tenant, w.event.body) is not None


async def _write(
    conn: Conn,
    wakes: Wakes,
    rules: Rules,
    writes: list[MoWrite],
    rows: list[Any],
    routes: list[Route],
    *,
    in_tx: bool,
) -> list[IngestResult]:
    """The group's writes; outside a transaction (`in_tx` False) only the insert may write,
    carrying its NOTIFY. `wakes` gets what to wake locally after the commit."""
    results: list[IngestResult | None] = [None] * len(writes)
    new: list[tuple[int, NewRecord]] = []
    for n, (w, row, route) in enumerate(zip(writes, rows, routes, strict=True)):
        if row["e_id"] is not None:
            if row["e_tenant"] is not None or route.tenant is None:
                results[n] = IngestResult("duplicate", row["e_tenant"])
            else:
                results[n] = await _assign(conn, wakes, rules, w, row["e_id"], route.tenant)
            continue
        record = NewRecord(
            route.tenant,
            "in",
            event_key=w.key,
            ref=w.event.message_id,
            send_id=route.send_id,
            msisdn_from=w.event.sender,
            msisdn_to=w.event.to,
            body=w.event.body,
            in_reply_to=route.in_reply_to,
        )
        new.append((n, record))
    values = sorted((r.values(rules, writes[n].now) for n, r in new), key=lambda v: str(v[2]))
    notify = None
    if not in_tx:
        notify = {
            (r.tenant, "in")
            for n, r in new
            if r.tenant is not None and r.wakes(rules, writes[n].now)
        }
    stored = await _insert(conn, values, notify)
    for n, record in new:
        w, tenant = writes[n], record.tenant
        new_row = stored.get(w.key)
        if new_row is None:
            results[n] = IngestResult("duplicate", tenant)
            continue
        if tenant is None:
            results[n] = IngestResult("unmatched", None)
            continue
        # New here or assigned by the insert (stored unmatched by another replica meanwhile):
        # either way its STOP/START and its wake-up, as the sequential path's.
        await _opt_out(conn, rules, tenant, w)
        if record.wakes(rules, w.now):
            wakes.add((tenant, "in"))
        results[n] = IngestResult("stored" if new_row else "assigned", tenant)
    return [r for r in results if r is not None]


async def _insert(
    conn: Conn, values: list[tuple[Any, ...]], notify: Wakes | None
) -> dict[str, bool]:
    """Insert the rows (MO_INSERT); for each key written, True when its row is new here,
    False when it was another replica's unmatched row, assigned. Keys not written are
    duplicates. `notify`: wake-ups to NOTIFY in the same statement (outside a transaction)."""
    if not values:
        return {}
    if notify is None:
        rows = await conn.fetch(MO_INSERT, *columns(values))
        written = [(r["event_key"], r["receipt_id"]) for r in rows]
    else:
        written = await conn.fetchval(MO_INSERT_NOTIFY, *columns(values), wake_payloads(notify))
    sent = {v[_KEY]: v[_RECEIPT] for v in values}
    return {key: receipt == sent[key] for key, receipt in written}


async def _assign(
    conn: Conn, wakes: Wakes, rules: Rules, w: MoWrite, record_id: int, tenant: str
) -> IngestResult:
    """An unmatched incoming message whose account is now known goes to that tenant."""
    p = rules.placement(tenant, "in", w.now)
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
    await _opt_out(conn, rules, tenant, w)
    if p.waiting:
        wakes.add((tenant, "in"))
    return IngestResult("assigned", tenant)


async def _opt_out(conn: Conn, rules: Rules, tenant: str, w: MoWrite) -> None:
    """STOP blocks the handset for the tenant, START unblocks it (when the rules say so)."""
    command = rules.opt_out_command(tenant, w.event.body)
    if command == "stop":
        await conn.execute(
            "INSERT INTO blocked (tenant, handset, since, by_message) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (tenant, handset) DO NOTHING",
            tenant,
            w.event.sender,
            w.now,
            w.event.message_id,
        )
    elif command == "start":
        await conn.execute(
            "DELETE FROM blocked WHERE tenant = $1 AND handset = $2", tenant, w.event.sender
        )
