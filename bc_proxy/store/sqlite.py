"""Embedded SQLite backend (WAL) with group commit.

Every write is a small function; the writes queued during one event-loop tick run in one
transaction (a savepoint each, so one failure does not sink its neighbours) and are answered
once the commit is in the OS, which survives a killed process. With `store.fsync: true` they
are answered after one fsync of the WAL per group instead, which also survives power loss.
Claims of pollable records are held in memory: one process owns a SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from bc_proxy.errors import StoreError
from bc_proxy.store import (
    KINDS,
    Delivery,
    DlrEvent,
    IngestResult,
    Kind,
    LegacyRecord,
    MoEvent,
    Notifier,
    SendRecord,
    StatusRecord,
    WaitingStat,
)

T = TypeVar("T")
Wakes = set[tuple[str, str]]
Op = Callable[[sqlite3.Connection, Wakes], Any]

REPLY_WINDOW_SECONDS = 7 * 24 * 3600.0
PURGE_CHUNK = 2000
CHECKPOINT_SECONDS = 1.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    legacy_id TEXT,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    connexus_id TEXT,
    upstream_ref TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_connexus ON sends (connexus_id) WHERE connexus_id IS NOT NULL;
DROP INDEX IF EXISTS sends_ref;
CREATE INDEX IF NOT EXISTS sends_recipient ON sends (recipient, id);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    tenant TEXT,
    kind TEXT NOT NULL,
    dedupe_key TEXT UNIQUE,
    ref TEXT,
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
    push_due REAL,
    push_attempts INTEGER NOT NULL DEFAULT 0,
    push_deadline REAL,
    push_error TEXT NOT NULL DEFAULT '',
    dead INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_poll ON records (tenant, kind, id) WHERE pollable = 1;
CREATE INDEX IF NOT EXISTS records_unmatched ON records (ref) WHERE tenant IS NULL;
CREATE INDEX IF NOT EXISTS records_push ON records (push_due) WHERE push_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_dead ON records (id) WHERE dead = 1;
"""

_RECORD_COLUMNS = (
    "id, tenant, kind, receipt_id, msisdn_from, msisdn_to, body, rate_code, in_reply_to, "
    "status_code, dlr_status, error, created_at, push_attempts, push_error, push_deadline"
)

_INSERT_SEND = (
    "INSERT INTO sends (id, tenant, legacy_id, recipient, sender, connexus_id, upstream_ref, "
    "created_at) VALUES (?,?,?,?,?,?,?,?)"
)
_OWN_REF = re.compile(r"bc([0-9a-f]{1,15})x([0-9a-f]{6})")

