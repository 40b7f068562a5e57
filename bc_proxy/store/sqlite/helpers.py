"""The SQLite engine's helper threads: the reader (counts, scans, migrations) and the
checkpointer (copies the WAL into the database file four times a second, PASSIVE, at a lower
CPU priority than the event loop); and the file lock that tells `migrate-store` a store is open.

Both threads use their own connections, so nothing here ever waits for a lock on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

CHECKPOINT_SECONDS = 0.25
# The checkpointer's nice value above the process's. Where the process has one core (a pinned
# container), a checkpoint at the same priority takes half of it for its whole run and every
# request waiting meanwhile pays for it (the 1-connection p99). At +10 (CFS weight 110 against
# the loop's 1,024) it yields to the loop yet still gets ~10% of a saturated core, more than
# it needs (~7% at full send load here): if it fell behind, SQLite's automatic checkpoint
# inside a commit would copy the backlog on the loop thread (~100 ms stalls, measured).
CHECKPOINT_NICE = 10


def connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def moved_marker(path: str) -> str:
    """`<file>.moved`, beside the database (as its lock): written by migrate-store once the
    file's content is in PostgreSQL, it makes a store refuse to open the file."""
    return f"{os.path.realpath(path)}.moved"


def moved_to(path: str) -> str | None:
    """Where migrate-store moved this file's content (the marker's text), or None."""
    if not path or ":memory:" in path:
        return None
    try:
        with open(moved_marker(path), encoding="utf-8") as f:
            return f.read().strip() or "PostgreSQL"
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"(unreadable marker: {exc.strerror})"


def moved_problem(path: str) -> str | None:
    """The one-line refusal for a moved file, or None: serve's and check-config's words."""
    where = moved_to(path)
    if where is None:
        return None
    return (
        f"{path} was moved to {where} by migrate-store: point store.url there (delete "
        f"{moved_marker(path)} to use this file again; a second gateway on it would deliver "
        "the moved records twice)"
    )


def in_use_lock(path: str, *, exclusive: bool) -> int | None:
    """An flock on `<path>.lock`, beside the database: shared by every store opened on the file
    (a gateway, a CLI command), exclusive for `migrate-store`, which must not copy a file that
    a running gateway still writes. Its fd, to close when done; None when it is not held (no
    such file and none can be made, ":memory:"). A second lock file, not the database's own:
    closing another descriptor of the database file would drop SQLite's POSIX locks on it.
    Raises BlockingIOError when held the other way; PermissionError when the exclusive lock
    cannot be told (a lock file this user cannot open)."""
    if not path or ":memory:" in path or (exclusive and not os.path.exists(path)):
        return None  # (no database to copy: the copy fails on its own, no lock file is left)
    # Beside the file itself, as SQLite's own -wal and -shm are: one lock whether a config
    # names the file or a symlink to it.
    lock = f"{os.path.realpath(path)}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        try:  # made by another user (a gateway's): flock needs no write access
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # a folder we cannot write: nobody can have made the file there either
        except OSError as exc:
            if exclusive:
                raise PermissionError(f"{lock}: {exc.strerror}") from None
            return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lower_priority(increment: int) -> bool:
    """Raise the calling thread's nice value (Linux: per thread); False where not possible."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (OSError, AttributeError):
        return False
    return True


def _checkpoint_connection(path: str) -> sqlite3.Connection:
    lower_priority(CHECKPOINT_NICE)  # runs on the checkpointer's own thread
    return connect(path)


class Reader:
    """One thread with its own read-only connection (WAL: reads run beside the writer)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bc-store-read")
        self._conn: sqlite3.Connection | None = None

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read, fn)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = connect(self.path)
            self._conn.execute("PRAGMA busy_timeout = 5000")  # a thread may wait; the loop not
            self._conn.execute("PRAGMA query_only = 1")
        return fn(self._conn)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the reader thread (a migration, on its own connection)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)


async def checkpoints(path: str, pool: ThreadPoolExecutor) -> None:
    """Copy most of the WAL into the database file every CHECKPOINT_SECONDS, off the event loop
    and below its priority, so the automatic checkpoint inside a commit finds little left to
    do (run as a task; cancel it)."""
    loop = asyncio.get_running_loop()
    conn = await loop.run_in_executor(pool, _checkpoint_connection, path)
    try:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            with contextlib.suppress(sqlite3.Error):
                await loop.run_in_executor(pool, conn.execute, "PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        await loop.run_in_executor(pool, conn.close)
