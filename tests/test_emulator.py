"""Tests for the Connexus emulator: wire shapes, auth, scripting knobs and outgoing webhooks."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from bc_proxy.connexus.emulator import (
    Emulator,
    SentMessage,
    create_emulator_app,
    serve_emulator,
)

Client = TestClient[web.Request, web.Application]
USER = {"userId": "demo@example.org", "password": "demo-password"}
BASIC = {"Authorization": aiohttp.encode_basic_auth("demo@example.org", "demo-password")}
CREDS = {"client_id": "cid_demo", "client_secret": "csk_demo"}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator()
    yield emu
    await emu.close()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, emulator: Emulator) -> Client:
    return await aiohttp_client(create_emulator_app(emulator))


class Receiver:
    """A real webhook receiver that answers scripted statuses (200 once the script runs out)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.payloads: list[dict[str, Any]] = []
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        self.got.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"success": status == 200}, status=status)


async def start_receiver(aiohttp_server: AiohttpServer, receiver: Receiver) -> str:
    app = web.Application()
    app.router.add_post("/webhook", receiver.handle)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/webhook"))


async def get_token(client: Client) -> str:
    resp = await client.post("/api/connexus/auth/token", data=CREDS)
    assert resp.status == 200
    token: str = (await resp.json())["access_token"]
    return token


async def send(client: Client, token: str, **json: Any) -> aiohttp.ClientResponse:
    return await client.post(
        "/api/connexus/sms/out", json=json, headers={"Authorization": f"Bearer {token}"}
    )


@pytest.mark.parametrize("as_json", [False, True])
async def test_token_success(client: Client, emulator: Emulator, as_json: bool) -> None:
    """Valid client credentials, as form or JSON, get a wst_ bearer token with expires_in."""
    emulator.token_ttl = 2
    kwargs: dict[str, Any] = {"json": CREDS} if as_json else {"data": CREDS}
    resp = await client.post("/api/connexus/auth/token", **kwargs)
    assert resp.status == 200
    data = await resp.json()
    assert data["access_token"].startswith("wst_")
    assert data["token_type"] == "Bearer"
    assert data["expires_in"] == 2
    assert emulator.token_requests == 1


async def test_token_default_expiry(client: Client) -> None:
    """Without scripting, tokens last the documented 24 hours."""
    resp = await client.post("/api/connexus/auth/token", data=CREDS)
    assert (await resp.json())["expires_in"] == 86400


@pytest.mark.parametrize(
    "payload", [{}, {"client_id": "cid_demo"}, {"client_secret": "csk_demo"}, {"client_id": ""}]
)
async def test_token_missing_credentials(
    client: Client, emulator: Emulator, payload: dict[str, str]
) -> None:
    """A token request missing client_id or client_secret gets 400 invalid_request."""
    resp = await client.post("/api/connexus/auth/token", data=payload)
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"
    assert emulator.token_requests == 1


async def test_token_wrong_credentials(client: Client) -> None:
    """A wrong client secret gets 401 invalid_client."""
    resp = await client.post(
        "/api/connexus/auth/token", json={"client_id": "cid_demo", "client_secret": "nope"}
    )
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"


async def test_token_wrong_method(client: Client, emulator: Emulator) -> None:
    """Any method but POST on auth/token gets 405 method_not_allowed and is not counted."""
    resp = await client.get("/api/connexus/auth/token")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"
    assert emulator.token_requests == 0
    assert emulator.requests[-1].status == 405


