"""The SQLite engine's helper threads: the reader (counts, scans, migrations) and the
checkpointer (copies the WAL into the database file every second, PASSIVE).

Both use their own connections, so nothing here ever waits for a lock on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

CHECKPOINT_SECONDS = 1.0


def connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


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
    """Copy most of the WAL into the database file every second, off the event loop, so the
    automatic checkpoint inside a commit finds little left to do (run as a task; cancel it)."""
    loop = asyncio.get_running_loop()
    conn = await loop.run_in_executor(pool, connect, path)
    try:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            with contextlib.suppress(sqlite3.Error):
                await loop.run_in_executor(pool, conn.execute, "PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        await loop.run_in_executor(pool, conn.close)
