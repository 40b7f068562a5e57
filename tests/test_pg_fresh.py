"""PostgreSQL begin_send groups in one round trip (store/postgres/fresh.py, migration 10).

A group of calls none of which was seen before is written by one statement, in its own
transaction; a group with a retry or a blocked handset writes nothing there and is planned again
in a transaction on the facts read. Checked here: the statements each kind of group sends, that
the fallback writes what the transaction always wrote (no row twice, NUR records once), that two
store instances racing on one key still write one pending row, and that a lost answer of the
one statement is recovered as a lost COMMIT is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bc_proxy.store import SendIntent, SendPlan
from bc_proxy.store.postgres import PostgresStore, fresh, sends
from bc_proxy.store.postgres.db import Db
from bc_proxy.store.postgres.group import Batcher
from bc_proxy.store.rules import Rules, TenantRules
from tests import pg
from tests.pg import pg_url, session  # noqa: F401  (fixtures)
from tests.tcpproxy import TcpProxy

RULES = Rules({"t": TenantRules(senders=("552",))})
_WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND datname = current_database()"
)


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Db]:  # noqa: F811
    async with pg.started_db(pg_url, pool_max=2, migrated=True) as d:
        yield d


async def _logged(db: Db) -> list[str]:
    """The statements sent from now on over the connection the store's next use takes (the
    one kept checked out between uses: db.conn gives it back to its kept list)."""
    queries: list[str] = []

    def log(record: Any) -> None:
        queries.append(" ".join(record.query.split()))

    async with db.conn("logged") as conn:
        conn.add_query_logger(log)
    return queries


def _writes(*intents: SendIntent) -> list[sends.BeginWrite]:
    now = time.time()
    return [sends.BeginWrite(i, now) for i in intents]


async def _rows(db: Db) -> list[tuple[str | None, str, str]]:
    async with db.conn("rows") as conn:
        rows = await conn.fetch("SELECT legacy_id, recipient, state FROM sends ORDER BY id")
    return [(r["legacy_id"], r["recipient"], r["state"]) for r in rows]


async def test_a_group_of_fresh_calls_is_one_statement(db: Db) -> None:
    # a first group: the driver's one-off type introspection of the connection is done
    await fresh.begin_group(db, RULES, _writes(SendIntent("t", "m-0", ("6421000000",), "552")))
    queries = await _logged(db)
    plans = await fresh.begin_group(
        db,
        RULES,
        _writes(
            SendIntent("t", "m-1", ("6421000001", "6421000002", "6421000001"), "552"),
            SendIntent("t", None, ("6421000003",), "552"),
        ),
    )
    await asyncio.sleep(0)  # the driver calls loggers soon after, not at once
    assert queries == [fresh.BEGIN_FRESH]  # no BEGIN, facts, insert, COMMIT
    assert [[p.recipient for p in plan.to_send] for plan in plans] == [
        ["6421000001", "6421000002"],
        ["6421000003"],
    ]
    # a number named twice in one call: its second mention repeats the pending send
    assert plans[0].repeats == (("6421000001", "pending"),)
    assert await _rows(db) == [
        ("m-0", "6421000000", "pending"),
        ("m-1", "6421000001", "pending"),
        ("m-1", "6421000002", "pending"),
        (None, "6421000003", "pending"),
    ]
    async with db.conn("refs") as conn:
        stored = [r[0] for r in await conn.fetch("SELECT upstream_ref FROM sends ORDER BY id")]
    assert stored[1:] == [p.upstream_ref for plan in plans for p in plan.to_send]


async def test_a_group_with_a_retry_writes_nothing_in_one_statement_and_is_planned_again(
    db: Db,
) -> None:
    (first,) = await fresh.begin_group(
        db, RULES, _writes(SendIntent("t", "m-1", ("642101",), "552"))
    )
    queries = await _logged(db)
    retry, other = await fresh.begin_group(
        db,
        RULES,
        _writes(
            SendIntent("t", "m-1", ("642101", "642102"), "552"),
            SendIntent("t", "m-2", ("642103",), "552"),
        ),
    )
    await asyncio.sleep(0)  # the driver calls loggers soon after, not at once
    assert queries[0] == fresh.BEGIN_FRESH
    assert queries[1] == "BEGIN;"  # planned again on the facts read, in a transaction
    assert queries[2].startswith("SELECT latest, is_blocked FROM bc_send_facts(")
    assert queries[-1] == "COMMIT;"
    assert retry.repeats == (("642101", "pending"),)
    assert [p.recipient for p in retry.to_send] == ["642102"]
    assert [p.recipient for p in other.to_send] == ["642103"]
    # the fresh statement's refs were never written: only the transaction's plans were
    assert await _rows(db) == [
        ("m-1", "642101", "pending"),
        ("m-1", "642102", "pending"),
        ("m-2", "642103", "pending"),
    ]
    async with db.conn("refs") as conn:
        stored = {r[0] for r in await conn.fetch("SELECT upstream_ref FROM sends")}
    planned = {p.upstream_ref for p in (*first.to_send, *retry.to_send, *other.to_send)}
    assert stored == planned


async def test_a_blocked_handset_gets_its_nur_record_once_and_no_pending_row(db: Db) -> None:
    async with db.conn("block") as conn:
        await conn.execute("INSERT INTO blocked (tenant, handset, since) VALUES ('t', '642109', 0)")
    (plan,) = await fresh.begin_group(
        db, RULES, _writes(SendIntent("t", "m-9", ("642109", "642108"), "552"))
    )
    assert plan.blocked == ("642109",)
    assert [p.recipient for p in plan.to_send] == ["642108"]
    assert await _rows(db) == [("m-9", "642108", "pending")]
    async with db.conn("nur") as conn:
        nur = await conn.fetch("SELECT msisdn_from, status_code FROM records WHERE kind = 'status'")
    assert [(r["msisdn_from"], r["status_code"]) for r in nur] == [("642109", "NUR")]


async def test_two_stores_racing_on_one_key_write_one_pending_row(
    pg_url: str,  # noqa: F811
) -> None:
    # Two replicas get the same call (a client retrying on another replica) many times at
    # once: the key locks of the one statement keep the second from writing a second row.
    stores = [PostgresStore(pg_url, RULES), PostgresStore(pg_url, RULES)]
    for s in stores:
        await s.open()
    try:
        for n in range(30):
            intent = SendIntent("t", f"race-{n}", ("642100",), "552")
            now = time.time()
            a, b = await asyncio.gather(*(s.begin_send(intent, now) for s in stores))
            assert sorted([len(a.to_send), len(b.to_send)]) == [0, 1]
            assert (a.repeats or b.repeats) == (("642100", "pending"),)
    finally:
        for s in stores:
            await s.close()
    async with pg.started_db(pg_url) as db:
        assert len(await _rows(db)) == 30


async def test_a_lost_answer_of_the_one_statement_is_recovered_as_a_lost_commit(db: Db) -> None:
    # The statement committed (its own transaction); the answer is lost as a reset connection
    # loses it. The group's callers get the plans it committed, and nothing is written twice.
    lost = [True]

    async def run(writes: list[sends.BeginWrite]) -> list[SendPlan]:
        plans = await fresh.begin_group(db, RULES, writes)
        if lost[0]:
            lost[0] = False
            raise ConnectionResetError("connection lost while the answer was on the wire")
        return plans

    async def recover(writes: list[sends.BeginWrite]) -> list[SendPlan] | None:
        return await sends.recover_begins(db, writes)

    b: Batcher[sends.BeginWrite, SendPlan] = Batcher(
        db, "begin send", None, key=sends.BeginWrite.key, run=run, recover=recover
    )
    now = time.time()
    intents = [SendIntent("t", f"m-{n}", (f"64210000{n}",), "552") for n in range(3)]
    plans = await asyncio.gather(*(b.submit(sends.BeginWrite(i, now)) for i in intents))
    assert [[p.recipient for p in plan.to_send] for plan in plans] == [
        ["642100000"],
        ["642100001"],
        ["642100002"],
    ]
    assert all(plan.repeats == () for plan in plans)
    assert len(await _rows(db)) == 3


async def test_the_store_begins_a_fresh_send_in_one_statement(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The store as the gateway runs it: every pooled connection logs its statements.
    queries = pg.log_statements(monkeypatch)
    store = PostgresStore(pg_url, RULES)
    await store.open()
    other = PostgresStore(pg_url, RULES)  # another replica
    await other.open()
    try:
        await store.begin_send(SendIntent("t", "m-0", ("642100",), "552"), time.time())
        await other.begin_send(SendIntent("t", "m-9", ("642109",), "552"), time.time())
        await asyncio.sleep(0)
        queries.clear()
        plan = await store.begin_send(SendIntent("t", "m-1", ("642101",), "552"), time.time())
        await asyncio.sleep(0)
        fresh_one = list(queries)
        queries.clear()
        repeat = await store.begin_send(SendIntent("t", "m-1", ("642101",), "552"), time.time())
        await asyncio.sleep(0)
        retried_here = list(queries)
        queries.clear()
        elsewhere = await other.begin_send(SendIntent("t", "m-1", ("642101",), "552"), time.time())
        await asyncio.sleep(0)
        retried_elsewhere = list(queries)
    finally:
        await other.close()
        await store.close()
    assert [p.recipient for p in plan.to_send] == ["642101"]
    assert repeat.repeats == elsewhere.repeats == (("642101", "pending"),)
    facts = "SELECT latest, is_blocked FROM bc_send_facts("
    # the fresh call: one statement
    assert fresh_one == [fresh.BEGIN_FRESH]
    # its retry on the same replica, whose key it began lately: the transaction at once
    assert retried_here[0] == "BEGIN;"
    assert retried_here[1].startswith(facts)
    # on another replica, which does not know the key: the statement, then the transaction
    assert retried_elsewhere[:2] == [fresh.BEGIN_FRESH, "BEGIN;"]
    assert retried_elsewhere[2].startswith(facts)


async def test_a_keyless_group_cut_off_mid_statement_is_recovered_not_written_twice(
    pg_url: str,  # noqa: F811
    session: asyncpg.Connection,  # noqa: F811
) -> None:
    # Calls without a messageId take no key lock. The connection is lost while the group's one
    # statement runs on the server (held by a lock, as a slow disk or a table lock holds it):
    # the server does not notice, and the statement's transaction commits at its end. The
    # recovery must wait for it (the group's own lock) and find its rows, or each call would
    # be written again one by one and the first rows left pending, never sent.
    target = urlsplit(pg.DSN)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    try:
        async with pg.started_db(pg_url, migrated=True):
            pass
        parts = urlsplit(pg_url)
        auth = parts.netloc.rpartition("@")[0]
        url = urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}"))
        async with pg.started_db(url, pool_max=4) as db:

            async def run(writes: list[sends.BeginWrite]) -> list[SendPlan]:
                return await fresh.begin_group(db, RULES, writes)

            async def recover(writes: list[sends.BeginWrite]) -> list[SendPlan] | None:
                return await sends.recover_begins(db, writes)

            b: Batcher[sends.BeginWrite, SendPlan] = Batcher(
                db, "begin send", None, key=sends.BeginWrite.key, run=run, recover=recover
            )
            await session.execute("BEGIN; LOCK TABLE blocked IN ACCESS EXCLUSIVE MODE")
            now = time.time()
            calls = [
                asyncio.ensure_future(
                    b.submit(sends.BeginWrite(SendIntent("t", None, (f"64210{n}",), "552"), now))
                )
                for n in range(2)
            ]
            await pg.until_blocked_by(pg_url, session)  # the statement runs on the server
            proxy.cut()  # its connection reset; new ones are let through again at once
            proxy.restore()
            # the recovery (or a retry) comes and waits for a lock too, then the statement
            # may end
            for _ in range(100):
                if await pg.execute(pg_url, _WAITING) >= 2:
                    break
                await asyncio.sleep(0.05)
            await session.execute("COMMIT")
            plans = await asyncio.wait_for(asyncio.gather(*calls), 10)
    finally:
        await proxy.close()
    answered = {p.upstream_ref for plan in plans for p in plan.to_send}
    assert len(answered) == 2
    stored = await pg.execute(pg_url, "SELECT array_agg(upstream_ref) FROM sends")
    assert sorted(stored) == sorted(answered)  # each call's row once, and no row nobody sends