async def test_bearer_accepted(client: Client) -> None:
    """A freshly issued bearer token authorises API calls."""
    token = await get_token(client)
    resp = await client.post(
        "/api/connexus/sms/balance", headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status == 200
    assert await resp.json() == {"balance": "125.50", "currency": "NZD"}


async def test_expired_token_rejected(client: Client, emulator: Emulator) -> None:
    """A token used after token_ttl seconds gets 401."""
    emulator.token_ttl = 1
    token = await get_token(client)
    await asyncio.sleep(1.1)
    resp = await send(client, token, to="6421234567", body="hi")
    assert resp.status == 401
    assert await resp.json() == {"success": False, "error": "Unauthorized"}
    assert emulator.sent == []


async def test_revoked_token_rejected(client: Client, emulator: Emulator) -> None:
    """After revoke_tokens every previously issued token gets 401, new ones work."""
    token = await get_token(client)
    assert (await send(client, token, to="6421234567", body="hi")).status == 200
    emulator.revoke_tokens()
    assert (await send(client, token, to="6421234567", body="hi")).status == 401
    assert (await send(client, await get_token(client), to="6421234567", body="hi")).status == 200


async def test_user_password_auth(client: Client) -> None:
    """userId/password as form or JSON params and HTTP Basic authorise; wrong or none get 401."""
    form = await client.post("/api/connexus/sms/out", data={**USER, "to": "642", "body": "x"})
    assert form.status == 200
    as_json = await client.post("/api/connexus/sms/balance", json=USER)
    assert as_json.status == 200
    basic = await client.get("/api/connexus/configure", headers=BASIC)
    assert basic.status == 200
    wrong = await client.post("/api/connexus/sms/balance", data={**USER, "password": "bad"})
    assert wrong.status == 401
    bad_basic = await client.get(
        "/api/connexus/configure", headers={"Authorization": aiohttp.encode_basic_auth("a", "b")}
    )
    assert bad_basic.status == 401
    assert (await client.post("/api/connexus/mo/query")).status == 401


async def test_single_send_shape(client: Client, emulator: Emulator) -> None:
    """A form send answers the documented single-message JSON and records one SentMessage."""
    token = await get_token(client)
    resp = await client.post(
        "/api/connexus/sms/out",
        data={"to": "6421234567", "body": "Hello World", "messageId": "MSG1"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status == 200
    assert await resp.json() == {
        "success": True,
        "status": "accepted",
        "message_id": "1158493",
        "to": "6421234567",
        "from": "552",
        "parts": 1,
    }
    assert emulator.sent == [
        SentMessage("1158493", "6421234567", "Hello World", "552", "MSG1", True, "")
    ]
    [recorded] = emulator.sms_out_requests()
    assert recorded.method == "POST"
    assert recorded.status == 200
    assert b"body=Hello+World" in recorded.body
    assert recorded.headers["Authorization"] == f"Bearer {token}"


async def test_bulk_send_shape(client: Client, emulator: Emulator) -> None:
    """A JSON array of 3 recipients answers per-recipient messages and a summary."""
    token = await get_token(client)
    to = ["6421111111", "6422222222", "6423333333"]
    resp = await send(client, token, to=to, body="Tomorrow 2pm", **{"from": "MyCo"})
    assert resp.status == 200
    data = await resp.json()
    assert data["success"] is True
    assert data["summary"] == {"total": 3, "sent": 3, "failed": 0}
    assert [m["message_id"] for m in data["messages"]] == ["1158493", "1158494", "1158495"]
    assert [m["to"] for m in data["messages"]] == to
    assert all(m["from"] == "MyCo" and m["status"] == "accepted" for m in data["messages"])
    assert [s.to for s in emulator.sent] == to


async def test_bulk_over_limit(client: Client, emulator: Emulator) -> None:
    """More than 200 recipients in one bulk request gets 400 and sends nothing."""
    token = await get_token(client)
    resp = await send(client, token, to=[f"64210{i:05d}" for i in range(201)], body="x")
    assert resp.status == 400
    assert await resp.json() == {
        "success": False,
        "error": "Maximum 200 recipients per bulk request",
    }
    assert emulator.sent == []
    assert (await send(client, token, to=["642"] * 200, body="x")).status == 200


async def test_reject_inside_bulk(client: Client, emulator: Emulator) -> None:
    """A scripted rejection fails one recipient inside an otherwise accepted bulk request."""
    emulator.reject["6422222222"] = "Invalid number"
    token = await get_token(client)
    resp = await send(client, token, to=["6421111111", "6422222222"], body="x")
    assert resp.status == 200
    data = await resp.json()
    assert data["success"] is False
    assert data["summary"] == {"total": 2, "sent": 1, "failed": 1}
    assert data["messages"][1] == {
        "success": False,
        "status": "rejected",
        "to": "6422222222",
        "error": "Invalid number",
    }
    assert emulator.sent[1] == SentMessage(
        "", "6422222222", "x", "552", None, False, "Invalid number"
    )
    single = await send(client, token, to="6422222222", body="x")
    assert single.status == 200
    assert (await single.json())["status"] == "rejected"


@pytest.mark.parametrize(
    "payload",
    [{"body": "x"}, {"to": "642"}, {"to": [], "body": "x"}, {"to": "642", "body": ""}],
)
async def test_missing_parameters(client: Client, payload: dict[str, Any]) -> None:
    """A send without a recipient or a body gets 400 Missing parameters."""
    resp = await send(client, await get_token(client), **payload)
    assert resp.status == 400
    assert await resp.json() == {"success": False, "error": "Missing parameters"}


async def test_message_id_too_long(client: Client, emulator: Emulator) -> None:
    """A messageId over 36 characters gets 400; exactly 36 is accepted."""
    token = await get_token(client)
    assert (await send(client, token, to="642", body="x", messageId="m" * 37)).status == 400
    assert (await send(client, token, to="642", body="x", messageId="m" * 36)).status == 200
    assert emulator.sent[0].upstream_message_id == "m" * 36


async def test_insufficient_funds(client: Client, emulator: Emulator) -> None:
    """With insufficient_funds set sms/out answers 403 and records no message."""
    emulator.insufficient_funds = True
    resp = await send(client, await get_token(client), to="642", body="x")
    assert resp.status == 403
    assert await resp.json() == {"success": False, "error": "Insufficient funds"}
    assert emulator.sent == []


async def test_fail_next_then_recovery(client: Client, emulator: Emulator) -> None:
    """Scripted failures answer the next requests in order, then normal service resumes."""
    token = await get_token(client)
    emulator.fail_next = [500, 503]
    statuses = [(await send(client, token, to="642", body="x")).status for _ in range(3)]
    assert statuses == [500, 503, 200]
    assert [r.status for r in emulator.sms_out_requests()] == [500, 503, 200]
    assert len(emulator.sent) == 1


async def test_fail_token_next(client: Client, emulator: Emulator) -> None:
    """fail_token_next fails only token requests, which still count; fail_next skips them."""
    emulator.fail_token_next = [500, 500]
    emulator.fail_next = [502]
    statuses = [
        (await client.post("/api/connexus/auth/token", data=CREDS)).status for _ in range(3)
    ]
    assert statuses == [500, 500, 200]
    assert emulator.token_requests == 3
    assert emulator.fail_next == [502]


async def test_latency_applied(client: Client, emulator: Emulator) -> None:
    """Every API request waits the scripted latency before answering."""
    emulator.latency = 0.2
    start = time.monotonic()
    resp = await client.post("/api/connexus/sms/balance", data=USER)
    elapsed = time.monotonic() - start
    assert resp.status == 200
    assert 0.2 <= elapsed < 2.0


async def test_mo_query_pagination(client: Client, emulator: Emulator) -> None:
    """250 incoming messages with limit 100 come back as 3 pages with the documented shape."""
    for i in range(250):
        await emulator.fire_mo(f"6421{i:06d}", "551", f"reply {i}")
    pages = []
    for page in (1, 2, 3):
        resp = await client.post("/api/connexus/mo/query", data={**USER, "page": str(page)})
        assert resp.status == 200
        pages.append(await resp.json())
    assert [len(p["messages"]) for p in pages] == [100, 100, 50]
    assert pages[0]["pagination"] == {
        "page": 1,
        "limit": 100,
        "totalRecords": 250,
        "totalPages": 3,
        "hasNextPage": True,
        "hasPreviousPage": False,
    }
    assert pages[2]["pagination"]["hasNextPage"] is False
    assert pages[2]["pagination"]["hasPreviousPage"] is True
    assert pages[0]["status"] == "success"
    assert pages[0]["filters"] == {
        "from": None,
        "to": None,
        "callback_status": None,
        "start_date": None,
        "end_date": None,
    }
    first = pages[0]["messages"][0]
    assert set(first) == {"messageId", "from", "to", "body", "receivedTime", "timestamp"}
    big = await client.post("/api/connexus/mo/query", json={**USER, "limit": 500})
    assert (await big.json())["pagination"]["limit"] == 200


async def test_mo_query_filters(client: Client, emulator: Emulator) -> None:
    """from, to and date filters narrow mo/query; dates are echoed as Y-m-d H:i:s."""
    await emulator.fire_mo("6421", "551", "a", received_at=datetime(2025, 1, 1, 9, 0, 0))
    await emulator.fire_mo("6421", "552", "b", received_at=datetime(2025, 1, 15, 14, 30, 0))
    await emulator.fire_mo(
        "6429", "551", "c", received_at=datetime(2025, 2, 1), related_message_id="1158493"
    )
    resp = await client.post(
        "/api/connexus/mo/query",
        data={**USER, "from": "6421", "start_date": "2025-01-02", "end_date": "2025-01-31"},
    )
    data = await resp.json()
    assert [m["body"] for m in data["messages"]] == ["b"]
    assert data["messages"][0]["receivedTime"] == "2025-01-15 14:30:00"
    assert data["filters"]["start_date"] == "2025-01-02 00:00:00"
    assert data["filters"]["end_date"] == "2025-01-31 23:59:59"
    by_to = await client.post("/api/connexus/mo/query", json={**USER, "to": "551"})
    messages = (await by_to.json())["messages"]
    assert [m["body"] for m in messages] == ["a", "c"]
    assert "relatedMessageId" not in messages[0]
    assert messages[1]["relatedMessageId"] == "1158493"
    timed = await client.post(
        "/api/connexus/mo/query", data={**USER, "start_date": "2025-01-15 14:30:01"}
    )
    assert [m["body"] for m in (await timed.json())["messages"]] == ["c"]
    bad = await client.post("/api/connexus/mo/query", data={**USER, "end_date": "15/01/2025"})
    assert bad.status == 400


async def test_fire_mo_reaches_receiver(
    aiohttp_server: AiohttpServer, emulator: Emulator, client: Client
) -> None:
    """fire_mo POSTs the documented mo payload and records the callback on the mo entry."""
    receiver = Receiver()
    emulator.webhook_url = await start_receiver(aiohttp_server, receiver)
    payload = await emulator.fire_mo("+6421234567", "551", "Reply text")
    assert receiver.payloads == [payload]
    assert payload["type"] == "mo"
    assert set(payload) == {
        "type",
        "messageId",
        "from",
        "to",
        "body",
        "timestamp",
        "encoding",
        "network",
    }
    assert emulator.webhook_deliveries == [(payload, 200)]
    assert emulator.mo[0]["callbackUrl"] == emulator.webhook_url
    assert emulator.mo[0]["callbackStatus"] == "200"
    resp = await client.post("/api/connexus/mo/query", data={**USER, "callback_status": "200"})
    assert (await resp.json())["pagination"]["totalRecords"] == 1


async def test_fire_dlr_reaches_receiver(aiohttp_server: AiohttpServer, emulator: Emulator) -> None:
    """fire_dlr POSTs the documented dlr payload with the status name for the code."""
    receiver = Receiver()
    emulator.webhook_url = await start_receiver(aiohttp_server, receiver)
    payload = await emulator.fire_dlr("1158493", 1)
    assert receiver.payloads == [payload]
    assert payload["type"] == "dlr"
    assert payload["messageId"] == "1158493"
    assert payload["status"] == "DELIVRD"
    assert payload["statusCode"] == 1
    assert isinstance(payload["timestamp"], int)
    assert payload["details"]["smsc"] == "emulator"
    assert payload["details"]["smscid"]


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "DELIVRD"),
        (2, "UNDELIV"),
        (4, "QUEUED"),
        (8, "ACCEPTD"),
        (16, "UNDELIV"),
        (3, "UNKNOWN"),
    ],
)
async def test_dlr_status_names(emulator: Emulator, code: int, name: str) -> None:
    """Each documented statusCode maps to its status name; others are UNKNOWN."""
    assert (await emulator.fire_dlr("1", code))["status"] == name


