"""A begin_send group whose COMMIT reached PostgreSQL but whose answer was lost.

The failure window: the connection drops while COMMIT is on the wire; the server committed the
pending rows, the gateway sees an error. Retried one call at a time, each call would find its
own pending rows and be answered as a repeat: nobody would send those SMS, and expiry would
later report them as "outcome unknown". With recovery, the group's callers get the plans that
were committed, so the route sends them, and no row is written twice.

The lost answer is made by the group function itself: it commits through the real store
module, then raises as a reset connection would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bc_proxy.errors import StoreError
from bc_proxy.store import SendIntent, SendPlan, Settlement, StatusRecord
from bc_proxy.store.postgres import PostgresStore, sends
from bc_proxy.store.postgres import abandoned as abandoned_module
from bc_proxy.store.postgres.abandoned import Abandoned
from bc_proxy.store.postgres.db import Db
from bc_proxy.store.postgres.group import Batcher
from bc_proxy.store.postgres.schema import LOCK_CLASS_SEND
from bc_proxy.store.rules import Rules, TenantRules
from tests import pg
from tests.pg import pg_url, session  # noqa: F401  (fixtures)

RULES = Rules({"t": TenantRules(senders=("552",))})


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Db]:  # noqa: F811
    async with pg.started_db(pg_url, pool_max=4, migrated=True) as d:
        yield d


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:  # noqa: F811
    """The PostgreSQL store as the gateway runs it, opened on the test's schema."""
    s = PostgresStore(pg_url, RULES)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _batcher(
    db: Db, *, recover: bool, lose_answers: list[int]
) -> Batcher[sends.BeginWrite, SendPlan]:
    """A begin-send batcher whose group function loses the COMMIT answer of the groups
    (counted from 0) listed in `lose_answers`."""
    calls = [0]

    async def run(writes: list[sends.BeginWrite]) -> list[SendPlan]:
        async with db.tx("begin send") as (conn, wakes):
            plans = await sends.begin_sends(conn, wakes, RULES, writes)
        call, calls[0] = calls[0], calls[0] + 1
        if call in lose_answers:
            raise ConnectionResetError("connection lost while COMMIT was on the wire")
        return plans

    async def recover_begins(writes: list[sends.BeginWrite]) -> list[SendPlan] | None:
        return await sends.recover_begins(db, writes)

    return Batcher(
        db,
        "begin send",
        None,
        key=sends.BeginWrite.key,
        run=run,
        droppable=True,
        recover=recover_begins if recover else None,
    )


async def _rows(db: Db) -> list[tuple[str | None, str]]:
    async with db.conn("rows") as conn:
        rows = await conn.fetch("SELECT legacy_id, recipient FROM sends ORDER BY id")
    return [(r["legacy_id"], r["recipient"]) for r in rows]


def _intents() -> list[SendIntent]:
    return [
        SendIntent("t", "m-1", ("6421000001", "6421000002"), "552"),
        SendIntent("t", "m-2", ("6421000003",), "552"),
        SendIntent("t", None, ("6421000004",), "552"),
    ]


async def _submit_all(b: Batcher[sends.BeginWrite, SendPlan]) -> list[SendPlan]:
    now = time.time()
    return list(await asyncio.gather(*(b.submit(sends.BeginWrite(i, now)) for i in _intents())))


async def test_a_group_committed_with_its_answer_lost_is_answered_with_its_plans(
    db: Db,
) -> None:
    plans = await _submit_all(_batcher(db, recover=True, lose_answers=[0]))
    assert [sorted(p.recipient for p in plan.to_send) for plan in plans] == [
        ["6421000001", "6421000002"],
        ["6421000003"],
        ["6421000004"],
    ]
    assert all(plan.repeats == () for plan in plans)
    # the rows the answers name are the committed ones, each written once
    assert sorted(await _rows(db), key=str) == sorted(
        [("m-1", "6421000001"), ("m-1", "6421000002"), ("m-2", "6421000003"), (None, "6421000004")],
        key=str,
    )
    async with db.conn("refs") as conn:
        stored = {r[0] for r in await conn.fetch("SELECT upstream_ref FROM sends")}
    assert {p.upstream_ref for plan in plans for p in plan.to_send} == stored


