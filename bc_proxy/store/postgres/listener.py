"""The LISTEN side of wake-ups: one connection per process feeding the in-process waker.

Owns the dedicated connection listening on `bc_proxy_records` (payload `tenant:kind`, sent by
every committing transaction that makes a record pollable or push-due), its liveness check and
reconnection with backoff; once back it wakes every waiter, who re-check what they missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from bc_proxy.store.postgres.db import CHANNEL, DRIVER_ERRORS
from bc_proxy.store.waker import LocalWaker

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 10.0  # a silent (half-open) connection is found within about this
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0


class Listener:
    """Keeps one LISTEN connection up for the life of the store."""

    def __init__(self, dsn: str, waker: LocalWaker, *, timeout: float) -> None:
        self.dsn = dsn
        self.waker = waker
        self.timeout = timeout
        self.pid: int | None = None  # the listening backend's pid while connected
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None

    async def start(self) -> None:
        """Connect once (raising the driver's error when PostgreSQL is down), then supervise."""
        conn, lost = await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._run(conn, lost))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:  # the task may have been cancelled before it first ran
            conn.terminate()

    async def _connect(self) -> tuple[Any, asyncio.Event]:
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self.pid = conn.get_server_pid()
        self._conn = conn
        self.connected.set()
        return conn, lost

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        tenant, sep, kind = payload.rpartition(":")
        if sep:
            self.waker.notify(tenant, kind)

    async def _run(self, conn: Any, lost: asyncio.Event) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._watch(conn, lost)
            finally:
                self.connected.clear()
                self.pid = None
                self._conn = None
                conn.terminate()
            log.warning("store LISTEN connection lost; reconnecting")
            while True:
                await asyncio.sleep(delay)
                try:
                    conn, lost = await self._connect()
                except DRIVER_ERRORS as exc:
                    delay = min(delay * 2, BACKOFF_MAX)
                    log.warning("store LISTEN reconnect failed: %s", type(exc).__name__)
                    continue
                break
            delay = BACKOFF_FIRST
            self.reconnects += 1
            # Notifications sent while we were away are gone: every waiter looks again.
            self.waker.notify_all()

    async def _watch(self, conn: Any, lost: asyncio.Event) -> None:
        """Return when the connection is lost (closed, or silent past the keepalive)."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    await lost.wait()
                    return
            try:
                await conn.execute("SELECT 1", timeout=self.timeout)
            except DRIVER_ERRORS:
                return
