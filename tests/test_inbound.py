"""Inbound path end to end: Connexus webhooks -> store -> legacy poll, queue and push.

Every test drives the real gateway on 127.0.0.1 against the real Connexus emulator, under each
reading of its delivery reports (which id they carry; with or without timestamp and details);
push receivers are real aiohttp servers. Nothing of bc_proxy is mocked.
"""

from __future__ import annotations

import asyncio
import copy
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import yaml
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestServer

from bc_proxy import keys
from bc_proxy.recovery import sweep_tenant
from bc_proxy.store import SendIntent, Settlement, Store
from tests.conftest import (
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
    with_tenant,
)
from tests.readings import ONE_READING, reading_connexus  # noqa: F401 - each test, each reading
from tests.served import run_cli

IN_KEYS = {"messageId", "from", "to", "body", "rateCode", "inReplyToId"}
STATUS_KEYS = {"messageId", "from", "to", "statusCode", "inReplyToId", "error"}
FORM_CT = "application/x-www-form-urlencoded"
HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
HANDSET = "6421000111"
OTHER_USER = "globex-legacy"
OTHER_PASSWORD = "globex-legacy-pass"
TRICKY_BODY = "Kia ora ü 日本語 🎉 & a=b + c 100%\nline two\r\nline three &amp; ?x=1#frag"


# -- helpers ------------------------------------------------------------------------------------


def dlr(message_id: str, status_code: int, status: str = "") -> dict[str, Any]:
    """A Connexus delivery-report webhook payload (bare: no timestamp, no details)."""
    return {"type": "dlr", "messageId": message_id, "statusCode": status_code, "status": status}


def db_count(cfg: dict[str, Any], table: str, where: str = "") -> int:
    """Rows of a table of the gateway's SQLite file, read by a separate connection."""
    path = cfg["store"]["url"][len("sqlite:///") :]
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        (n,) = db.execute(f"SELECT count(*) FROM {table} {where}").fetchone()
    return int(n)


def mo(
    message_id: str, sender: str, to: str, body: str, related: str | None = None
) -> dict[str, Any]:
    """A Connexus incoming-SMS webhook payload."""
    payload: dict[str, Any] = {
        "type": "mo",
        "messageId": message_id,
        "from": sender,
        "to": to,
        "body": body,
        "timestamp": int(time.time()),
    }
    if related is not None:
        payload["relatedMessageId"] = related
    return payload


async def hook(client: GatewayClient, payload: Any) -> int:
    """POST one webhook to the gateway; the HTTP status."""
    async with client.post(HOOK, json=payload) as resp:
        await resp.read()
        return resp.status


def parse_record(body: bytes) -> dict[str, str]:
    """A legacy form body as a dict, every key exactly once."""
    parsed = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in parsed.values()), parsed
    return {k: v[0] for k, v in parsed.items()}


@dataclass
class Polled:
    status: int
    body: bytes
    content_type: str | None

    @property
    def record(self) -> dict[str, str]:
        assert self.status == 200, (self.status, self.body)
        return parse_record(self.body)


async def poll(
    client: GatewayClient,
    kind: str,
    user: str = LEGACY_USER,
    password: str = LEGACY_PASSWORD,
    client_timeout: ClientTimeout | None = None,
) -> Polled:
    """GET /api/1/sms/{in,status} the way bulletinlibs does (credentials in the query)."""
    params = {"userId": user, "password": password}
    async with client.get(f"/api/1/sms/{kind}", params=params, timeout=client_timeout) as resp:
        body = await resp.read()
        return Polled(resp.status, body, resp.headers.get("Content-Type"))


async def queue(
    client: GatewayClient, user: str = LEGACY_USER, password: str = LEGACY_PASSWORD
) -> tuple[int, bytes]:
    async with client.get(
        "/api/1/sms/queue", params={"userId": user, "password": password}
    ) as resp:
        return resp.status, await resp.read()


async def queue_settles(client: GatewayClient, expected: bytes, within: float = 3.0) -> None:
    """/sms/queue reaches `expected` (a poll is consumed once the client's TCP stack acked it)."""
    deadline = time.monotonic() + within
    while (got := await queue(client)) != (200, expected):
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.02)


