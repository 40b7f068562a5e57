"""What only the SQLite backend promises: schema migrations (from the first release's file too),
a locked database never blocking the event loop, counts off the loop, one fsync per group.

The backend-neutral behaviour is in test_store_contract.py; this file may know SQLite.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bc_proxy.errors import StoreError, StoreRefused
from bc_proxy.store import (
    DlrEvent,
    MoEvent,
    SendIntent,
    Settlement,
    StatusRecord,
    open_store,
)
from bc_proxy.store.sqlite import SQLiteStore, engine, helpers, push, schema, sends, upkeep
from tests.push_backlog import push_backlog
from tests.test_store_contract import HANDSET, POLL, PUSH, RULES, SENDER

# The first release's schema (bc_proxy/store/sqlite.py before the versioned migrations).
FIRST_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, legacy_id TEXT, recipient TEXT NOT NULL,
    sender TEXT NOT NULL, connexus_id TEXT, upstream_ref TEXT, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_connexus ON sends (connexus_id) WHERE connexus_id IS NOT NULL;
DROP INDEX IF EXISTS sends_ref;
CREATE INDEX IF NOT EXISTS sends_recipient ON sends (recipient, id);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY, tenant TEXT, kind TEXT NOT NULL, dedupe_key TEXT UNIQUE, ref TEXT,
    receipt_id TEXT NOT NULL, msisdn_from TEXT NOT NULL DEFAULT '',
    msisdn_to TEXT NOT NULL DEFAULT '', body TEXT NOT NULL DEFAULT '',
    rate_code TEXT NOT NULL DEFAULT '', in_reply_to TEXT NOT NULL DEFAULT '',
    status_code TEXT NOT NULL DEFAULT '', dlr_status INTEGER, error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, pollable INTEGER NOT NULL DEFAULT 0, push_due REAL,
    push_attempts INTEGER NOT NULL DEFAULT 0, push_deadline REAL,
    push_error TEXT NOT NULL DEFAULT '', dead INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_poll ON records (tenant, kind, id) WHERE pollable = 1;
CREATE INDEX IF NOT EXISTS records_unmatched ON records (ref) WHERE tenant IS NULL;
CREATE INDEX IF NOT EXISTS records_push ON records (push_due) WHERE push_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_dead ON records (id) WHERE dead = 1;
"""


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "bc-proxy.db")


@pytest.fixture
async def store(db: str) -> AsyncIterator[SQLiteStore]:
    """An open SQLite store on a fresh file."""
    s = SQLiteStore(db, RULES)
    await s.open()
    yield s
    await s.close()


def schema_versions(path: str) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


# -- migrations -------------------------------------------------------------------------------


def schema_at(conn: sqlite3.Connection, version: int) -> None:
    """A file's schema as `version` left it (in the caller's transaction)."""
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for n in range(version):
        schema.MIGRATIONS[n](conn)
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (n + 1,))


async def test_fresh_file_gets_the_latest_schema(db: str) -> None:
    """A new file is created at the latest version, and migrate() then has nothing to do."""
    store = SQLiteStore(db, RULES)
    assert await store.migrate() == (0, schema.LATEST)
    assert await store.migrate() == (schema.LATEST, schema.LATEST)
    await store.open()
    try:
        assert schema_versions(db) == list(range(1, schema.LATEST + 1))
        assert await store.migrate() == (schema.LATEST, schema.LATEST)
    finally:
        await store.close()


def _first_release_file(path: str) -> None:
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.executescript(FIRST_RELEASE_SCHEMA)
        conn.executemany(
            "INSERT INTO sends VALUES (?,?,?,?,?,?,?,?)",
            [
                (1, POLL, "L1", HANDSET, SENDER, "cx-1", "bc1xabcdef", now),
                (2, POLL, "L1", "6421000002", SENDER, "cx-2", "bc1xabcdef", now),  # shared ref
                (3, POLL, "", "6421000003", SENDER, "cx-3", None, now),
            ],
        )
        rows: list[tuple[Any, ...]] = [
            # id, tenant, kind, dedupe_key, ref, receipt, from, to, body, in_reply_to,
            # dlr_status, error, pollable, push_due, push_deadline, dead
            (1, POLL, "in", "mo:m1", "m1", "r1", HANDSET, SENDER, "old", "", None, "", 1, None, 0),
            (2, POLL, "in", "mo:m2", "m2", "r2", HANDSET, SENDER, "done", "", None, "", 0, None, 0),
            (3, None, "status", "dlr:cx-9:1:x", "cx-9", "r3", "", "", "", "", 1, "", 0, None, 0),
            (4, PUSH, "status", "dlr:cx-4:1:x", "cx-4", "r4", "", "", "", "L4", 1, "", 0, now, 0),
            (5, PUSH, "status", "dlr:cx-5:1:x", "cx-5", "r5", "", "", "", "L5", 1, "", 0, None, 1),
        ]
        conn.executemany(
            "INSERT INTO records (id, tenant, kind, dedupe_key, ref, receipt_id, msisdn_from, "
            "msisdn_to, body, in_reply_to, dlr_status, error, pollable, push_due, dead, "
            "created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(*r, now) for r in rows],
        )