async def test_a_group_that_did_not_commit_is_retried_call_by_call(db: Db) -> None:
    async def failing_run(writes: list[sends.BeginWrite]) -> list[SendPlan]:
        if len(writes) > 1:
            async with db.tx("begin send") as (conn, wakes):
                await sends.begin_sends(conn, wakes, RULES, writes)
                raise ConnectionResetError("lost before COMMIT")  # rolled back
        async with db.tx("begin send") as (conn, wakes):
            return await sends.begin_sends(conn, wakes, RULES, writes)

    async def recover_begins(writes: list[sends.BeginWrite]) -> list[SendPlan] | None:
        return await sends.recover_begins(db, writes)

    b: Batcher[sends.BeginWrite, SendPlan] = Batcher(
        db, "begin send", None, key=sends.BeginWrite.key, run=failing_run, recover=recover_begins
    )
    plans = await _submit_all(b)
    assert [len(plan.to_send) for plan in plans] == [2, 1, 1]
    assert len(await _rows(db)) == 4


async def _plan_and_roll_back(db: Db, writes: list[sends.BeginWrite]) -> None:
    async with db.tx("rolled back") as (conn, wakes):
        await sends.begin_sends(conn, wakes, RULES, writes)
        raise ConnectionResetError("lost before COMMIT")


async def test_recover_begins_tells_committed_from_rolled_back(db: Db) -> None:
    writes = [sends.BeginWrite(i, time.time()) for i in _intents()]
    assert await sends.recover_begins(db, writes) is None  # never planned
    with pytest.raises(StoreError, match="lost before COMMIT"):
        await _plan_and_roll_back(db, writes)
    assert await sends.recover_begins(db, writes) is None  # planned, rolled back
    async with db.tx("committed") as (conn, wakes):
        committed = await sends.begin_sends(conn, wakes, RULES, writes)
    assert await sends.recover_begins(db, writes) == committed


async def _begun(db: Db, now: float) -> list[str]:
    """The intents' pending rows, committed: their upstream refs."""
    async with db.tx("begin") as (conn, wakes):
        begun = await sends.begin_sends(
            conn, wakes, RULES, [sends.BeginWrite(i, now) for i in _intents()]
        )
    return [p.upstream_ref for plan in begun for p in plan.to_send]


async def test_a_settle_group_committed_with_its_answer_lost_stores_its_statuses_once(
    db: Db,
) -> None:
    now = time.time()
    refs = await _begun(db, now)
    async with db.conn("unmatched report") as conn:  # a report that came before its settle
        await conn.execute(
            "INSERT INTO records (kind, ref, receipt_id, created_at, status_code) "
            "VALUES ('status', 'cx-0', 'r-0', $1, 'DELIVRD')",
            now,
        )
    writes = [
        sends.SettleWrite((Settlement(refs[0], "accepted", "cx-0"),), ()),
        sends.SettleWrite(
            (Settlement(refs[1], "rejected"),),
            (StatusRecord("t", "6421000002", "552", "m-1", "ERR", "rejected", refs[1]),),
        ),
        sends.SettleWrite(
            (Settlement(refs[2], "unknown"),),
            (StatusRecord("t", "6421000003", "552", "m-2", "ERR", "unknown", refs[2]),),
        ),
    ]
    calls = [0]

    async def run(ws: list[sends.SettleWrite]) -> list[None]:
        calls[0] += 1
        if calls[0] > 1:
            return await sends.settle_sends(db, RULES, ws)
        # What settle_sends commits, through its COMMIT; then the answer is lost, so its late
        # report matching (after the commit) does not run either.
        done = [s for w in ws for s in w.settlements]
        async with db.tx("settle send") as (conn, wakes):
            rows = await conn.fetch(
                sends.SETTLE,
                [s.upstream_ref for s in done],
                [s.state for s in done],
                [s.connexus_id for s in done],
                [s.sender for s in done],
                max(w.now for w in ws),
            )
            await sends.insert_statuses(
                conn,
                wakes,
                RULES,
                [(st, w.now) for w in ws for st in w.statuses],
                {r["upstream_ref"]: r["id"] for r in rows},
            )
        raise ConnectionResetError("connection lost while COMMIT was on the wire")

    async def recover_settles(ws: list[sends.SettleWrite]) -> list[None] | None:
        return await sends.recover_settles(db, RULES, ws)

    b: Batcher[sends.SettleWrite, None] = Batcher(
        db, "settle send", None, key=id, run=run, recover=recover_settles
    )
    # the group's calls, queued together before its writer runs
    await asyncio.gather(*(b.submit(w) for w in writes))
    async with db.conn("check") as conn:
        errs = await conn.fetch(
            "SELECT msisdn_from FROM records WHERE status_code = 'ERR' ORDER BY msisdn_from"
        )
        report = await conn.fetchrow("SELECT tenant, send_id FROM records WHERE ref = 'cx-0'")
        states = dict(await conn.fetch("SELECT upstream_ref, state FROM sends"))
    assert [r["msisdn_from"] for r in errs] == ["6421000002", "6421000003"]  # once each
    assert report["tenant"] == "t"  # matched late
    assert report["send_id"] is not None
    assert [states[r] for r in refs[:3]] == ["accepted", "rejected", "unknown"]
    assert calls[0] == 1  # answered by the recovery, not run again


