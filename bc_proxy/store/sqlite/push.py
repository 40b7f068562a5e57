"""The push queue in SQLite: lease due records in order per send, then done, retry or dead.

Owns the push columns of `records` (push_due, attempts, deadline, error, dead). Which tenants
push which kind comes from `Rules.push_tenants`; records of other tenants are never touched.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bc_proxy.store import LegacyRecord
from bc_proxy.store.rules import KINDS, Rules
from bc_proxy.store.sqlite.group import Wakes
from bc_proxy.store.sqlite.records import COLUMNS, to_record

_DUE = (
    "push_due IS NOT NULL AND push_due <= ? AND dead = 0 "
    "AND (lease_owner IS NULL OR lease_until < ?) AND (push_due, id) > (?, ?)"
)
# In order per send: the due time of the latest earlier record of the same send (same kind)
# still awaiting its push, NULL when there is none (the record may go). One probe of
# `records_push_order`, however long the send's queue: the records before that one are
# before it in the same way (a deferred record is examined again when its new time comes).
_BLOCKER = (
    "CASE WHEN r.send_id IS NULL THEN NULL ELSE (SELECT e.push_due FROM records e "
    "WHERE e.send_id = r.send_id AND e.kind = r.kind AND e.id < r.id "
    "AND e.push_due IS NOT NULL ORDER BY e.id DESC LIMIT 1) END"
)
# Passed over (no place in a page): a record behind an earlier one of its send due no later
# than itself, which it can neither go before nor be deferred behind (being pushed now, or
# leased by a replica that died). The first such record found ends the probe.
_MOVABLE = (
    "NOT EXISTS (SELECT 1 FROM records e WHERE e.send_id = r.send_id AND e.kind = r.kind "
    "AND e.id < r.id AND e.push_due IS NOT NULL AND e.push_due <= r.push_due)"
)
AHEAD_PAGE = 64  # records read at a time once a page met held-back ones (an outage's backlog)
MAX_READ = 4096  # records one claim leases or defers at most (the next starts at the top)
_CHUNK_PAIRS = 200  # (tenant, kind) pairs per statement (two bound parameters each)


def claim_pushes(
    conn: sqlite3.Connection,
    rules: Rules,
    owner: str,
    due_by: float,
    now: float,
    until: float,
    limit: int,
) -> list[LegacyRecord]:
    """Lease up to `limit` records due by `due_by` of tenants that push their kind, oldest
    due first (leases expire by the clock `now`, whatever `due_by` asks).

    A due record held back by an earlier record of its send that is due later (waiting for
    its retry) is given that record's due time: it cannot go before then, claims until then
    do not read it again (a push target's outage would otherwise make every claim walk its
    whole backlog), and from then on it sorts right behind that record. One held back by a
    record due no later (being pushed now, or leased by a replica that died) is passed over:
    it costs the claim a probe, not a place among the records a page reads."""
    scopes: list[str] = []
    scope_params: list[Any] = []
    for kind in KINDS:
        tenants = rules.push_tenants(kind)
        if tenants:
            scopes.append(f"(r.kind = ? AND r.tenant IN ({','.join('?' * len(tenants))}))")
            scope_params += [kind, *tenants]
    if not scopes or limit <= 0:
        return []
    sql = (
        f"SELECT {COLUMNS}, push_due, {_BLOCKER} FROM records r "
        f"WHERE {_DUE} AND ({' OR '.join(scopes)}) AND {_MOVABLE} ORDER BY push_due, id LIMIT ?"
    )
    claimed: list[tuple[Any, ...]] = []
    deferred: list[tuple[float, int]] = []
    after: tuple[float, int] = (float("-inf"), 0)
    page, read = limit, 0
    while read < MAX_READ:
        rows = conn.execute(sql, (due_by, now, *after, *scope_params, page)).fetchall()
        read += len(rows)
        for row in rows:
            if len(claimed) == limit:
                break
            blocker = row[-1]
            if blocker is None:
                claimed.append(row[:-2])
            else:
                deferred.append((blocker, row[0]))
        if len(claimed) == limit or len(rows) < page:
            break
        after = (rows[-1][-2], rows[-1][0])
        page = max(limit, AHEAD_PAGE)
    conn.executemany(
        "UPDATE records SET lease_owner = ?, lease_until = ? WHERE id = ?",
        [(owner, until, row[0]) for row in claimed],
    )
    conn.executemany("UPDATE records SET push_due = ? WHERE id = ?", deferred)
    return [replace(to_record(row), lease_end=until) for row in claimed]


def _wake_next(conn: sqlite3.Connection, wakes: Wakes, record_id: int) -> None:
    """A finished push may let the next record of the same send go: wake the push worker."""
    row = conn.execute(
        "SELECT r.tenant, r.kind FROM records r JOIN records e ON e.send_id = r.send_id "
        "AND e.kind = r.kind AND e.id > r.id WHERE r.id = ? AND e.push_due IS NOT NULL LIMIT 1",
        (record_id,),
    ).fetchone()
    if row is not None and row[0] is not None:
        wakes.add((row[0], row[1]))


# The claim still holds the record: its owner, and its lease end (a later claim of the same
# record by the same owner, after this lease expired or a reload placed it again, sets another).
_HELD = "id = ? AND lease_owner = ? AND lease_until = ? AND push_due IS NOT NULL"


# A success finishes the record whoever holds it now: one landing after its lease expired
# (the record claimed again, or polled and acked meanwhile) still means it was delivered. The
# lease is ended only where it is surely a push's (this claim's, or a record no poll can
# hold): a poll's on a record also kept for polling stays with that poll.
_DONE = (
    "UPDATE records SET push_due = NULL, push_attempts = push_attempts + 1, push_error = '', "
    "lease_owner = CASE WHEN lease_until = ? OR pollable = 0 THEN NULL ELSE lease_owner END, "
    "lease_until = CASE WHEN lease_until = ? OR pollable = 0 THEN NULL ELSE lease_until END, "
    "consumed = (pollable = 0) WHERE id = ? AND push_due IS NOT NULL"
)


# An attempt whose record another attempt's late success finished meanwhile: its own lease
# (this claim's, exactly) ends, or polls of a record also kept for polling would wait for it.
_END_OWN = (
    "UPDATE records SET lease_owner = NULL, lease_until = NULL "
    "WHERE id = ? AND lease_until = ? AND push_due IS NULL AND pollable = 1"
)


def push_done(conn: sqlite3.Connection, wakes: Wakes, record: LegacyRecord) -> bool:
    cur = conn.execute(_DONE, (record.lease_end, record.lease_end, record.id))
    if cur.rowcount:
        _wake_next(conn, wakes, record.id)
    elif conn.execute(_END_OWN, (record.id, record.lease_end)).rowcount:
        wakes.add((record.tenant, record.kind))
    return cur.rowcount > 0


def push_failed(
    conn: sqlite3.Connection,
    wakes: Wakes,
    record: LegacyRecord,
    owner: str,
    next_at: float | None,
    error: str,
) -> bool:
    cur = conn.execute(
        "UPDATE records SET push_due = ?, push_attempts = push_attempts + 1, push_error = ?, "
        f"dead = ?, lease_owner = NULL, lease_until = NULL WHERE {_HELD}",
        (next_at, error[:200], int(next_at is None), record.id, owner, record.lease_end),
    )
    if cur.rowcount and next_at is None:
        _wake_next(conn, wakes, record.id)
    elif not cur.rowcount and conn.execute(_END_OWN, (record.id, record.lease_end)).rowcount:
        wakes.add((record.tenant, record.kind))
    return cur.rowcount > 0


def dead_letters(conn: sqlite3.Connection, limit: int | None = None) -> list[LegacyRecord]:
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM records WHERE dead = 1 ORDER BY id LIMIT ?",
        (-1 if limit is None else limit,),  # -1: no limit
    ).fetchall()
    return [to_record(r) for r in rows]


def replay(
    conn: sqlite3.Connection, wakes: Wakes, rules: Rules, ids: Sequence[int] | None, now: float
) -> int:
    """Dead letters back to the push queue, fresh (or to polling, for a tenant that no longer
    pushes that kind)."""
    sql = "SELECT id, tenant, kind FROM records WHERE dead = 1"
    params: list[Any] = []
    if ids is not None:
        if not ids:
            return 0
        sql += f" AND id IN ({','.join('?' * len(ids))})"
        params = list(ids)
    rows = conn.execute(sql, params).fetchall()
    for rid, tenant, kind in rows:
        place = rules.placement(tenant, kind, now)
        unpushed = int(place.push_due is None)  # polled from now on, unless polled already
        conn.execute(
            "UPDATE records SET dead = 0, push_due = ?, push_deadline = ?, push_attempts = 0, "
            "push_error = '', pollable = max(pollable, ? * (1 - polled)), "
            "consumed = max(consumed, ? * polled) WHERE id = ?",
            (place.push_due, place.push_deadline, unpushed, unpushed, rid),
        )
        wakes.add((tenant, kind))
    return len(rows)


# Push to poll: the record is placed afresh (no attempts, no error). A push lease of a record
# that was not pollable ends (its push's outcome is then ignored: push_done / push_failed
# need a push still due); a pollable one's lease may be a poll's hand-over, and stays.
# A record a poll acknowledged already (`polled`) is finished instead.
_TO_POLL = (
    "UPDATE records SET pollable = 1 - polled, consumed = polled, push_due = NULL, dead = 0, "
    "push_attempts = 0, push_error = '', "
    "lease_owner = CASE WHEN pollable = 1 THEN lease_owner END, "
    "lease_until = CASE WHEN pollable = 1 THEN lease_until END "
    "WHERE {where} AND (tenant, kind) IN (VALUES {pairs}) RETURNING tenant, kind"
)


def place_stranded(conn: sqlite3.Connection, wakes: Wakes, rules: Rules, now: float) -> None:
    """Records of configured tenants placed by another configuration, placed again: waiting
    for a push this one no longer makes (or dead-lettered by it) become pollable; waiting for
    a poll (never pushed, not being handed over) where this one only pushes their kind are
    pushed instead. (Where it pushes and keeps records for polling, a poll still takes them:
    not stranded, and not read, however many a tenant keeps.) Each statement reads one
    partial index (records awaiting a push, dead letters, a tenant's pollable records) and
    the rows it names, never a scan of the table."""
    places = [(t, k, rules.placement(t, k, now)) for t in rules.tenants for k in KINDS]
    polling = [(t, k) for t, k, p in places if p.push_due is None]
    for at in range(0, len(polling), _CHUNK_PAIRS):
        chunk = polling[at : at + _CHUNK_PAIRS]
        pairs = ", ".join(["(?, ?)"] * len(chunk))
        args = [x for pair in chunk for x in pair]
        for where in ("push_due IS NOT NULL", "dead = 1"):
            sql = _TO_POLL.format(where=where, pairs=pairs)
            wakes.update((t, k) for t, k in conn.execute(sql, args).fetchall())
    for tenant, kind, place in places:
        if not place.push_only:
            continue
        cur = conn.execute(
            "UPDATE records SET push_due = ?, push_deadline = ?, pollable = 0 "
            "WHERE tenant = ? AND kind = ? AND pollable = 1 AND push_due IS NULL "
            "AND dead = 0 AND push_attempts = 0 "
            "AND (lease_owner IS NULL OR lease_until < ?)",
            (place.push_due, place.push_deadline, tenant, kind, now),
        )
        if cur.rowcount:
            wakes.add((tenant, kind))
