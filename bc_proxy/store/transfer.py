"""`bc-proxy migrate-store`: move a single-node SQLite install into a PostgreSQL store.

Owns the table-by-table copy (one consistent SQLite read, one PostgreSQL transaction, COPY in
batches), the mapping between the two schemas (claims and leases released), and the count
check that must hold before the transaction commits. The gateway must be stopped meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bc_proxy.errors import StoreError
from bc_proxy.store import sqlite_path
from bc_proxy.store.postgres import schema as pg_schema
from bc_proxy.store.postgres.db import DRIVER_ERRORS, store_error
from bc_proxy.store.postgres.store import pool_options
from bc_proxy.store.sqlite import schema as sqlite_schema
from bc_proxy.store.sqlite.helpers import in_use_lock, moved_marker, moved_problem

BATCH = 20_000
NOT_EMPTY = "the target store is not empty (--force empties it first)"
Row = tuple[Any, ...]

SENDS = (
    "id, tenant, legacy_id, recipient, sender, state, upstream_ref, connexus_id, created_at, "
    "settled_at, repeat_seen"
)
RECORD_COLUMNS = (
    "id, tenant, kind, event_key, ref, send_id, ambiguous, receipt_id, msisdn_from, msisdn_to, "
    "body, rate_code, in_reply_to, status_code, dlr_status, error, created_at, pollable, "
    "push_due, push_deadline, push_attempts, push_error, dead, polled"
)
# SQLite's `consumed` is PostgreSQL's "finished" (not pollable, no push due, not dead); an
# ambiguous report is kept there with no ref (never matched later), here with a flag.
RECORDS = (
    "id, tenant, kind, event_key, ref, send_id, "
    "(tenant IS NULL AND kind = 'status' AND ref IS NULL), receipt_id, msisdn_from, msisdn_to, "
    "body, rate_code, in_reply_to, status_code, dlr_status, error, created_at, "
    "(pollable = 1 AND consumed = 0), CASE WHEN consumed = 1 THEN NULL ELSE push_due END, "
    "push_deadline, push_attempts, push_error, dead = 1, polled = 1"
)


@dataclass(frozen=True)
class Table:
    """One table to move: what to read from SQLite, where it goes in PostgreSQL."""

    name: str
    select: str  # SQLite column expressions, in `columns` order
    columns: str  # PostgreSQL columns
    fix: Callable[[Row], Row] = field(default=lambda row: row)
    identity: bool = False  # its id sequence must continue past the moved ids


def _send_row(row: Row) -> Row:
    # A send of the first release may have no upstream ref; PostgreSQL needs one per row.
    ref = row[6] if row[6] is not None else f"migrated-{row[0]}"
    return (*row[:6], ref, *row[7:10], bool(row[10]))


def _record_row(row: Row) -> Row:
    return (
        *row[:6],
        bool(row[6]),
        *row[7:17],
        bool(row[17]),
        *row[18:22],
        bool(row[22]),
        bool(row[23]),
    )


TABLES = (
    Table("sends", SENDS, SENDS, _send_row, identity=True),  # repeat_seen: 0/1 -> bool
    Table("records", RECORDS, RECORD_COLUMNS, _record_row, identity=True),
    Table(
        "sweep_marks",
        "tenant, last_time, last_id, updated_at",
        "tenant, last_time, last_id, updated_at",
    ),
    Table("blocked", "tenant, handset, since, message_id", "tenant, handset, since, by_message"),
    Table(
        "rejected_webhooks",
        "id, received_at, reason, body",
        "id, received_at, reason, body",
        lambda row: (*row[:3], bytes(row[3])),
        identity=True,
    ),
)

# Per-table breakdowns checked on both sides after the copy (same meaning in both schemas).
CHECKS: dict[str, tuple[str, str]] = {
    "records pollable": ("pollable = 1 AND consumed = 0", "pollable"),
    "records push pending": ("push_due IS NOT NULL AND consumed = 0", "push_due IS NOT NULL"),
    "records dead letters": ("dead = 1", "dead"),
    "records unmatched": ("tenant IS NULL", "tenant IS NULL"),
    "sends pending": ("state = 'pending'", "state = 'pending'"),
    "sends accepted": ("state = 'accepted'", "state = 'accepted'"),
    "sends rejected": ("state = 'rejected'", "state = 'rejected'"),
    "sends unknown": ("state = 'unknown'", "state = 'unknown'"),
}


@dataclass
class Report:
    """Counts per table (and per check) on each side; `ok` when every pair is equal."""

    counts: list[tuple[str, int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(a == b for _, a, b in self.counts)

    def lines(self) -> Iterator[str]:
        width = max(len(name) for name, _, _ in self.counts)
        for name, source, target in self.counts:
            mark = "ok" if source == target else "MISMATCH"
            yield f"{name:<{width}}  {source:>9} -> {target:>9}  {mark}"


def lock_source(url: str) -> int | None:
    """The source file's in-use lock, exclusive: refused while a store is open on it."""
    if not url.startswith("sqlite:///"):
        raise StoreError("--from must be a sqlite:/// url")
    path = sqlite_path(url)
    try:
        return in_use_lock(path, exclusive=True)
    except BlockingIOError:
        raise StoreError(
            f"sqlite {path}: a bc-proxy has this store open; stop it first (records it stores "
            "or hands out during the copy would be left behind or handed out twice)"
        ) from None
    except PermissionError as exc:
        raise StoreError(
            f"sqlite {path}: cannot tell whether a bc-proxy has this store open ({exc}); run "
            "migrate-store as the user the gateway runs as"
        ) from None