async def test_webhook_retried_until_200(aiohttp_server: AiohttpServer, emulator: Emulator) -> None:
    """A receiver failing twice then answering 200 gets exactly 3 attempts."""
    receiver = Receiver([500, 503])
    emulator.webhook_url = await start_receiver(aiohttp_server, receiver)
    payload = await emulator.fire_dlr("7", 2)
    assert len(receiver.payloads) == 3
    assert emulator.webhook_deliveries == [(payload, 500), (payload, 503), (payload, 200)]


async def test_webhook_unreachable(emulator: Emulator) -> None:
    """A receiver that refuses connections gets 1 + 3 attempts recorded with status 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    emulator.webhook_url = f"http://127.0.0.1:{port}/webhook"
    await emulator.fire_mo("642", "551", "x")
    assert [status for _, status in emulator.webhook_deliveries] == [0, 0, 0, 0]
    assert "callbackStatus" not in emulator.mo[0]


async def test_auto_dlr_before_send_response(
    aiohttp_server: AiohttpServer, client: Client, emulator: Emulator
) -> None:
    """With auto_dlr and send_response_delay the dlr reaches the receiver before sms/out answers."""
    receiver = Receiver()
    emulator.webhook_url = await start_receiver(aiohttp_server, receiver)
    emulator.auto_dlr = 1
    emulator.send_response_delay = 0.3
    resp = await send(client, await get_token(client), to="642", body="x")
    assert receiver.got.is_set()
    assert receiver.payloads[0]["messageId"] == (await resp.json())["message_id"]
    assert receiver.payloads[0]["status"] == "DELIVRD"


async def test_configure(client: Client, emulator: Emulator) -> None:
    """GET configure shows the webhook URL and POST configure sets it."""
    auth = BASIC
    resp = await client.get("/api/connexus/configure", headers=auth)
    assert await resp.json() == {"webhook_url": None}
    url = "https://example.org/webhook"
    resp = await client.post("/api/connexus/configure", json={"webhook_url": url}, headers=auth)
    assert resp.status == 200
    assert emulator.webhook_url == url
    resp = await client.get("/api/connexus/configure", headers=auth)
    assert await resp.json() == {"webhook_url": url}


async def test_unknown_path_recorded(client: Client, emulator: Emulator) -> None:
    """An unknown API path answers 404 and is still recorded."""
    resp = await client.post("/api/connexus/sms/nothing", data=USER)
    assert resp.status == 404
    assert emulator.requests[-1].path == "/api/connexus/sms/nothing"
    assert emulator.requests[-1].status == 404


async def test_control_paths(
    aiohttp_server: AiohttpServer, client: Client, emulator: Emulator
) -> None:
    """The /_emulator/ paths script behaviour, fire mo/dlr, list sends and revoke tokens."""
    receiver = Receiver()
    url = await start_receiver(aiohttp_server, receiver)
    resp = await client.post(
        "/_emulator/script",
        json={"webhook_url": url, "reject": {"649": "Blocked"}, "fail_next": [], "latency": 0},
    )
    assert resp.status == 200
    assert emulator.reject == {"649": "Blocked"}
    bad = await client.post("/_emulator/script", json={"latency": "slow", "nope": 1})
    assert bad.status == 400
    token = await get_token(client)
    await send(client, token, to=["642", "649"], body="x")
    sent = await (await client.get("/_emulator/sent")).json()
    assert [(m["to"], m["accepted"]) for m in sent] == [("642", True), ("649", False)]
    mo = await client.post(
        "/_emulator/mo", json={"from": "642", "to": "551", "body": "Y", "relatedMessageId": "5"}
    )
    assert (await mo.json())["type"] == "mo"
    assert emulator.mo[0]["relatedMessageId"] == "5"
    dlr = await client.post("/_emulator/dlr", json={"messageId": "1158493", "statusCode": 2})
    assert (await dlr.json())["status"] == "UNDELIV"
    assert [p["type"] for p in receiver.payloads] == ["mo", "dlr"]
    assert (await client.post("/_emulator/revoke")).status == 200
    assert (await send(client, token, to="642", body="x")).status == 401


async def test_serve_emulator_runs_until_cancelled() -> None:
    """serve_emulator serves the API on a real port and shuts down cleanly when cancelled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    emulator = Emulator()
    task = asyncio.create_task(serve_emulator("127.0.0.1", port, emulator))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/api/connexus/sms/balance", data=USER
                    ) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("emulator never came up")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(emulator.requests) == 1


