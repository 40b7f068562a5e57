"""The operator console: off by default, its own Basic login, the gateway's state on one page,
every value escaped under a strict CSP, and a dead-letter replay that needs its CSRF token."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bc_proxy import keys
from bc_proxy.legacy.auth import hash_password
from bc_proxy.log import mask_number
from tests.conftest import (
    WEBHOOK_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
)

CONSOLE_USER = "ops"
CONSOLE_PASSWORD = "console-pass-123"
HANDSET = "6421234567"
HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"


@functools.cache
def console_hash() -> str:
    return hash_password(CONSOLE_PASSWORD)


def basic(user: str = CONSOLE_USER, password: str = CONSOLE_PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Receiver:
    """A legacy push endpoint answering `status` (mutable), remembering what it got."""

    status: int = 500
    got: list[str] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        if self.status == 200:
            self.got.append(str(form.get("body", "")))
        return web.Response(status=self.status)


async def start_receiver(aiohttp_server: AiohttpServer) -> Receiver:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/sms-in", receiver.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    receiver.url = str(server.make_url("/sms-in"))
    return receiver


def console_cfg(cfg: dict[str, Any], receiver: Receiver | None = None) -> dict[str, Any]:
    """`cfg` with the console on; with a receiver, pushes that dead-letter after about 1 s."""
    out = copy.deepcopy(cfg)
    out["console"] = {"user": CONSOLE_USER, "password_hash": console_hash()}
    if receiver is not None:
        out["tenants"][0]["push"] = {
            "incoming_url": receiver.url,
            "max_age_hours": 0.0003,
            "retry_initial_seconds": 0.05,
            "retry_max_seconds": 0.2,
        }
    return out


def mo(message_id: str, body: str) -> dict[str, Any]:
    return {"type": "mo", "messageId": message_id, "from": "+" + HANDSET, "to": "552", "body": body}


async def dead_letter(client: GatewayClient, body: str, within: float = 10.0) -> int:
    """Store an incoming SMS by webhook and wait for its push to dead-letter; its id."""
    assert (await client.post(HOOK, json=mo(f"m-{body}", body))).status == 200
    store = client.app[keys.STORE]
    for _ in range(int(within / 0.05)):
        dead = await store.dead_letters()
        if dead:
            return dead[0].id
        await asyncio.sleep(0.05)
    raise AssertionError("never dead-lettered")


async def page(client: GatewayClient) -> str:
    resp = await client.get("/console", headers=basic())
    assert resp.status == 200
    return await resp.text()


async def test_console_is_off_by_default(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """Without a `console` block there is no /console at all."""
    client = await gateway(cfg)
    assert (await client.get("/console", headers=basic())).status == 404


async def test_console_needs_its_own_credentials(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """No, wrong or legacy credentials get 401 with a Basic challenge, on every console path."""
    client = await gateway(console_cfg(cfg))
    wrong = [
        {},
        basic(password="nope"),
        basic(user="root"),
        basic("acme-legacy", "acme-legacy-pass"),
    ]
    for headers in wrong:
        for method, path in (
            ("GET", "/console"),
            ("POST", "/console/replay"),
            ("GET", "/console/x"),
        ):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"].startswith('Basic realm="bc-proxy console"')
            assert "bc-proxy console</h1>" not in await resp.text()


async def test_page_has_strict_csp_and_no_script(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """The page is served with a strict CSP, refreshes itself and carries no JavaScript."""
    client = await gateway(console_cfg(cfg))
    resp = await client.get("/console", headers=basic())
    csp = resp.headers["Content-Security-Policy"]
    for rule in ("default-src 'none'", "form-action 'self'", "frame-ancestors 'none'"):
        assert rule in csp
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]+'", csp)
    text = await resp.text()
    assert '<meta http-equiv="refresh"' in text
    assert "<script" not in text.lower()
    assert not re.search(r"<[^>]+\son\w+=", text)  # no event-handler attributes either
    assert "acme" in text


async def test_page_shows_waiting_records_tokens_and_masked_requests(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Waiting records, token state, upstream errors and masked recent requests are shown."""
    client = await gateway(console_cfg(cfg))
    assert (await client.post(HOOK, json=mo("w-1", "waiting"))).status == 200
    resp = await client.get("/api/1/sms/out", params=creds(to=HANDSET, body="hi"))
    assert resp.status == 204
    text = await page(client)
    assert re.search(r"<td>acme</td><td>in</td><td>poll</td><td>1</td>", text)
    assert "token valid for" in text
    assert "/api/1/sms/out" in text
    assert mask_number(HANDSET) in text
    assert HANDSET not in text
    assert "0 of 2 (0.0%)" in text  # the token fetch and the send, no errors