async def legacy_send(
    client: GatewayClient,
    connexus: Connexus,
    to: str,
    message_id: str | None,
    user: str = LEGACY_USER,
    password: str = LEGACY_PASSWORD,
) -> str:
    """One legacy send to one number; the id its delivery reports carry (by the reading)."""
    before = len(connexus.emu.sent)
    form = {"to": to, "body": "hello", "userId": user, "password": password}
    if message_id is not None:
        form["messageId"] = message_id
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    sent = connexus.emu.sent[before:]
    assert len(sent) == 1
    assert sent[0].accepted
    return connexus.emu.report_id(sent[0])


async def store_send(
    store: Store, legacy_id: str | None, to: str = HANDSET, cid: str | None = None
) -> str:
    """Write ahead and settle one accepted send in a store; its Connexus id."""
    plan = await store.begin_send(SendIntent("acme", legacy_id, (to,), "552"), time.time())
    [planned] = plan.to_send
    cid = cid or f"cx-{legacy_id}"
    await store.settle_send([Settlement(planned.upstream_ref, "accepted", connexus_id=cid)])
    return cid


async def legacy_send_direct(client: GatewayClient, legacy_id: str) -> str:
    """Record a send through the running app's store; its Connexus id."""
    return await store_send(client.app[keys.STORE], legacy_id)


