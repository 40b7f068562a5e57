"""A settle's look for reports that beat it, in its own statement (migration 11).

A PostgreSQL settle without status records is one statement (`bc_settle_sends`): it updates the
rows, takes the advisory locks of the Connexus ids it set, looks for unmatched reports naming
them, and holds the locks until its commit. The ingest of an unmatched report looks for its send
after its own commit under the same locks (`bc_report_candidates`). The window this closes: an
ingest that commits and looks between the settle's look and the settle's commit would see no
send, and the settle would have seen no report. Two replicas stand for the two sides, on one
database. The settle is held between its look and its commit by a deferred trigger that waits
for a lock the test holds: interleavings by locks, not timing (as tests/test_pg_ingest_races.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bc_proxy.store import DlrEvent, IngestResult, SendIntent, Settlement
from bc_proxy.store.postgres import PostgresStore, matching, sends
from bc_proxy.store.postgres.group import Batcher
from bc_proxy.store.rules import Rules, TenantRules
from tests import pg
from tests.pg import pg_url, session  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres

RULES = Rules({"acme": TenantRules(senders=("552",))})
HANDSET = "6421000001"
HOLD = 4242  # the advisory lock the test holds, and the trigger waits for
# A trigger that runs at commit (deferred) and waits there for HOLD: it stops a settle after
# its statement, its look included, and before its commit, with its locks held.
HOLD_AT_COMMIT = f"""
    CREATE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_advisory_xact_lock({HOLD}); RETURN NULL; END $$;
    CREATE CONSTRAINT TRIGGER test_hold AFTER UPDATE ON sends
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_hold();
"""


@pytest.fixture
async def pair(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:  # noqa: F811
    """Replicas A (settles) and B (ingests), open on the test's schema."""
    async with pg.replicas(pg_url, RULES) as stores:
        yield stores


async def test_a_report_ingested_while_its_settle_commits_is_matched_at_once(
    pair: tuple[PostgresStore, PostgresStore],
    pg_url: str,  # noqa: F811
    session: asyncpg.Connection,  # noqa: F811
) -> None:
    a, b = pair
    plan = await a.begin_send(SendIntent("acme", "L-1", (HANDSET,), "552"), time.time())
    await session.execute(HOLD_AT_COMMIT)
    await session.execute(f"SELECT pg_advisory_lock({HOLD})")
    settle = asyncio.create_task(
        a.settle_send([Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-1")])
    )
    try:
        # The settle has looked (no report yet) and waits to commit, its locks held.
        settling = await pg.waiter_of(pg_url, session.get_server_pid())
        ingest = asyncio.create_task(b.add_dlr(DlrEvent("cx-1", 1, "DELIVRD")))
        # The report is committed unmatched; its look waits for the settle's lock (or, were it
        # not ordered by the lock, it is answered at once: unmatched, and the settle, which
        # looked before the report was there, would not match it either).
        for _ in range(100):
            if ingest.done() or await pg.execute(pg_url, pg.WAITING_FOR, settling) is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        await session.execute(f"SELECT pg_advisory_unlock({HOLD})")
    await asyncio.wait_for(settle, 10)
    # Once the settle committed, the ingest's look saw its send: matched now, not by the upkeep
    # pass (which does not run here).
    assert await asyncio.wait_for(ingest, 10) == IngestResult("stored", "acme")
    record = await a.claim("acme", "status")
    assert record is not None
    assert record.in_reply_to == "L-1"
    await a.ack(record)
    assert await b.claim("acme", "status") is None  # once


async def test_a_settle_finds_a_report_that_beat_it_in_its_own_statement(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queries = pg.log_statements(monkeypatch)
    async with pg.replicas(pg_url, RULES) as (a, b):
        plan = await a.begin_send(SendIntent("acme", "L-2", (HANDSET,), "552"), time.time())
        assert await b.add_dlr(DlrEvent("cx-2", 1, "DELIVRD")) == IngestResult("unmatched", None)
        await asyncio.sleep(0)
        queries.clear()
        await a.settle_send([Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-2")])
        await asyncio.sleep(0)
        settled = list(queries)
        record = await b.claim("acme", "status")
    assert record is not None
    assert (record.in_reply_to, record.dlr_status) == ("L-2", 1)
    # found by the settle's statement: no second look after its commit
    assert settled[0] == sends.SETTLE_AND_LOOK
    assert matching.UNMATCHED not in settled


async def test_a_settle_whose_answer_was_lost_still_matches_the_report_that_beat_it(
    pg_url: str,  # noqa: F811
) -> None:
    # The statement committed (the report found, the locks held to its end), its answer lost
    # before the matching that follows it: the recovery, which finds the settle committed,
    # matches the report instead of leaving it to the upkeep pass.
    async with pg.replicas(pg_url, RULES) as (a, b):
        plan = await a.begin_send(SendIntent("acme", "L-3", (HANDSET,), "552"), time.time())
        assert await b.add_dlr(DlrEvent("cx-3", 1, "DELIVRD")) == IngestResult("unmatched", None)
        async with pg.started_db(pg_url, pool_max=2) as db:
            lost = [True]

            async def run(writes: list[sends.SettleWrite]) -> list[None]:
                if not lost[0]:
                    return await sends.settle_sends(db, RULES, writes)
                lost[0] = False
                s = writes[0].settlements[0]
                async with db.conn("settle") as conn:
                    await conn.fetch(
                        sends.SETTLE_AND_LOOK,
                        [s.upstream_ref],
                        [s.state],
                        [s.connexus_id],
                        [s.sender],
                        writes[0].now,
                    )
                raise ConnectionResetError("the answer was lost")

            async def recover(writes: list[sends.SettleWrite]) -> list[None] | None:
                return await sends.recover_settles(db, RULES, writes)

            settles: Batcher[sends.SettleWrite, None] = Batcher(
                db, "settle send", None, key=id, run=run, recover=recover
            )
            settlement = Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-3")
            await settles.submit(sends.SettleWrite((settlement,), ()))
        record = await b.claim("acme", "status")
    assert record is not None
    assert (record.in_reply_to, record.dlr_status) == ("L-3", 1)


async def test_a_settle_with_no_report_waiting_is_one_statement(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queries = pg.log_statements(monkeypatch)
    store = PostgresStore(pg_url, RULES)
    await store.open()
    try:
        plans = [
            await store.begin_send(SendIntent("acme", f"L-{n}", (HANDSET,), "552"), time.time())
            for n in range(2)
        ]
        await store.settle_send([Settlement(plans[0].to_send[0].upstream_ref, "accepted", "c0")])
        await asyncio.sleep(0)  # the driver calls loggers soon after, not at once
        queries.clear()
        await store.settle_send([Settlement(plans[1].to_send[0].upstream_ref, "accepted", "c1")])
        await asyncio.sleep(0)
        settled = list(queries)
    finally:
        await store.close()
    assert settled == [sends.SETTLE_AND_LOOK]  # no second look after the commit