async def test_first_release_file_is_upgraded_keeping_its_rows(db: str) -> None:
    """A first-release file (no schema_version) opens, upgraded in place, with its rows."""
    _first_release_file(db)
    store = SQLiteStore(db, RULES)
    await store.open()
    try:
        assert schema_versions(db) == list(range(1, schema.LATEST + 1))
        rec = await store.claim(POLL, "in")
        assert rec is not None
        assert (rec.id, rec.body) == (1, "old")
        assert await store.ack(rec)
        assert await store.claim(POLL, "in") is None  # the consumed one stays consumed
        assert not (await store.add_mo(MoEvent("m1", HANDSET, SENDER, "x"), account=None)).stored
        assert (await store.add_dlr(DlrEvent("cx-2", 1, "DELIVRD"))).tenant == POLL
        assert (await store.add_dlr(DlrEvent("bc1xabcdef", 2, ""))).tenant == POLL
        plan = await store.begin_send(SendIntent(POLL, "L1", (HANDSET,), SENDER), time.time())
        assert plan.repeats == ((HANDSET, "accepted"),)  # old sends were accepted ones
        # The old unmatched report is matched when its Connexus id becomes known.
        new = await store.begin_send(SendIntent(POLL, "L9", ("6421000009",), SENDER), time.time())
        await store.settle_send([Settlement(new.to_send[0].upstream_ref, "accepted", "cx-9")])
        statuses = []
        while (r := await store.claim(POLL, "status")) is not None:
            statuses.append(r)
            await store.ack(r)
        assert [(r.msisdn_from, r.in_reply_to) for r in statuses] == [
            ("6421000009", "L9"),  # the early report, matched
            ("6421000002", "L1"),
            (HANDSET, "L1"),  # the shared ref names its first recipient
        ]
        assert [r.id for r in await store.claim_pushes(time.time(), 10)] == [4]
        assert [r.id for r in await store.dead_letters()] == [5]
    finally:
        await store.close()


async def test_newer_schema_is_refused(db: str) -> None:
    """A file written by a newer bc-proxy is refused with both versions named."""
    store = SQLiteStore(db, RULES)
    await store.open()
    await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (7, 0)")
    newer = SQLiteStore(db, RULES)
    with pytest.raises(StoreError, match=rf"version 7 is newer .*version {schema.LATEST}\)"):
        await newer.open()
    await newer.close()
    assert schema_versions(db) == [*range(1, schema.LATEST + 1), 7]  # untouched