_INSERT_RECORD = (
    "INSERT OR IGNORE INTO records (tenant, kind, dedupe_key, ref, receipt_id, msisdn_from, "
    "msisdn_to, body, rate_code, in_reply_to, status_code, dlr_status, error, created_at, "
    "pollable, push_due, push_deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _row_to_record(row: tuple[Any, ...]) -> LegacyRecord:
    return LegacyRecord(*row)


def receipt_id() -> str:
    """A unique legacy receipt id (32 hex chars, well under the 50 allowed)."""
    return uuid.uuid4().hex


class SQLiteStore:
    """The default store: one SQLite file in WAL mode, written with group commit."""

    def __init__(self, path: str, delivery: Mapping[str, Delivery], *, fsync: bool = False):
        self.path = path
        self.delivery = dict(delivery)
        self.notifier = Notifier()
        self._fsync = fsync
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="bc-store-fsync")
        self._checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix="bc-store-ckpt")
        self._checkpointer: asyncio.Task[None] | None = None
        self._conn: sqlite3.Connection | None = None
        self._wal_fd: int | None = None
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flush_handle: asyncio.Handle | None = None
        # Committed but not yet fsynced: (future, result, wakes), answered after the next fsync.
        self._unsynced: list[tuple[asyncio.Future[Any], Any]] = []
        self._unsynced_wakes: Wakes = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._send_rows: list[tuple[Any, ...]] = []
        self._send_batch: list[SendRecord] = []
        self._send_waiters: list[asyncio.Future[Any]] = []
        self._maybe_unmatched = True  # delivery reports may wait for their send
        self._last_group = 0  # writes in the previous commit group
        self._next_send_id = 1  # sends rows get their ids here: see upstream_ref()
        self._ref_tag = secrets.token_hex(3)  # tells this process's refs from a former one's
        self._claimed: dict[tuple[str, str], set[int]] = {}
        self._push_claimed: set[int] = set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL: a commit is in the OS before we answer (survives SIGKILL). With
            # `fsync`, the WAL is also fsynced, once per group, before the answer.
            conn.execute("PRAGMA synchronous = NORMAL")
            # A helper thread (below) copies the WAL into the database every second, so the
            # automatic checkpoint inside a commit finds little left to do. It stays on: only a
            # checkpoint on the writing connection can finish while writes keep coming, and
            # an unfinished one lets the WAL (and its mapped index) grow without bound.
            conn.executescript(SCHEMA)
            self._unpush_stranded(conn)
            self._next_send_id = int(
                conn.execute("SELECT coalesce(max(id), 0) + 1 FROM sends").fetchone()[0]
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._conn = conn
        if self.path != ":memory:":
            if self._fsync:
                self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
            self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoints())

    def _unpush_stranded(self, conn: sqlite3.Connection) -> None:
        """Records waiting for a push that this configuration no longer makes: poll them."""
        for tenant, d in self.delivery.items():
            for kind in KINDS:
                if d.pushes(kind):
                    continue
                for where in ("push_due IS NOT NULL", "dead=1"):
                    conn.execute(
                        "UPDATE records SET pollable=1, push_due=NULL, dead=0 "
                        f"WHERE {where} AND tenant=? AND kind=?",
                        (tenant, kind),
                    )

    async def _checkpoints(self) -> None:
        """Copy most of the WAL into the database file every second, off the event loop."""
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(self._checkpoint_thread, self._checkpoint_conn)
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_SECONDS)
                with contextlib.suppress(sqlite3.Error):
                    await loop.run_in_executor(
                        self._checkpoint_thread, conn.execute, "PRAGMA wal_checkpoint(PASSIVE)"
                    )
        finally:
            await loop.run_in_executor(self._checkpoint_thread, conn.close)

    def _checkpoint_conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    async def close(self) -> None:
        """Finish pending writes, then checkpoint and close (idempotent)."""
        if self._closed:
            return
        self.notifier.close()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        while self._sync_task is not None:
            await asyncio.shield(self._sync_task)
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        self._checkpoint_thread.shutdown(wait=True)
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self._syncer.shutdown(wait=True)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # -- group commit ------------------------------------------------------------------------
    #
    # SQL runs on the event-loop thread: the statements are microseconds, and one thread
    # means no GIL hand-offs and no stale reads (a claim sees an ack the moment it is made).
    # Writes queued during one loop tick share one transaction; the commit reaches the OS
    # before any of them is answered. The only slow part, fsync, runs on a helper thread
    # (when `fsync` is on), one fsync for every commit made since the previous one.

    async def _write(self, op: Op) -> Any:
        if self._closed or self._conn is None:
            raise StoreError("store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._schedule_flush()
        return await fut

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            # Under load, one more loop iteration lets I/O that is already readable join this
            # group (bigger groups for microseconds); a lone writer commits at once.
            step = self._flush_next_tick if self._last_group > 1 else self._flush
            self._flush_handle = asyncio.get_running_loop().call_soon(step)

    def _flush_next_tick(self) -> None:
        self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        ops, self._pending = self._pending, []
        send_rows, self._send_rows = self._send_rows, []
        sends, self._send_batch = self._send_batch, []
        send_waiters, self._send_waiters = self._send_waiters, []
        if not ops and not send_rows:
            return
        self._last_group = len(ops) + len(send_waiters)
        try:
            results, wakes = self._run_batch([op for op, _ in ops], send_rows, sends)
        except BaseException as exc:  # the commit itself failed: every write of it failed
            results, wakes = [_as_store_error(exc)] * len(ops), set()
            send_result: Any = _as_store_error(exc)
        else:
            send_result = None
        batch = [*ops, *((None, fut) for fut in send_waiters)]
        results = [*results, *([send_result] * len(send_waiters))]
        if self._wal_fd is None:
            for (_, fut), result in zip(batch, results, strict=True):
                _resolve(fut, result)
            self._notify_all(wakes)
            return
        self._unsynced.extend(
            (fut, result) for (_, fut), result in zip(batch, results, strict=True)
        )
        self._unsynced_wakes |= wakes
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._unsynced:
                group, self._unsynced = self._unsynced, []
                wakes, self._unsynced_wakes = self._unsynced_wakes, set()
                fd = self._wal_fd
                error: StoreError | None = None
                try:
                    if fd is not None:
                        await loop.run_in_executor(self._syncer, os.fsync, fd)
                except OSError as exc:
                    error = StoreError(f"fsync: {exc}")
                for fut, result in group:
                    _resolve(fut, error or result)
                self._notify_all(wakes)
        finally:
            self._sync_task = None

    def _notify_all(self, wakes: Wakes) -> None:
        for tenant, kind in wakes:
            self.notifier.notify(tenant, kind)

    def _run_batch(
        self, ops: list[Op], send_rows: list[tuple[Any, ...]], sends: Sequence[SendRecord]
    ) -> tuple[list[Any], Wakes]:
        conn = self._conn
        if conn is None:
            raise StoreError("store is not open")
        results: list[Any] = []
        wakes: Wakes = set()
        single = len(ops) == 1 and not send_rows
        conn.execute("BEGIN IMMEDIATE")
        try:
            if send_rows:
                conn.executemany(_INSERT_SEND, send_rows)
                self._match_early_reports(conn, wakes, sends, send_rows[0][-1])
            for op in ops:
                if single:
                    results.append(op(conn, wakes))
                    continue
                conn.execute("SAVEPOINT w")
                op_wakes: Wakes = set()
                try:
                    results.append(op(conn, op_wakes))
                    conn.execute("RELEASE w")
                    wakes |= op_wakes
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    results.append(_as_store_error(exc))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if single:
                return [_as_store_error(exc)], set()
            raise
        return results, wakes

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if self._closed or conn is None:
            raise StoreError("store is closed")
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"read: {exc}") from exc

    # -- placement of a new record ------------------------------------------------------------

    def _placement(
        self, tenant: str | None, kind: Kind, now: float
    ) -> tuple[int, float | None, float | None]:
        """(pollable, push_due, push_deadline) for a new record of this tenant and kind."""
        if tenant is None:
            return 0, None, None
        d = self.delivery.get(tenant, _POLL_ONLY)
        if d.pushes(kind):
            return int(d.pollable(kind)), now, now + d.max_age_seconds
        return 1, None, None

    def _wake(self, wakes: Wakes, tenant: str | None, kind: Kind) -> None:
        if tenant is not None:
            wakes.add((tenant, kind))

    # -- sends --------------------------------------------------------------------------------

    async def record_sends(
        self,
        sends: Sequence[SendRecord],
        statuses: Sequence[StatusRecord] = (),
        *,
        solo: bool = False,
    ) -> None:
        now = time.time()
        rows = self._send_rows_for(sends, now)
        if not statuses:
            # The hot path: every plain send of one loop tick goes in with one executemany.
            conn = self._conn
            if self._closed or conn is None:
                raise StoreError("store is closed")
            if solo and self._flush_handle is None and self._wal_fd is None:
                # No other send in flight, so no group to wait for: commit now, directly.
                self._commit_sends_now(conn, rows, sends)
                return
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._send_rows.extend(rows)
            self._send_batch.extend(sends)
            self._send_waiters.append(fut)
            self._schedule_flush()
            await fut
            return

        def op(conn: sqlite3.Connection, wakes: Wakes) -> None:
            conn.executemany(_INSERT_SEND, rows)
            for s in statuses:
                pollable, due, deadline = self._placement(s.tenant, "status", now)
                conn.execute(
                    _INSERT_RECORD,
                    (
                        s.tenant,
                        "status",
                        None,
                        None,
                        receipt_id(),
                        s.recipient,
                        s.sender,
                        "",
                        "",
                        s.legacy_id or "",
                        s.status_code,
                        None,
                        s.error,
                        now,
                        pollable,
                        due,
                        deadline,
                    ),
                )
                self._wake(wakes, s.tenant, "status")
            self._match_early_reports(conn, wakes, sends, now)

        await self._write(op)

    def _match_early_reports(
        self, conn: sqlite3.Connection, wakes: Wakes, sends: Sequence[SendRecord], now: float
    ) -> None:
        """Give delivery reports that arrived before their send to the send's tenant."""
        refs = {}
        for s in sends:
            if s.connexus_id:
                refs[s.connexus_id] = s
            if s.upstream_ref:
                refs.setdefault(s.upstream_ref, s)
        if not refs:
            return
        if not self._maybe_unmatched:
            return
        # One cheap probe first: the unmatched index is almost always empty.
        probe = "SELECT 1 FROM records WHERE tenant IS NULL AND kind='status' LIMIT 1"
        if conn.execute(probe).fetchone() is None:
            self._maybe_unmatched = False
            return
        for ref, s in refs.items():
            pollable, due, deadline = self._placement(s.tenant, "status", now)
            cur = conn.execute(
                "UPDATE records SET tenant=?, msisdn_from=?, msisdn_to=?, in_reply_to=?, "
                "pollable=?, push_due=?, push_deadline=? WHERE tenant IS NULL AND ref=? "
                "AND kind='status'",
                (s.tenant, s.recipient, s.sender, s.legacy_id or "", pollable, due, deadline, ref),
            )
            if cur.rowcount:
                self._wake(wakes, s.tenant, "status")

    # -- webhooks -----------------------------------------------------------------------------

    def _commit_sends_now(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], sends: Sequence[SendRecord]
    ) -> None:
        try:
            _, wakes = self._run_batch([], rows, sends)
        except sqlite3.Error as exc:
            raise _as_store_error(exc) from exc
        self._last_group = 1
        self._notify_all(wakes)

    def upstream_ref(self) -> str:
        """A new messageId to send upstream: `bc<hex row id>x<tag>`, 18 characters or so.

        It names the row the send's first recipient will get, so a report carrying it is
        found by primary key: no index on upstream_ref, one page less to write per commit.
        """
        rid = self._next_send_id
        self._next_send_id += 1
        return f"bc{rid:x}x{self._ref_tag}"

    def _send_rows_for(self, sends: Sequence[SendRecord], now: float) -> list[tuple[Any, ...]]:
        """Insert rows with explicit ids: a ref's own row id for its first recipient, new ids
        for the others (never SQLite's max+1, which could take an id a ref reserved)."""
        rows = []
        claimed: set[str] = set()
        for s in sends:
            rid = None
            ref = s.upstream_ref
            if ref and ref not in claimed:
                m = _OWN_REF.fullmatch(ref)
                if m and m.group(2) == self._ref_tag:
                    rid = int(m.group(1), 16)
                    claimed.add(ref)
            if rid is None:
                rid = self._next_send_id
                self._next_send_id += 1
            rows.append(
                (rid, s.tenant, s.legacy_id, s.recipient, s.sender, s.connexus_id, ref, now)
            )
        return rows

    @staticmethod
    def _find_send(conn: sqlite3.Connection, ref: str) -> tuple[str, str, str, str | None] | None:
        row = conn.execute(
            "SELECT tenant, recipient, sender, legacy_id FROM sends WHERE connexus_id=? "
            "ORDER BY id DESC LIMIT 1",
            (ref,),
        ).fetchone()
        if row is None:
            m = _OWN_REF.fullmatch(ref)
            if m is not None:
                row = conn.execute(
                    "SELECT tenant, recipient, sender, legacy_id FROM sends WHERE id=? "
                    "AND upstream_ref=?",
                    (int(m.group(1), 16), ref),
                ).fetchone()
        return cast("tuple[str, str, str, str | None] | None", row)

    async def add_dlr(self, event: DlrEvent) -> IngestResult:
        # The event's own identity: a retried webhook repeats all of it; reports for several
        # recipients of one bulk send that share our upstream ref differ in time or smscid.
        key = f"dlr:{event.message_id}:{event.status}:{event.event_key}"
        now = time.time()

        def op(conn: sqlite3.Connection, wakes: Wakes) -> IngestResult:
            send = self._find_send(conn, event.message_id)
            tenant, recipient, sender, legacy_id = send if send else (None, "", "", None)
            pollable, due, deadline = self._placement(tenant, "status", now)
            cur = conn.execute(
                _INSERT_RECORD,
                (
                    tenant,
                    "status",
                    key,
                    event.message_id,
                    receipt_id(),
                    recipient,
                    sender,
                    "",
                    "",
                    legacy_id or "",
                    "",
                    event.status,
                    event.status_text,
                    now,
                    pollable,
                    due,
                    deadline,
                ),
            )
            if cur.rowcount == 0:
                return IngestResult(stored=False, tenant=tenant)
            if tenant is None:
                self._maybe_unmatched = True
            self._wake(wakes, tenant, "status")
            return IngestResult(stored=True, tenant=tenant)

        return cast(IngestResult, await self._write(op))

    async def add_mo(self, event: MoEvent, *, fallback_tenant: str | None) -> IngestResult:
        key = f"mo:{event.message_id}"
        now = time.time()

        def op(conn: sqlite3.Connection, wakes: Wakes) -> IngestResult:
            if conn.execute("SELECT 1 FROM records WHERE dedupe_key=?", (key,)).fetchone():
                return IngestResult(stored=False, tenant=None)
            tenant, in_reply_to = self._route_mo(conn, event, now)
            tenant = tenant or fallback_tenant
            pollable, due, deadline = self._placement(tenant, "in", now)
            conn.execute(
                _INSERT_RECORD,
                (
                    tenant,
                    "in",
                    key,
                    event.message_id,
                    receipt_id(),
                    event.sender,
                    event.to,
                    event.body,
                    "",
                    in_reply_to,
                    "",
                    None,
                    "",
                    now,
                    pollable,
                    due,
                    deadline,
                ),
            )
            self._wake(wakes, tenant, "in")
            return IngestResult(stored=True, tenant=tenant)

        return cast(IngestResult, await self._write(op))

    def _route_mo(
        self, conn: sqlite3.Connection, event: MoEvent, now: float
    ) -> tuple[str | None, str]:
        """(tenant, inReplyToId) of an incoming message."""
        if event.related_id:
            send = self._find_send(conn, event.related_id)
            if send is not None and (event.owner is None or send[0] == event.owner):
                return send[0], send[3] or ""
        since = now - REPLY_WINDOW_SECONDS
        if event.owner is not None:
            row = conn.execute(
                "SELECT legacy_id FROM sends WHERE recipient=? AND tenant=? AND created_at>? "
                "ORDER BY id DESC LIMIT 1",
                (event.sender, event.owner, since),
            ).fetchone()
            return event.owner, (row[0] or "") if row else ""
        row = conn.execute(
            "SELECT tenant, legacy_id FROM sends WHERE recipient=? AND created_at>? "
            "ORDER BY id DESC LIMIT 1",
            (event.sender, since),
        ).fetchone()
        if row is None:
            return None, ""
        return row[0], row[1] or ""

    async def has_mo(self, message_ids: Sequence[str]) -> set[str]:
        keys = [f"mo:{m}" for m in message_ids]
        if not keys:
            return set()

        def fn(conn: sqlite3.Connection) -> set[str]:
            marks = ",".join("?" * len(keys))
            rows = conn.execute(
                f"SELECT dedupe_key FROM records WHERE dedupe_key IN ({marks})", keys
            ).fetchall()
            return {r[0][3:] for r in rows}

        return await self._read(fn)

    # -- polling ------------------------------------------------------------------------------

    async def claim(self, tenant: str, kind: Kind) -> LegacyRecord | None:
        claimed = self._claimed.setdefault((tenant, kind), set())
        while True:
            limit = len(claimed) + 1

            def fn(conn: sqlite3.Connection, limit: int = limit) -> list[tuple[Any, ...]]:
                return conn.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM records WHERE tenant=? AND kind=? "
                    "AND pollable=1 ORDER BY id LIMIT ?",
                    (tenant, kind, limit),
                ).fetchall()

            rows = await self._read(fn)
            for row in rows:
                if row[0] not in claimed:
                    claimed.add(row[0])
                    return _row_to_record(row)
            if len(rows) < limit:
                return None
            # Every row read is claimed by a poll still answering its client: look further.

    async def ack(self, record: LegacyRecord) -> None:
        def op(conn: sqlite3.Connection, wakes: Wakes) -> None:
            conn.execute("UPDATE records SET pollable=0 WHERE id=?", (record.id,))

        try:
            await self._write(op)
        finally:
            self._unclaim(record)

    def _unclaim(self, record: LegacyRecord) -> None:
        self._claimed.get((record.tenant, record.kind), set()).discard(record.id)

    def release(self, record: LegacyRecord) -> None:
        self._unclaim(record)
        # A poll waiting meanwhile skipped this record as claimed: let it look again.
        self.notifier.notify(record.tenant, record.kind)

    async def queue_depth(self, tenant: str) -> tuple[int, int]:
        def fn(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = dict(
                conn.execute(
                    "SELECT kind, count(*) FROM records WHERE tenant=? AND pollable=1 "
                    "GROUP BY kind",
                    (tenant,),
                ).fetchall()
            )
            return int(rows.get("in", 0)), int(rows.get("status", 0))

        return await self._read(fn)

    async def waiting(self) -> list[WaitingStat]:
        def fn(conn: sqlite3.Connection) -> list[WaitingStat]:
            # Two queries, each served by its partial index (a single OR scans the table).
            groups: dict[tuple[str, str], list[int]] = {}
            for sql in (
                "SELECT tenant, kind, count(*), min(id) FROM records WHERE pollable=1 "
                "GROUP BY tenant, kind",
                "SELECT tenant, kind, count(*), min(id) FROM records WHERE push_due IS NOT NULL "
                "AND pollable=0 AND tenant IS NOT NULL GROUP BY tenant, kind",
            ):
                for tenant, kind, n, first in conn.execute(sql):
                    g = groups.setdefault((tenant, kind), [0, first])
                    g[0] += n
                    g[1] = min(g[1], first)
            out = []
            for (tenant, kind), (n, first) in groups.items():
                if kind not in KINDS:
                    continue
                row = conn.execute("SELECT created_at FROM records WHERE id=?", (first,)).fetchone()
                out.append(WaitingStat(tenant, kind, n, row[0] if row else None))
            return out

        return await self._read(fn)

    # -- push ---------------------------------------------------------------------------------

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        skip = len(self._push_claimed)

        def fn(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE push_due IS NOT NULL "
                "AND push_due<=? ORDER BY push_due LIMIT ?",
                (now, limit + skip),
            ).fetchall()

        out: list[LegacyRecord] = []
        for row in await self._read(fn):
            if row[0] in self._push_claimed or len(out) >= limit:
                continue
            self._push_claimed.add(row[0])
            out.append(_row_to_record(row))
        return out

    async def push_done(self, record: LegacyRecord) -> None:
        def op(conn: sqlite3.Connection, wakes: Wakes) -> None:
            conn.execute(
                "UPDATE records SET push_due=NULL, push_attempts=push_attempts+1, push_error='' "
                "WHERE id=?",
                (record.id,),
            )

        try:
            await self._write(op)
        finally:
            self._push_claimed.discard(record.id)

    async def push_failed(self, record: LegacyRecord, *, next_at: float | None, error: str) -> None:
        def op(conn: sqlite3.Connection, wakes: Wakes) -> None:
            conn.execute(
                "UPDATE records SET push_due=?, push_attempts=push_attempts+1, push_error=?, "
                "dead=? WHERE id=?",
                (next_at, error[:200], int(next_at is None), record.id),
            )

        try:
            await self._write(op)
        finally:
            self._push_claimed.discard(record.id)

    async def dead_letters(self) -> list[LegacyRecord]:
        def fn(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE dead=1 ORDER BY id"
            ).fetchall()

        return [_row_to_record(r) for r in await self._read(fn)]

    async def replay(self, ids: Sequence[int] | None, now: float) -> int:
        def op(conn: sqlite3.Connection, wakes: Wakes) -> int:
            sql = "SELECT id, tenant FROM records WHERE dead=1"
            params: list[Any] = []
            if ids is not None:
                if not ids:
                    return 0
                sql += f" AND id IN ({','.join('?' * len(ids))})"
                params = list(ids)
            rows = conn.execute(sql, params).fetchall()
            for rid, tenant in rows:
                d = self.delivery.get(tenant, _POLL_ONLY)
                conn.execute(
                    "UPDATE records SET dead=0, push_due=?, push_deadline=?, push_attempts=0, "
                    "push_error='' WHERE id=?",
                    (now, now + d.max_age_seconds, rid),
                )
            return len(rows)

        return cast(int, await self._write(op))

    async def purge(self, before: float) -> int:
        """Delete in chunks, so a large purge never holds the event loop for long.

        Rows are written in id order, so everything older than `before` lies below one id:
        finding it reads only the old rows, and the deletes walk the id range, not the table.
        Unmatched rows (a report whose send never came) go too, once past the retention.
        """

        def bounds(conn: sqlite3.Connection) -> tuple[int, int]:
            out = []
            for table in ("records", "sends"):
                row = conn.execute(
                    f"SELECT id FROM {table} WHERE created_at>=? ORDER BY id LIMIT 1", (before,)
                ).fetchone()
                if row is None:
                    row = conn.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchone()
                out.append(int(row[0]))
            return out[0], out[1]

        records_below, sends_below = await self._read(bounds)

        def op(conn: sqlite3.Connection, wakes: Wakes) -> int:
            a = conn.execute(
                "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE id<? "
                "AND pollable=0 AND push_due IS NULL AND dead=0 LIMIT ?)",
                (records_below, PURGE_CHUNK),
            ).rowcount
            b = conn.execute(
                "DELETE FROM sends WHERE id IN (SELECT id FROM sends WHERE id<? LIMIT ?)",
                (sends_below, PURGE_CHUNK),
            ).rowcount
            return a + b

        total = 0
        while True:
            n = cast(int, await self._write(op))
            total += n
            if n == 0:
                return total
            await asyncio.sleep(0)

    async def dead_letter_count(self) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM records WHERE dead=1").fetchone()[0])

        return await self._read(fn)

    # -- helpers for tests and the CLI -----------------------------------------------------------

    async def count(self, table: str) -> int:
        """Rows in `sends` or `records` (diagnostics and tests)."""
        if table not in ("sends", "records"):
            raise ValueError(table)
        sql = f"SELECT count(*) FROM {table}"
        return cast(int, await self._read(lambda c: c.execute(sql).fetchone()[0]))


_POLL_ONLY = Delivery()


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _as_store_error(exc: BaseException) -> StoreError:
    return exc if isinstance(exc, StoreError) else StoreError(f"{type(exc).__name__}: {exc}")
