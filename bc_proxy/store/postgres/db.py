"""The PostgreSQL connection pool, transactions and error mapping.

Owns how SQL reaches the server (asyncpg pool with explicit limits and a command timeout),
turning every driver or socket failure into StoreError, and the wake-ups a transaction sends
(`pg_notify` inside it, the local waker after its commit). It decides no business rule.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import asyncpg

from bc_proxy.errors import StoreError
from bc_proxy.store.waker import LocalWaker

Conn = Any  # asyncpg.Connection (asyncpg ships no type hints)
Wakes = set[tuple[str, str]]

CHANNEL = "bc_proxy_records"
# The database's clock, in epoch seconds: leases of every replica expire by one clock.
DB_NOW = "extract(epoch from clock_timestamp())::float8"
DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# What a write may raise besides the driver: bad input that cannot be stored.
WRITE_ERRORS = (*DRIVER_ERRORS, TypeError, ValueError)
_NOTIFY = f"SELECT count(pg_notify('{CHANNEL}', w)) FROM unnest($1::text[]) AS w"


def store_error(exc: BaseException, what: str) -> StoreError:
    """A StoreError naming the operation and the driver's complaint (never the password)."""
    return StoreError(f"postgresql {what}: {type(exc).__name__}: {exc}".rstrip(": "))


def wake_payloads(wakes: Wakes) -> list[str]:
    return [f"{tenant}:{kind}" for tenant, kind in sorted(wakes)]


class Db:
    """Two pools plus this process's waker: `tx()` for writes, `conn()` for single statements.

    Leases (claim, ack, release, push outcomes) commit on a second pool with
    `synchronous_commit = off`: still atomic and at once visible to every replica, but not
    waiting for the WAL flush. A lease lost in a server crash only means a record is handed
    out again, which at-least-once delivery allows; sends and ingest always wait for it.
    """

    def __init__(
        self,
        dsn: str,
        waker: LocalWaker,
        *,
        pool_min: int,
        pool_max: int,
        command_timeout: float,
    ) -> None:
        self.dsn = dsn
        self.waker = waker
        self.command_timeout = command_timeout
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._pool: Any = None
        self._lease_pool: Any = None

    async def start(self) -> None:
        try:
            self._pool = await self._create_pool(self._pool_min, self._pool_max, {})
            self._lease_pool = await self._create_pool(
                1, max(2, self._pool_max // 2), {"synchronous_commit": "off"}
            )
        except DRIVER_ERRORS as exc:
            await self.stop()
            raise store_error(exc, "connect") from exc

    async def _create_pool(self, least: int, most: int, settings: dict[str, str]) -> Any:
        return await asyncpg.create_pool(
            self.dsn,
            min_size=least,
            max_size=most,
            command_timeout=self.command_timeout,
            timeout=self.command_timeout,  # connecting
            server_settings=settings,
        )

    async def stop(self) -> None:
        pools = (self._pool, self._lease_pool)
        self._pool = self._lease_pool = None
        for pool in pools:
            if pool is None:
                continue
            try:
                async with asyncio.timeout(self.command_timeout):
                    await pool.close()
            except DRIVER_ERRORS:
                pool.terminate()

    @property
    def started(self) -> bool:
        return self._pool is not None

    @contextlib.asynccontextmanager
    async def conn(self, what: str, *, lease: bool = False) -> AsyncIterator[Conn]:
        """A pooled connection outside any explicit transaction (each statement commits)."""
        pool = self._lease_pool if lease else self._pool
        if pool is None:
            raise StoreError("store is closed")
        try:
            async with pool.acquire(timeout=self.command_timeout) as conn:
                yield conn
        except StoreError:
            raise
        except WRITE_ERRORS as exc:
            raise store_error(exc, what) from exc

    async def acquire(self, what: str) -> Conn:
        """A pooled connection to hold across the caller's own code (give it back: release)."""
        if self._pool is None:
            raise StoreError("store is closed")
        try:
            return await self._pool.acquire(timeout=self.command_timeout)
        except DRIVER_ERRORS as exc:
            raise store_error(exc, what) from exc

    async def release(self, conn: Conn) -> None:
        pool = self._pool
        if pool is None:
            conn.terminate()
            return
        try:
            await pool.release(conn, timeout=self.command_timeout)
        except DRIVER_ERRORS:
            conn.terminate()

    @contextlib.asynccontextmanager
    async def tx(self, what: str, *, lease: bool = False) -> AsyncIterator[tuple[Conn, Wakes]]:
        """One transaction: wakes added to the set are NOTIFYed in it and fired locally after."""
        wakes: Wakes = set()
        async with self.conn(what, lease=lease) as conn, conn.transaction():
            yield conn, wakes
            if wakes:
                await conn.fetchval(_NOTIFY, wake_payloads(wakes))
        self.fire(wakes)

    def fire(self, wakes: Iterable[tuple[str, str]]) -> None:
        """Wake this process's waiters at once (the LISTEN echo follows; re-checks are cheap)."""
        for tenant, kind in wakes:
            self.waker.notify(tenant, kind)
