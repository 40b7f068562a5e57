"""The missed-webhook sweep: no cap, a persisted mark across restarts, one routing rule.

The real gateway on 127.0.0.1 pages the real emulator's `mo/query` (per-account message logs,
pagination and date filters as connexus-api.txt documents) into a real SQLite file.
"""

from __future__ import annotations

import copy
import json
import math
import sqlite3
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiohttp import web

from bc_proxy import keys
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.errors import GatewayError
from bc_proxy.recovery import OVERLAP, sweep_account, sweep_all, sweep_tenant
from bc_proxy.store import Rules, TenantRules, open_store
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    config_dict,
)
from tests.pg import pg_url  # noqa: F401  (fixture)

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
OTHER = {"userId": "globex-legacy", "password": "globex-legacy-pass"}
ACME = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}


def two_tenants(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` plus `globex` on its own Connexus account (cid_other) with sender 3000."""
    out = copy.deepcopy(cfg)
    out["tenants"].append(
        {
            "name": "globex",
            "legacy": {"user_id": OTHER["userId"], "password": OTHER["password"]},
            "connexus": {"client_id": "cid_other", "client_secret": "csk_other"},
            "senders": ["3000"],
            "poll_wait_seconds": 0,
        }
    )
    return out


def db_scalar(cfg: dict[str, Any], sql: str) -> Any:
    with sqlite3.connect(cfg["store"]["url"][len("sqlite:///") :]) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        return db.execute(sql).fetchone()[0]


def query_starts(connexus: Connexus, since: int) -> list[str]:
    """start_date of every mo/query the emulator got after request number `since`."""
    out = []
    for r in connexus.emu.requests[since:]:
        if r.path.endswith("/mo/query"):
            out.append(parse_qs(r.body.decode())["start_date"][0])
    return out


async def queue(client: GatewayClient, who: dict[str, str]) -> str:
    async with client.get("/api/1/sms/queue", params=who) as resp:
        return await resp.text()


async def test_20000_missed_messages_recovered_across_a_restart(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """20,000 messages no webhook delivered are all stored once; the second gateway resumes."""
    started = time.perf_counter()
    emu = connexus.emu
    now = datetime.now(UTC)
    first_at = now - timedelta(hours=20)
    for i in range(12_000):
        emu.record_mo(f"642{i:07d}", "552", f"first {i}", received_at=first_at + timedelta(
            seconds=5 * i))  # fmt: skip
    client = await gateway(dict(cfg, log={"requests": False}))
    assert await sweep_tenant(client.app, "acme") == 12_000
    mark = await client.app[keys.STORE].sweep_mark("acme")
    assert mark is not None
    assert mark.last_time == emu.mo[-1]["receivedTime"]
    assert mark.last_id == emu.mo[-1]["messageId"]
    await client.close()  # restart between sweeps

    second_at = now - timedelta(minutes=30)
    for i in range(8_000):
        emu.record_mo(f"643{i:07d}", "552", f"second {i}", received_at=second_at + timedelta(
            seconds=i // 5))  # fmt: skip
    client = await gateway(dict(cfg, log={"requests": False}))
    before = len(emu.requests)
    assert await sweep_tenant(client.app, "acme") == 8_000
    starts = query_starts(connexus, before)
    resume = datetime.strptime(mark.last_time, "%Y-%m-%d %H:%M:%S") - OVERLAP
    assert set(starts) == {resume.strftime("%Y-%m-%d %H:%M:%S")}  # from the mark, not 24 h
    assert len(starts) <= 8_000 // 200 + 2  # the overlap re-reads a page at most
    assert await sweep_tenant(client.app, "acme") == 0
    assert await queue(client, ACME) == "inCount=20000&statusCount=0"
    assert db_scalar(cfg, "SELECT count(DISTINCT event_key) FROM records") == 20_000
    elapsed = time.perf_counter() - started
    print(f"\nsweep: 20,000 recovered across a restart in {elapsed:.1f} s")
    assert elapsed < 30


@pytest.mark.parametrize("first", ["webhook", "sweep"])
async def test_unlisted_number_same_tenant_whichever_path_first(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], first: str
) -> None:
    """A mo to an unlisted number on globex's account ends in globex's queue either way."""
    client = await gateway(two_tenants(cfg))
    emu = connexus.emu
    emu.webhook_url = str(client.make_url(HOOK))
    payload = await emu.fire_mo(
        "+6421000999", "64900000", "whose?", account="cid_other", deliver=first == "webhook"
    )
    if first == "webhook":
        assert emu.webhook_deliveries[-1][1] == 200
        assert await queue(client, OTHER) == "inCount=0&statusCount=0"  # unmatched so far
    assert await sweep_all(client.app)
    if first == "sweep":
        async with client.post(HOOK, data=json.dumps(payload)) as resp:
            assert resp.status == 200
    assert await queue(client, ACME) == "inCount=0&statusCount=0"
    assert await queue(client, OTHER) == "inCount=1&statusCount=0"
    async with client.get("/api/1/sms/in", params=OTHER) as resp:
        record = parse_qs(await resp.text())
    assert record["body"] == ["whose?"]
    assert record["from"] == ["6421000999"]
    assert db_scalar(cfg, "SELECT count(*) FROM records") == 1


async def test_sweep_reads_every_page(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """5,050 missed messages (26 pages, past the old 25-page cap) are all recovered."""
    for i in range(5_050):
        connexus.emu.record_mo(f"644{i:07d}", "2190", f"m{i}")
    client = await gateway(cfg)
    assert await sweep_tenant(client.app, "acme") == 5_050
    assert await queue(client, ACME) == "inCount=5050&statusCount=0"


class Upstream:
    """A stand-in for Connexus mo/query: fixed messages, oldest or newest first, 200 a page,
    raising on one page number once (the sweep dies there)."""

    def __init__(self, messages: list[dict[str, Any]], newest_first: bool) -> None:
        self.messages = messages[::-1] if newest_first else messages
        self.fail_page: int | None = None
        self.starts: list[str] = []

    async def mo_query(self, tenant: str, params: Mapping[str, str]) -> Any:
        page = int(params["page"])
        if page == 1:
            self.starts.append(params["start_date"])
        if page == self.fail_page:
            self.fail_page = None
            raise GatewayError("mo/query answered 502")
        chunk = self.messages[(page - 1) * 200 : page * 200]
        more = page * 200 < len(self.messages)
        return {"status": "success", "messages": chunk, "pagination": {"hasNextPage": more}}


def messages(n: int) -> list[dict[str, Any]]:
    at = datetime(2026, 5, 1, 10, 0, 0)
    return [
        {"messageId": f"x{i}", "from": "6421", "to": "552", "body": f"b{i}",
         "receivedTime": (at + timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S")}
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("newest_first", [False, True])
async def test_sweep_killed_mid_way_resumes_without_loss(
    tmp_path: Path, newest_first: bool
) -> None:
    """A sweep dying on page 3 of 5 leaves a mark that loses nothing, oldest or newest first."""
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", Rules({"acme": TenantRules()}))
    await store.open()
    try:
        upstream = Upstream(messages(1_000), newest_first)
        upstream.fail_page = 3
        with pytest.raises(GatewayError):
            await sweep_account(store, upstream, "acme")
        mark = await store.sweep_mark("acme")
        if newest_first:
            assert mark is None  # pages of a newest-first answer prove nothing until the end
        else:
            assert mark is not None
            assert mark.last_id == "x399"  # the last message of page 2, committed
        result = await sweep_account(store, upstream, "acme")
        assert result.recovered == 600  # the 400 of pages 1-2 were committed before it died
        assert await store.queue_depth("acme") == (1_000, 0)
        mark = await store.sweep_mark("acme")
        assert mark is not None
        assert (mark.last_time, mark.last_id) == ("2026-05-01 10:16:39", "x999")
        if not newest_first:
            assert upstream.starts[-1] == "2026-05-01 09:56:39"  # page 2's last, minus 10 min
    finally:
        await store.close()


@pytest.mark.parametrize("newest_first", [False, True])
async def test_a_first_page_of_one_second_moves_no_mark_until_the_order_shows(
    tmp_path: Path, newest_first: bool
) -> None:
    """200 messages that came in one second fill page 1: equal times look ascending whichever
    the order. Read newest first, a mark moved to them after page 1 would put the next sweep's
    window (mark - 10 min) after the 800 older messages of the pages this sweep never read. So
    the mark waits for a rise in the times (oldest first, it then follows the pages again) or
    for the last page."""
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", Rules({"acme": TenantRules()}))
    await store.open()
    try:
        msgs = messages(1_000)  # 10:00:00 + i s
        burst = msgs[800:] if newest_first else msgs[:200]  # what page 1 holds
        second = "2026-05-01 12:00:00" if newest_first else "2026-05-01 09:00:00"
        for m in burst:
            m["receivedTime"] = second
        upstream = Upstream(msgs, newest_first)
        upstream.fail_page = 2
        with pytest.raises(GatewayError):
            await sweep_account(store, upstream, "acme")
        assert await store.sweep_mark("acme") is None  # page 1 proved no order
        if not newest_first:  # page 2 rises: the mark follows the pages from then on
            upstream.fail_page = 4
            with pytest.raises(GatewayError):
                await sweep_account(store, upstream, "acme")
            mark = await store.sweep_mark("acme")
            assert mark is not None
            assert mark.last_id == "x599"  # the last message of page 3, committed
        await sweep_account(store, upstream, "acme")
        assert await store.queue_depth("acme") == (1_000, 0)
        mark = await store.sweep_mark("acme")
        assert mark is not None
        assert mark.last_time == ("2026-05-01 12:00:00" if newest_first else "2026-05-01 10:16:39")
    finally:
        await store.close()


class NewestFirst:
    """Connexus answering mo/query newest first, behind the emulator's auth and request log;
    one scripted page answers a malformed 200 once, or once does not say whether more follow."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.base_url = ""
        self.bad_page: int | None = None
        self.bad_body = b""
        self.bad_type = "application/json"
        self.unsaid_page: int | None = None
        self.unsaid = "hasNextPage"  # the key that page lacks: of `pagination`, or `pagination`

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)  # the emulator's own checks
        if not request.path.endswith("/mo/query") or response.status != 200:
            return response
        params = {k: v[0] for k, v in parse_qs((await request.read()).decode()).items()}
        page, limit = int(params["page"]), int(params["limit"])
        if page == self.bad_page:
            self.bad_page = None
            return web.Response(body=self.bad_body, content_type=self.bad_type)
        window = self.emu.mo_window(params["start_date"], None)[::-1]
        pagination = {
            "page": page,
            "limit": limit,
            "totalRecords": len(window),
            "totalPages": math.ceil(len(window) / limit),
            "hasNextPage": page * limit < len(window),
            "hasPreviousPage": page > 1,
        }
        answer = {
            "status": "success",
            "messages": window[(page - 1) * limit : page * limit],
            "pagination": pagination,
        }
        if page == self.unsaid_page:
            self.unsaid_page = None
            (answer if self.unsaid == "pagination" else pagination).pop(self.unsaid)
        return web.json_response(answer)


@pytest.fixture
async def newest_first(aiohttp_server: AiohttpServer) -> NewestFirst:
    """The emulator on a real loopback port, its mo/query answering newest first."""
    fake = NewestFirst(Emulator(clients={CLIENT_ID: CLIENT_SECRET}))
    app = create_emulator_app(fake.emu)
    app.middlewares.append(fake.middleware)
    server = await aiohttp_server(app, host="127.0.0.1")
    fake.base_url = str(server.make_url("/api/connexus"))
    return fake


async def mark_of(client: GatewayClient) -> tuple[str, str] | None:
    mark = await client.app[keys.STORE].sweep_mark("acme")
    return None if mark is None else (mark.last_time, mark.last_id)


async def swept_once(client: GatewayClient, emu: Emulator, now: datetime) -> tuple[str, str]:
    """10 messages of 3 hours ago swept whole: the mark a later sweep must not move wrongly."""
    for i in range(10):
        emu.record_mo(f"645{i:07d}", "552", f"old {i}", received_at=now - timedelta(
            hours=3, seconds=-i))  # fmt: skip
    assert await sweep_tenant(client.app, "acme") == 10
    newest = (emu.mo[-1]["receivedTime"], emu.mo[-1]["messageId"])
    assert await mark_of(client) == newest
    return newest


def record_newer(emu: Emulator, now: datetime) -> tuple[str, str]:
    """1,000 messages one a second, ending now: 5 pages spanning more than the overlap."""
    for i in range(1_000):
        emu.record_mo(f"646{i:07d}", "552", f"new {i}", received_at=now - timedelta(
            seconds=1_000 - i))  # fmt: skip
    return emu.mo[-1]["receivedTime"], emu.mo[-1]["messageId"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html"),  # not JSON
        (b'{"status": "error", "message": "query failed"}', "application/json"),  # no messages
    ],
    ids=["not-json", "no-messages"],
)
async def test_malformed_page_fails_a_newest_first_sweep_and_leaves_its_mark(
    newest_first: NewestFirst, gateway: GatewayFactory, tmp_path: Path, body: bytes,
    content_type: str,
) -> None:  # fmt: skip
    """A 200 page 3 of 5 that is not JSON with `messages` fails the sweep; nothing is lost."""
    emu, now = newest_first.emu, datetime.now(UTC)
    client = await gateway(config_dict(tmp_path, newest_first.base_url))
    before = await swept_once(client, emu, now)
    newest = record_newer(emu, now)
    newest_first.bad_page, newest_first.bad_body = 3, body
    newest_first.bad_type = content_type
    with pytest.raises(GatewayError):
        await sweep_tenant(client.app, "acme")
    assert await mark_of(client) == before  # pages 4-5 were never read
    assert await queue(client, ACME) == "inCount=410&statusCount=0"  # pages 1-2 were stored
    assert await sweep_tenant(client.app, "acme") == 600
    assert await queue(client, ACME) == "inCount=1010&statusCount=0"
    assert await mark_of(client) == newest


@pytest.mark.parametrize("unsaid", ["hasNextPage", "pagination"])
async def test_page_not_saying_it_is_last_leaves_a_newest_first_mark(
    newest_first: NewestFirst, gateway: GatewayFactory, tmp_path: Path, unsaid: str
) -> None:
    """A newest-first page 3 of 5 without `hasNextPage` ends the sweep but does not move the
    mark past pages 4-5; the next sweep, told where the end is, stores every message."""
    emu, now = newest_first.emu, datetime.now(UTC)
    client = await gateway(config_dict(tmp_path, newest_first.base_url))
    before = await swept_once(client, emu, now)
    newest = record_newer(emu, now)
    newest_first.unsaid_page, newest_first.unsaid = 3, unsaid
    assert await sweep_tenant(client.app, "acme") == 600
    assert await mark_of(client) == before
    assert await sweep_tenant(client.app, "acme") == 400
    assert await queue(client, ACME) == "inCount=1010&statusCount=0"
    assert await mark_of(client) == newest


@pytest.mark.postgres
async def test_a_message_the_store_refuses_is_kept_aside_and_the_sweep_goes_on(
    pg_url: str,  # noqa: F811
) -> None:
    """A swept message PostgreSQL cannot hold (a NUL in its text) is kept with the rejected
    webhooks; the sweep stores the rest, reads every page and moves its mark (before, every
    sweep failed at that page, and later missed webhooks were never recovered)."""
    store = open_store(pg_url, Rules({"acme": TenantRules()}))
    await store.open()
    try:
        msgs = messages(400)
        msgs[10]["body"] = "a\u0000b"
        result = await sweep_account(store, Upstream(msgs, False), "acme")
        assert result.recovered == 399
        assert await store.queue_depth("acme") == (399, 0)
        mark = await store.sweep_mark("acme")
        assert mark is not None
        assert mark.last_id == "x399"
        [kept] = await store.rejected_webhooks()
        assert kept.reason == "store_refused"
        assert json.loads(kept.body)["messageId"] == "x10"
        # The next sweep reads the last 10 minutes again: nothing kept a second time.
        msgs.append({**messages(401)[400], "body": "c\u0000d"})
        await sweep_account(store, Upstream(msgs, False), "acme")
        assert [json.loads(k.body)["messageId"] for k in await store.rejected_webhooks()] == [
            "x400",
            "x10",
        ]
    finally:
        await store.close()


async def test_a_message_the_sweep_cannot_use_is_kept_aside_once(tmp_path: Path) -> None:
    """A swept message missing what an incoming SMS needs (no sender) is kept with the rejected
    webhooks, as a webhook would be, once however often the sweep reads it again."""
    store = open_store(f"sqlite:///{tmp_path / 'bc.db'}", Rules({"acme": TenantRules()}))
    await store.open()
    try:
        msgs = messages(5)
        msgs[2]["from"] = ""
        for _ in range(2):
            result = await sweep_account(store, Upstream(msgs, False), "acme")
            assert result.recovered in (4, 0)
        [kept] = await store.rejected_webhooks()
        assert kept.reason == "mo_query_unusable"
        assert json.loads(kept.body)["messageId"] == "x2"
        assert await store.queue_depth("acme") == (4, 0)
    finally:
        await store.close()