async def test_everything_is_escaped(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """A hostile rejected webhook body is shown as text, never as markup."""
    client = await gateway(console_cfg(cfg))
    assert (await client.post(HOOK, data=b"<script>alert(1)</script>")).status == 400
    text = await page(client)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>" not in text


async def test_replay_needs_the_csrf_token_then_pushes_again(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A replay without the login's CSRF token is refused; with it the dead letter is pushed."""
    receiver = await start_receiver(aiohttp_server)
    client = await gateway(console_cfg(cfg, receiver))
    record_id = await dead_letter(client, "dead one")
    text = await page(client)
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', text)
    assert token is not None
    store = client.app[keys.STORE]
    for data in ({"id": str(record_id)}, {"id": str(record_id), "csrf": "0" * 64}):
        resp = await client.post("/console/replay", data=data, headers=basic())
        assert resp.status == 403
    assert len(await store.dead_letters()) == 1
    client.session.cookie_jar.clear()  # a cross-site POST: the SameSite cookie is not sent
    resp = await client.post(
        "/console/replay", data={"id": str(record_id), "csrf": token[1]}, headers=basic()
    )
    assert resp.status == 403
    await page(client)  # the cookie again
    receiver.status = 200
    resp = await client.post(
        "/console/replay",
        data={"id": str(record_id), "csrf": token[1]},
        headers=basic(),
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/console"
    for _ in range(100):
        if receiver.got:
            break
        await asyncio.sleep(0.05)
    assert receiver.got == ["dead one"]
    assert await store.dead_letters() == []


async def test_replay_of_an_id_that_is_no_row_number_is_400(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A replay id that is no row number (a Unicode digit, more digits than a row id has) is
    refused with 400, not a 500; the dead letter stays."""
    receiver = await start_receiver(aiohttp_server)
    client = await gateway(console_cfg(cfg, receiver))
    await dead_letter(client, "dead one")
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', await page(client))
    assert token is not None
    for bad in ("\u00b2", "\u0663", "9" * 30, "-1", ""):
        resp = await client.post(
            "/console/replay", data={"id": bad, "csrf": token[1]}, headers=basic()
        )
        assert resp.status == 400, bad
    assert len(await client.app[keys.STORE].dead_letters()) == 1


async def test_recent_requests_hold_no_secrets(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """The last-requests list shows route templates: no webhook secret, no legacy password."""
    client = await gateway(console_cfg(cfg))
    assert (await client.post(HOOK, json=mo("s-1", "secret?"))).status == 200
    assert (await client.get("/api/1/sms/queue", params=creds())).status == 200
    text = await page(client)
    assert "/webhooks/connexus/{secret}" in text
    assert "/api/1/sms/queue" in text
    assert WEBHOOK_SECRET not in text
    assert creds()["password"] not in text


async def test_upstream_error_rate_between_refreshes(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A Connexus 5xx between two page views shows in the recent and since-start error rates."""
    client = await gateway(console_cfg(cfg))
    assert "recent: measured from one refresh to the next" in await page(client)
    await asyncio.sleep(1.1)
    connexus.emu.fail_next = [503]
    resp = await client.get("/api/1/sms/out", params=creds(to=HANDSET, body="hi"))
    assert resp.status == 500
    text = await page(client)
    assert re.search(r"last 1 s: 1 of 2 \(50\.0%\); since start: 1 of 2 \(50\.0%\)", text)
