"""Liveness and readiness: /healthz, /readyz (store up, not shutting down; tokens only verbose),
and /metrics moving to `server.metrics_port` when one is set."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp

from bc_proxy import keys
from tests.conftest import (
    CLIENT_SECRET,
    WEBHOOK_SECRET,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def ready(client: GatewayClient) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/readyz")
    assert resp.content_type == "application/json"
    body: dict[str, Any] = json.loads(await resp.read())
    return resp.status, body


async def test_healthz_answers_alive_json(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """/healthz answers 200 with a JSON body without touching Connexus."""
    client = await gateway(cfg)
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert json.loads(await resp.read()) == {"status": "alive"}


async def test_readyz_ready_without_touching_connexus(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """/readyz answers 200 on store and shutdown checks alone: no token is fetched for it."""
    client = await gateway(cfg)
    status, body = await ready(client)
    assert status == 200
    assert body == {"status": "ready", "checks": {"store": "ok"}}
    assert connexus.emu.token_requests == 0


async def test_readyz_stays_ready_with_token_endpoint_down(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """With the token endpoint failing, /readyz is 200 in under 1 s, webhooks are stored and
    polls answer; /readyz?verbose names the failing tenant."""
    connexus.emu.fail_token_next = [500] * 1000
    client = await gateway(cfg)
    resp = await client.post("/api/1/sms/out", data=creds(to="6421000000", body="hi"))
    assert resp.status == 500  # the send needs a token: a gateway error, not an outage
    started = time.monotonic()
    status, _ = await ready(client)
    assert time.monotonic() - started < 1.0
    assert status == 200
    hook = await client.post(
        f"/webhooks/connexus/{WEBHOOK_SECRET}",
        json={
            "type": "mo",
            "messageId": "m-ready-1",
            "from": "+6421000009",
            "to": "552",
            "body": "still here",
        },
    )
    assert hook.status == 200
    poll = await client.post("/api/1/sms/in", data=creds())
    assert poll.status == 200
    assert "still+here" in await poll.text()
    verbose = await client.get("/readyz?verbose")
    assert verbose.status == 200
    detail = json.loads(await verbose.read())
    assert detail["tenants"]["acme"].startswith("no token: ")
    assert CLIENT_SECRET not in json.dumps(detail)


async def test_readyz_verbose_shows_a_valid_token(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """After a send fetched a token, /readyz?verbose reports it valid with its remaining life."""
    client = await gateway(cfg)
    resp = await client.post("/api/1/sms/out", data=creds(to="6421000000", body="hi"))
    assert resp.status == 204
    detail = json.loads(await (await client.get("/readyz?verbose")).read())
    assert detail["tenants"]["acme"].startswith("ok: token valid for ")


async def test_readyz_503_when_the_store_is_gone(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A store that cannot answer makes /readyz 503 with a store reason, within 1 s."""
    client = await gateway(cfg)
    await client.app[keys.STORE].close()
    started = time.monotonic()
    status, body = await ready(client)
    assert time.monotonic() - started < 1.0
    assert status == 503
    assert body["checks"]["store"].startswith("unreachable")


async def test_readyz_says_shutting_down(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """Once shutdown has begun /readyz answers 503 with a shutdown check."""
    client = await gateway(cfg)
    assert (await ready(client))[0] == 200
    await client.app.shutdown()  # what run_app does on SIGTERM once it stops accepting
    status, body = await ready(client)
    assert status == 503
    assert body["checks"]["shutdown"] == "shutting down"
    assert (await client.get("/healthz")).status == 200


async def test_metrics_port_serves_metrics_there_only(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """With server.metrics_port set, /metrics answers on that port and 404s on the main port."""
    port = free_port()
    cfg = {**cfg, "server": {**cfg["server"], "metrics_port": port}}
    client = await gateway(cfg)
    resp = await client.post("/api/1/sms/queue", data=creds())
    assert resp.status == 200
    assert (await client.get("/metrics")).status == 404
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as side,
    ):
        assert side.status == 200
        text = await side.text()
    assert (
        'bc_proxy_legacy_requests_total{route="/api/1/sms/queue",status="200",tenant="acme"} 1.0'
        in text
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as other,
    ):
        assert other.status == 404


async def test_webhook_registered_on_start(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """register_on_start with a public_url sets Connexus's webhook to public_url/webhooks/...."""
    cfg["server"]["public_url"] = "https://sms-gw.example.org/"
    cfg["webhook"]["register_on_start"] = True
    await gateway(cfg)
    url = f"https://sms-gw.example.org/webhooks/connexus/{WEBHOOK_SECRET}"
    for _ in range(100):  # registration runs in the background (bc_proxy.registration)
        if connexus.emu.webhook_url == url:
            break
        await asyncio.sleep(0.05)
    assert connexus.emu.webhook_url == url


async def test_webhook_not_registered_by_default(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Without register_on_start the gateway leaves Connexus's webhook setting alone."""
    cfg["server"]["public_url"] = "https://sms-gw.example.org"
    await gateway(cfg)
    assert connexus.emu.webhook_url is None
