"""Several PostgresStore replicas on one database: leases, wake-ups, idempotency, migrations.

Each test opens two stores (replicas A and B) on a fresh PostgreSQL schema (tests/pg.py) and
checks what no single-process backend can show: claims that never overlap, NOTIFY wake-ups
across replicas, leases of a crashed replica coming back, one pending row per send key.
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from bc_proxy.errors import StoreError
from bc_proxy.store import (
    Delivery,
    DlrEvent,
    MoEvent,
    SendIntent,
    Settlement,
    StatusRecord,
    Store,
    TenantRules,
)
from bc_proxy.store.postgres import PostgresStore, matching
from bc_proxy.store.postgres.schema import LATEST
from bc_proxy.store.rules import Rules
from tests import pg
from tests.pg import pg_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.postgres

# Unique per run: NOTIFY reaches every schema of the database, and another run's "acme:in"
# would wake this run's waiters early.
POLL = f"acme-{secrets.token_hex(3)}"
PUSH = f"pusher-{secrets.token_hex(3)}"
RULES = Rules(
    {
        POLL: TenantRules(senders=("552",)),
        PUSH: TenantRules(delivery=Delivery(push_in=True, push_status=True), senders=("553",)),
    }
)
Opener = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def opener(pg_url: str) -> AsyncIterator[Opener]:  # noqa: F811
    """Opens replicas on the test's schema; every one still open is closed after the test."""
    stores: list[PostgresStore] = []

    async def open_replica(replica: str, **kw: object) -> PostgresStore:
        store = PostgresStore(pg_url, RULES, replica=replica, **kw)  # type: ignore[arg-type]
        await store.open()
        stores.append(store)
        return store

    yield open_replica
    for store in reversed(stores):
        await store.close()


@pytest.fixture
async def pair(opener: Opener) -> tuple[PostgresStore, PostgresStore]:
    """Replicas A and B, open on one schema."""
    return await opener("A"), await opener("B")


async def add_incoming(store: Store, n: int, *, to: str = "552", prefix: str = "m") -> None:
    for i in range(n):
        result = await store.add_mo(
            MoEvent(f"{prefix}{i}", f"64210{i:05d}", to, "hi"), account=None
        )
        assert result.outcome == "stored", result


async def add_push_statuses(store: Store, n: int) -> None:
    for start in range(0, n, 100):
        await store.settle_send(
            [],
            [
                StatusRecord(PUSH, f"6421{i:06d}", "553", f"L{i}", "NUR", "x")
                for i in range(start, min(n, start + 100))
            ],
        )


