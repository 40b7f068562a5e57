"""Two PostgreSQL replicas ingesting the same event: nothing a second delivery carries is lost.

An incoming SMS stored unmatched by one replica (the webhook: no account) while another (the
sweep or pull: the account known) had read it as not stored yet is assigned by the second one,
STOP/START included, as it would have been one after the other. A delivery report left
unmatched because the look for its send after its commit failed (the webhook answered 503) is
matched when Connexus's retry comes back as a duplicate.

The interleavings are made with locks held by another session (as tests/test_pg_lost_commit.py
does), not timing: each test waits until the replica it stops waits for that session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bc_proxy.errors import StoreError
from bc_proxy.store import DlrEvent, IngestResult, MoEvent, SendIntent, Settlement, TenantRules
from bc_proxy.store.postgres import PostgresStore, matching
from bc_proxy.store.rules import Rules
from tests import pg
from tests.pg import pg_url, session  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres

# Two tenants, so a message to a number in no tenant's `senders` with no account is unmatched.
RULES = Rules({"acme": TenantRules(senders=("552",)), "globex": TenantRules(senders=("3000",))})
HANDSET, OTHER = "6421000001", "6421000002"


@pytest.fixture
async def pair(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:  # noqa: F811
    """Replicas A and B, open on the test's schema."""
    async with pg.replicas(pg_url, RULES) as stores:
        yield stores


@pytest.mark.parametrize(
    ("body", "webhook_account", "stored", "swept", "tenant"),
    [
        # stored unmatched by A: B assigns it, and its STOP blocks the handset for acme
        ("STOP", None, IngestResult("unmatched", None), "assigned", "acme"),
        ("hello", None, IngestResult("unmatched", None), "assigned", "acme"),  # no transaction
        # stored with a tenant by A: B leaves it
        ("hello", "globex", IngestResult("stored", "globex"), "duplicate", "globex"),
    ],
)
async def test_a_message_another_replica_stored_meanwhile_is_assigned_by_the_sweep(
    pair: tuple[PostgresStore, PostgresStore],
    session: asyncpg.Connection,  # noqa: F811
    pg_url: str,  # noqa: F811
    body: str,
    webhook_account: str | None,
    stored: IngestResult,
    swept: str,
    tenant: str,
) -> None:
    a, b = pair
    event = MoEvent("m-race", HANDSET, "9999", body)
    # A's group holds the message inserted, not committed: a STOP of another handset in the
    # same group waits for the blocked row this session inserted and has not committed.
    tx = session.transaction()
    await tx.start()
    await session.execute(
        "INSERT INTO blocked (tenant, handset, since) VALUES ('globex', $1, 0)", OTHER
    )
    webhook = asyncio.gather(  # queued together: one group
        a.add_mo(event, account=webhook_account),
        a.add_mo(MoEvent("m-stop", OTHER, "3000", "STOP"), account=None),
    )
    replica_a = await pg.waiter_of(pg_url, session.get_server_pid())
    # B reads the message as not stored (A has not committed), and its insert waits for A's.
    sweep = asyncio.ensure_future(b.add_mo(event, account="acme"))
    await pg.waiter_of(pg_url, replica_a)
    await tx.rollback()  # A commits, then B's insert meets A's row
    (hook, stop), got = await asyncio.wait_for(webhook, 10), await asyncio.wait_for(sweep, 10)

    assert hook == stored
    assert stop == IngestResult("stored", "globex")
    assert got.outcome == swept
    if swept == "assigned":
        assert got.tenant == "acme"
    row = "SELECT {} FROM records WHERE msisdn_from = $1"
    assert await pg.execute(pg_url, row.format("tenant"), HANDSET) == tenant
    assert await pg.execute(pg_url, row.format("pollable"), HANDSET)  # placed for its tenant
    assert await b.blocked("acme") == ([HANDSET] if body == "STOP" else [])
    assert await b.blocked("globex") == [OTHER]
    # one row, assigned once: the webhook's repeat changes nothing
    assert (await a.add_mo(event, account=None)).outcome == "duplicate"
    assert await pg.execute(pg_url, "SELECT count(*) FROM records WHERE kind = 'in'") == 2


