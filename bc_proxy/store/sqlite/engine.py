"""The SQLite engine: one writer connection on the event loop, group commit, fsync, checkpoints.

Writes queued during one loop tick share one transaction (group.py: all at once, or each in a
savepoint when one fails) and are answered once the commit is in the OS, or fsynced with
`fsync`. A locked database is retried with backoff, never waited on. Counts and scans run on a
reader thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bc_proxy.errors import StoreError
from bc_proxy.store.sqlite import schema
from bc_proxy.store.sqlite.group import (
    BatchFn,
    Busy,
    Group,
    Op,
    Wakes,
    as_store_error,
    run,
)
from bc_proxy.store.sqlite.helpers import Reader, checkpoints, connect

T = TypeVar("T")
Abandoned = Callable[[Any, Any], None]  # (item, result) of a write its caller never got

log = logging.getLogger(__name__)
_UNSET: Any = object()  # Engine._answer: no result other than the answer

BUSY_GIVE_UP_SECONDS = 5.0  # a write waits this long for another process's lock, then fails
BUSY_FIRST_BACKOFF = 0.002
BUSY_MAX_BACKOFF = 0.05
AUTOCHECKPOINT_PAGES = 10_000  # see Engine._writer


class Engine:
    """The writer connection and its helpers; `on_wakes` is called once writes are durable."""

    def __init__(
        self,
        path: str,
        *,
        fsync: bool,
        on_wakes: Callable[[Wakes], None],
        on_rollback: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.memory = path == ":memory:" or path.startswith("file::memory:")
        self._fsync = fsync
        self._on_wakes = on_wakes
        self._on_rollback = on_rollback  # group.run: what a write learnt may be undone
        self.conn: sqlite3.Connection | None = None
        self._reader = Reader(path)
        self._helpers = ThreadPoolExecutor(1, thread_name_prefix="bc-store-sync")  # fsync
        # The checkpointer's own thread: its connection is closed on the thread that runs its
        # checkpoints, after the one in progress (on a shared pool a cancelled checkpointer's
        # close could run beside its last checkpoint, on one connection: a crash at shutdown).
        self._checkpoint_pool = ThreadPoolExecutor(1, thread_name_prefix="bc-store-ckpt")
        self._checkpointer: asyncio.Task[None] | None = None
        self._wal_fd: int | None = None
        self._group = Group()
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._busy_tries = 0
        self._last_group = 0
        self._unsynced: list[tuple[asyncio.Future[Any], Any]] = []
        self._unsynced_wakes: Wakes = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._droppable: set[BatchFn] = set()
        # Futures of items whose caller must be told apart from their result (write_batched's
        # `abandoned`): dropped once answered, or once dropped unwritten.
        self._abandon: dict[asyncio.Future[Any], tuple[Abandoned, Any]] = {}
        self.closed = False
        # The loop that opened the store; every write is queued from it. Kept because
        # asyncio.get_running_loop() makes a getpid system call on Python 3.11, three per send.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> tuple[int, int]:
        """Migrate (off the loop, where lock waits are harmless), then connect the writer."""
        try:
            if self.memory:
                conn = self._writer()
                migrated = schema.migrate(conn)
            else:
                migrated = await self._reader.call(self._migrate_once)
                conn = self._writer()
                conn.execute("SELECT count(*) FROM schema_version").fetchone()  # opens the WAL
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self.conn = conn
        self._loop = asyncio.get_running_loop()
        if not self.memory:
            if self._fsync:
                self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
            self._checkpointer = asyncio.get_running_loop().create_task(
                checkpoints(self.path, self._checkpoint_pool)
            )
        return migrated

    def _writer(self) -> sqlite3.Connection:
        conn = connect(self.path)
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit is in the OS before we answer (survives SIGKILL); with `fsync` the
        # WAL is fsynced too, once per group, before the answer (survives power loss).
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 0")  # never wait for a lock on the loop thread
        # The automatic checkpoint runs inside a commit, on the loop thread. At SQLite's default
        # (1,000 pages) a send's two commits (~4 pages each) crossed it several times a second
        # at one connection, and each crossing copied whatever the helper thread had not yet
        # copied: ~0.9 ms of loop CPU in 1% of commits. At 10,000 pages (a WAL of at most ~40 MB)
        # the helper's checkpoint usually completes in a gap between commits first, and the WAL
        # restarts from its beginning without an inline copy. Measured (docs/performance.md):
        # loop CPU per commit p99.9 1.46 -> 0.39 ms, commits over 1 ms of CPU 174 -> 17 in 40,000.
        conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
        return conn

    def _migrate_once(self) -> tuple[int, int]:
        conn = connect(self.path)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            return schema.migrate(conn)
        finally:
            conn.close()

    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations now: (from, to)."""
        if self.memory and self.conn is not None:
            return schema.migrate(self.conn)
        return await self._reader.call(self._migrate_once)

    async def close(self) -> None:
        """Commit what is queued, wait for its fsync, stop the helpers, close (idempotent)."""
        if self.closed:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while len(self._group) and self.conn is not None:
            self._flush()
            if len(self._group):  # busy: wait a little, as the retry would
                await asyncio.sleep(BUSY_MAX_BACKOFF)
        while self._sync_task is not None:
            await asyncio.shield(self._sync_task)
        self.closed = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        await self._reader.close()
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()
            self.conn = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self._helpers.shutdown(wait=True)
        self._checkpoint_pool.shutdown(wait=True)

    # -- reads ---------------------------------------------------------------------------------

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A short indexed read on the writer connection (WAL: it never waits for a lock)."""
        conn = self.conn
        if self.closed or conn is None:
            raise StoreError("store is closed")
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"read: {exc}") from exc

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A count or scan, on the reader connection in its own thread (WAL: concurrent)."""
        if self.closed or self.conn is None:
            raise StoreError("store is closed")
        if self.memory:
            return self.read_now(fn)
        try:
            return await self._reader.read(fn)
        except sqlite3.Error as exc:
            raise StoreError(f"read: {exc}") from exc

    # -- group commit --------------------------------------------------------------------------
    #
    # SQL runs on the loop thread: statements take microseconds, and one thread means no GIL
    # hand-offs and no stale reads (a claim sees an ack the moment it is made).

    async def write(self, op: Op[T]) -> T:
        """Run `op` in the next group commit; answered once the commit is durable."""
        result: T = await self.submit(op)
        return result

    def submit(self, op: Op[T]) -> asyncio.Future[T]:
        """Queue `op` for the next group commit without waiting: its future is answered once
        the commit is durable (for writes nobody awaits, such as a compensation)."""
        fut = self._future()
        self._group.ops.append((op, fut))
        self._schedule_flush()
        return fut

    async def write_batched(
        self,
        fn: BatchFn,
        item: Any,
        *,
        droppable: bool = False,
        abandoned: Abandoned | None = None,
    ) -> Any:
        """Queue `item` for `fn`, called once per group with every item queued for it.

        `droppable`: an item whose caller was cancelled before its group ran is not written
        (a write-ahead row nobody will act on); otherwise a queued item is written whatever
        happens to its caller. `abandoned(item, result)` is called for an item that was written
        but whose caller never acts on the result: cancelled while its commit waited for its
        fsync or between the answer and its next step, or told of a failed fsync after the
        commit (the rows are in the file all the same)."""
        fut = self._future()
        if droppable:
            self._droppable.add(fn)
        if abandoned is not None:
            self._abandon[fut] = (abandoned, item)
        self._group.batches.setdefault(fn, []).append((item, fut))
        self._schedule_flush()
        try:
            return await fut
        except asyncio.CancelledError:
            # Answered, then cancelled before this step ran: the result never reaches anyone.
            answered = fut.done() and not fut.cancelled() and fut.exception() is None
            if abandoned is not None and answered:
                _tell(abandoned, item, fut.result())
            raise

    def _future(self) -> asyncio.Future[Any]:
        loop = self._loop
        if self.closed or self.conn is None or loop is None:
            raise StoreError("store is closed")
        return loop.create_future()

    def _call_soon(self, callback: Callable[[], None]) -> asyncio.Handle:
        loop = self._loop
        if loop is None:  # (writes are queued only once open: _future)
            raise StoreError("store is not open")
        return loop.call_soon(callback)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            # Under load one more loop iteration lets I/O that is already readable join this
            # group (bigger groups for microseconds); a lone writer commits at once.
            step = self._flush_next_tick if self._last_group > 1 else self._flush
            self._flush_handle = self._call_soon(step)

    def _flush_next_tick(self) -> None:
        self._flush_handle = self._call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        group, self._group = self._group, Group()
        for fn in self._droppable.intersection(group.batches):
            kept = []
            for item, fut in group.batches[fn]:
                if fut.cancelled():  # never written: nothing to give up
                    self._abandon.pop(fut, None)
                else:
                    kept.append((item, fut))
            if kept:
                group.batches[fn] = kept
            else:
                del group.batches[fn]
        if not len(group):
            return
        if not group.since:
            group.since = time.monotonic()
        self._last_group = len(group)
        try:
            if self.conn is None:
                raise StoreError("store is not open")
            results, wakes = run(self.conn, group, self._on_rollback)
        except Busy:
            self._retry_busy(group)
            return
        except BaseException as exc:  # the commit itself failed: every write of it failed
            results, wakes = [as_store_error(exc)] * len(group), set()
        self._busy_tries = 0
        futures = group.futures()
        if self._wal_fd is None:
            for fut, result in zip(futures, results, strict=True):
                self._answer(fut, result)
            self._on_wakes(wakes)
            return
        self._unsynced.extend(zip(futures, results, strict=True))
        self._unsynced_wakes |= wakes
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    def _answer(self, fut: asyncio.Future[Any], result: Any, written: Any = _UNSET) -> None:
        """Answer a write's caller with `result`; tell `abandoned` of an item that was written
        (`written`: its result when `result` is the error of the fsync after its commit) but
        whose caller is gone or gets that error."""
        hook = self._abandon.pop(fut, None)
        if not fut.done():
            _resolve(fut, result)
            if not isinstance(result, BaseException):
                return
        if hook is None:
            return
        data = result if written is _UNSET else written
        if not isinstance(data, BaseException):
            _tell(hook[0], hook[1], data)

    def _retry_busy(self, group: Group) -> None:
        """Another connection holds the lock: try again soon, without blocking the loop."""
        group.merge(self._group)
        self._group = group
        if time.monotonic() - group.since > BUSY_GIVE_UP_SECONDS:
            self._group = Group()
            error = StoreError(f"database is locked (waited {BUSY_GIVE_UP_SECONDS:.0f} s)")
            for fut in group.futures():
                self._answer(fut, error)
            return
        delay = min(BUSY_FIRST_BACKOFF * 2**self._busy_tries, BUSY_MAX_BACKOFF)
        self._busy_tries += 1
        if not self.closed and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(delay, self._flush)

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
                        await loop.run_in_executor(self._helpers, os.fsync, fd)
                except OSError as exc:
                    error = StoreError(f"fsync: {exc}")
                for fut, result in group:
                    self._answer(fut, error or result, written=result)
                if error is None:
                    self._on_wakes(wakes)
        finally:
            self._sync_task = None


def _tell(abandoned: Abandoned, item: Any, result: Any) -> None:
    """Call an `abandoned` hook; its failure is logged, never raised into the commit path."""
    try:
        abandoned(item, result)
    except Exception:
        log.exception("abandoned-write hook failed")


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