async def test_a_group_of_blocked_handsets_committed_with_its_answer_lost_is_stored_once(
    db: Db,
) -> None:
    async with db.conn("block") as conn:
        await conn.execute(
            "INSERT INTO blocked (tenant, handset, since) VALUES ('t', '6421000001', 0), "
            "('t', '6421000003', 0)"
        )
    now = time.time()
    b = _batcher(db, recover=True, lose_answers=[0])
    plans = await asyncio.gather(
        b.submit(sends.BeginWrite(SendIntent("t", "m-1", ("6421000001",), "552"), now)),
        b.submit(sends.BeginWrite(SendIntent("t", "m-2", ("6421000003",), "552"), now)),
    )
    assert [plan.blocked for plan in plans] == [("6421000001",), ("6421000003",)]
    async with db.conn("check") as conn:
        nurs = await conn.fetch(
            "SELECT msisdn_from FROM records WHERE status_code = 'NUR' ORDER BY msisdn_from"
        )
    assert [r["msisdn_from"] for r in nurs] == ["6421000001", "6421000003"]  # once each


async def test_calls_of_a_group_whose_commit_could_not_be_told_are_checked_before_a_retry(
    db: Db,
) -> None:
    # The group committed, its answer was lost, and the check right after failed too (the
    # database still unreachable): each call is checked again before it is written alone.
    now = time.time()
    refs = await _begun(db, now)
    writes = [
        sends.SettleWrite(
            (Settlement(ref, "rejected"),),
            (StatusRecord("t", f"64210000{i:02d}", "552", None, "ERR", "rejected", ref),),
            now=now + i,  # the group stores the latest time of its calls
        )
        for i, ref in enumerate(refs)
    ]
    runs = [0]
    checks = [0]

    async def run(ws: list[sends.SettleWrite]) -> list[None]:
        runs[0] += 1
        await sends.settle_sends(db, RULES, ws)
        if runs[0] == 1:
            raise ConnectionResetError("connection lost while COMMIT was on the wire")
        return [None] * len(ws)

    async def recover_settles(ws: list[sends.SettleWrite]) -> list[None] | None:
        checks[0] += 1
        if checks[0] == 1:
            raise ConnectionRefusedError("the database is still unreachable")
        return await sends.recover_settles(db, RULES, ws)

    b: Batcher[sends.SettleWrite, None] = Batcher(
        db, "settle send", None, key=id, run=run, recover=recover_settles
    )
    await asyncio.gather(*(b.submit(w) for w in writes))
    async with db.conn("check") as conn:
        errs = await conn.fetchval("SELECT count(*) FROM records WHERE status_code = 'ERR'")
    assert errs == len(refs)  # once each
    assert runs[0] == 1  # no call was written again


