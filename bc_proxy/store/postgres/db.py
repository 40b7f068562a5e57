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

from bc_proxy.errors import StoreError, StoreRefused
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
# Planner settings of every pooled connection. Each statement of this store looks rows up by key
# (arrays of keys joined to an index); none scans a table. The planner's statistics of a table
# that grew from empty to 100,000 rows within its first minute say "tiny", and a prepared
# statement's generic plan, made at its sixth run, is kept until the next ANALYZE: a sequential
# scan (and hash join) that seemed cheapest at ten rows then reads the whole table on every
# settle, growing with it (measured: PostgreSQL CPU per send 0.4 to 1.8 ms from run to run, by
# what the table held when each connection planned). With these, every plan is an index path
# whatever the statistics, and made once per connection: arrays of keys (unnest) otherwise keep
# choosing a fresh custom plan, planned again on every execution.
PLANNER_SETTINGS = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}
# The lease pool's connections add these: their statements take and end leases (poll and
# push claims, ack, release). A claim reads its index in order up to its LIMIT; a generic plan
# made on a small table chose a bitmap scan and a sort instead, which reads every entry in
# range (for a push claim, every due record, dead index entries included) on every claim.
LEASE_SETTINGS = {"synchronous_commit": "off", "enable_bitmapscan": "off"}
NOTIFY = f"SELECT count(pg_notify('{CHANNEL}', w)) FROM unnest($1::text[]) AS w"


# What the server (class 22 data exceptions, class 23 constraints) or the driver (encoding a
# value: TypeError, ValueError) refuses in the data itself: StoreRefused. Not class 54 (it
# also covers a full NOTIFY queue), nor the driver's configuration errors (ValueErrors too).
REFUSALS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    TypeError,
    ValueError,
)


def describe(exc: BaseException) -> str:
    """The driver's complaint for a log line or an error: its type and message, except where
    the message holds the arguments (the driver refusing to encode a value quotes every value
    of the statement: a group's message texts and phone numbers)."""
    text = str(exc)
    if text.startswith("invalid input for query argument"):  # "...$1: [the values] (why)"
        return f"{type(exc).__name__}: {text.split(':', 1)[0]}"
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def store_error(exc: BaseException, what: str) -> StoreError:
    """A StoreError naming the operation and the driver's complaint (never the password, nor
    the statement's arguments); StoreRefused where the data itself was refused."""
    refused = isinstance(exc, REFUSALS) and not isinstance(
        exc, asyncpg.exceptions.ClientConfigurationError
    )
    kind = StoreRefused if refused else StoreError
    return kind(f"postgresql {what}: {describe(exc)}")


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
        # Server pids of pooled connections that took session-level state (advisory locks of
        # exclusive() or a migration): only these get asyncpg's full reset query on release.
        self._session_state: set[int] = set()
        # Connections kept checked out between uses, per pool (`conn`): given back at stop.
        self._kept: list[Conn] = []
        self._kept_lease: list[Conn] = []
        self._acquiring: dict[Any, int] = {}  # callers waiting in each pool's acquire

    async def start(self) -> None:
        try:
            self._pool = await self._create_pool(self._pool_min, self._pool_max, {})
            self._lease_pool = await self._create_pool(
                1, max(2, self._pool_max // 2), LEASE_SETTINGS
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
            server_settings={**PLANNER_SETTINGS, **settings},
            reset=self._reset,
        )

    async def _reset(self, conn: Conn) -> None:
        """What a connection needs before it goes back to the pool (asyncpg has already rolled
        back an open transaction and dropped listener callbacks by then).

        asyncpg's default runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on
        every release: a round trip and server work per operation. Nothing of this store leaves
        session state on a pooled connection (no SET, cursors or LISTEN: the listener has its
        own connection) except session advisory locks, taken only on connections marked with
        `session_state`; those, and only those, get the full reset.
        """
        pid = conn.get_server_pid()
        if pid in self._session_state:
            self._session_state.discard(pid)
            await conn.execute(conn.get_reset_query())

    def session_state(self, conn: Conn) -> None:
        """Mark a pooled connection that may hold session state: fully reset on release."""
        self._session_state.add(conn.get_server_pid())

    async def stop(self) -> None:
        pools = ((self._pool, self._kept), (self._lease_pool, self._kept_lease))
        self._pool = self._lease_pool = None
        self._acquiring.clear()
        for pool, kept in pools:
            if pool is None:
                continue
            try:
                async with asyncio.timeout(self.command_timeout):
                    while kept:
                        await pool.release(kept.pop())
                    await pool.close()
            except DRIVER_ERRORS:
                pool.terminate()
            kept.clear()

    @property
    def started(self) -> bool:
        return self._pool is not None

    @contextlib.asynccontextmanager
    async def conn(
        self, what: str, *, lease: bool = False, session: bool = False
    ) -> AsyncIterator[Conn]:
        """A pooled connection outside any explicit transaction (each statement commits).

        `session`: the caller may leave session state (advisory locks): reset on release."""
        pool = self._lease_pool if lease else self._pool
        if pool is None:
            raise StoreError("store is closed")
        kept = self._kept_lease if lease else self._kept
        try:
            conn = await self._take(pool, kept)
            if session:
                self.session_state(conn)
            clean = False
            try:
                yield conn
                clean = True
            finally:
                if clean and not session and self._reusable(conn, pool, lease):
                    kept.append(conn)
                else:
                    await pool.release(conn, timeout=self.command_timeout)
        except StoreError:
            raise
        except WRITE_ERRORS as exc:
            raise store_error(exc, what) from exc

    async def _take(self, pool: Any, kept: list[Conn]) -> Conn:
        """A connection kept from an earlier use, else one from the pool."""
        while kept:
            conn = kept.pop()
            if _usable(conn):
                return conn
            await pool.release(conn)  # frees its place (a detached one has freed it already)
        self._acquiring[pool] = self._acquiring.get(pool, 0) + 1
        try:
            return await pool.acquire(timeout=self.command_timeout)
        finally:
            self._acquiring[pool] -= 1

    def _reusable(self, conn: Conn, pool: Any, lease: bool) -> bool:
        """Keep a connection checked out for the next use (asyncpg's release and acquire cost a
        task and a timer each, per statement group), when it is idle and healthy and nobody is
        waiting for the pool (a connection kept would never reach that waiter)."""
        current = self._lease_pool if lease else self._pool
        return (
            current is pool
            and not self._acquiring.get(pool)
            and _usable(conn)
            and not conn.is_in_transaction()
        )

    async def acquire(self, what: str) -> Conn:
        """A pooled connection to hold across the caller's own code (give it back: release);
        it may take session-level advisory locks (fully reset on release)."""
        if self._pool is None:
            raise StoreError("store is closed")
        try:
            conn = await self._take(self._pool, self._kept)
        except DRIVER_ERRORS as exc:
            raise store_error(exc, what) from exc
        self.session_state(conn)  # exclusive(): session advisory locks
        return conn

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
                await conn.fetchval(NOTIFY, wake_payloads(wakes))
        self.fire(wakes)

    def fire(self, wakes: Iterable[tuple[str, str]]) -> None:
        """Wake this process's waiters at once (the LISTEN echo follows; re-checks are cheap)."""
        for tenant, kind in wakes:
            self.waker.notify(tenant, kind)


def _usable(conn: Conn) -> bool:
    """Open and still this caller's: when asyncpg loses a checked-out connection (a server
    restart, a terminated backend) it detaches it from its pool proxy, whose every method then
    raises InterfaceError, and gives the place back to the pool itself."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False