def _open_source(url: str) -> sqlite3.Connection:
    path = sqlite_path(url)
    problem = moved_problem(path)
    if problem is not None:
        raise StoreError(f"sqlite {problem}")
    try:
        # As a URI, quoted: a `#`, `?` or `%` in the path must not cut or change it.
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute("BEGIN")  # one snapshot for every table (WAL readers do not block writers)
        found = sqlite_schema.version(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite {path}: {exc}") from exc
    if found != sqlite_schema.LATEST:
        conn.close()
        raise StoreError(
            f"sqlite {path}: schema version {found}, expected {sqlite_schema.LATEST}: "
            "run `bc-proxy migrate` with this bc-proxy on it first"
        )
    return conn


def _batches(source: sqlite3.Connection, table: Table, replaced: list[int]) -> Iterator[list[Row]]:
    """The table's rows, in id order, mapped for PostgreSQL. A NUL character, which SQLite
    keeps and PostgreSQL's text cannot hold (an SMS body from Connexus, say), becomes U+FFFD,
    and the row's id is added to `replaced`: one such row no longer stops the whole move."""
    cursor = source.execute(f"SELECT {table.select} FROM {table.name} ORDER BY 1")
    while rows := cursor.fetchmany(BATCH):
        out = []
        for r in rows:
            row = table.fix(tuple(r))
            if any(isinstance(v, str) and "\x00" in v for v in row):
                row = tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)
                replaced.append(row[0])
            out.append(row)
        yield out


async def _target_rows(conn: Any) -> bool:
    """Whether any table to fill already holds a row (a table not made yet holds none)."""
    present = await conn.fetchval(
        "SELECT array_agg(n) FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NOT NULL",
        [t.name for t in TABLES],
    )
    if not present:
        return False
    exists = " OR ".join(f"EXISTS (SELECT 1 FROM {name})" for name in present)
    return bool(await conn.fetchval(f"SELECT {exists}"))


async def transfer(
    source_url: str, target_url: str, *, force: bool = False, out: Callable[[str], None] = print
) -> Report:
    """Copy every table; raise StoreError before committing when a count differs."""
    started = time.monotonic()
    lock = lock_source(source_url)  # held to the end: no gateway starts on the file meanwhile
    try:
        return await _transfer(source_url, target_url, force, out, started)
    finally:
        if lock is not None:
            os.close(lock)


