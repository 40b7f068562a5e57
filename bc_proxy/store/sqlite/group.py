"""One group commit's transaction: every write queued in a loop tick, run at once; or, when one
of them fails, each in a savepoint of its own, so that it fails alone.

The engine (engine.py) queues the writes of one tick as a `Group` and runs it here, on the event
loop's thread, between BEGIN IMMEDIATE and COMMIT.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bc_proxy.errors import StoreError, StoreRefused

T = TypeVar("T")
Wakes = set[tuple[str, str]]
Op = Callable[[sqlite3.Connection, Wakes], T]
BatchFn = Callable[[sqlite3.Connection, Wakes, list[Any]], list[Any]]


class Busy(Exception):
    """The database is locked by another connection: retry the whole group later."""


def is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def as_store_error(exc: BaseException) -> StoreError:
    """StoreRefused where the data itself was refused (a constraint, a value SQLite or the
    driver cannot hold), else StoreError (read-only, disk full, I/O)."""
    if isinstance(exc, StoreError):
        return exc
    refused = (sqlite3.IntegrityError, sqlite3.DataError, TypeError, ValueError)
    kind = StoreRefused if isinstance(exc, refused) else StoreError
    return kind(f"{type(exc).__name__}: {exc}")


@dataclass
class Group:
    """The writes of one tick: single ops, and items of batch functions (one call per fn)."""

    ops: list[tuple[Op[Any], asyncio.Future[Any]]] = field(default_factory=list)
    batches: dict[BatchFn, list[tuple[Any, asyncio.Future[Any]]]] = field(default_factory=dict)
    since: float = 0.0  # monotonic time of the first attempt (busy retries give up after 5 s)

    def __len__(self) -> int:
        return len(self.ops) + sum(len(v) for v in self.batches.values())

    def futures(self) -> list[asyncio.Future[Any]]:
        return [f for _, f in self.ops] + [f for v in self.batches.values() for _, f in v]

    def merge(self, later: Group) -> None:
        self.ops.extend(later.ops)
        for fn, items in later.batches.items():
            self.batches.setdefault(fn, []).extend(items)


class _OneFailed(Exception):
    """A write of the group failed: the group runs again, each write in a savepoint."""


def _nothing() -> None:
    pass


def run(
    conn: sqlite3.Connection, group: Group, on_rollback: Callable[[], None] = _nothing
) -> tuple[list[Any], Wakes]:
    """One transaction for the group: (results in the order of `group.futures()`, wakes).

    The writes run at once, with no savepoint around each: two statements less per write (every
    settle, every webhook). Should one raise, the transaction is rolled back and the group runs
    again with a savepoint per op (or per batch function): that write fails alone, the others
    are stored, as they would have been at the first run. So a write may run twice, and one
    may run in a transaction that is then rolled back: what it keeps besides its statements
    must be told of the rollback (`on_rollback`, called after each; the store forgets what its
    writes learnt of the database, `SQLiteStore._maybe_unmatched`). A write may only add to
    `wakes`. Raises Busy where another connection holds the lock; any other exception is the
    commit's own failure."""
    if conn.in_transaction:  # a rollback that failed last time: start clean
        _rollback(conn, on_rollback)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            results, wakes = _at_once(conn, group)
        except _OneFailed:
            _rollback(conn, on_rollback)
            conn.execute("BEGIN IMMEDIATE")  # (the lock was let go: Busy retries the group)
            results, wakes = _each_alone(conn, group)
        conn.execute("COMMIT")
    except BaseException as exc:
        _rollback(conn, on_rollback)
        if is_busy(exc):
            raise Busy from exc
        raise
    # Batch results came first: put them back in submission order of `group.futures()`.
    n_batch = sum(len(v) for v in group.batches.values())
    return results[n_batch:] + results[:n_batch], wakes


def _rollback(conn: sqlite3.Connection, on_rollback: Callable[[], None]) -> None:
    """Roll back, where SQLite has not already (a full disk or an I/O error ends the
    transaction itself), and tell the caller."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    finally:
        on_rollback()


def _at_once(conn: sqlite3.Connection, group: Group) -> tuple[list[Any], Wakes]:
    results: list[Any] = []
    wakes: Wakes = set()
    try:
        for fn, items in group.batches.items():
            results.extend(fn(conn, wakes, [i for i, _ in items]))
        for op, _ in group.ops:
            results.append(op(conn, wakes))
    except Exception as exc:
        if is_busy(exc):
            raise
        raise _OneFailed from exc
    return results, wakes


def _each_alone(conn: sqlite3.Connection, group: Group) -> tuple[list[Any], Wakes]:
    results: list[Any] = []
    wakes: Wakes = set()
    for fn, items in group.batches.items():
        results.extend(_savepoint(conn, wakes, len(items), fn, [i for i, _ in items]))
    for op, _ in group.ops:
        results.extend(_savepoint(conn, wakes, 1, _single, [op]))
    return results, wakes


def _savepoint(
    conn: sqlite3.Connection, wakes: Wakes, n: int, fn: BatchFn, items: list[Any]
) -> list[Any]:
    conn.execute("SAVEPOINT w")
    mine: Wakes = set()
    try:
        out = fn(conn, mine, items)
        conn.execute("RELEASE w")
    except Exception as exc:
        if is_busy(exc) or not conn.in_transaction:  # (SQLite ended it: the group's error)
            raise
        conn.execute("ROLLBACK TO w")
        conn.execute("RELEASE w")
        return [as_store_error(exc)] * n
    wakes |= mine
    return out


def _single(conn: sqlite3.Connection, wakes: Wakes, ops: list[Any]) -> list[Any]:
    return [ops[0](conn, wakes)]
