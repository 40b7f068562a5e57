"""Legacy records in SQLite: inserting a placed record, and the poll side (claim, ack, release).

Owns the `records` row <-> `LegacyRecord` mapping and poll leases. Placement comes from
`Rules.placement`; pushes are in `push.py`, counts and housekeeping in `upkeep.py`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

from bc_proxy.store import LegacyRecord
from bc_proxy.store.rules import Kind, Placement, Rules, receipt_id
from bc_proxy.store.sqlite.group import Wakes

COLUMNS = (
    "id, tenant, kind, receipt_id, msisdn_from, msisdn_to, body, rate_code, in_reply_to, "
    "status_code, dlr_status, error, created_at, push_attempts, push_error, push_deadline"
)

INSERT = (
    "INSERT INTO records (tenant, kind, event_key, ref, send_id, receipt_id, msisdn_from, "
    "msisdn_to, body, in_reply_to, status_code, dlr_status, error, created_at, pollable, "
    "push_due, push_deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def to_record(row: tuple[Any, ...]) -> LegacyRecord:
    return LegacyRecord(*row)


def row_values(
    *,
    tenant: str | None,
    kind: Kind,
    place: Placement,
    now: float,
    event_key: str | None = None,
    ref: str | None = None,
    send_id: int | None = None,
    msisdn_from: str = "",
    msisdn_to: str = "",
    body: str = "",
    in_reply_to: str = "",
    status_code: str = "",
    dlr_status: int | None = None,
    error: str = "",
) -> tuple[Any, ...]:
    """The values of `INSERT` for one new record."""
    return (
        tenant,
        kind,
        event_key,
        ref,
        send_id,
        receipt_id(),
        msisdn_from,
        msisdn_to,
        body,
        in_reply_to,
        status_code,
        dlr_status,
        error,
        now,
        int(place.pollable),
        place.push_due,
        place.push_deadline,
    )


def wake(wakes: Wakes, tenant: str | None, kind: str, place: Placement) -> None:
    """Remember to wake (tenant, kind) once the commit is durable, if the record is waiting."""
    if tenant is not None and (place.pollable or place.push_due is not None):
        wakes.add((tenant, kind))


def claim(
    conn: sqlite3.Connection, tenant: str, kind: Kind, owner: str, now: float, until: float
) -> LegacyRecord | None:
    row = conn.execute(
        f"UPDATE records SET lease_owner = ?, lease_until = ? WHERE id = ("
        "SELECT id FROM records WHERE tenant = ? AND kind = ? AND pollable = 1 "
        "AND (lease_owner IS NULL OR lease_until < ?) ORDER BY id LIMIT 1) "
        f"RETURNING {COLUMNS}",
        (owner, until, tenant, kind, now),
    ).fetchone()
    return None if row is None else replace(to_record(row), lease_end=until)


# The claim that returned the record still holds it: its owner and its lease end (a later claim
# by the same owner, after this lease expired, sets another; so does a push claim).
_HELD = "id = ? AND lease_owner = ? AND lease_until = ?"


def ack(conn: sqlite3.Connection, record: LegacyRecord, owner: str) -> bool:
    cur = conn.execute(
        "UPDATE records SET pollable = 0, polled = 1, lease_owner = NULL, lease_until = NULL, "
        f"consumed = (push_due IS NULL AND dead = 0) WHERE {_HELD} AND pollable = 1",
        (record.id, owner, record.lease_end),
    )
    return cur.rowcount > 0


# A record handed back by its poll whose tenant, since its claim, only pushes its kind (a
# reload; placing again skipped it while a poll held it): pushed now, as placing would have.
TO_PUSH = (
    "UPDATE records SET push_due = ?, push_deadline = ?, pollable = 0 WHERE id = ? "
    "AND pollable = 1 AND push_due IS NULL AND dead = 0 AND push_attempts = 0"
)


def release(
    conn: sqlite3.Connection,
    wakes: Wakes,
    rules: Rules,
    record: LegacyRecord,
    owner: str,
    now: float,
) -> bool:
    row = conn.execute(
        "UPDATE records SET lease_owner = NULL, lease_until = NULL "
        f"WHERE {_HELD} RETURNING tenant, kind",
        (record.id, owner, record.lease_end),
    ).fetchone()
    if row is None:
        return False
    place = rules.placement(row[0], row[1], now)
    if (
        place.push_only
        and conn.execute(TO_PUSH, (place.push_due, place.push_deadline, record.id)).rowcount
    ):
        wakes.add((row[0], row[1]))
    return True


def release_all(conn: sqlite3.Connection, owner: str) -> int:
    """Give back `owner`'s poll claims (close). A push's lease is kept: an attempt abandoned at
    shutdown may have reached its receiver, so its record comes back only once the lease
    expires, as after a crash. A poll and a push share a record's lease here: on a record
    still awaiting its push (and also kept for polling) it may be either, and is kept too."""
    cur = conn.execute(
        "UPDATE records SET lease_owner = NULL, lease_until = NULL "
        "WHERE lease_owner = ? AND pollable = 1 AND push_due IS NULL",
        (owner,),
    )
    return cur.rowcount