# -- readings of the delivery report ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reading", "client_id", "expected"),
    [
        ("connexus", "MSG1", "own"),
        ("client", "MSG1", "MSG1"),
        ("client", None, "own"),
    ],
)
async def test_dlr_id_reading(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    reading: str,
    client_id: str | None,
    expected: str,
) -> None:
    """auto_dlr reports carry the emulator's message_id, or the client's messageId when sent."""
    emu = Emulator(dlr_id=reading)  # type: ignore[arg-type]
    client = await aiohttp_client(create_emulator_app(emu))
    receiver = Receiver()
    emu.webhook_url = await start_receiver(aiohttp_server, receiver)
    emu.auto_dlr = 1
    form = {"to": "6421234567", "body": "x"}
    if client_id is not None:
        form["messageId"] = client_id
    token = await get_token(client)
    resp = await client.post(
        "/api/connexus/sms/out", data=form, headers={"Authorization": f"Bearer {token}"}
    )
    own = (await resp.json())["message_id"]
    await asyncio.wait_for(receiver.got.wait(), 5)
    assert receiver.payloads[0]["messageId"] == (own if expected == "own" else expected)
    await emu.close()


async def test_bulk_reports_one_id_per_recipient(
    aiohttp_server: AiohttpServer, client: Client, emulator: Emulator
) -> None:
    """A bulk send's auto reports name each recipient's own message_id, never a shared one."""
    receiver = Receiver()
    emulator.webhook_url = await start_receiver(aiohttp_server, receiver)
    emulator.auto_dlr = 8
    emulator.dlr_id = "client"  # no messageId in the bulk request: falls back to message_id
    resp = await send(client, await get_token(client), to=["641", "642", "643"], body="x")
    ids = [m["message_id"] for m in (await resp.json())["messages"]]
    assert len(set(ids)) == 3
    async with asyncio.timeout(5):
        while True:
            receiver.got.clear()
            if len(receiver.payloads) >= 3:
                break
            await receiver.got.wait()
    assert sorted(p["messageId"] for p in receiver.payloads) == sorted(ids)