def vm_steps(conn: sqlite3.Connection, work: Callable[[], object]) -> int:
    """SQLite VM steps (in units of 100) `work` takes on `conn`: its work, not its time."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 100)
    try:
        work()
    finally:
        conn.set_progress_handler(None, 0)
    return steps


def _latest_to_steps(conn: sqlite3.Connection, handset: str, now: float) -> int:
    """Steps of the latest-send lookups (any tenant, one tenant) finding nothing."""

    def lookups() -> None:
        assert sends.latest_to(conn, handset, None, now) is None
        assert sends.latest_to(conn, handset, POLL, now) is None

    return vm_steps(conn, lookups)


async def test_latest_send_lookup_does_not_read_a_handsets_older_sends(db: str) -> None:
    """An incoming SMS asks for the latest send to its handset inside the reply window. With
    none inside, the lookup must not walk back through the handset's older sends (on the
    event loop, per message): 20,000 older sends cost what 10 do."""
    store = SQLiteStore(db, RULES)
    await store.migrate()
    now = time.time()
    old = now - 30 * 86400
    with sqlite3.connect(db) as conn:
        for handset, n in (("6421000010", 10), ("6421020000", 20_000)):
            conn.executemany(
                "INSERT INTO sends (tenant, recipient, state, upstream_ref, created_at) "
                "VALUES (?, ?, 'accepted', ?, ?)",
                [(POLL, handset, f"u-{handset}-{i}", old + i) for i in range(n)],
            )
        few = _latest_to_steps(conn, "6421000010", now)
        many = _latest_to_steps(conn, "6421020000", now)
        assert many <= few + 2, (few, many)
        # Inside the window, the latest by time is found (then by id).
        conn.executemany(
            "INSERT INTO sends (tenant, recipient, state, upstream_ref, created_at) "
            "VALUES (?, '6421020000', 'accepted', ?, ?)",
            [(POLL, "in-window-b", now - 60), (POLL, "in-window-a", now - 120)],
        )
        latest = sends.latest_to(conn, "6421020000", POLL, now)
        assert latest is not None
        ref = conn.execute("SELECT upstream_ref FROM sends WHERE id = ?", (latest.id,))
        assert ref.fetchone() == ("in-window-b",)


def _push_claim_steps(db: Path) -> int:
    """Steps of one push claim on `db`, which must find nothing due."""
    with sqlite3.connect(db) as conn:
        now = time.time()
        claimed = vm_steps(conn, lambda: push.claim_pushes(conn, RULES, "me", now, now, now, 10))
        assert push.claim_pushes(conn, RULES, "me", now, now, now, 10) == []
    return claimed


async def test_a_push_claim_does_not_read_the_backlog_of_a_push_targets_outage(
    tmp_path: Path,
) -> None:
    """During a push target's outage, each send's first report waits for its retry and its
    second is held back behind it. A claim (run on the write thread for every new record)
    must read neither: a backlog of 2,000 sends costs what 10 do."""
    steps = []
    for n in (10, 2000):
        db = tmp_path / f"{n}.db"
        store = SQLiteStore(str(db), RULES)
        await store.open()
        await push_backlog(store, PUSH, n)
        await store.close()
        steps.append(_push_claim_steps(db))
    few, many = steps
    assert many <= few + 2, (few, many)


def _place_stranded_steps(db: Path) -> int:
    """Steps of one place_stranded on `db` (its schema read first)."""
    with sqlite3.connect(db) as conn:
        conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()
        return vm_steps(conn, lambda: push.place_stranded(conn, set(), RULES, time.time()))


async def test_placing_stranded_records_does_not_read_the_table(tmp_path: Path) -> None:
    """place_stranded runs at start and at every reload, on the write thread: it reads the
    records awaiting a push, the dead letters and push-only tenants' pollable records (each a
    partial index), not the table. 20,000 records waiting for a poll cost what 10 do."""
    steps = []
    for n in (10, 20_000):
        db = tmp_path / f"{n}.db"
        store = SQLiteStore(str(db), RULES)
        await store.open()
        await store.close()
        with sqlite3.connect(db) as conn:
            conn.executemany(
                "INSERT INTO records (tenant, kind, receipt_id, created_at, pollable) "
                "VALUES (?, 'in', ?, 0, 1)",
                [(POLL, f"r{i}") for i in range(n)],
            )
        steps.append(_place_stranded_steps(db))
    few, many = steps
    assert many <= few + 2, (few, many)


async def test_version_1_file_is_upgraded_to_the_time_keyed_handset_index(db: str) -> None:
    """A file at version 1 (handset index by id) is upgraded in place, its sends kept."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("BEGIN")
        schema_at(conn, 1)
        conn.execute(
            "INSERT INTO sends (tenant, recipient, state, upstream_ref, created_at) "
            "VALUES (?, ?, 'accepted', 'u1', ?)",
            (POLL, HANDSET, time.time()),
        )
        conn.execute("COMMIT")
    store = SQLiteStore(db, RULES)
    assert await store.migrate() == (1, schema.LATEST)
    with sqlite3.connect(db) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "sends_recent" in indexes
        assert "sends_recipient" not in indexes
        latest = sends.latest_to(conn, HANDSET, None, time.time())
        assert latest is not None
        assert latest.tenant == POLL


