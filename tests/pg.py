"""PostgreSQL for tests: the server at BC_PROXY_TEST_PG_DSN, one fresh schema per test.

A test that needs PostgreSQL is skipped, with the reason, when the server cannot be reached,
unless BC_PROXY_REQUIRE_PG=1 (CI), where that is a failure. Each schema `t_<random>` is
selected through the URL (`?options=-csearch_path=...`) and dropped after the test.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg
import pytest

from bc_proxy.store.postgres import PostgresStore, schema
from bc_proxy.store.postgres.db import Db
from bc_proxy.store.rules import Rules
from bc_proxy.store.waker import LocalWaker

DSN = os.environ.get("BC_PROXY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRED = os.environ.get("BC_PROXY_REQUIRE_PG") == "1"
T = TypeVar("T")
_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

_unreachable: list[str] = []  # the reason, once found (checked once per session)
_checked = False
_leftover: list[str] = []  # schemas made by schema_url_sync, dropped at exit


def schema_url(schema: str, dsn: str = DSN) -> str:
    """The DSN with `schema` first on the search path (libpq and asyncpg both read it)."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


async def _connect() -> Any:
    return await asyncpg.connect(DSN, timeout=3)


async def require() -> None:
    """Skip (or, with BC_PROXY_REQUIRE_PG=1, fail) when PostgreSQL cannot be reached."""
    global _checked
    if not _checked:
        _checked = True
        try:
            conn = await _connect()
        except _DOWN as exc:
            _unreachable.append(f"{type(exc).__name__}: {exc}")
        else:
            await conn.close()
    if _unreachable:
        reason = f"PostgreSQL at {DSN} unreachable ({_unreachable[0]})"
        if REQUIRED:
            pytest.fail(f"{reason}; BC_PROXY_REQUIRE_PG=1 requires it")
        pytest.skip(reason)


async def create_schema() -> str:
    name = f"t_{secrets.token_hex(6)}"
    conn = await _connect()
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return name


async def drop_schema(name: str) -> None:
    conn = await _connect()
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def execute(url: str, sql: str, *args: Any) -> Any:
    """Run one statement on its own connection to `url` (tests poking at the database)."""
    conn = await asyncpg.connect(url, timeout=3)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


# Sessions waiting for a lock the session with this backend pid holds (no other test's waits).
BLOCKED_BY = "SELECT count(*) FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))"


WAITING_FOR = "SELECT pid FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))"


async def waiter_of(url: str, pid: int) -> int:
    """The backend pid of a session waiting for a lock `pid` holds (5 s at most)."""
    for _ in range(100):
        waiter = await execute(url, WAITING_FOR, pid)
        if waiter is not None:
            return int(waiter)
        await asyncio.sleep(0.05)
    raise AssertionError(f"nobody ever waited for backend {pid}")


@contextlib.asynccontextmanager
async def replicas(url: str, rules: Rules) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Replicas A and B: two stores open on `url`, closed after."""
    a = PostgresStore(url, rules, replica="A")
    b = PostgresStore(url, rules, replica="B")
    await a.open()
    try:
        await b.open()
        try:
            yield a, b
        finally:
            await b.close()
    finally:
        await a.close()


def log_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the pools opened from now on send, as asyncpg's query loggers see
    them (called soon after each statement, not at once: yield to the loop before reading)."""
    queries: list[str] = []
    create_pool = asyncpg.create_pool

    def logging_pool(*args: Any, **kwargs: Any) -> Any:
        async def init(conn: Any) -> None:
            conn.add_query_logger(lambda r: queries.append(" ".join(r.query.split())))

        return create_pool(*args, init=init, **kwargs)

    monkeypatch.setattr(asyncpg, "create_pool", logging_pool)
    return queries


async def until_blocked_by(url: str, holder: asyncpg.Connection) -> None:
    """Wait (5 s at most) until some session waits for a lock `holder` holds."""
    for _ in range(100):
        if await execute(url, BLOCKED_BY, holder.get_server_pid()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("nobody ever waited for the lock")


@contextlib.asynccontextmanager
async def started_db(url: str, *, pool_max: int = 2, migrated: bool = False) -> AsyncIterator[Db]:
    """The store's own connection layer (`Db`) on `url`, started (and migrated), stopped after."""
    db = Db(url, LocalWaker(), pool_min=1, pool_max=pool_max, command_timeout=10)
    await db.start()
    try:
        if migrated:
            async with db.conn("migrate", session=True) as conn:
                await schema.migrate(conn)
        yield db
    finally:
        await db.stop()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A URL naming a fresh, empty PostgreSQL schema; dropped after the test."""
    await require()
    name = await create_schema()
    try:
        yield schema_url(name)
    finally:
        await drop_schema(name)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def schema_url_sync() -> str:
    """For sync URL recipes: a fresh schema's URL (skip/fail rule applied), dropped at exit."""
    _run(require())
    name = _run(create_schema())
    _leftover.append(name)
    return schema_url(name)


@atexit.register
def _drop_leftovers() -> None:
    async def drop_all() -> None:
        for name in _leftover:
            with contextlib.suppress(*_DOWN):
                await drop_schema(name)

    if _leftover:
        asyncio.run(drop_all())  # at exit no event loop runs: this thread may run one


@pytest.fixture
async def session(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session on the test's schema (another replica's, holding locks)."""
    conn = await asyncpg.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()
