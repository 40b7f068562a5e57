"""The PostgreSQL store's connections (`store/postgres/db.py`): kept between uses, never hoarded.

`Db.conn` keeps an idle, healthy connection checked out for the next use instead of giving it
back to asyncpg's pool (whose acquire and release each cost a task and a timer). That must not
keep a connection from a caller waiting for the pool, nor keep session state (advisory locks)
on a connection someone else gets next.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bc_proxy.errors import StoreError, StoreRefused
from bc_proxy.store.postgres.db import Db, store_error
from tests import pg
from tests.pg import pg_url  # noqa: F401  (fixture)


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Db]:  # noqa: F811
    async with pg.started_db(pg_url, pool_max=1) as d:
        yield d


async def _pid(db: Db) -> int:
    async with db.conn("pid") as conn:
        return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_a_connection_is_reused_from_one_use_to_the_next(db: Db) -> None:
    assert await _pid(db) == await _pid(db)


async def test_a_caller_waiting_for_the_pool_gets_the_connection_given_back(db: Db) -> None:
    # pool_max=1: the second caller can only run once the first gives its connection back.
    order: list[str] = []
    first_holds = asyncio.Event()

    async def first() -> None:
        async with db.conn("first") as conn:
            first_holds.set()
            await asyncio.sleep(0.2)
            await conn.fetchval("SELECT 1")
            order.append("first done")

    async def second() -> None:
        await first_holds.wait()
        async with db.conn("second") as conn:
            await conn.fetchval("SELECT 1")
            order.append("second done")

    await asyncio.wait_for(asyncio.gather(first(), second()), 5)
    assert order == ["first done", "second done"]


async def test_a_connection_with_session_locks_is_reset_not_kept(db: Db, pg_url: str) -> None:  # noqa: F811
    async with db.conn("lock", session=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(424242)")
    held = await pg.execute(
        pg_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 424242"
    )
    assert held == 0


async def test_a_connection_left_in_a_transaction_is_rolled_back_not_kept(db: Db) -> None:
    async with db.conn("open tx") as conn:  # a caller that forgot its COMMIT
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE t_left (x int)")
    async with db.conn("after") as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.t_left')") is None


async def test_kept_connections_lost_by_the_server_are_replaced_not_handed_out(
    pg_url: str,  # noqa: F811
) -> None:
    # A server restart or a terminated backend: asyncpg detaches the lost connections.
    async with pg.started_db(pg_url, pool_max=3) as db:

        async def use() -> int:
            async with db.conn("use") as conn:
                await conn.fetchval("SELECT pg_sleep(0.05)")
                return int(conn.get_server_pid())

        pids = await asyncio.gather(use(), use(), use())  # three connections, all kept
        terminated = await pg.execute(
            pg_url, "SELECT count(pg_terminate_backend(p)) FROM unnest($1::int[]) AS p", pids
        )
        assert terminated == 3
        await asyncio.sleep(0.3)  # asyncpg notices the closed sockets
        for _ in range(4):
            new_pid = await _pid(db)
            assert new_pid not in pids


async def test_a_refused_value_is_told_from_an_outage(db: Db) -> None:
    """The data refused by the server is StoreRefused (the same write would fail again); a
    statement that runs out of time is a plain StoreError (it may pass later)."""
    with pytest.raises(StoreRefused):
        async with db.conn("refused") as conn:
            await conn.execute("SELECT $1::text", "a\x00b")  # a NUL: no text of PostgreSQL holds it
    with pytest.raises(StoreRefused) as unencodable:  # the driver refuses a lone surrogate
        async with db.conn("refused") as conn:
            await conn.execute("SELECT $1::text", "call 6421000001 \ud800")
    assert "6421000001" not in str(unencodable.value)  # it quotes the arguments: not passed on
    with pytest.raises(StoreError) as timed_out:
        async with db.conn("slow") as conn:
            await conn.execute("SELECT pg_sleep(2)", timeout=0.1)
    assert not isinstance(timed_out.value, StoreRefused)
    # Neither a full NOTIFY queue (class 54, as a value too long for an index) nor the
    # driver's configuration (a ValueError) says anything about the data.
    for outage in (
        asyncpg.exceptions.ProgramLimitExceededError("too many notifications in the queue"),
        asyncpg.exceptions.ClientConfigurationError("root certificate file not found"),
    ):
        assert not isinstance(store_error(outage, "add mo"), StoreRefused)