async def test_open_store_url_and_memory() -> None:
    """open_store builds the SQLite backend from a URL, in memory too."""
    store = open_store("sqlite:///:memory:", RULES)
    assert isinstance(store, SQLiteStore)
    await store.open()
    try:
        assert (await store.add_mo(MoEvent("m1", HANDSET, SENDER, "hi"), account=None)).stored
        assert await store.queue_depth(POLL) == (1, 0)
    finally:
        await store.close()


# -- never block the loop ---------------------------------------------------------------------


@pytest.fixture
def hold_lock(db: str) -> Iterator[Callable[[float], threading.Event]]:
    """Start a thread holding the database's write lock for `seconds` (another process)."""
    threads: list[threading.Thread] = []

    def start(seconds: float) -> threading.Event:
        locked = threading.Event()

        def hold() -> None:
            conn = sqlite3.connect(db, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
            conn.close()

        t = threading.Thread(target=hold)
        t.start()
        threads.append(t)
        return locked

    yield start
    for t in threads:
        t.join()


class Ticker:
    """Counts event-loop ticks of 10 ms while it runs: a blocked loop barely ticks."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    def stop(self) -> int:
        self._task.cancel()
        return self.ticks


async def test_locked_database_does_not_block_the_loop(
    store: SQLiteStore, hold_lock: Callable[[float], threading.Event]
) -> None:
    """While another connection holds the lock for 1 s the loop keeps ticking; the write then
    completes."""
    locked = hold_lock(1.0)
    await asyncio.to_thread(locked.wait)
    ticker = Ticker()
    start = time.monotonic()
    result = await store.add_mo(MoEvent("m1", HANDSET, SENDER, "hi"), account=None)
    elapsed = time.monotonic() - start
    ticks = ticker.stop()
    assert result.stored
    assert elapsed >= 0.5  # it did wait for the lock...
    assert ticks >= 0.5 * elapsed / 0.01  # ...without holding the loop
    assert await store.queue_depth(POLL) == (1, 0)


async def test_locked_database_fails_the_write_after_a_bound(
    store: SQLiteStore, hold_lock: Callable[[float], threading.Event], monkeypatch: Any
) -> None:
    """A lock held past the bound fails the write with StoreError; later writes succeed."""
    monkeypatch.setattr(engine, "BUSY_GIVE_UP_SECONDS", 0.2)
    locked = hold_lock(0.6)
    await asyncio.to_thread(locked.wait)
    with pytest.raises(StoreError, match="locked"):
        await store.add_mo(MoEvent("m1", HANDSET, SENDER, "hi"), account=None)
    await asyncio.sleep(0.6)
    assert (await store.add_mo(MoEvent("m1", HANDSET, SENDER, "hi"), account=None)).stored


@pytest.mark.parametrize("count", ["queue_depth", "waiting", "dead_letter_count"])
async def test_counts_run_off_the_loop(store: SQLiteStore, monkeypatch: Any, count: str) -> None:
    """A slow count does not hold the event loop: it runs on the reader thread."""
    real = getattr(upkeep, count)
    threads: list[int] = []

    def slow(*args: Any) -> Any:
        threads.append(threading.get_ident())
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(upkeep, count, slow)
    ticker = Ticker()
    await (store.queue_depth(POLL) if count == "queue_depth" else getattr(store, count)())
    assert ticker.stop() >= 10
    assert threads
    assert threading.get_ident() not in threads


async def test_fsync_once_per_group_off_the_loop(db: str, monkeypatch: Any) -> None:
    """With fsync on, a burst of writes is answered after few fsyncs, all off the loop."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = SQLiteStore(db, RULES, fsync=True)
    await store.open()
    try:
        events = [MoEvent(f"m{i}", HANDSET, SENDER, "hi") for i in range(200)]
        results = await asyncio.gather(*(store.add_mo(e, account=None) for e in events))
        assert all(r.stored for r in results)
        assert 1 <= len(calls) <= 10
        assert threading.get_ident() not in calls
    finally:
        await store.close()


def _nice(tid: int) -> int:
    """A thread's nice value, from /proc (field 19 of its stat line)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[16])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
async def test_checkpointer_runs_below_the_loop(db: str) -> None:
    """The checkpoint thread runs at a higher nice value than the event loop's thread, so a
    checkpoint on a one-core box does not take half the core from requests."""
    store = open_store(f"sqlite:///{db}", RULES)
    await store.open()
    try:
        loop_nice = _nice(threading.get_native_id())
        for i in range(200):
            await store.add_mo(
                MoEvent(f"m{i}", HANDSET, SENDER, "hi", "2026-01-01T00:00:00Z"), account=None
            )
        deadline = time.monotonic() + 5
        ckpt: list[threading.Thread] = []
        while not ckpt and time.monotonic() < deadline:
            ckpt = [t for t in threading.enumerate() if t.name.startswith("bc-store-ckpt")]
            await asyncio.sleep(0.05)
        assert ckpt, "no checkpoint thread"
        assert ckpt[0].native_id is not None
        assert _nice(ckpt[0].native_id) == min(19, loop_nice + upkeep_nice())
    finally:
        await store.close()


def upkeep_nice() -> int:
    return helpers.CHECKPOINT_NICE


async def test_a_refused_value_is_told_from_an_outage(tmp_path: Path) -> None:
    """A write whose data SQLite refuses (a constraint) is StoreRefused; one refused because
    the store cannot write at all (read-only) is a plain StoreError."""
    store = SQLiteStore(str(tmp_path / "bc.db"), RULES)
    await store.open()
    try:
        with pytest.raises(StoreRefused):
            await store._engine.write(lambda c, w: c.execute("INSERT INTO sends (id) VALUES (0)"))
        store._engine.conn.execute("PRAGMA query_only = ON")  # type: ignore[union-attr]
        with pytest.raises(StoreError) as read_only:
            await store.reject_webhook(b"{}", "test")
        assert not isinstance(read_only.value, StoreRefused)
    finally:
        store._engine.conn.execute("PRAGMA query_only = OFF")  # type: ignore[union-attr]
        await store.close()


async def test_version_4_file_is_rebuilt_keeping_its_sends_and_indexes(db: str) -> None:
    """Version 5 rebuilds `sends` for its state check: every row, id and column is kept (an
    operator's own column too), and so is every index and trigger the file had (an operator's
    own included, whatever the case of the table's name in it), and a view of the table still
    reads it; the check still refuses a state that is not one of the four."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("BEGIN")
        schema_at(conn, 4)
        conn.execute("ALTER TABLE sends ADD COLUMN operators_note TEXT")
        conn.execute("CREATE INDEX operators_own ON sends (operators_note, tenant)")
        conn.execute("CREATE VIEW operators_view AS SELECT tenant, state FROM sends")
        conn.execute("CREATE TABLE operators_log (send_id INTEGER)")
        conn.execute(  # (kept in sqlite_master under the name as written: SENDS)
            "CREATE TRIGGER operators_trigger AFTER UPDATE OF state ON SENDS "
            "BEGIN INSERT INTO operators_log VALUES (new.id); END"
        )
        conn.executemany(
            "INSERT INTO sends (id, tenant, legacy_id, recipient, sender, state, upstream_ref, "
            "connexus_id, created_at, settled_at, repeat_seen, operators_note) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (3, POLL, "L1", HANDSET, SENDER, "pending", "u3", None, 10.5, None, 1, "n3"),
                (7, POLL, None, "6421000002", "", "accepted", "u7", "cx-7", 11.0, 12.0, 0, None),
                (8, PUSH, "L2", HANDSET, SENDER, "rejected", None, None, 12.0, 12.5, 0, "n8"),
                (9, PUSH, "L3", HANDSET, SENDER, "unknown", "u9", None, 13.0, 14.0, 0, None),
            ],
        )
        conn.execute("COMMIT")
        before = conn.execute("SELECT * FROM sends ORDER BY id").fetchall()
        indexes = (
            "SELECT name, sql FROM sqlite_master WHERE lower(tbl_name) = 'sends' "
            "AND type != 'table'"
        )
        indexes_before = set(conn.execute(indexes))
    store = SQLiteStore(db, RULES)
    assert await store.migrate() == (4, schema.LATEST)
    with sqlite3.connect(db, isolation_level=None) as conn:
        (create,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'sends'").fetchone()
        assert "state = 'pending' OR state = 'accepted'" in create
        assert " IN (" not in create
        assert conn.execute("SELECT * FROM sends ORDER BY id").fetchall() == before
        assert set(conn.execute(indexes)) == indexes_before
        assert {"operators_own", "operators_trigger"} <= {name for name, _ in indexes_before}
        # An operator's view still reads the table, and their trigger still fires.
        assert conn.execute("SELECT count(*) FROM operators_view").fetchone() == (4,)
        conn.execute("UPDATE sends SET state = 'accepted' WHERE id = 3")
        assert conn.execute("SELECT send_id FROM operators_log").fetchall() == [(3,)]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE sends SET state = 'sent' WHERE id = 7")
        # The write-ahead row of a send is still found by its ref, its recipient and its key.
        assert [f.id for f in sends.find_sends(conn, "cx-7")] == [7]
        assert [f.id for f in sends.find_sends(conn, "u3")] == [3]


def test_a_kill_during_the_rebuild_leaves_the_version_4_file_whole(db: str) -> None:
    """Migration 5 rebuilds `sends` in one transaction: a process killed while it copies
    (its pages already spilling into the WAL) leaves the file at version 4 with every send and
    the old check; the next open migrates it."""
    n = 300_000
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        schema_at(conn, 4)
        conn.executemany(
            "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, "
            "created_at) VALUES (?, ?, ?, 'S', 'accepted', ?, 1.0)",
            ((POLL, f"L{i}", f"642{i % 50_000:07d}", f"bc{i:020d}") for i in range(n)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(db + "-wal")
    start = wal.stat().st_size if wal.exists() else 0
    code = (
        "import sqlite3, sys\n"
        "from bc_proxy.store.sqlite import helpers, schema\n"
        "conn = helpers.connect(sys.argv[1])\n"
        "conn.execute('PRAGMA journal_mode = WAL')\n"
        "schema.migrate(conn)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, db])
    try:
        deadline = time.monotonic() + 60
        while (wal.stat().st_size if wal.exists() else 0) <= start + 4_000_000:
            assert proc.poll() is None, "the migration ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.kill()  # mid-copy: several MB of the rebuild are in the WAL, uncommitted
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert schema.version(conn) == 4
        assert conn.execute("SELECT count(*) FROM sends").fetchone() == (n,)
        (create,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'sends'").fetchone()
        assert "state IN (" in create
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert schema.migrate(conn) == (4, schema.LATEST)
        assert conn.execute("SELECT count(*) FROM sends").fetchone() == (n,)


def test_a_send_writes_its_rows_without_a_temporary_btree(db: str) -> None:
    """No statement that writes a send's state (its pending rows, their settles, a status
    record, the rejection of an abandoned row, expiry) builds a temporary b-tree
    (`OpenEphemeral`). The state check did, per row written, until version
    5: an IN list of more than two constants in a CHECK is tested against a b-tree of them
    built every time."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        schema.migrate(conn)
        ran: list[str] = []
        conn.set_trace_callback(ran.append)
        now = time.time()
        handsets = tuple(f"642100000{n}" for n in range(1, 6))
        intent = SendIntent(POLL, "L1", handsets, SENDER)
        (plan,) = sends.begin_sends(conn, set(), RULES, [(intent, now)])
        a, b, c, d, _expired = (p.upstream_ref for p in plan.to_send)
        status = StatusRecord(POLL, handsets[2], SENDER, "L1", "NUR", "refused", c)
        outcomes = [
            Settlement(a, "accepted", "cx-1"),
            Settlement(b, "unknown"),
            Settlement(c, "rejected"),
        ]
        sends.settle(conn, set(), RULES, outcomes, [status], now, match_early=True)
        assert sends.reject_abandoned(conn, [d], now) == 1  # a begin nobody acted on
        assert sends.expire_pending(conn, set(), RULES, now + 1, now, 10) == 1  # the last
        conn.set_trace_callback(None)
        states = conn.execute("SELECT state FROM sends ORDER BY id").fetchall()
        assert [s for (s,) in states] == ["accepted", "unknown", "rejected", "rejected", "unknown"]
        writes = [sql for sql in ran if sql.lstrip().upper().startswith(("INSERT", "UPDATE"))]
        assert len(writes) >= 6, ran  # pending rows, settles, rejection, expiry, status records
        for sql in writes:
            plan_ops = [row[1] for row in conn.execute("EXPLAIN " + sql)]
            assert "OpenEphemeral" not in plan_ops, sql
    finally:
        conn.close()


def test_a_send_both_ids_name_is_found_once(db: str) -> None:
    """A report's id is looked up as a Connexus id and as our ref: a send whose Connexus id is
    its own ref (Connexus echoing our messageId) is one candidate, not two; sends named by
    either id are all found."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        schema.migrate(conn)
        insert = (
            "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, "
            "connexus_id, created_at) VALUES ('acme', ?, ?, 'S', 'accepted', ?, ?, 1.0)"
        )
        conn.execute(insert, ("L1", "6421000001", "bcsame", "bcsame"))
        conn.execute(insert, ("L2", "6421000002", "bcother", "c-2"))
        conn.execute(insert, ("L3", "6421000003", "c-2", "c-3"))  # a ref equal to another's id
        assert [f.legacy_id for f in sends.find_sends(conn, "bcsame")] == ["L1"]
        assert sorted(str(f.legacy_id) for f in sends.find_sends(conn, "c-2")) == ["L2", "L3"]
        assert sends.find_sends(conn, "nothing") == []
    finally:
        conn.close()


async def test_a_group_runs_its_writes_without_savepoints_until_one_fails(db: str) -> None:
    """The writes of one tick share one transaction with no savepoint each. When one fails,
    what it wrote is undone, it fails alone and the others are stored: the group ran again,
    each write in its own savepoint (so a write may run twice)."""
    eng = engine.Engine(db, fsync=False, on_wakes=lambda wakes: None)
    await eng.open()
    conn = eng.conn
    assert conn is not None
    statements: list[str] = []
    calls: dict[int, int] = {}

    def put(x: int, fail: bool = False) -> Callable[[sqlite3.Connection, Any], int]:
        def op(c: sqlite3.Connection, wakes: Any) -> int:
            calls[x] = calls.get(x, 0) + 1
            c.execute("INSERT INTO t VALUES (?)", (x,))
            if fail:
                raise ValueError("refused after it wrote")
            return x

        return op

    try:
        await eng.write(lambda c, w: c.execute("CREATE TABLE t (x INTEGER)"))
        conn.set_trace_callback(statements.append)
        assert await asyncio.gather(*(eng.write(put(x)) for x in range(3))) == [0, 1, 2]
        assert statements.count("BEGIN IMMEDIATE") == 1  # one group
        assert not [s for s in statements if "SAVEPOINT" in s]
        statements.clear()
        writes = (eng.write(put(10)), eng.write(put(11, fail=True)), eng.write(put(12)))
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert results[0] == 10
        assert isinstance(results[1], StoreRefused)
        assert results[2] == 12
        assert statements.count("SAVEPOINT w") == 3
        assert sorted(x for (x,) in conn.execute("SELECT x FROM t")) == [0, 1, 2, 10, 12]
        # 10 and 11 ran twice; 12 once: the first run stopped at 11.
        assert [calls[x] for x in (0, 10, 11, 12)] == [1, 2, 2, 1]
    finally:
        conn.set_trace_callback(None)
        await eng.close()


async def test_a_report_matched_in_a_rolled_back_run_is_matched_again(db: str) -> None:
    """A settle that matches an early report, in a group whose first run is rolled back (a
    neighbour failed), matches it again in the second run: what the first run's probe saw of
    waiting reports is forgotten with the rollback (review of the savepoint-free groups)."""
    store = SQLiteStore(db, RULES)
    await store.open()
    try:
        now = time.time()
        p1 = await store.begin_send(SendIntent(POLL, "L1", (HANDSET,), SENDER), now)
        p2 = await store.begin_send(SendIntent(POLL, "L2", (HANDSET + "1",), SENDER), now)
        early = await store.add_dlr(DlrEvent("CX1", 1, "DELIVRD"))  # before its settle
        assert early.outcome == "unmatched"

        def refused(c: sqlite3.Connection, w: Any) -> None:
            raise ValueError("refused")

        s1 = asyncio.ensure_future(
            store.settle_send([Settlement(p1.to_send[0].upstream_ref, "accepted", "CX1")])
        )
        s2 = asyncio.ensure_future(
            store.settle_send([Settlement(p2.to_send[0].upstream_ref, "accepted", "CX2")])
        )
        await asyncio.sleep(0)  # both settles queued: the failing write joins their group
        failing = store._engine.submit(refused)
        results = await asyncio.gather(s1, s2, failing, return_exceptions=True)
        assert list(results[:2]) == [None, None]
        assert isinstance(results[2], StoreRefused)
        assert await store.queue_depth(POLL) == (0, 1)  # (in, status): the report is there
    finally:
        await store.close()