async def test_recovery_waits_for_a_group_still_committing_on_the_server(db: Db) -> None:
    # The connection dropped while the server still runs the group's COMMIT: the check must
    # not read before that commit is visible (it would find nothing, and the retry would
    # turn the group's sends into repeats of themselves).
    writes = [sends.BeginWrite(i, time.time()) for i in _intents()[:2]]  # with messageIds
    committing = asyncio.Event()
    release = asyncio.Event()

    async def group_on_the_server() -> list[SendPlan]:
        async with db.tx("begin send") as (conn, wakes):
            plans = await sends.begin_sends(conn, wakes, RULES, writes)
            committing.set()
            await release.wait()
        return plans

    server = asyncio.ensure_future(group_on_the_server())
    await committing.wait()
    check = asyncio.ensure_future(sends.recover_begins(db, writes))
    await asyncio.sleep(0.3)
    assert not check.done()  # waiting for the group's locks
    release.set()
    assert await asyncio.wait_for(check, 5) == await server

    settle = [
        sends.SettleWrite((Settlement(p.upstream_ref, "accepted", "cx-9"),), ())
        for p in (await server)[0].to_send
    ]
    settling = asyncio.Event()
    done = asyncio.Event()

    async def settle_on_the_server() -> None:
        async with db.tx("settle send") as (conn, _):
            await conn.execute(
                "UPDATE sends SET state = 'accepted', settled_at = $2 "
                "WHERE upstream_ref = ANY($1::text[])",
                [w.settlements[0].upstream_ref for w in settle],
                max(w.now for w in settle),
            )
            settling.set()
            await done.wait()

    server2 = asyncio.ensure_future(settle_on_the_server())
    await settling.wait()
    check2 = asyncio.ensure_future(sends.recover_settles(db, RULES, settle))
    await asyncio.sleep(0.3)
    assert not check2.done()  # waiting for the rows the settle holds
    done.set()
    await server2
    assert await asyncio.wait_for(check2, 5) == [None] * len(settle)


async def _state(db: Db, ref: str) -> str:
    async with db.conn("state") as conn:
        return str(await conn.fetchval("SELECT state FROM sends WHERE upstream_ref = $1", ref))


async def _state_becomes(db: Db, ref: str, want: str, within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        state = await _state(db, ref)
        if state == want or time.monotonic() >= deadline:
            return state
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("retry_at_once", [True, False])
async def test_a_call_whose_commit_could_not_be_told_leaves_no_pending_row_behind(
    db: Db, retry_at_once: bool
) -> None:
    # The call's group committed, its answer was lost and the check failed too (the database
    # unreachable): the caller gets an error and never calls Connexus, yet its pending row
    # exists. Left pending, the legacy retry would be answered "outcome unknown" and nothing
    # would ever be sent. The row is rejected (never written upstream), so the retry sends:
    # at once (the retry's own group rejects it before reading its facts), or later (the
    # background flush).
    abandoned = Abandoned(db)
    lost = [True]

    async def run(writes: list[sends.BeginWrite]) -> list[SendPlan]:
        await abandoned.reject(fresh_only=True)
        async with db.tx("begin send") as (conn, wakes):
            plans = await sends.begin_sends(conn, wakes, RULES, writes)
        if lost[0]:
            lost[0] = False
            raise ConnectionResetError("connection lost while COMMIT was on the wire")
        return plans

    async def cannot_tell(writes: list[sends.BeginWrite]) -> list[SendPlan] | None:
        raise StoreError("the database is still unreachable")

    b: Batcher[sends.BeginWrite, SendPlan] = Batcher(
        db,
        "begin send",
        None,
        key=sends.BeginWrite.key,
        run=run,
        droppable=True,
        recover=cannot_tell,
        abandoned=lambda w: abandoned.add(w.refs_tried),
    )
    intent = SendIntent("t", "m-lost", ("6421000031",), "552")
    first = sends.BeginWrite(intent, time.time())
    with pytest.raises(StoreError):
        await b.submit(first)
    (ref,) = first.refs_tried
    if not retry_at_once:
        assert await _state_becomes(db, ref, "rejected", 5) == "rejected"
    plan = await b.submit(sends.BeginWrite(intent, time.time()))
    assert [p.recipient for p in plan.to_send] == ["6421000031"]  # sent by the retry
    assert plan.repeats == ()
    assert await _state(db, ref) == "rejected"
    assert len(abandoned) == 0
    await abandoned.stop()


async def test_a_call_cancelled_while_its_group_commits_leaves_no_pending_row_behind(
    store: PostgresStore,
    pg_url: str,  # noqa: F811
    session: asyncpg.Connection,  # noqa: F811
) -> None:
    # The store as the gateway runs it: a begin_send whose caller is cancelled (a shutdown's
    # deadline) while its group waits on the server; the group commits the pending row, its
    # caller is gone and never sends. The row is rejected, and a retry sends.
    intent = SendIntent("t", "m-cancelled", ("6421000032",), "552")
    tx = session.transaction()
    await tx.start()
    await session.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2 || chr(1) || $3))",
        LOCK_CLASS_SEND,
        "t",
        "m-cancelled",
    )
    caller = asyncio.ensure_future(store.begin_send(intent, time.time()))
    await pg.until_blocked_by(pg_url, session)  # its group waits for the lock on the server
    caller.cancel()
    await tx.commit()  # the group goes on and commits; its caller is gone
    with pytest.raises(asyncio.CancelledError):
        await caller
    deadline = time.monotonic() + 5
    while True:
        state = await pg.execute(pg_url, "SELECT state FROM sends WHERE legacy_id = 'm-cancelled'")
        if state == "rejected" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert state == "rejected"
    plan = await store.begin_send(intent, time.time())
    assert [p.recipient for p in plan.to_send] == ["6421000032"]


