"""Pushes in flight at SIGTERM: one the receiver answers within the shutdown timeout is finished
and delivered once; one still running at the bound is abandoned with its lease kept (pushed
again only once the lease expires, as after a crash); the stop stays within its bound. On
both backends: real `bc-proxy serve` processes, receivers on 127.0.0.1, a real SQLite file or
a fresh PostgreSQL schema."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web

from bc_proxy import keys
from bc_proxy.app import create_app, store_rules
from bc_proxy.config import parse
from bc_proxy.delivery import UNWIND, push_worker
from bc_proxy.store import Delivery, LegacyRecord, MoEvent, Rules, Store, TenantRules, open_store
from bc_proxy.store.sqlite.store import SQLiteStore
from tests import pg
from tests.conftest import WEBHOOK_SECRET, AiohttpServer, Connexus, config_dict, creds
from tests.test_shutdown import free_port, serve

HANDSET = "6421000001"
TICK = 0.02


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL naming an empty store: a SQLite file, or a fresh PostgreSQL schema (skipped,
    or failed with BC_PROXY_REQUIRE_PG=1, when the server is down; see tests/pg.py)."""
    if cast(str, request.param) == "sqlite":
        yield f"sqlite:///{tmp_path / 'bc-proxy.db'}"
        return
    await pg.require()
    name = await pg.create_schema()
    try:
        yield pg.schema_url(name)
    finally:
        await pg.drop_schema(name)


@dataclass
class PushState:
    """The pushed record's row: awaiting its push, attempts made, and whether a push lease
    is held, with the seconds left of it."""

    due: bool
    attempts: int
    leased: bool
    lease_left: float