def two_tenants(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` plus a second tenant `globex` with its own credentials and sender."""
    out = copy.deepcopy(cfg)
    out["tenants"].append(
        {
            "name": "globex",
            "legacy": {"user_id": OTHER_USER, "password": OTHER_PASSWORD},
            "connexus": {"client_id": "cid_other", "client_secret": "csk_other"},
            "default_from": "3000",
            "senders": ["3000"],
            "poll_wait_seconds": out["tenants"][0]["poll_wait_seconds"],
        }
    )
    return out


async def eventually(cond: Callable[[], bool], within: float, what: str) -> None:
    """Wait until `cond()` holds, at most `within` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@dataclass
class Hit:
    path: str
    form: dict[str, str]
    answered: int


@dataclass
class Receiver:
    """A legacy system's push endpoint: answers the scripted statuses, then `default`."""

    script: list[int] = field(default_factory=list)
    default: int = 200
    hits: list[Hit] = field(default_factory=list)
    server: TestServer | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def ok(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path and h.answered == 200]

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == FORM_CT
        form = await request.post()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        assert len(values) == len(form)
        status = self.script.pop(0) if self.script else self.default
        self.hits.append(Hit(request.path, values, status))
        return web.Response(status=status, text="ok" if status == 200 else "down")


async def start_receiver(aiohttp_server: AiohttpServer, receiver: Receiver) -> Receiver:
    app = web.Application()
    app.router.add_post("/sms-in", receiver.handle)
    app.router.add_post("/sms-status", receiver.handle)
    receiver.server = await aiohttp_server(app, host="127.0.0.1")
    return receiver


def push_cfg(cfg: dict[str, Any], receiver: Receiver, **push: Any) -> dict[str, Any]:
    settings = {
        "incoming_url": receiver.url("/sms-in"),
        "status_url": receiver.url("/sms-status"),
        "keep_for_polling": False,
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.2,
        **push,
    }
    return with_tenant(cfg, push=settings)


# -- 1. webhook ingest --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/webhooks/connexus/wrong-secret-0123456",
        f"/webhooks/connexus/{WEBHOOK_SECRET[:-1]}",
        f"/webhooks/connexus/{WEBHOOK_SECRET}x",
        f"/webhooks/connexus/{WEBHOOK_SECRET.upper()}",
    ],
)
@ONE_READING
async def test_webhook_wrong_secret_stores_nothing(
    gateway: GatewayFactory, cfg: dict[str, Any], path: str
) -> None:
    """A webhook with the wrong path secret is refused and leaves no record behind."""
    client = await gateway(cfg)
    async with client.post(path, json=mo("m1", "+" + HANDSET, "552", "hi")) as resp:
        assert resp.status != 200
        assert resp.status in (401, 403, 404)
    assert await queue(client) == (200, b"inCount=0&statusCount=0")
    assert (await poll(client, "in")).status == 204
    assert db_count(cfg, "records") == 0
    assert db_count(cfg, "rejected_webhooks") == 0  # not ours: nothing of it is kept


async def test_webhook_200_only_after_commit(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Right after a webhook's 200 an immediate poll returns its record, well inside 5 s."""
    client = await gateway(cfg)
    cid = await legacy_send(client, connexus, HANDSET, "commit-1")
    for code in range(1, 11):
        started = time.perf_counter()
        assert await hook(client, dlr(cid, code)) == 200
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, elapsed
        got = await poll(client, "status")
        assert got.record["inReplyToId"] == "commit-1"
    started = time.perf_counter()
    assert await hook(client, mo("m-commit", "+" + HANDSET, "552", "hi")) == 200
    assert time.perf_counter() - started < 1.0
    got = await poll(client, "in")
    assert got.record["body"] == "hi"


async def test_same_event_twice_is_one_record(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Connexus retrying the same dlr or mo webhook yields one legacy record each."""
    client = await gateway(cfg)
    cid = await legacy_send(client, connexus, HANDSET, "dup-1")
    for _ in range(3):
        assert await hook(client, dlr(cid, 1, "DELIVRD")) == 200
        assert await hook(client, mo("555", "+" + HANDSET, "552", "once")) == 200
    # Concurrent duplicates too (Connexus retries overlapping a slow answer).
    codes = await asyncio.gather(*(hook(client, dlr(cid, 2, "UNDELIV")) for _ in range(10)))
    assert codes == [200] * 10
    assert await queue(client) == (200, b"inCount=1&statusCount=2")
    first = (await poll(client, "status")).record
    second = (await poll(client, "status")).record
    assert {first["statusCode"], second["statusCode"]} == {"RCV", "NRCV"}
    assert (await poll(client, "status")).status == 204
    assert (await poll(client, "in")).record["body"] == "once"
    assert (await poll(client, "in")).status == 204
    # Retried after it was consumed: still not handed out again.
    assert await hook(client, dlr(cid, 1, "DELIVRD")) == 200
    assert await hook(client, mo("555", "+" + HANDSET, "552", "once")) == 200
    await queue_settles(client, b"inCount=0&statusCount=0")


# -- 2/3. delivery reports -> status records ----------------------------------------------------


async def test_dlr_codes_become_legacy_status_records(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Connexus statuses 1,2,4,8,16,99 poll as RCV,NRCV,SNT,SNT,NUR,ERR for the legacy send."""
    client = await gateway(cfg)
    legacy_id = "6b06fbc6a1b501.29755622"
    cid = await legacy_send(client, connexus, "+" + HANDSET, legacy_id)
    expected = [(1, "RCV"), (2, "NRCV"), (4, "SNT"), (8, "SNT"), (16, "NUR"), (99, "ERR")]
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    receipts = set()
    for code, legacy in expected:
        await connexus.emu.fire_dlr(cid, code)
        assert connexus.emu.webhook_deliveries[-1][1] == 200
        got = await poll(client, "status")
        assert got.status == 200
        assert got.content_type == FORM_CT
        rec = got.record
        assert set(rec) == STATUS_KEYS
        assert rec["statusCode"] == legacy, (code, rec)
        assert rec["inReplyToId"] == legacy_id
        assert rec["from"] == HANDSET
        assert rec["to"] == "552"
        assert 0 < len(rec["messageId"]) <= 50
        receipts.add(rec["messageId"])
        if code == 99:
            assert "99" in rec["error"]
        else:
            assert rec["error"] == ""
    assert len(receipts) == len(expected)
    empty = await poll(client, "status")
    assert empty.status == 204
    assert empty.body == b""


async def test_status_map_override(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A tenant status_map {4: EXP} turns Connexus 4 into EXP while 8 stays SNT."""
    client = await gateway(with_tenant(cfg, status_map={4: "EXP"}))
    cid = await legacy_send(client, connexus, HANDSET, "map-1")
    assert await hook(client, dlr(cid, 4, "QUEUED")) == 200
    assert (await poll(client, "status")).record["statusCode"] == "EXP"
    assert await hook(client, dlr(cid, 8, "ACCEPTD")) == 200
    assert (await poll(client, "status")).record["statusCode"] == "SNT"


# -- 4. storm -----------------------------------------------------------------------------------


@ONE_READING
async def test_webhook_storm_each_record_polled_exactly_once(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """10,000 dlr webhooks, 100 in flight, become 10,000 status records each polled once."""
    total, in_flight, pollers = 10_000, 100, 4
    test_started = time.perf_counter()
    client = await gateway(dict(cfg, log={"requests": False}))
    store = client.app[keys.STORE]
    await asyncio.gather(
        *(store_send(store, f"L{i}", f"6421{i:07d}", f"cx{i}") for i in range(total))
    )
    todo = iter(range(total))
    answered: list[int] = []
    latencies: list[float] = []

    async def post_worker() -> None:
        for i in todo:
            t0 = time.perf_counter()
            answered.append(await hook(client, dlr(f"cx{i}", 1, "DELIVRD")))
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    async with asyncio.timeout(30):
        await asyncio.gather(*(post_worker() for _ in range(in_flight)))
    ingest_rate = total / (time.perf_counter() - started)
    assert answered == [200] * total
    assert max(latencies) < 5.0
    assert await queue(client) == (200, f"inCount=0&statusCount={total}".encode())

    records: list[dict[str, str]] = []
    seen: set[str] = set()

    async def poll_worker() -> None:
        while len(seen) < total:
            got = await poll(client, "status")
            if got.status == 204:
                await asyncio.sleep(0.005)
                continue
            rec = got.record
            assert set(rec) == STATUS_KEYS
            assert rec["statusCode"] == "RCV"
            assert rec["from"] == f"6421{int(rec['inReplyToId'][1:]):07d}"
            records.append(rec)
            seen.add(rec["inReplyToId"])

    started = time.perf_counter()
    async with asyncio.timeout(30):
        await asyncio.gather(*(poll_worker() for _ in range(pollers)))
    drain_rate = len(records) / (time.perf_counter() - started)
    latencies.sort()
    print(
        f"\nstorm: {ingest_rate:.0f} webhooks/s ingested (p99 {latencies[total * 99 // 100]:.3f}"
        f" s, max {latencies[-1]:.3f} s), {drain_rate:.0f} polls/s drained by {pollers} pollers"
    )
    assert seen == {f"L{i}" for i in range(total)}
    receipts = [r["messageId"] for r in records]
    assert len(receipts) - len(set(receipts)) == 0, "receipts handed out twice"
    assert len(records) == total
    assert (await poll(client, "status")).status == 204
    await queue_settles(client, b"inCount=0&statusCount=0")
    assert time.perf_counter() - test_started < 50


# -- 5. long-poll -------------------------------------------------------------------------------


@ONE_READING
async def test_long_poll_wakes_on_webhook(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """A waiting poll answers 200 as soon as an incoming message is stored, not after 2 s."""
    client = await gateway(with_tenant(cfg, poll_wait_seconds=2))
    waiting = asyncio.create_task(poll(client, "in"))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    stored_at = time.perf_counter()
    assert await hook(client, mo("lp-1", "+" + HANDSET, "552", "wake up")) == 200
    got = await asyncio.wait_for(waiting, 3)
    latency = time.perf_counter() - stored_at
    assert latency < 0.5, latency
    assert got.record["body"] == "wake up"


@ONE_READING
async def test_long_poll_times_out_with_204(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """With nothing stored a poll waits about poll_wait_seconds, then answers 204 empty."""
    client = await gateway(with_tenant(cfg, poll_wait_seconds=2))
    for kind in ("in", "status"):
        started = time.perf_counter()
        got = await poll(client, kind)
        elapsed = time.perf_counter() - started
        assert got.status == 204
        assert got.body == b""
        assert 1.9 <= elapsed < 3.0, elapsed


async def test_long_poll_disconnect_consumes_nothing(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A client that gives up during the wait consumes nothing; the next poll gets the record."""
    client = await gateway(with_tenant(cfg, poll_wait_seconds=2))
    with pytest.raises(TimeoutError):
        await poll(client, "in", client_timeout=ClientTimeout(total=0.3))
    cancelled = asyncio.create_task(poll(client, "status"))
    await asyncio.sleep(0.3)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0.1)
    cid = await legacy_send_direct(client, "dc-1")
    assert await hook(client, mo("dc-mo", "+" + HANDSET, "552", "still here")) == 200
    assert await hook(client, dlr(cid, 1, "DELIVRD")) == 200
    await asyncio.sleep(0.2)  # the abandoned waiters have woken by now
    assert await queue(client) == (200, b"inCount=1&statusCount=1")
    assert (await poll(client, "in")).record["body"] == "still here"
    assert (await poll(client, "status")).record["inReplyToId"] == "dc-1"


async def test_tenants_never_see_each_others_records(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Records of one tenant are invisible to the other, and a waiting poll is not woken."""
    client = await gateway(two_tenants(with_tenant(cfg, poll_wait_seconds=1)))
    other_wait = asyncio.create_task(poll(client, "in", OTHER_USER, OTHER_PASSWORD))
    await asyncio.sleep(0.2)
    cid = await legacy_send(client, connexus, HANDSET, "acme-1")
    assert await hook(client, mo("t-1", "+" + HANDSET, "552", "for acme")) == 200
    assert await hook(client, dlr(cid, 1, "DELIVRD")) == 200
    other = await asyncio.wait_for(other_wait, 3)
    assert other.status == 204
    assert await queue(client, OTHER_USER, OTHER_PASSWORD) == (200, b"inCount=0&statusCount=0")
    assert (await poll(client, "status", OTHER_USER, OTHER_PASSWORD)).status == 204
    assert await queue(client) == (200, b"inCount=1&statusCount=1")
    assert (await poll(client, "in")).record["body"] == "for acme"
    assert (await poll(client, "status")).record["inReplyToId"] == "acme-1"
    assert await hook(client, mo("t-2", "+" + HANDSET, "3000", "for globex")) == 200
    assert (await poll(client, "in")).status == 204
    assert (await poll(client, "in", OTHER_USER, OTHER_PASSWORD)).record["body"] == "for globex"


@ONE_READING
async def test_concurrent_polls_each_get_a_record(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Several polls at once on a queue of as many records each get one, none twice."""
    client = await gateway(cfg)
    n = 20
    for i in range(n):
        assert await hook(client, mo(f"cp-{i}", HANDSET, "552", f"m{i}")) == 200
    got = await asyncio.gather(*(poll(client, "in") for _ in range(n)))
    bodies = [g.record["body"] for g in got]
    assert sorted(bodies) == sorted(f"m{i}" for i in range(n))


@ONE_READING
async def test_parallel_poll_workers_never_miss_waiting_records(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Eight poll workers draining exactly as many records as polls all get 200, never 204."""
    client = await gateway(dict(cfg, log={"requests": False}))
    workers, each = 8, 50
    total = workers * each
    await asyncio.gather(
        *(hook(client, mo(f"pw-{i}", HANDSET, "552", f"m{i}")) for i in range(total))
    )
    assert await queue(client) == (200, f"inCount={total}&statusCount=0".encode())

    async def worker() -> list[int]:
        return [(await poll(client, "in")).status for _ in range(each)]

    async with asyncio.timeout(60):
        answers = [s for w in await asyncio.gather(*(worker() for _ in range(workers))) for s in w]
    assert answers.count(204) == 0, f"{answers.count(204)} of {total} polls answered 204"


# -- 6. queue -----------------------------------------------------------------------------------


async def test_queue_exact_counts(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """/sms/queue answers exactly inCount=N&statusCount=M, following stores and polls."""
    client = await gateway(cfg)
    assert await queue(client) == (200, b"inCount=0&statusCount=0")
    cid = await legacy_send(client, connexus, HANDSET, "q-1")
    for i in range(3):
        assert await hook(client, mo(f"q-mo-{i}", HANDSET, "2190", "x")) == 200
    for code in (4, 8, 1, 2, 16):
        assert await hook(client, dlr(cid, code)) == 200
    async with client.post("/api/1/sms/queue", data=creds()) as resp:
        assert resp.status == 200
        assert await resp.read() == b"inCount=3&statusCount=5"
    await poll(client, "in")
    await poll(client, "status")
    await poll(client, "status")
    await queue_settles(client, b"inCount=2&statusCount=3")


@pytest.mark.parametrize(
    ("user", "password"),
    [(LEGACY_USER, "wrong"), ("nobody", LEGACY_PASSWORD), ("", ""), (LEGACY_USER, "")],
)
@ONE_READING
async def test_queue_bad_credentials_401(
    gateway: GatewayFactory, cfg: dict[str, Any], user: str, password: str
) -> None:
    """Wrong or missing credentials on /sms/queue (and the polls) answer 401."""
    client = await gateway(cfg)
    assert await hook(client, mo("q401", HANDSET, "552", "x")) == 200
    status, _ = await queue(client, user, password)
    assert status == 401
    assert (await poll(client, "in", user, password)).status == 401
    assert await queue(client) == (200, b"inCount=1&statusCount=0")


# -- 7. incoming SMS routing and content --------------------------------------------------------


@ONE_READING
async def test_mo_routed_by_sender_number(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """An incoming SMS to a tenant's sender number is that tenant's, `from` without '+'."""
    client = await gateway(two_tenants(cfg))
    assert await hook(client, mo("r-1", "+" + HANDSET, "+2190", "hello acme")) == 200
    assert (await poll(client, "in", OTHER_USER, OTHER_PASSWORD)).status == 204
    got = await poll(client, "in")
    assert got.content_type == FORM_CT
    rec = got.record
    assert set(rec) == IN_KEYS
    assert rec["from"] == HANDSET
    assert rec["to"] == "2190"
    assert rec["body"] == "hello acme"
    assert rec["inReplyToId"] == ""
    assert rec["rateCode"] == ""
    assert 0 < len(rec["messageId"]) <= 50


async def test_mo_routed_by_the_send_it_replies_to(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """relatedMessageId picks the tenant of that send and its legacy messageId, not the latest."""
    client = await gateway(two_tenants(cfg))
    cid = await legacy_send(client, connexus, HANDSET, "globex-42", OTHER_USER, OTHER_PASSWORD)
    await legacy_send(client, connexus, HANDSET, "acme-later")
    assert await hook(client, mo("r-2", "+" + HANDSET, "64900000", "yes", related=cid)) == 200
    assert (await poll(client, "in")).status == 204
    rec = (await poll(client, "in", OTHER_USER, OTHER_PASSWORD)).record
    assert rec["inReplyToId"] == "globex-42"
    assert rec["from"] == HANDSET
    assert rec["body"] == "yes"


async def test_mo_routed_by_latest_send_to_handset(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], tmp_path: Path
) -> None:
    """Without sender or relation, the latest send to that handset within 7 days decides."""
    client = await gateway(two_tenants(cfg))
    await legacy_send(client, connexus, HANDSET, "acme-old")
    await legacy_send(client, connexus, HANDSET, "globex-new", OTHER_USER, OTHER_PASSWORD)
    await legacy_send(client, connexus, "6421999999", "acme-other-handset")
    assert await hook(client, mo("r-3", "+" + HANDSET, "64900000", "who?")) == 200
    assert (await poll(client, "in")).status == 204
    rec = (await poll(client, "in", OTHER_USER, OTHER_PASSWORD)).record
    assert rec["inReplyToId"] == "globex-new"

    # To a tenant's own number: that tenant, replying to its latest send to the handset.
    assert await hook(client, mo("r-4", "+" + HANDSET, "552", "to acme")) == 200
    assert (await poll(client, "in")).record["inReplyToId"] == "acme-old"

    # Sends older than 7 days no longer count: the message belongs to nobody.
    with sqlite3.connect(tmp_path / "bc-proxy.db") as db:
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("UPDATE sends SET created_at = created_at - 8 * 86400")
    assert await hook(client, mo("r-5", "+" + HANDSET, "64900000", "late")) == 200
    assert (await poll(client, "in")).status == 204
    assert (await poll(client, "in", OTHER_USER, OTHER_PASSWORD)).status == 204


@ONE_READING
async def test_mo_body_intact_through_poll_and_push(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Unicode, &, =, +, % and newlines reach the legacy side intact by poll and by push."""
    receiver = await start_receiver(aiohttp_server, Receiver())
    client = await gateway(two_tenants(push_cfg(cfg, receiver, keep_for_polling=True)))
    assert await hook(client, mo("b-1", "+" + HANDSET, "552", TRICKY_BODY)) == 200
    await eventually(lambda: bool(receiver.ok("/sms-in")), 5, "push")
    pushed = receiver.ok("/sms-in")[0].form
    polled = (await poll(client, "in")).record  # after the push: its lease blocks a poll
    assert polled["body"] == TRICKY_BODY
    assert pushed == polled
    # The other tenant polls only: same content through its poll.
    assert await hook(client, mo("b-2", "+" + HANDSET, "3000", TRICKY_BODY)) == 200
    assert (await poll(client, "in", OTHER_USER, OTHER_PASSWORD)).record["body"] == TRICKY_BODY


# -- 8. delivery report before the send is recorded ---------------------------------------------


async def test_dlr_before_send_response_is_matched(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A dlr that lands while the send's answer is still delayed is matched, at once when it
    names bc-proxy's written-ahead ref, else once the answer with Connexus's id lands."""
    client = await gateway(cfg)
    emu = connexus.emu
    emu.webhook_url = str(client.make_url(HOOK))
    emu.auto_dlr = 1
    emu.send_response_delay = 0.5
    form = creds(to="+" + HANDSET, body="early report", messageId="early-1")
    sending = asyncio.create_task(client.post("/api/1/sms/out", data=form))
    await eventually(lambda: any(s == 200 for _, s in emu.webhook_deliveries), 2, "dlr webhook")
    assert not sending.done()
    early = await poll(client, "status")
    if emu.dlr_id == "connexus":
        assert early.status == 204  # Connexus's id is not known yet: nobody's record
    resp = await asyncio.wait_for(sending, 5)
    assert resp.status == 204
    resp.release()
    rec = early.record if emu.dlr_id == "client" else (await poll(client, "status")).record
    assert rec["inReplyToId"] == "early-1"
    assert rec["from"] == HANDSET
    assert rec["to"] == "552"
    assert rec["statusCode"] == "RCV"
    assert (await poll(client, "status")).status == 204


# -- 9. push ------------------------------------------------------------------------------------


async def test_push_retries_until_accepted(
    connexus: Connexus,
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
) -> None:
    """A receiver failing three times then answering 200 gets each record exactly once."""
    receiver = await start_receiver(aiohttp_server, Receiver(script=[500, 500, 500]))
    client = await gateway(push_cfg(cfg, receiver))
    cid = await legacy_send(client, connexus, HANDSET, "push-1")
    assert await hook(client, mo("p-1", "+" + HANDSET, "552", "pushed")) == 200
    await eventually(lambda: bool(receiver.ok("/sms-in")), 10, "incoming push accepted")
    assert await hook(client, dlr(cid, 16, "UNDELIV")) == 200
    await eventually(lambda: bool(receiver.ok("/sms-status")), 10, "status push accepted")
    await asyncio.sleep(1.2)  # longer than the worker's nap: any duplicate would show
    in_hits = [h for h in receiver.hits if h.path == "/sms-in"]
    assert [h.answered for h in in_hits] == [500, 500, 500, 200]
    assert len(receiver.ok("/sms-in")) == 1
    assert len(receiver.ok("/sms-status")) == 1
    assert all(h.form == in_hits[0].form for h in in_hits)
    rec_in = receiver.ok("/sms-in")[0].form
    assert set(rec_in) == IN_KEYS
    assert rec_in["from"] == HANDSET
    assert rec_in["body"] == "pushed"
    assert rec_in["to"] == "552"
    rec_st = receiver.ok("/sms-status")[0].form
    assert set(rec_st) == STATUS_KEYS
    assert rec_st["statusCode"] == "NUR"
    assert rec_st["inReplyToId"] == "push-1"
    assert rec_st["from"] == HANDSET
    assert rec_st["to"] == "552"
    # Pushed and keep_for_polling false: nothing left to poll.
    await queue_settles(client, b"inCount=0&statusCount=0")
    assert (await poll(client, "in")).status == 204
    assert (await poll(client, "status")).status == 204


@pytest.mark.parametrize("keep", [True, False])
@ONE_READING
async def test_keep_for_polling(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, cfg: dict[str, Any], keep: bool
) -> None:
    """keep_for_polling true leaves pushed records pollable (same keys); false does not."""
    receiver = await start_receiver(aiohttp_server, Receiver())
    client = await gateway(push_cfg(cfg, receiver, keep_for_polling=keep))
    assert await hook(client, mo("k-1", "+" + HANDSET, "552", "keep?")) == 200
    await eventually(lambda: bool(receiver.ok("/sms-in")), 5, "push")
    pushed = receiver.ok("/sms-in")[0].form
    got = await poll(client, "in")
    if keep:
        assert got.record == pushed
        assert (await poll(client, "in")).status == 204
    else:
        assert got.status == 204
        await queue_settles(client, b"inCount=0&statusCount=0")
    await asyncio.sleep(0.7)
    assert len(receiver.hits) == 1


async def _dead_lettered(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    tmp_path: Path,
    messages: dict[str, str],
) -> tuple[Receiver, dict[str, Any], Path, GatewayClient]:
    """A gateway pushing to a receiver that answers 500, its config written to a file, and
    one incoming SMS per (messageId, body) posted and dead-lettered (max age about 1.1 s)."""
    receiver = await start_receiver(aiohttp_server, Receiver(default=500))
    config = push_cfg(cfg, receiver, max_age_hours=0.0003)
    config_file = tmp_path / "bc-proxy.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    client = await gateway(config)
    for message_id, body in messages.items():
        assert await hook(client, mo(message_id, "+" + HANDSET, "552", body)) == 200
    store = client.app[keys.STORE]
    deadline = time.monotonic() + 8
    while len(await store.dead_letters()) < len(messages):
        assert time.monotonic() < deadline, "never dead-lettered"
        await asyncio.sleep(0.05)
    return receiver, config, config_file, client


@ONE_READING
async def test_push_dead_letter_then_replay(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A receiver down past max age dead-letters the record; CLI replay delivers it later."""
    receiver, config, config_file, client = await _dead_lettered(
        aiohttp_server, gateway, cfg, tmp_path, {"d-1": "dead letter"}
    )
    attempts = len(receiver.hits)
    assert attempts >= 2
    assert all(h.answered == 500 for h in receiver.hits)
    await asyncio.sleep(0.7)
    assert len(receiver.hits) == attempts  # a dead letter is not pushed any more
    await client.close()

    code, out, err = await run_cli("dead-letters", "list", "--config", str(config_file))
    assert code == 0, err
    assert "1 dead letter(s)" in err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    fields = lines[0].split("\t")
    assert fields[1:3] == ["acme", "in"]
    assert "HTTP 500" in lines[0]
    listed = parse_record(fields[-1].encode())
    assert listed["body"] == "dead letter"

    code, out, err = await run_cli("dead-letters", "replay", "--all", "--config", str(config_file))
    assert code == 0, err
    assert out.startswith("1 dead letter")

    receiver.default = 200
    client = await gateway(config)
    await eventually(lambda: bool(receiver.ok("/sms-in")), 5, "replayed push")
    assert receiver.ok("/sms-in")[0].form == listed
    assert await client.app[keys.STORE].dead_letters() == []
    code, out, err = await run_cli("dead-letters", "list", "--config", str(config_file))
    assert code == 0
    assert out == ""
    assert "0 dead letter(s)" in err


# -- 10. missed-webhook recovery ----------------------------------------------------------------


async def test_recovery_sweep_stores_missed_messages_once(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """mo/query recovers messages no webhook delivered, without duplicating delivered ones."""
    client = await gateway(cfg)
    emu = connexus.emu
    emu.webhook_url = str(client.make_url(HOOK))
    await emu.fire_mo("+" + HANDSET, "552", "by webhook")
    assert emu.webhook_deliveries[-1][1] == 200
    for i in range(3):
        await emu.fire_mo("+6421555000" + str(i), "2190", f"missed {i}", deliver=False)
    assert await queue(client) == (200, b"inCount=1&statusCount=0")

    assert await sweep_tenant(client.app, "acme") == 3
    assert await queue(client) == (200, b"inCount=4&statusCount=0")
    assert await sweep_tenant(client.app, "acme") == 0
    bodies = []
    for _ in range(4):
        rec = (await poll(client, "in")).record
        assert not rec["from"].startswith("+")
        bodies.append(rec["body"])
    assert sorted(bodies) == ["by webhook", "missed 0", "missed 1", "missed 2"]
    assert (await poll(client, "in")).status == 204
    # A late webhook for a recovered message is a duplicate too.
    late = emu.mo[1]
    assert await hook(client, mo(late["messageId"], late["from"], late["to"], late["body"])) == 200
    await queue_settles(client, b"inCount=0&statusCount=0")


@ONE_READING
async def test_dead_letter_replay_by_id(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    tmp_path: Path,
) -> None:
    """`dead-letters replay ID` queues that dead letter only; an unknown id queues nothing."""
    _, _, config_file, client = await _dead_lettered(
        aiohttp_server, gateway, cfg, tmp_path, {"r-1": "letter 1", "r-2": "letter 2"}
    )
    first, second = sorted(await client.app[keys.STORE].dead_letters(), key=lambda r: r.id)
    await client.close()

    code, out, err = await run_cli(
        "dead-letters", "replay", "999999999", "--config", str(config_file)
    )
    assert code == 0, err
    assert out.startswith("0 dead letter")
    code, out, err = await run_cli(
        "dead-letters", "replay", str(first.id), "--config", str(config_file)
    )
    assert code == 0, err
    assert out.startswith("1 dead letter")
    code, out, err = await run_cli("dead-letters", "list", "--config", str(config_file))
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == [str(second.id)]
    code, out, err = await run_cli("dead-letters", "replay", "--config", str(config_file))
    assert code == 2
    assert "needs --all or one or more ids" in err