async def _transfer(
    source_url: str, target_url: str, force: bool, out: Callable[[str], None], started: float
) -> Report:
    source = _open_source(source_url)
    dsn, _ = pool_options(target_url)
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except DRIVER_ERRORS as exc:
        source.close()
        raise store_error(exc, "connect") from exc
    try:
        # Refused before its schema is touched: the upgrade of a live store takes its locks.
        if not force and await _target_rows(conn):
            raise StoreError(NOT_EMPTY)
        before, after = await pg_schema.migrate(conn)
        out(f"target schema version {before} -> {after}")
        report = Report()
        marker: str | None = None
        try:
            async with conn.transaction():
                if await _target_rows(conn):
                    if not force:
                        raise StoreError(NOT_EMPTY)
                    await conn.execute(f"TRUNCATE {', '.join(t.name for t in TABLES)}")
                    out("target emptied (--force)")
                for table in TABLES:
                    await _copy(source, conn, table, report, out)
                await _check(source, conn, report)
                if not report.ok:
                    for line in report.lines():
                        out(line)
                    raise StoreError("counts differ: nothing was committed")
                # Before the commit: a kill between the two leaves the file refused (delete
                # the marker to use it), never a moved file a gateway would start on again.
                marker = _mark_moved(sqlite_path(source_url), target_url, out)
        except BaseException:
            if marker is not None:  # the commit failed: the file was not moved
                with contextlib.suppress(OSError):
                    os.remove(marker)
            raise
        report.seconds = time.monotonic() - started
        return report
    except DRIVER_ERRORS as exc:
        raise store_error(exc, "migrate-store") from exc
    finally:
        source.close()
        await conn.close()


def _mark_moved(path: str, target_url: str, out: Callable[[str], None]) -> str | None:
    """The file says where it went (its marker's path, None if it could not be written): a
    gateway started on it again (an old unit left enabled) refuses it instead of delivering
    the moved records a second time."""
    parts = urlsplit(target_url)
    where = f"postgresql://{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
    try:
        with open(moved_marker(path), "w", encoding="utf-8") as f:
            f.write(f"{where} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    except OSError as exc:
        out(f"warning: could not mark {path} as moved ({exc.strerror}): start no gateway on it")
        return None
    out(f"{path} marked as moved ({moved_marker(path)}): a gateway started on it refuses it")
    return moved_marker(path)


async def _copy(
    source: sqlite3.Connection,
    conn: Any,
    table: Table,
    report: Report,
    out: Callable[[str], None],
) -> None:
    columns = [c.strip() for c in table.columns.split(",")]
    moved = 0
    replaced: list[int] = []
    for rows in _batches(source, table, replaced):
        await conn.copy_records_to_table(table.name, records=rows, columns=columns)
        moved += len(rows)
    if table.identity:
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
            f"coalesce((SELECT max(id) FROM {table.name}), 0) + 1, false)"
        )
    src = int(source.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0])
    dst = int(await conn.fetchval(f"SELECT count(*) FROM {table.name}"))
    report.counts.append((table.name, src, dst))
    out(f"{table.name}: {moved} rows copied")
    if replaced:
        shown = ", ".join(str(i) for i in replaced[:20]) + (", ..." if len(replaced) > 20 else "")
        out(
            f"{table.name}: {len(replaced)} rows held NUL characters, which PostgreSQL cannot "
            f"store; each became U+FFFD (ids {shown})"
        )


async def _check(source: sqlite3.Connection, conn: Any, report: Report) -> None:
    for name, (lite, pg) in CHECKS.items():
        table = name.split()[0]
        src = int(source.execute(f"SELECT count(*) FROM {table} WHERE {lite}").fetchone()[0])
        dst = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {pg}"))
        report.counts.append((name, src, dst))
    # Every claim is released in the copy: no lease may arrive held (0 expected on both sides).
    held = await conn.fetchval(
        "SELECT count(*) FROM records WHERE lease_owner IS NOT NULL OR push_owner IS NOT NULL"
    )
    report.counts.append(("records leases held", 0, int(held)))


def summary(report: Report) -> Sequence[str]:
    return [*report.lines(), f"moved and verified in {report.seconds:.1f} s"]