async def test_concurrent_claims_are_disjoint_and_cover_every_record(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Four pollers on each of two replicas claim 200 records: each record goes to exactly one."""
    a, b = pair
    await add_incoming(a, 200)
    got: dict[str, list[int]] = {"A": [], "B": []}

    async def poller(store: PostgresStore) -> None:
        while (record := await store.claim(POLL, "in")) is not None:
            got[store.replica].append(record.id)
            assert await store.ack(record)

    await asyncio.gather(*(poller(s) for s in (a, b) for _ in range(4)))
    assert not set(got["A"]) & set(got["B"])
    assert len(got["A"]) + len(got["B"]) == 200
    assert len(set(got["A"]) | set(got["B"])) == 200
    assert got["A"], "replica A never got a claim: not concurrent"
    assert got["B"], "replica B never got a claim: not concurrent"
    assert await b.queue_depth(POLL) == (0, 0)


async def test_record_stored_on_one_replica_wakes_a_waiter_on_the_other_within_50ms(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """A long-poll waiting on B wakes within 50 ms of A committing a record (LISTEN/NOTIFY)."""
    a, b = pair
    for i in range(3):
        seen = b.waker.generation(POLL, "in")
        waiter = asyncio.create_task(b.waker.wait(POLL, "in", seen, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await a.add_mo(MoEvent(f"w{i}", "6421000001", "552", "hi"), account=None)
        stored = time.monotonic()
        assert await waiter
        assert time.monotonic() - stored < 0.05
    assert await b.claim(POLL, "in") is not None


async def test_each_of_500_pushes_is_claimed_by_one_replica_once(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Two replicas claiming pushes in a loop push each of 500 due records exactly once."""
    a, b = pair
    await add_push_statuses(a, 500)
    pushed: collections.Counter[int] = collections.Counter()
    by: dict[str, int] = {"A": 0, "B": 0}

    async def worker(store: PostgresStore) -> None:
        while batch := await store.claim_pushes(time.time(), 16):
            for record in batch:
                pushed[record.id] += 1
                by[store.replica] += 1
                await store.push_done(record)

    await asyncio.gather(worker(a), worker(b), worker(a), worker(b))
    assert len(pushed) == 500
    assert set(pushed.values()) == {1}
    assert by["A"]
    assert by["B"]
    assert await a.claim_pushes(time.time() + 3600, 10) == []


async def test_lease_of_a_crashed_replica_expires_and_its_late_ack_fails(opener: Opener) -> None:
    """A replica that claimed and died (pool gone, no close) loses the record after the lease;
    its late ack fails, and its late push success finishes the record."""
    a = await opener("A", lease_seconds=0.5)
    b = await opener("B", lease_seconds=0.5)
    await add_incoming(a, 1)
    await add_push_statuses(a, 1)
    polled = await a.claim(POLL, "in")
    pushing = await a.claim_pushes(time.time(), 10)
    assert polled is not None
    assert len(pushing) == 1
    await a._db.stop()  # the crash: connections gone, leases never released
    assert await b.claim(POLL, "in") is None
    assert await b.claim_pushes(time.time(), 10) == []
    await asyncio.sleep(0.6)
    again = await b.claim(POLL, "in")
    assert again is not None
    assert again.id == polled.id
    repushed = await b.claim_pushes(time.time(), 10)
    assert [r.id for r in repushed] == [pushing[0].id]
    await a._db.start()  # the late replica comes back and acks what it claimed long ago
    assert await a.ack(polled) is False
    # A's push was delivered before it died: its late done finishes the record, and B's
    # attempt in flight (a second delivery: at least once) changes nothing after it.
    await a.push_done(pushing[0])
    assert await b.ack(again) is True
    await b.push_failed(repushed[0], next_at=None, error="HTTP 503")
    assert await b.dead_letters() == []
    await asyncio.sleep(0.6)  # past B's lease: the record is not pushed a third time
    assert await b.claim_pushes(time.time(), 10) == []


async def test_concurrent_begin_send_of_one_key_writes_one_pending_row(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """The same (tenant, messageId, recipient) begun on both replicas at once is sent once."""
    a, b = pair
    now = time.time()
    for i in range(20):
        intent = SendIntent(POLL, f"dup-{i}", ("6421000001", "6421000002"), "552")
        plans = await asyncio.gather(a.begin_send(intent, now), b.begin_send(intent, now))
        sent = [p.recipient for plan in plans for p in plan.to_send]
        repeats = [r for plan in plans for r in plan.repeats]
        assert sorted(sent) == ["6421000001", "6421000002"], plans
        assert sorted(repeats) == [("6421000001", "pending"), ("6421000002", "pending")]
    rows = await pg.execute(a.url, "SELECT count(*) FROM sends WHERE state = 'pending'")
    assert rows == 40


async def test_replicas_expiring_at_once_expire_each_pending_row_once(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Two replicas expiring the same stale sends concurrently: one ERR record per send."""
    a, b = pair
    recipients = tuple(f"64210{i:05d}" for i in range(30))
    for i in range(0, 30, 3):
        await a.begin_send(SendIntent(POLL, f"x-{i}", recipients[i : i + 3], "552"), time.time())
    counts = await asyncio.gather(
        *(s.expire_pending(time.time() + 1) for s in (a, b, a, b)),
    )
    assert sum(counts) == 30
    assert await a.expire_pending(time.time() + 1) == 0
    errs = await pg.execute(
        a.url, "SELECT count(*) FROM records WHERE status_code = 'ERR' AND send_id IS NOT NULL"
    )
    assert errs == 30
    per_send = await pg.execute(
        a.url, "SELECT max(n) FROM (SELECT count(*) AS n FROM records GROUP BY send_id) AS c"
    )
    assert per_send == 1


async def test_concurrent_group_commits_on_two_replicas_never_deadlock(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Groups of begin_send on both replicas naming the same keys in opposite orders: every
    call answers, and each key is sent once."""
    a, b = pair
    keys = [f"k-{i}" for i in range(40)]
    now = time.time()
    calls = [a.begin_send(SendIntent(POLL, k, ("6421000001",), "552"), now) for k in keys]
    calls += [b.begin_send(SendIntent(POLL, k, ("6421000001",), "552"), now) for k in keys[::-1]]
    async with asyncio.timeout(20):
        plans = await asyncio.gather(*calls)
    assert sum(len(p.to_send) for p in plans) == 40
    assert sum(len(p.repeats) for p in plans) == 40


async def test_report_stored_before_its_settle_commits_is_matched_by_either_side(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Reports racing their settles (on the other replica), many times: none stays
    unmatched, whichever side commits second (the post-commit checks of both)."""
    a, b = pair
    for i in range(40):
        plan = await a.begin_send(SendIntent(POLL, f"r-{i}", ("6421000001",), "552"), time.time())
        ref = plan.to_send[0].upstream_ref
        await asyncio.gather(
            a.settle_send([Settlement(ref, "accepted", f"cx-race-{i}")]),
            b.add_dlr(DlrEvent(f"cx-race-{i}", 1, "DELIVRD")),
        )
    unmatched = await pg.execute(a.url, "SELECT count(*) FROM records WHERE tenant IS NULL")
    assert unmatched == 0
    matched = await pg.execute(
        a.url, "SELECT count(*) FROM records WHERE kind = 'status' AND send_id IS NOT NULL"
    )
    assert matched == 40


async def test_exclusive_is_held_by_one_replica_at_a_time(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """A singleton job lock taken on A is refused on B until A lets it go, even by failing."""
    a, b = pair
    async with a.exclusive("sweep") as got_a:
        assert got_a
        async with b.exclusive("sweep") as got_b:
            assert not got_b
        async with b.exclusive("purge") as other:
            assert other
    async with b.exclusive("sweep") as got_b:
        assert got_b

    async def failing_job() -> None:
        async with a.exclusive("sweep") as got:
            assert got
            raise ValueError("the job failed")

    with pytest.raises(ValueError, match="the job failed"):  # not turned into a StoreError
        await failing_job()
    async with b.exclusive("sweep") as got_b:
        assert got_b, "a failed job kept the lock"


async def test_purge_keeps_a_record_another_replica_makes_waiting_meanwhile(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """Purge on A meets an unmatched incoming SMS past retention while B assigns it (B's
    sweep found it under its tenant's account: pollable now). Purge waits for B's row lock,
    then must see the record waiting, and keep it."""
    a, b = pair
    stored = await a.add_mo(MoEvent("mo-late", "6421000002", "999", "hi"), account=None)
    assert stored.outcome == "unmatched"
    holder = await asyncpg.connect(b.url)
    try:
        tx = holder.transaction()
        await tx.start()
        # What B's assignment writes, held open so that A's purge meets the row locked.
        await holder.execute(
            "UPDATE records SET tenant = $1, pollable = true WHERE event_key = 'mo:mo-late'", POLL
        )
        purge = asyncio.create_task(a.purge(time.time() + 1))
        await pg.until_blocked_by(b.url, holder)
        await tx.commit()
        await purge
    finally:
        await holder.close()
    assert await a.queue_depth(POLL) == (1, 0)
    record = await a.claim(POLL, "in")
    assert record is not None
    assert record.body == "hi"


async def test_a_report_left_unmatched_by_a_replica_killed_after_its_settle_is_matched(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """A report arrives before its send is settled (kept unmatched); the replica sending it is
    killed right after its settle's commit, before the look for reports waiting for the new
    Connexus id. Nobody repeats the report: the upkeep pass on the other replica matches it."""
    a, b = pair
    plan = await a.begin_send(SendIntent(POLL, "L-late", ("6421000009",), "552"), time.time())
    (ref,) = [p.upstream_ref for p in plan.to_send]
    assert (await b.add_dlr(DlrEvent("cx-late", 1, "DELIVRD"))).outcome == "unmatched"
    assert await b.match_waiting_reports() == 0  # its send is not known yet
    # A's settle, committed; A dies before its look (what settle_send's commit writes).
    await pg.execute(
        a.url,
        "UPDATE sends SET state = 'accepted', connexus_id = 'cx-late', sender = '552', "
        "settled_at = $2 WHERE upstream_ref = $1",
        ref,
        time.time(),
    )
    assert await b.match_waiting_reports() == 1
    record = await b.claim(POLL, "status")
    assert record is not None
    assert (record.in_reply_to, record.msisdn_from) == ("L-late", "6421000009")
    assert await b.match_waiting_reports() == 0


async def test_the_upkeep_pass_matches_every_waiting_report_oldest_first(
    pair: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More reports wait than one statement takes (a chunk of 1 here): the pass goes on while
    its chunks are full, oldest first, so none is left to age out of its window."""
    a, b = pair
    monkeypatch.setattr(matching, "WAITING_CHUNK", 1)
    for i in range(3):
        plan = await a.begin_send(
            SendIntent(POLL, f"L-w{i}", (f"642100001{i}",), "552"), time.time()
        )
        assert (await b.add_dlr(DlrEvent(f"cx-w{i}", 1, "DELIVRD"))).outcome == "unmatched"
        await pg.execute(  # a settle committed, its look lost
            a.url,
            "UPDATE sends SET state = 'accepted', connexus_id = $2 WHERE upstream_ref = $1",
            plan.to_send[0].upstream_ref,
            f"cx-w{i}",
        )
    assert await b.match_waiting_reports() == 3
    assert await a.queue_depth(POLL) == (0, 3)


async def test_open_refuses_a_schema_newer_than_the_code(opener: Opener, pg_url: str) -> None:  # noqa: F811
    """A database migrated by a newer bc-proxy is refused with both versions named."""
    await opener("A")
    await pg.execute(pg_url, "INSERT INTO schema_version VALUES ($1, 0)", LATEST + 5)
    newer = PostgresStore(pg_url, RULES, replica="C")
    with pytest.raises(StoreError, match=rf"version {LATEST + 5}.*\({LATEST}\)"):
        await newer.open()
    await newer.close()


async def test_migrate_applies_once_and_reports_versions(pg_url: str) -> None:  # noqa: F811
    """Three replicas migrating one empty schema at once: one goes 0 -> latest, none races."""
    stores = [PostgresStore(pg_url, RULES, replica=f"r{i}") for i in range(3)]
    results = await asyncio.gather(*(s.migrate() for s in stores))
    assert sorted(results) == [(0, LATEST), (LATEST, LATEST), (LATEST, LATEST)]
    versions = await pg.execute(pg_url, "SELECT count(*) FROM schema_version")
    assert versions == LATEST


async def test_killed_listen_connection_comes_back_and_wakes_waiters(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """pg_terminate_backend on B's LISTEN connection: B reconnects, wakes its waiters, listens."""
    a, b = pair
    pid = b.listener.pid
    assert pid is not None
    seen = b.waker.generation(POLL, "in")
    waiter = asyncio.create_task(b.waker.wait(POLL, "in", seen, 5.0))
    await asyncio.sleep(0.02)
    assert await pg.execute(a.url, "SELECT pg_terminate_backend($1)", pid)
    async with asyncio.timeout(3):
        assert await waiter  # woken once the connection is back: it re-checks
    assert b.listener.reconnects == 1
    assert b.listener.pid not in (None, pid)
    seen = b.waker.generation(POLL, "in")
    waiter = asyncio.create_task(b.waker.wait(POLL, "in", seen, 5.0))
    await a.add_mo(MoEvent("after", "6421000001", "552", "hi"), account=None)
    async with asyncio.timeout(0.5):
        assert await waiter


async def test_driver_failures_surface_as_store_error(opener: Opener, pg_url: str) -> None:  # noqa: F811
    """A statement past the command timeout (set in the URL), a backend killed mid-statement,
    a dead server: each is a StoreError (the app's 503/500), never a driver exception."""
    quick = PostgresStore(f"{pg_url}&command_timeout=0.3&pool_max=2", RULES, replica="A")
    await quick.open()
    patient = await opener("B")
    blocker = await asyncpg.connect(pg_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreError, match="claim"):
                await quick.claim(POLL, "in")
            stuck = asyncio.create_task(patient.queue_depth(POLL))
            killed = 0
            async with asyncio.timeout(3):
                while not killed:
                    await asyncio.sleep(0.02)
                    killed = await blocker.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
            with pytest.raises(StoreError, match="queue depth"):
                await stuck
    finally:
        await blocker.close()
    assert await patient.queue_depth(POLL) == (0, 0)  # the pool heals
    await quick.close()
    down = PostgresStore("postgresql://postgres@127.0.0.1:1/test", RULES, replica="X")
    with pytest.raises(StoreError, match="connect"):
        await down.open()
    await down.close()


async def test_close_releases_this_replicas_poll_claims_at_once(opener: Opener) -> None:
    """A replica shutting down hands its poll claims back without waiting the lease; its push
    claims stay leased (an attempt abandoned at shutdown may have reached its receiver), so
    another replica pushes the record only once the lease expired."""
    a = await opener("A", lease_seconds=0.5)
    b = await opener("B", lease_seconds=0.5)
    await add_incoming(a, 1)
    await add_push_statuses(a, 1)
    polled = await a.claim(POLL, "in")
    pushing = await a.claim_pushes(time.time(), 5)
    assert polled is not None
    assert pushing
    await a.close()
    got = await b.claim(POLL, "in")
    assert got is not None
    assert got.id == polled.id
    assert await b.claim_pushes(time.time(), 5) == []
    await asyncio.sleep(0.6)
    assert [r.id for r in await b.claim_pushes(time.time(), 5)] == [pushing[0].id]


async def test_migrate_command_reports_versions_and_refuses_newer(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`bc-proxy migrate` prints 0 -> latest, then latest -> latest; a newer schema exits 2."""
    config = tmp_path / "bc-proxy.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, port: 0}\n"
        "upstream: {base_url: 'http://127.0.0.1:9/api/connexus', timeout_seconds: 2}\n"
        f"store: {{url: '{pg_url}'}}\n"
        "webhook: {secret: test-webhook-secret-0123}\n"
        "tenants:\n"
        "  - name: acme\n"
        "    legacy: {user_id: acme-legacy, password: pw}\n"
        "    connexus: {client_id: cid, client_secret: csk}\n"
    )

    async def migrate(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bc_proxy",
            "migrate",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    assert await migrate("--config", str(config)) == (
        0,
        f"store schema version 0 -> {LATEST} (migrated)\n",
        "",
    )
    code, out, _ = await migrate(env={"BC_PROXY_CONFIG": str(config)})
    assert (code, out) == (0, f"store schema version {LATEST} -> {LATEST} (up to date)\n")
    await pg.execute(pg_url, "INSERT INTO schema_version VALUES ($1, 0)", LATEST + 1)
    code, out, err = await migrate("--config", str(config))
    assert code == 2
    assert f"version {LATEST + 1} is newer" in err


async def test_report_racing_its_settle_on_another_replica_is_never_left_unmatched(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """A report stored on B while A's settle makes its Connexus id known ends up matched."""
    a, b = pair
    n = 150
    recipients = tuple(f"6422{i:06d}" for i in range(n))
    plan = await a.begin_send(SendIntent(POLL, "race", recipients, "552"), time.time())
    outcomes = await asyncio.gather(
        *(
            a.settle_send([Settlement(p.upstream_ref, "accepted", f"cx-race-{i}")])
            for i, p in enumerate(plan.to_send)
        ),
        *(b.add_dlr(DlrEvent(f"cx-race-{i}", 1, "DELIVRD")) for i in range(n)),
    )
    assert {o.outcome for o in outcomes[n:] if o is not None} <= {"stored", "unmatched"}
    assert await a.queue_depth(POLL) == (0, n)