async def test_abandoned_rows_are_rejected_once_more_as_the_store_closes(db: Db) -> None:
    # Callers cancelled by a shutdown: their groups commit as the store drains, and the
    # background flush is stopped with it. The close rejects what is left, once.
    write = sends.BeginWrite(SendIntent("t", "m-close", ("6421000033",), "552"), time.time())
    async with db.tx("begin send") as (conn, wakes):
        await sends.begin_sends(conn, wakes, RULES, [write])
    abandoned = Abandoned(db)
    abandoned.add(write.refs_tried)
    await abandoned.stop()  # before the flush's first attempt
    assert await _state(db, write.refs_tried[0]) == "rejected"
    assert len(abandoned) == 0
    abandoned.add(["u-after-close"])  # stopped: kept, no flush started
    assert len(abandoned) == 1


class _LosesTheFirstAnswer(PostgresStore):
    """The store as the gateway runs it, except that its first begin group's COMMIT answer is
    lost and every check after a failure fails (the database "still unreachable")."""

    lose = True

    async def _begin_sends(self, w: list[sends.BeginWrite]) -> list[SendPlan]:
        plans = await super()._begin_sends(w)
        if self.lose:
            self.lose = False
            raise ConnectionResetError("connection lost while COMMIT was on the wire")
        return plans

    async def _recover_begins(self, w: list[sends.BeginWrite]) -> list[SendPlan] | None:
        raise StoreError("the database is still unreachable")


async def _states(url: str, legacy_id: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT state FROM sends WHERE legacy_id = $1 ORDER BY id", legacy_id
        )
    finally:
        await conn.close()
    return [r["state"] for r in rows]


async def test_the_store_rejects_an_abandoned_row_before_a_retry_reads_its_facts(
    pg_url: str,  # noqa: F811
) -> None:
    # The real store's wiring: the caller of the lost group gets an error; its retry, at once
    # (before any background flush), is planned by a group that rejects the row first.
    store = _LosesTheFirstAnswer(pg_url, RULES)
    await store.open()
    try:
        intent = SendIntent("t", "m-wired", ("6421000034",), "552")
        with pytest.raises(StoreError):
            await store.begin_send(intent, time.time())
        plan = await store.begin_send(intent, time.time())
        assert [p.recipient for p in plan.to_send] == ["6421000034"]
    finally:
        await store.close()
    assert await _states(pg_url, "m-wired") == ["rejected", "pending"]


async def test_a_row_a_retry_was_answered_from_is_never_rejected(
    store: PostgresStore,
    pg_url: str,  # noqa: F811
) -> None:
    # A retry read the row while it was pending (another replica, before the refs were known
    # abandoned) and was answered "unknown" from it: the row is marked and keeps its state, so
    # that expiry gives the client its ERR record instead of a silent rejection.
    intent = SendIntent("t", "m-seen", ("6421000035",), "552")
    first = await store.begin_send(intent, time.time())
    retry = await store.begin_send(intent, time.time())
    assert retry.repeats == (("6421000035", "pending"),)
    async with pg.started_db(pg_url) as db:
        abandoned = Abandoned(db)
        abandoned.add([first.to_send[0].upstream_ref])
        await abandoned.stop()  # its one last rejection
        assert len(abandoned) == 0  # settled: the row was seen, and left alone
    assert await _states(pg_url, "m-seen") == ["pending"]
    assert await store.expire_pending(time.time() + 1) == 1
    status = await store.claim("t", "status")
    assert status is not None
    assert status.status_code == "ERR"


