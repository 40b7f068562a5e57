"""SQLite: a begin_send whose caller was cancelled after its group committed, before the caller
got its plan, leaves no pending row that nobody sends.

Two windows: with `fsync`, the commit waits for its fsync while the caller can be cancelled;
in any mode, the answer can be set and the caller cancelled before its next step. Either way
the rows are rejected in a later group, so the legacy retry sends again instead of being
answered "pending" (204 by `unknown_retry_status`) for an SMS that never left, unless a retry
was already answered from the row: that row stays pending and expires with its ERR record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from bc_proxy.errors import StoreError
from bc_proxy.store import SendPlan
from bc_proxy.store.sqlite import SQLiteStore
from tests.test_store_contract import HANDSET, RULES, intent


def rows(db: str) -> list[tuple[str, int]]:
    """(state, repeat_seen) of every send row, oldest first, read beside the store."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT state, repeat_seen FROM sends ORDER BY id").fetchall()


async def committed_then_cancelled(db: str, task: asyncio.Future[SendPlan]) -> None:
    """Cancel `task` as soon as its group's rows are committed: each loop step is checked, so
    the cancel lands before the task's own next step (after its answer, or during its fsync)."""
    for _ in range(10_000):
        if rows(db):
            break
        await asyncio.sleep(0)
    assert rows(db), "the begin never committed"
    assert not task.done()
    task.cancel()


async def until_state(db: str, state: str) -> None:
    deadline = time.monotonic() + 5
    while rows(db)[0][0] != state:
        assert time.monotonic() < deadline, rows(db)
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fsync", [False, True], ids=["answered-then-cancelled", "during-fsync"])
async def test_rows_of_a_begin_cancelled_after_its_commit_are_rejected(
    tmp_path: Path, fsync: bool
) -> None:
    db = str(tmp_path / "s.db")
    store = SQLiteStore(db, RULES, fsync=fsync)
    await store.open()
    try:
        task = asyncio.ensure_future(store.begin_send(intent("L7"), time.time()))
        await committed_then_cancelled(db, task)
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_state(db, "rejected")
        retry = await store.begin_send(intent("L7"), time.time())
        assert retry.repeats == ()
        assert [p.recipient for p in retry.to_send] == [HANDSET]  # sent again, not lost
    finally:
        await store.close()
    assert rows(db) == [("rejected", 0), ("pending", 0)]


async def test_a_row_a_retry_was_answered_from_is_not_rejected(tmp_path: Path) -> None:
    """The retry is queued before the rejection: it is answered from the pending row, so the
    row is marked and stays pending (its expiry tells that client the outcome is unknown)."""
    db = str(tmp_path / "s.db")
    store = SQLiteStore(db, RULES)
    await store.open()
    try:
        task = asyncio.ensure_future(store.begin_send(intent("L8"), time.time()))
        await committed_then_cancelled(db, task)
        retry = asyncio.ensure_future(store.begin_send(intent("L8"), time.time()))
        with pytest.raises(asyncio.CancelledError):
            await task
        plan = await retry
        assert plan.to_send == ()
        assert plan.repeats == ((HANDSET, "pending"),)
        # A later group: any rejection queued for the cancelled begin has run by then.
        await store.begin_send(intent("OTHER", "6421000099"), time.time())
        await store.begin_send(intent("OTHER2", "6421000098"), time.time())
    finally:
        await store.close()
    assert rows(db)[0] == ("pending", 1)


async def test_a_row_a_call_of_the_same_group_was_answered_from_is_not_rejected(
    tmp_path: Path,
) -> None:
    """Two calls with one messageId in one group: the second is answered from the first's row
    before it is even inserted; that row is marked too."""
    db = str(tmp_path / "s.db")
    store = SQLiteStore(db, RULES)
    await store.open()
    try:
        first = asyncio.ensure_future(store.begin_send(intent("L6"), time.time()))
        second = asyncio.ensure_future(store.begin_send(intent("L6"), time.time()))
        await committed_then_cancelled(db, first)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await second).repeats == ((HANDSET, "pending"),)
        await store.begin_send(intent("OTHER", "6421000099"), time.time())
        await store.begin_send(intent("OTHER2", "6421000098"), time.time())
    finally:
        await store.close()
    assert rows(db)[0] == ("pending", 1)


async def test_rows_of_a_begin_whose_fsync_failed_are_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit is in the file, the fsync after it fails: the caller gets a store error (the
    client 500, nothing sent), and the rows are rejected, so its retry sends."""
    db = str(tmp_path / "s.db")
    store = SQLiteStore(db, RULES, fsync=True)
    await store.open()
    real = os.fsync
    failed: list[int] = []

    def fsync(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        with pytest.raises(StoreError, match="fsync"):
            await store.begin_send(intent("F1"), time.time())
        await until_state(db, "rejected")
        retry = await store.begin_send(intent("F1"), time.time())
        assert retry.repeats == ()
        assert [p.recipient for p in retry.to_send] == [HANDSET]
    finally:
        await store.close()


async def test_a_failed_rejection_is_tried_again(tmp_path: Path) -> None:
    """The rejection's own write fails (a trigger refuses it, standing for a full disk or an
    I/O error): it is tried again until it commits, not left to expiry."""
    db = str(tmp_path / "s.db")
    store = SQLiteStore(db, RULES)
    await store.open()
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as admin:
        admin.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF state ON sends "
            "WHEN NEW.state = 'rejected' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        try:
            task = asyncio.ensure_future(store.begin_send(intent("R1"), time.time()))
            await committed_then_cancelled(db, task)
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)  # the first attempt ran and failed
            assert rows(db)[0][0] == "pending"
            admin.execute("DROP TRIGGER refuse")
            await until_state(db, "rejected")  # the next attempt, 0.5 s after the first
        finally:
            await store.close()


async def test_a_row_answered_to_its_caller_is_left_alone(tmp_path: Path) -> None:
    """The usual case: a caller that got its plan owns its rows; nothing rejects them."""
    db = str(tmp_path / "s.db")
    store = SQLiteStore(db, RULES)
    await store.open()
    try:
        plan = await store.begin_send(intent("L9"), time.time())
        assert len(plan.to_send) == 1
        await store.begin_send(intent("OTHER", "6421000099"), time.time())
    finally:
        await store.close()
    assert rows(db)[0] == ("pending", 0)