async def push_state(url: str) -> PushState:
    """The one incoming record's push columns, read from the database itself."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            due, attempts, owner, until = db.execute(
                "SELECT push_due, push_attempts, lease_owner, lease_until FROM records "
                "WHERE kind = 'in'"
            ).fetchone()
        left = (until - time.time()) if until is not None else 0.0
        return PushState(due is not None, attempts, owner is not None, left)
    conn = await asyncpg.connect(url, timeout=3)
    try:
        row = await conn.fetchrow(
            "SELECT push_due, push_attempts, push_owner, "
            "push_until - extract(epoch FROM clock_timestamp()) AS left "
            "FROM records WHERE kind = 'in'"
        )
    finally:
        await conn.close()
    assert row is not None
    left = float(row["left"]) if row["left"] is not None else 0.0
    return PushState(
        row["push_due"] is not None, row["push_attempts"], row["push_owner"] is not None, left
    )


@dataclass
class Receiver:
    """A legacy push receiver on 127.0.0.1: when each POST arrived and what it carried."""

    url: str
    arrivals: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, its messageId)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def ids(self) -> list[str]:
        return [mid for _, mid in self.arrivals]

    async def wait_for(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while len(self.arrivals) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def start_receiver(aiohttp_server: AiohttpServer, answer: Any) -> Receiver:
    """A receiver whose handler, after noting the POST, awaits `answer(n)` (n: which POST)."""
    receiver = Receiver(url="")

    async def receive(request: web.Request) -> web.Response:
        mid = dict(parse_qsl(await request.text()))["messageId"]
        receiver.arrivals.append((time.monotonic(), mid))
        receiver.arrived.set()
        await answer(len(receiver.arrivals))
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/in", receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    receiver.url = str(server.make_url("/in"))
    return receiver


def gateway_config(
    tmp_path: Path,
    connexus: Connexus,
    url: str,
    receiver: Receiver,
    *,
    shutdown_timeout: float,
    lease: float,
    push: dict[str, Any],
) -> tuple[Path, int]:
    """A config file for one gateway pushing incoming SMS to `receiver`, and its port."""
    port = free_port()
    cfg = config_dict(tmp_path, connexus.base_url, port=port)
    cfg["server"]["shutdown_timeout_seconds"] = shutdown_timeout
    cfg["store"] = {"url": url, "lease_seconds": lease}
    cfg["upstream"].update(timeout_seconds=5, mo_query_interval_seconds=0)
    cfg["tenants"][0]["push"] = {"incoming_url": receiver.url, **push}
    cfg["log"] = {"level": "info", "format": "json"}
    path = tmp_path / "bc-proxy.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, port


async def store_mo(http: aiohttp.ClientSession, base: str, message_id: str) -> None:
    payload = {
        "type": "mo",
        "messageId": message_id,
        "from": f"+{HANDSET}",
        "to": "552",
        "body": "pushed at shutdown",
        "timestamp": int(time.time()),
    }
    async with http.post(f"{base}/webhooks/connexus/{WEBHOOK_SECRET}", json=payload) as r:
        assert r.status == 200


# Timings of the first test: the receiver answers 200 after RECEIVER_DELAY (inside the push's
# timeout, capped at 0.8 lease), and a legacy send in flight at SIGTERM (SEND_LATENCY, beyond
# the push worker's idle nap) keeps the server's drain busy until after the push worker has
# begun its stop: the background jobs are cancelled while the push is still on its way.
SHUTDOWN_TIMEOUT = 3.0
LEASE = 3.0
RECEIVER_DELAY = 1.5
SEND_LATENCY = 1.0


async def test_a_push_answered_during_a_graceful_stop_is_delivered_once(
    tmp_path: Path, connexus: Connexus, aiohttp_server: AiohttpServer, store_url: str
) -> None:
    """SIGTERM while a push is at its receiver, which answers 200 well inside the shutdown
    timeout: the push is finished (done in the store, not cut off by the cancel of the
    background jobs), the process exits 0 in time, and neither a restart nor its lease's
    expiry pushes the record again."""
    finished: list[float] = []
    answered = asyncio.Event()

    async def answer(n: int) -> None:
        async def process() -> None:  # runs to its end even if the gateway hangs up
            await asyncio.sleep(RECEIVER_DELAY)
            finished.append(time.monotonic())
            answered.set()

        await asyncio.shield(process())

    receiver = await start_receiver(aiohttp_server, answer)
    config, port = gateway_config(
        tmp_path,
        connexus,
        store_url,
        receiver,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        lease=LEASE,
        push={},
    )
    async with serve(config, port) as gw, aiohttp.ClientSession() as http:
        async with http.post(
            f"{gw.base}/api/1/sms/out", data=creds(to="6421000999", body="w")
        ) as r:
            assert r.status == 204  # the token is fetched before the timed part
        await store_mo(http, gw.base, "mo-once")
        await receiver.wait_for(1, within=5)
        connexus.emu.latency = SEND_LATENCY
        send = asyncio.ensure_future(
            http.post(f"{gw.base}/api/1/sms/out", data=creds(to="6421000777", body="x"))
        )
        deadline = time.monotonic() + 5
        while len(connexus.emu.sms_out_requests()) < 2:  # until the send waits on Connexus
            assert time.monotonic() < deadline, "the send never reached Connexus"
            await asyncio.sleep(TICK)
        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        async with await send as resp:
            assert resp.status == 204  # the send drained as before
        rc = await asyncio.wait_for(gw.proc.wait(), SHUTDOWN_TIMEOUT + 5)
        exited = time.monotonic() - signalled
    connexus.emu.latency = 0
    # The receiver ends its work either way (even if the gateway hung up).
    await asyncio.wait_for(answered.wait(), RECEIVER_DELAY + 2)
    state = await push_state(store_url)  # as the stop left it

    async with serve(config, port) as again:  # a restart (on PostgreSQL: any replica)
        await asyncio.sleep(LEASE + 1.0)  # past the lease the attempt had: nothing left
        again.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.proc.wait(), SHUTDOWN_TIMEOUT + 5) == 0
    assert len(receiver.ids()) == 1, "a push the receiver answered was pushed again"
    assert rc == 0, gw.log
    assert (state.due, state.attempts, state.leased) == (False, 1, False), state
    assert exited < SHUTDOWN_TIMEOUT + 1.5, f"exit took {exited:.2f}s"
    assert finished[0] - signalled > SEND_LATENCY / 2  # the answer came during the stop
    assert "push_abandoned" not in gw.log
    assert "Traceback" not in gw.log


# Timings of the second test: the receiver never answers the first POST; the push's own
# timeout (HANG_PUSH_TIMEOUT) is far past the short shutdown timeout, inside 0.8 lease; a
# failed attempt would be retried almost at once (retry_initial_seconds).
HANG_SHUTDOWN_TIMEOUT = 1.5
HANG_LEASE = 6.0
HANG_PUSH_TIMEOUT = 4.0


async def test_a_hanging_push_receiver_holds_neither_the_stop_nor_its_record(
    tmp_path: Path, connexus: Connexus, aiohttp_server: AiohttpServer, store_url: str
) -> None:
    """SIGTERM with one push at a receiver that does not answer: the process exits within the
    shutdown timeout (not the push's own), the attempt is abandoned unsettled with its lease
    kept, and the restarted gateway pushes the record again only once that lease expired."""
    release = asyncio.Event()

    async def answer(n: int) -> None:
        if n == 1:  # the first POST hangs; later ones are answered at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 30)

    receiver = await start_receiver(aiohttp_server, answer)
    config, port = gateway_config(
        tmp_path,
        connexus,
        store_url,
        receiver,
        shutdown_timeout=HANG_SHUTDOWN_TIMEOUT,
        lease=HANG_LEASE,
        push={"timeout_seconds": HANG_PUSH_TIMEOUT, "retry_initial_seconds": 0.1},
    )
    try:
        async with serve(config, port) as gw:
            async with aiohttp.ClientSession() as http:
                await store_mo(http, gw.base, "mo-hang")
            await receiver.wait_for(1, within=5)
            # No connection left open: the server's drain is empty, so the background jobs
            # are cancelled at once, the push worker still idle (the other test: still busy).
            await asyncio.sleep(0.2)
            signalled = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(gw.proc.wait(), HANG_PUSH_TIMEOUT + 10)
            exited = time.monotonic() - signalled
        assert rc == 0, gw.log
        assert exited < HANG_SHUTDOWN_TIMEOUT + 1.5, f"exit took {exited:.2f}s"
        state = await push_state(store_url)
        # Neither done nor counted as a failed attempt: its lease still held.
        assert (state.due, state.attempts, state.leased) == (True, 0, True), state
        assert state.lease_left > 1.0, state

        first = receiver.arrivals[0][0]
        async with serve(config, port) as again:
            await receiver.wait_for(2, within=HANG_LEASE + 5)
            again.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(again.proc.wait(), HANG_SHUTDOWN_TIMEOUT + 5) == 0
        first_id, second_id = receiver.ids()  # at-least-once: the same record, after the lease
        assert first_id == second_id
        assert receiver.arrivals[1][0] - first > HANG_LEASE - 0.5, "pushed before its lease ran out"
        state = await push_state(store_url)
        assert (state.due, state.leased) == (False, False), state
        assert "push_abandoned" in gw.log
        assert "Traceback" not in gw.log
    finally:
        release.set()


TENANTS = Rules(
    {
        "pusher": TenantRules(
            delivery=Delivery(push_in=True, max_age_seconds=3600), senders=("552",)
        ),
        "poller": TenantRules(senders=("2190",)),
    }
)
STORE_LEASE = 2.0  # long enough for the reopen to come first


async def test_close_keeps_push_leases_and_gives_back_poll_claims(store_url: str) -> None:
    """Store close (the end of a graceful stop) gives a poll claim back at once (polls are
    handed over explicitly) but keeps a push claim's lease: the record it holds is claimed
    again, after a restart, only once the lease expires."""
    store = open_store(store_url, TENANTS, lease_seconds=STORE_LEASE)
    await store.open()
    try:
        await store.add_mo(MoEvent("m-push", HANDSET, "552", "pushed", None), account=None)
        await store.add_mo(MoEvent("m-poll", HANDSET, "2190", "polled", None), account=None)
        (pushing,) = await store.claim_pushes(time.time(), 10)
        polling = await store.claim("poller", "in")
        assert polling is not None
    finally:
        await store.close()
    again = open_store(store_url, TENANTS, lease_seconds=STORE_LEASE)
    await again.open()
    try:
        back = await again.claim("poller", "in")
        assert back is not None
        assert back.id == polling.id
        assert await again.claim_pushes(time.time(), 10) == []
        await asyncio.sleep(STORE_LEASE + 0.2)
        assert [r.id for r in await again.claim_pushes(time.time(), 10)] == [pushing.id]
    finally:
        await again.close()


StoreT = TypeVar("StoreT", bound=SQLiteStore)


async def worker_app(
    tmp_path: Path,
    receiver: Receiver,
    store_class: type[StoreT],
    shutdown_timeout: float,
    push_timeout: float,
) -> tuple[web.Application, StoreT]:
    """The gateway's app (not started) for a push worker run by the test, pushing incoming SMS
    to `receiver`, on an opened SQLite store of `store_class` at tmp_path/push.db (lease 30 s)."""
    cfg = config_dict(tmp_path, "http://127.0.0.1:9/api/connexus")
    cfg["server"]["shutdown_timeout_seconds"] = shutdown_timeout
    cfg["store"]["lease_seconds"] = 30
    cfg["tenants"][0]["push"] = {"incoming_url": receiver.url, "timeout_seconds": push_timeout}
    settings = parse(cfg)
    app = create_app(settings)
    store = store_class(str(tmp_path / "push.db"), store_rules(settings))
    await store.open()
    app[keys.STORE] = cast(Store, store)
    return app, store


class _ClaimsHang(SQLiteStore):
    """A real SQLite store whose claims hang once its first has returned (the database stalls
    with the push worker inside a claim)."""

    claims = 0

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        self.claims += 1
        if self.claims > 1:
            await asyncio.sleep(3600)
        return await super().claim_pushes(now, limit)


async def test_the_stop_bound_counts_from_the_shutdown_not_from_a_hung_claim(
    tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    """The push worker, inside a claim that hangs, does not see the shutdown during the server's
    drain. Its bound for the push in flight still counts from on_shutdown: cancelled after
    the drain (shutdown_timeout_seconds), it is done within UNWIND, not another whole bound
    later (2S + UNWIND, past the supervisor's SIGKILL at S + 5 for S over 5)."""
    hang = asyncio.Event()

    async def answer(n: int) -> None:
        await asyncio.wait_for(hang.wait(), 30)  # the receiver never answers

    receiver = await start_receiver(aiohttp_server, answer)
    app, store = await worker_app(tmp_path, receiver, _ClaimsHang, HANG_SHUTDOWN_TIMEOUT, 20)
    app.freeze()
    job = asyncio.create_task(push_worker(app))
    try:
        await store.add_mo(MoEvent("m-1", HANDSET, "552", "pushed", None), account=None)
        await receiver.wait_for(1, 5)
        await asyncio.sleep(0.2)  # the loop is in its second claim, which hangs
        assert store.claims == 2
        began = time.monotonic()
        await app.on_shutdown.send(app)  # the stop begins (the shutdown's own hook)
        await asyncio.sleep(HANG_SHUTDOWN_TIMEOUT)  # the server's drain, busy to its bound
        job.cancel()  # the background jobs' cancel
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(job, 4 * HANG_SHUTDOWN_TIMEOUT + 5)
        took = time.monotonic() - began
    finally:
        job.cancel()
        await store.close()
    assert took < HANG_SHUTDOWN_TIMEOUT + UNWIND + 0.4, f"the push worker held the stop {took:.2f}s"


class _ClaimFails(SQLiteStore):
    """A real SQLite store whose second claim raises what no store error is (a bug)."""

    claims = 0

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        self.claims += 1
        if self.claims > 1:
            raise RuntimeError("a bug in the claim")
        return await super().claim_pushes(now, limit)


async def test_a_failing_push_loop_lets_its_pushes_in_flight_finish(
    tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    """The push loop fails with nothing stopping: its attempts in flight end by their own
    timeouts, not by the shutdown's bound (a receiver answering after it would get the record
    again once the lease expired)."""

    async def answer(n: int) -> None:
        await asyncio.sleep(1.0)  # answers after the shutdown timeout, inside its own

    receiver = await start_receiver(aiohttp_server, answer)
    app, store = await worker_app(tmp_path, receiver, _ClaimFails, 0.4, 10)
    try:
        await store.add_mo(MoEvent("m-1", HANDSET, "552", "pushed", None), account=None)
        with pytest.raises(RuntimeError, match="a bug in the claim"):
            await asyncio.wait_for(push_worker(app), 15)
        url = f"sqlite:///{tmp_path / 'push.db'}"
    finally:
        await store.close()
    state = await push_state(url)
    assert (state.due, state.attempts) == (False, 1), state  # delivered, not abandoned
    assert len(receiver.arrivals) == 1  # pushed once