async def test_a_retry_whose_pending_row_is_rejected_meanwhile_is_planned_again(
    store: PostgresStore,
    pg_url: str,  # noqa: F811
    session: asyncpg.Connection,  # noqa: F811
) -> None:
    # The rejection (another replica's, uncommitted) holds the row when the retry reads its
    # facts: the retry sees it pending, its mark waits for the row, finds it rejected once the
    # rejection commits, and the retry reads its facts again and sends.
    intent = SendIntent("t", "m-race", ("6421000036",), "552")
    first = await store.begin_send(intent, time.time())
    tx = session.transaction()
    await tx.start()
    await session.fetchrow(abandoned_module.REJECT, [first.to_send[0].upstream_ref], 1.0)
    retry = asyncio.ensure_future(store.begin_send(intent, time.time()))
    await pg.until_blocked_by(pg_url, session)  # the retry's mark waits for the row lock
    await tx.commit()
    plan = await asyncio.wait_for(retry, 10)
    assert [p.recipient for p in plan.to_send] == ["6421000036"]
    assert plan.repeats == ()
    assert await _states(pg_url, "m-race") == ["rejected", "pending"]


async def test_an_outage_longer_than_the_keep_time_still_rejects_abandoned_rows(db: Db) -> None:
    # Refs are abandoned while the database is down, often for longer than a ref with no row
    # is kept. That time counts from the first rejection that misses the row, not from the
    # abandonment: the first flush after the outage still rejects the rows it finds; a ref
    # with no row is dropped `keep_seconds` after that.
    write = sends.BeginWrite(SendIntent("t", "m-long", ("6421000037",), "552"), time.time())
    async with db.tx("begin send") as (conn, wakes):
        await sends.begin_sends(conn, wakes, RULES, [write])
    abandoned = Abandoned(db, keep_seconds=0.05)
    abandoned.add([*write.refs_tried, "u-never-stored"])
    await asyncio.sleep(0.1)  # "the outage": longer than keep_seconds, no rejection ran
    assert await abandoned.reject()
    assert await _state(db, write.refs_tried[0]) == "rejected"
    assert len(abandoned) == 1  # the ref with no row, kept a while
    await asyncio.sleep(0.1)
    assert await abandoned.reject()
    assert len(abandoned) == 0
    await abandoned.stop()


async def test_a_row_expiry_made_unknown_is_no_proof_that_a_settle_group_committed(
    db: Db,
) -> None:
    """A group settling one row `accepted` and another `unknown` lost its COMMIT answer, and
    in fact never committed; expiry then made the second row `unknown`. The recovery must not
    take that row for the group's commit: it answers None (retry call by call), and the retry
    makes the first row `accepted`."""
    async with db.tx("begin send") as (conn, wakes):
        (plan,) = await sends.begin_sends(
            conn, wakes, RULES, [sends.BeginWrite(SendIntent("t", "m-1", ("1", "2"), "552"), 1.0)]
        )
    first, second = plan.to_send
    group = [
        sends.SettleWrite((Settlement(first.upstream_ref, "accepted", "cx-1"),), ()),
        sends.SettleWrite((Settlement(second.upstream_ref, "unknown"),), ()),
    ]
    assert await sends.expire_pending(db, RULES, time.time()) == 2
    async with db.conn("put back") as conn:  # only the second row expired meanwhile
        await conn.execute(
            "UPDATE sends SET state = 'pending', settled_at = NULL WHERE upstream_ref = $1",
            first.upstream_ref,
        )
    assert await sends.recover_settles(db, RULES, group) is None
    await sends.settle_sends(db, RULES, group[:1])
    assert await _state(db, first.upstream_ref) == "accepted"