@pytest.mark.parametrize(("timestamp", "details"), [(True, True), (False, False), (True, False)])
async def test_dlr_optional_fields(timestamp: bool, details: bool) -> None:
    """dlr_timestamp and dlr_details decide whether reports carry those keys at all."""
    emu = Emulator(dlr_timestamp=timestamp, dlr_details=details)
    payload = await emu.fire_dlr("1", 1)
    assert ("timestamp" in payload) is timestamp
    assert ("details" in payload) is details
    assert {"type", "messageId", "status", "statusCode"} <= set(payload)
    fixed = await emu.fire_dlr("1", 1, timestamp=1700000000)
    assert fixed.get("timestamp") == (1700000000 if timestamp else None)


def test_dlr_id_reading_checked() -> None:
    """An unknown id reading is refused when the emulator is built."""
    with pytest.raises(ValueError, match="dlr_id"):
        Emulator(dlr_id="both")  # type: ignore[arg-type]


async def test_control_sets_reading(client: Client, emulator: Emulator) -> None:
    """/_emulator/script sets dlr_id, dlr_timestamp and dlr_details, and refuses bad values."""
    resp = await client.post(
        "/_emulator/script",
        json={"dlr_id": "client", "dlr_timestamp": False, "dlr_details": False},
    )
    assert resp.status == 200
    state = await resp.json()
    assert (state["dlr_id"], state["dlr_timestamp"], state["dlr_details"]) == (
        "client",
        False,
        False,
    )
    assert (emulator.dlr_id, emulator.dlr_timestamp, emulator.dlr_details) == (
        "client",
        False,
        False,
    )
    for bad in ({"dlr_id": "mine"}, {"dlr_timestamp": "no"}, {"dlr_details": 0}):
        assert (await client.post("/_emulator/script", json=bad)).status == 400
    assert emulator.dlr_id == "client"
    dlr = await client.post(
        "/_emulator/dlr", json={"messageId": "9", "statusCode": 1, "timestamp": 5}
    )
    assert set(await dlr.json()) == {"type", "messageId", "status", "statusCode"}
    bad_stamp = await client.post(
        "/_emulator/dlr", json={"messageId": "9", "statusCode": 1, "timestamp": 1.5}
    )
    assert bad_stamp.status == 400


