"""What the console and `/readyz?verbose` show holds no secrets: passthrough paths only when an
authenticated tenant's allowlist has them, Connexus and error text scrubbed by the logs' rules
(configured secrets, bearer tokens, phone numbers), phone numbers masked as in the logs."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from typing import Any

from aiohttp import web

from bc_proxy import log, registration
from bc_proxy.config import parse
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.metrics import NO_TENANT, Metrics
from tests.conftest import (
    CLIENT_SECRET,
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    AiohttpServer,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
    logging_to,
)
from tests.test_console import HANDSET, HOOK, console_cfg, page

UPSTREAM_TOKEN = "eyJupstream.leaked-bearer-value"
LEAKY_NUMBER = "+6427000111"
# A passthrough route's cells in the last-requests table: tenant, status, ms, detail.
_PASSTHROUGH_ROW = re.compile(
    r"<td>/api/connexus/\{path\}</td><td>([^<]*)</td><td>(\d+)</td><td>[^<]*</td><td>([^<]*)</td>"
)


def _legacy_basic() -> dict[str, str]:
    pair = base64.b64encode(f"{LEGACY_USER}:{LEGACY_PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


async def test_recent_passthrough_path_only_when_allowlisted_and_authenticated(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A passthrough path is shown only for a tenant that logged in and may call it; an
    unauthenticated one (a password in an encoded query) and one off the allowlist are
    `other`."""
    config = console_cfg(cfg)
    config["tenants"][0]["passthrough"] = ["sms/balance"]
    client = await gateway(config)
    leaky = f"sms/balance%3FuserId%3D{LEGACY_USER}%26password%3D{LEGACY_PASSWORD}"
    assert (await client.get(f"/api/connexus/{leaky}")).status == 401
    off_list = f"/api/connexus/hooks/{WEBHOOK_SECRET}"
    assert (await client.get(off_list, headers=_legacy_basic())).status == 404
    assert (await client.get("/api/connexus/sms/balance", headers=_legacy_basic())).status == 200
    text = await page(client)
    assert LEGACY_PASSWORD not in text
    assert WEBHOOK_SECRET not in text
    assert sorted(_PASSTHROUGH_ROW.findall(text)) == [
        (NO_TENANT, "401", "other"),
        ("acme", "200", "sms/balance"),
        ("acme", "404", "other"),
    ]


async def _leaky_connexus(aiohttp_server: AiohttpServer) -> str:
    """A Connexus that refuses every call with an error text quoting a configured secret, a
    bearer token and a phone number; its base URL."""

    async def refuse(request: web.Request) -> web.Response:
        reason = f"bad secret {CLIENT_SECRET} for Bearer {UPSTREAM_TOKEN} (to {LEAKY_NUMBER})"
        return web.json_response(
            {"error": "invalid_client", "error_description": reason}, status=401
        )

    app = web.Application()
    app.router.add_route("*", "/api/connexus/{tail:.*}", refuse)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("/api/connexus"))


async def _registration_failed(client: GatewayClient) -> str:
    """The /readyz?verbose text once the tenant's webhook registration has failed."""
    text = ""
    for _ in range(100):
        text = await (await client.get("/readyz?verbose")).text()
        if '"acme": "error' in text:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"registration never failed: {text}")


async def test_console_and_readyz_scrub_connexus_error_text(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, tmp_path: Any
) -> None:
    """Connexus's error text, in the token state and the registration line, is shown on the
    console and the unauthenticated /readyz?verbose with the configured secret, the bearer
    token and the phone number hidden, as in the logs."""
    config = console_cfg(config_dict(tmp_path, await _leaky_connexus(aiohttp_server)))
    config["server"]["public_url"] = "https://sms-gw.example.org"
    config["webhook"]["register_on_start"] = True
    client = await gateway(config)
    assert (await client.get("/api/1/sms/out", params=creds(to=HANDSET, body="hi"))).status >= 400
    ready = await _registration_failed(client)
    text = await page(client)
    for shown in (ready, text):
        assert "bad secret ***" in shown  # the text is there, scrubbed
        assert CLIENT_SECRET not in shown
        assert UPSTREAM_TOKEN not in shown
        assert LEAKY_NUMBER[1:] not in shown
        assert "*******111" in shown
    assert text.count("bad secret ***") >= 2  # token state and registration line


async def test_console_masks_phone_numbers_as_the_logs_do(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Recipients, dead letters' numbers and rejected webhook bodies keep only the last three
    digits of a phone number (the logs' `mask_number`), never its first ones."""
    client = await gateway(console_cfg(cfg))
    resp = await client.get("/api/1/sms/out", params=creds(to=HANDSET, body="hi"))
    assert resp.status == 204
    assert (await client.post(HOOK, data=f"not json {HANDSET}".encode())).status == 400
    text = await page(client)
    assert f"to=*******{HANDSET[-3:]}" in text
    assert f"not json *******{HANDSET[-3:]}" in text
    assert HANDSET[:3] + "*" not in text
    assert HANDSET not in text


async def test_a_legacy_error_answer_quoting_connexus_hides_secrets(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, tmp_path: Any
) -> None:
    """A send whose token request Connexus refuses is answered with Connexus's reason: the
    configured secret and the bearer token in it are hidden, as `serve` hides them in its logs
    (it hands the scrubber the configuration's secrets at start)."""
    cfg = config_dict(tmp_path, await _leaky_connexus(aiohttp_server))
    with logging_to(io.StringIO(), log.secrets_of(parse(cfg))):  # as serve sets it up
        client = await gateway(cfg)
        resp = await client.get("/api/1/sms/out", params=creds(to=HANDSET, body="hi"))
        body = await resp.text()
    assert resp.status >= 400
    assert "bad secret ***" in body, body  # the reason is there, scrubbed
    assert CLIENT_SECRET not in body
    assert UPSTREAM_TOKEN not in body


async def test_a_registration_error_is_scrubbed_before_it_is_cut(
    aiohttp_server: AiohttpServer, tmp_path: Any
) -> None:
    """The registration line keeps 200 characters of Connexus's error. Cut first, a secret
    crossing that edge was left in part, where no later scrubbing (the console's, /readyz's)
    could find it: the line is scrubbed before it is cut, wherever the secret falls."""
    padding: list[int] = [0]

    async def refuse(request: web.Request) -> web.Response:
        reason = "x" * padding[0] + f" {CLIENT_SECRET} "
        return web.json_response(
            {"error": "invalid_client", "error_description": reason}, status=401
        )

    fake = web.Application()
    fake.router.add_route("*", "/api/connexus/{tail:.*}", refuse)
    server = await aiohttp_server(fake, host="127.0.0.1")
    cfg = config_dict(tmp_path, str(server.make_url("/api/connexus")))
    client = ConnexusClient(parse(cfg), Metrics(process=False))
    await client.start()
    lines = []
    try:
        with logging_to(io.StringIO(), log.secrets_of(parse(cfg))):  # as serve sets it up
            for padding[0] in range(100, 200, 9):
                outcome, line = await registration.register(client, "acme", "https://x.test/h")
                assert outcome == "error"
                lines.append(line)
    finally:
        await client.close()
    assert all(len(line) <= 200 for line in lines)
    assert [line for line in lines if CLIENT_SECRET[:5] in line] == []
    assert any("***" in line for line in lines)
