"""Counts and housekeeping in SQLite: queue depth, waiting records, dead-letter count, purge.

The counts are run on the reader connection (off the event loop); purge deletes in chunks of
one short write each, so it never holds the loop or the write lock for long.
"""

from __future__ import annotations

import sqlite3

from bc_proxy.store import KINDS, WaitingStat
from bc_proxy.store.sqlite.group import Wakes

PURGE_CHUNK = 2000


def queue_depth(conn: sqlite3.Connection, tenant: str) -> tuple[int, int]:
    rows = dict(
        conn.execute(
            "SELECT kind, count(*) FROM records WHERE tenant = ? AND pollable = 1 GROUP BY kind",
            (tenant,),
        ).fetchall()
    )
    return int(rows.get("in", 0)), int(rows.get("status", 0))


def waiting(conn: sqlite3.Connection) -> list[WaitingStat]:
    """Pollable or push-pending records by tenant and kind, configured tenants or not."""
    groups: dict[tuple[str, str], list[int]] = {}
    # Two queries, each served by its partial index (a single OR scans the table); a record
    # both pollable and push-pending is counted once.
    for sql in (
        "SELECT tenant, kind, count(*), min(id) FROM records WHERE pollable = 1 "
        "AND tenant IS NOT NULL GROUP BY tenant, kind",
        "SELECT tenant, kind, count(*), min(id) FROM records WHERE push_due IS NOT NULL "
        "AND pollable = 0 AND tenant IS NOT NULL GROUP BY tenant, kind",
    ):
        for tenant, kind, n, first in conn.execute(sql):
            g = groups.setdefault((tenant, kind), [0, first])
            g[0] += n
            g[1] = min(g[1], first)
    out = []
    for (tenant, kind), (n, first) in sorted(groups.items()):
        if kind not in KINDS:
            continue
        row = conn.execute("SELECT created_at FROM records WHERE id = ?", (first,)).fetchone()
        out.append(WaitingStat(tenant, kind, n, row[0] if row else None))
    return out


def dead_letter_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM records WHERE dead = 1").fetchone()[0])


def purge_bounds(conn: sqlite3.Connection, before: float) -> tuple[int, int]:
    """The first record id and send id created at or after `before` (rows go in id order)."""
    out = []
    for table in ("records", "sends"):
        row = conn.execute(
            f"SELECT id FROM {table} WHERE created_at >= ? ORDER BY id LIMIT 1", (before,)
        ).fetchone()
        if row is None:
            row = conn.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchone()
        out.append(int(row[0]))
    return out[0], out[1]


def purge_chunk(
    conn: sqlite3.Connection, wakes: Wakes, records_below: int, sends_below: int
) -> int:
    """One chunk: consumed records (and unmatched ones past retention), settled sends."""
    a = conn.execute(
        "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE id < ? AND consumed = 1 "
        "LIMIT ?)",
        (records_below, PURGE_CHUNK),
    ).rowcount
    b = conn.execute(
        "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE id < ? "
        "AND tenant IS NULL LIMIT ?)",
        (records_below, PURGE_CHUNK),
    ).rowcount
    c = conn.execute(
        "DELETE FROM sends WHERE id IN (SELECT id FROM sends WHERE id < ? "
        "AND state != 'pending' LIMIT ?)",
        (sends_below, PURGE_CHUNK),
    ).rowcount
    return a + b + c