async def test_a_report_whose_recheck_failed_is_matched_by_its_retry(
    pair: tuple[PostgresStore, PostgresStore],
    session: asyncpg.Connection,  # noqa: F811
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = pair
    plan = await a.begin_send(SendIntent("acme", "L1", (HANDSET,), "552"), time.time())
    report = DlrEvent("cx-1", 1, "DELIVRD")
    rechecks: list[str] = []
    recheck = matching.recheck_unmatched

    async def fails_once(db: object, rules: Rules, message_id: str) -> str | None:
        rechecks.append(message_id)
        if len(rechecks) == 1:
            raise StoreError("postgresql match reports: ConnectionResetError")
        return await recheck(db, rules, message_id)  # type: ignore[arg-type]

    monkeypatch.setattr(matching, "recheck_unmatched", fails_once)
    # The report reads its candidates before the send's settle commits and is stored after the
    # settle's own look for unmatched reports: records are locked meanwhile (reads pass).
    tx = session.transaction()
    await tx.start()
    await session.execute("LOCK TABLE records IN SHARE MODE")
    webhook = asyncio.ensure_future(a.add_dlr(report))
    await pg.waiter_of(pg_url, session.get_server_pid())
    await a.settle_send([Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-1")])
    await tx.rollback()
    with pytest.raises(StoreError):  # stored unmatched, its recheck failed: the webhook's 503
        await asyncio.wait_for(webhook, 10)
    assert await pg.execute(pg_url, "SELECT count(*) FROM records WHERE tenant IS NULL") == 1

    # Connexus's retry, at the other replica
    assert await b.add_dlr(report) == IngestResult("duplicate", "acme")
    record = await b.claim("acme", "status")
    assert record is not None
    assert (record.msisdn_from, record.msisdn_to, record.in_reply_to) == (HANDSET, "552", "L1")
    # a repeat of a matched report looks for nothing
    assert await a.add_dlr(report) == IngestResult("duplicate", "acme")
    assert rechecks == ["cx-1", "cx-1"]


async def test_a_repeated_report_still_naming_no_send_stays_unmatched(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair
    report = DlrEvent("cx-unknown", 1, "DELIVRD")
    assert await a.add_dlr(report) == IngestResult("unmatched", None)
    assert await b.add_dlr(report) == IngestResult("duplicate", None)
    assert await b.claim("acme", "status") is None


async def test_a_late_repeat_taking_over_a_report_a_settle_is_matching_is_delivered_once(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report kept unmatched (it beat its send's answer) comes again more than the clocks'
    tolerance later, read as naming no send just before the send's settle commits: it takes
    the key over (the old row gives up key and ref, a new row carries the event on). The
    settle's look had read the old row under its lock a moment before; its UPDATE must not
    match that row now, or the one report is delivered twice (the old row by the settle, the
    new one by the repeat's recheck). The steps are ordered by hooks that call through."""
    from bc_proxy.store.postgres import dlr
    from bc_proxy.store.rules import REPORT_CLOCK_TOLERANCE_SECONDS

    store = PostgresStore(pg_url, RULES, replica="A")
    await store.open()
    try:
        plan = await store.begin_send(SendIntent("acme", "L-1", (HANDSET,), "552"), time.time())
        ref = plan.to_send[0].upstream_ref
        assert (await store.add_dlr(DlrEvent("cx-1", 1, "DELIVRD"))).outcome == "unmatched"
        aged = 2 * REPORT_CLOCK_TOLERANCE_SECONDS
        await pg.execute(pg_url, "UPDATE records SET created_at = created_at - $1", aged)
        await pg.execute(pg_url, "UPDATE sends SET created_at = created_at - $1", aged)
        settled, looked, taken = asyncio.Event(), asyncio.Event(), asyncio.Event()
        real_candidates = matching.candidates  # what dlr.py calls too
        real_take = dlr._take_keys

        async def repeat_reads(conn: asyncpg.Connection, ids: list[str]) -> object:
            out = await real_candidates(conn, ids)  # before the settle: no send named
            await pg.execute(  # the settle commits now
                pg_url,
                "UPDATE sends SET state = 'accepted', connexus_id = 'cx-1' WHERE upstream_ref = $1",
                ref,
            )
            settled.set()
            await looked.wait()
            return out

        async def settle_looks(conn: asyncpg.Connection, ids: list[str]) -> object:
            if not looked.is_set():  # the settle's look: its lock held, the old row read
                looked.set()
                await taken.wait()
            return await real_candidates(conn, ids)

        async def take(*args: object) -> object:
            try:
                return await real_take(*args)  # type: ignore[arg-type]
            finally:
                taken.set()

        monkeypatch.setattr(dlr, "candidates", repeat_reads)
        monkeypatch.setattr(matching, "candidates", settle_looks)
        monkeypatch.setattr(dlr, "_take_keys", take)

        async def settle_look() -> None:
            await settled.wait()
            await matching.match_late(store._db, store.rules, ["cx-1"])

        repeat = asyncio.create_task(store.add_dlr(DlrEvent("cx-1", 1, "DELIVRD")))
        await asyncio.wait_for(asyncio.gather(repeat, settle_look()), 20)
        got = []
        while (record := await store.claim("acme", "status")) is not None:
            got.append(record.in_reply_to)
            await store.ack(record)
        assert got == ["L-1"]
    finally:
        await store.close()
