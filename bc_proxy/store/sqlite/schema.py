"""The SQLite schema and its versioned migrations (applied at open, or by `bc-proxy migrate`).

Owns table and index definitions and the upgrade of older files, including the first release's
(no `schema_version` table: version 0). Does not own queries: see the other modules.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable

from bc_proxy.errors import StoreError

# -- version 1: write-ahead sends, leases, event keys ----------------------------------------

_V1_TABLES = [
    """CREATE TABLE sends (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        legacy_id TEXT,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'rejected', 'unknown')),
        upstream_ref TEXT UNIQUE,
        connexus_id TEXT,
        created_at REAL NOT NULL,
        settled_at REAL
    )""",
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY,
        tenant TEXT,
        kind TEXT NOT NULL CHECK (kind IN ('in', 'status')),
        event_key TEXT UNIQUE,
        ref TEXT,
        send_id INTEGER,
        receipt_id TEXT NOT NULL,
        msisdn_from TEXT NOT NULL DEFAULT '',
        msisdn_to TEXT NOT NULL DEFAULT '',
        body TEXT NOT NULL DEFAULT '',
        rate_code TEXT NOT NULL DEFAULT '',
        in_reply_to TEXT NOT NULL DEFAULT '',
        status_code TEXT NOT NULL DEFAULT '',
        dlr_status INTEGER,
        error TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        pollable INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL,
        push_due REAL,
        push_attempts INTEGER NOT NULL DEFAULT 0,
        push_deadline REAL,
        push_error TEXT NOT NULL DEFAULT '',
        dead INTEGER NOT NULL DEFAULT 0,
        consumed INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE sweep_marks (
        tenant TEXT PRIMARY KEY,
        last_time TEXT NOT NULL,
        last_id TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE blocked (
        tenant TEXT NOT NULL,
        handset TEXT NOT NULL,
        since REAL NOT NULL,
        message_id TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (tenant, handset)
    ) WITHOUT ROWID""",
    """CREATE TABLE rejected_webhooks (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        reason TEXT NOT NULL,
        body BLOB NOT NULL
    )""",
]

_V1_INDEXES = [
    "CREATE INDEX sends_connexus ON sends (connexus_id) WHERE connexus_id IS NOT NULL",
    "CREATE INDEX sends_recipient ON sends (recipient, id)",
    "CREATE INDEX sends_idempotency ON sends (tenant, legacy_id, id) WHERE legacy_id IS NOT NULL",
    "CREATE INDEX sends_pending ON sends (created_at) WHERE state = 'pending'",
    "CREATE INDEX records_poll ON records (tenant, kind, id) WHERE pollable = 1",
    "CREATE INDEX records_push ON records (push_due, id) WHERE push_due IS NOT NULL",
    # Push order per send: is an earlier record of the same send still waiting for its push?
    "CREATE INDEX records_push_order ON records (send_id, kind, id) "
    "WHERE push_due IS NOT NULL AND send_id IS NOT NULL",
    "CREATE INDEX records_unmatched ON records (ref) WHERE tenant IS NULL AND ref IS NOT NULL",
    "CREATE INDEX records_orphans ON records (id) WHERE tenant IS NULL",
    "CREATE INDEX records_dead ON records (id) WHERE dead = 1",
    "CREATE INDEX records_consumed ON records (id) WHERE consumed = 1",
    "CREATE INDEX records_leased ON records (lease_owner) WHERE lease_owner IS NOT NULL",
]

# The first release's tables, renamed aside and copied into version 1.
_V0_COPY = [
    "ALTER TABLE sends RENAME TO sends_v0",
    "ALTER TABLE records RENAME TO records_v0",
    "DROP INDEX IF EXISTS sends_connexus",
    "DROP INDEX IF EXISTS sends_recipient",
    "DROP INDEX IF EXISTS records_poll",
    "DROP INDEX IF EXISTS records_unmatched",
    "DROP INDEX IF EXISTS records_push",
    "DROP INDEX IF EXISTS records_dead",
    *_V1_TABLES[:2],
    # Old sends were recorded once Connexus had accepted them. Several recipients could share
    # one upstream ref; it now names one row only, the first (a report by it named the first).
    """INSERT INTO sends (id, tenant, legacy_id, recipient, sender, state, upstream_ref,
            connexus_id, created_at, settled_at)
        SELECT id, tenant, NULLIF(legacy_id, ''), recipient, sender, 'accepted',
            CASE WHEN id IN (SELECT min(id) FROM sends_v0 WHERE upstream_ref IS NOT NULL
                             GROUP BY upstream_ref) THEN upstream_ref END,
            connexus_id, created_at, created_at
        FROM sends_v0""",
    """INSERT INTO records (id, tenant, kind, event_key, ref, receipt_id, msisdn_from,
            msisdn_to, body, rate_code, in_reply_to, status_code, dlr_status, error, created_at,
            pollable, push_due, push_attempts, push_deadline, push_error, dead, consumed)
        SELECT id, tenant, kind, dedupe_key, CASE WHEN tenant IS NULL THEN ref END, receipt_id,
            msisdn_from, msisdn_to, body, rate_code, in_reply_to, status_code, dlr_status, error,
            created_at, pollable, push_due, push_attempts, push_deadline, push_error, dead,
            tenant IS NOT NULL AND pollable = 0 AND push_due IS NULL AND dead = 0
        FROM records_v0""",
    "DROP TABLE sends_v0",
    "DROP TABLE records_v0",
    *_V1_TABLES[2:],
]