async def test_cli_flags_shape_reports(aiohttp_server: AiohttpServer) -> None:
    """`bc-proxy emulator --dlr-id client --dlr-no-timestamp --dlr-no-details` reports that way."""
    receiver = Receiver()
    url = await start_receiver(aiohttp_server, receiver)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bc_proxy", "emulator", "--port", str(port),
        "--webhook-url", url, "--dlr-id", "client", "--dlr-no-timestamp", "--dlr-no-details",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    async with session.get(f"{base}/_emulator/script") as resp:
                        state = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("emulator never came up")
            assert state["dlr_id"] == "client"
            async with session.post(
                f"{base}/_emulator/dlr", json={"messageId": "42", "statusCode": 2}
            ) as resp:
                assert resp.status == 200
        assert receiver.payloads == [
            {"type": "dlr", "messageId": "42", "status": "UNDELIV", "statusCode": 2}
        ]
    finally:
        proc.terminate()
        await proc.wait()


# -- mo/query at scale and per account ----------------------------------------------------------


async def query(client: Client, **params: str) -> dict[str, Any]:
    resp = await client.post("/api/connexus/mo/query", data={**USER, **params})
    assert resp.status == 200
    data: dict[str, Any] = await resp.json()
    return data


async def test_mo_query_20000_paged_to_the_end(client: Client, emulator: Emulator) -> None:
    """20,000 messages page out completely at 200 a page, oldest first, each once, quickly."""
    base = datetime(2026, 1, 1, 0, 0, 0)
    for i in range(20_000):
        emulator.record_mo(f"6421{i:06d}", "551", f"m{i}", received_at=base.replace(
            hour=i // 3600 % 24, minute=i // 60 % 60, second=i % 60))  # fmt: skip
    started = time.perf_counter()
    seen: list[str] = []
    page = 1
    while True:
        data = await query(client, start_date="2026-01-01", limit="200", page=str(page))
        seen += [m["messageId"] for m in data["messages"]]
        assert data["pagination"]["totalRecords"] == 20_000
        if not data["pagination"]["hasNextPage"]:
            break
        page += 1
    elapsed = time.perf_counter() - started
    assert page == 100
    assert len(seen) == len(set(seen)) == 20_000
    times = [m["receivedTime"] for m in emulator.mo]
    assert times == sorted(times)
    assert elapsed < 10, elapsed


async def test_mo_query_date_bounds_inclusive_and_sorted(
    client: Client, emulator: Emulator
) -> None:
    """Messages logged out of time order are listed oldest first; both date bounds include."""
    emulator.record_mo("1", "551", "late", received_at=datetime(2025, 3, 1, 12, 0, 0))
    emulator.record_mo("2", "551", "early", received_at=datetime(2025, 3, 1, 8, 0, 0))
    emulator.record_mo("3", "551", "same", received_at=datetime(2025, 3, 1, 12, 0, 0))
    data = await query(client, start_date="2025-03-01 08:00:00", end_date="2025-03-01 12:00:00")
    assert [m["body"] for m in data["messages"]] == ["early", "late", "same"]
    data = await query(client, start_date="2025-03-01 08:00:01")
    assert [m["body"] for m in data["messages"]] == ["late", "same"]
    data = await query(client, end_date="2025-03-01 11:59:59")
    assert [m["body"] for m in data["messages"]] == ["early"]
    data = await query(client, start_date="2025-03-02")
    assert data["messages"] == []
    assert data["pagination"]["totalPages"] == 0
    assert data["pagination"]["hasNextPage"] is False


async def test_mo_query_per_account(client: Client, emulator: Emulator) -> None:
    """A message logged for one account is listed by that account's mo/query only."""
    emulator.clients["cid_other"] = "csk_other"
    await emulator.fire_mo("641", "551", "shared")
    await emulator.fire_mo("642", "551", "demo's", account="cid_demo")
    await emulator.fire_mo("643", "551", "other's", account="cid_other")
    demo = await client.post(
        "/api/connexus/mo/query", headers={"Authorization": f"Bearer {await get_token(client)}"}
    )
    assert [m["body"] for m in (await demo.json())["messages"]] == ["shared", "demo's"]
    tok = await client.post(
        "/api/connexus/auth/token", data={"client_id": "cid_other", "client_secret": "csk_other"}
    )
    other = await client.post(
        "/api/connexus/mo/query",
        headers={"Authorization": f"Bearer {(await tok.json())['access_token']}"},
    )
    assert [m["body"] for m in (await other.json())["messages"]] == ["shared", "other's"]
    assert "account" not in emulator.mo[1]