def _v1(conn: sqlite3.Connection) -> None:
    first_release = _has_table(conn, "records")
    for sql in _V0_COPY if first_release else _V1_TABLES:
        conn.execute(sql)
    for sql in _V1_INDEXES:
        conn.execute(sql)


# -- version 2: the latest send to a handset found without reading its older sends -----------
# `sends_recipient` (recipient, id) answered "the latest send to this handset in the reply
# window" by walking back through every send to the handset until one fell inside the window:
# with none inside, all of them (11 ms on the event loop per incoming SMS at 50,000 sends to
# one handset, linear). Keyed by time, the window is a range of the index.


def _v2(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX sends_recent ON sends (recipient, created_at)")
    conn.execute("DROP INDEX sends_recipient")


# -- version 3: a record a poll acknowledged is marked ---------------------------------------
# A tenant that pushes and keeps records for polling: a record acked by a poll while its push
# was still due kept that push (pollable off, push due). A configuration that then stopped the
# tenant's pushes made it pollable again, and the client got it a second time. The mark tells
# place_stranded and replay that its poll is done. A constant default: no table rewrite.


def _v3(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE records ADD COLUMN polled INTEGER NOT NULL DEFAULT 0")


# -- version 4: a pending row a repeat was answered from is marked ----------------------------
# A begin_send whose caller was cancelled after its commit leaves pending rows nobody sends;
# they are rejected (sends.reject_abandoned), except a row a legacy retry was already answered
# from, which expires with its ERR record. A constant default: no table rewrite.


def _v4(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE sends ADD COLUMN repeat_seen INTEGER NOT NULL DEFAULT 0")


# -- version 5: the state check without a temporary b-tree per row written -------------------
# `CHECK (state IN (...four values...))`: SQLite tests an IN list of more than two constants
# against a temporary b-tree of them, and inside a CHECK it builds that b-tree again for every
# row it checks, that is for every pending row inserted and every settle: about 60,000
# instructions per send (callgrind), a third of SQLite's share of it. The same values compared
# one by one need none. SQLite cannot alter a CHECK, so the table is rebuilt once (SQLite's own
# procedure, "Making Other Kinds Of Table Schema Changes"), from the file's own CREATE TABLE
# with only the check replaced: rows, ids and every column copied (an operator's own included),
# then the table's indexes and triggers (whatever the file has) created again. The rename runs
# with `legacy_alter_table` on, so that it leaves views alone: a view of `sends` (an operator's
# dashboard) names the rebuilt table as it named the old one. A file whose check is not the one
# version 1 wrote is left as it is.

_IN_CHECK = re.compile(
    r"CHECK\s*\(\s*state\s+IN\s*\(\s*'pending'\s*,\s*'accepted'\s*,\s*'rejected'\s*,"
    r"\s*'unknown'\s*\)\s*\)",
    re.IGNORECASE,
)
_OR_CHECK = (
    "CHECK (\n            state = 'pending' OR state = 'accepted' OR state = 'rejected' "
    "OR state = 'unknown'\n        )"
)
_SENDS_NAME = re.compile(r"^\s*CREATE\s+TABLE\s+(?:sends|\"sends\"|`sends`|\[sends\])", re.I)


def _v5(conn: sqlite3.Connection) -> None:
    (create,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'sends'"
    ).fetchone()
    if not _IN_CHECK.search(create) or not _SENDS_NAME.match(create):
        return
    rebuilt = _SENDS_NAME.sub("CREATE TABLE sends_v5", _IN_CHECK.sub(_OR_CHECK, create, 1), 1)
    names = [str(row[1]).replace('"', '""') for row in conn.execute("PRAGMA table_info(sends)")]
    columns = ", ".join(f'"{name}"' for name in names)
    attached = [  # (a trigger keeps the table's name as its CREATE wrote it: any case)
        sql
        for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') "
            "AND lower(tbl_name) = 'sends' AND sql IS NOT NULL ORDER BY rowid"
        )
    ]
    conn.execute(rebuilt)
    conn.execute(f"INSERT INTO sends_v5 ({columns}) SELECT {columns} FROM sends")
    conn.execute("DROP TABLE sends")
    legacy = conn.execute("PRAGMA legacy_alter_table").fetchone()[0]
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        conn.execute("ALTER TABLE sends_v5 RENAME TO sends")
    finally:
        conn.execute(f"PRAGMA legacy_alter_table = {int(legacy)}")
    for sql in attached:
        conn.execute(sql)


# [n-1]: version n-1 -> n
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4, _v5]
LATEST = len(MIGRATIONS)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def version(conn: sqlite3.Connection) -> int:
    """The schema version of an open database (0: empty, or the first release's tables)."""
    if not _has_table(conn, "schema_version"):
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Apply every pending migration in one transaction: (from, to) versions.

    Refuses a database written by a newer bc-proxy (StoreError naming both versions).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = version(conn)
        if current > LATEST:
            raise StoreError(
                f"database schema version {current} is newer than this bc-proxy knows "
                f"(version {LATEST}): upgrade bc-proxy, or use a matching database"
            )
        if current < LATEST:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            for n in range(current, LATEST):
                MIGRATIONS[n](conn)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (n + 1, time.time()),
                )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return current, LATEST
