"""Liveness and readiness: /healthz, /readyz (token obtainable, store up, not shutting down),
and /metrics moving to `server.metrics_port` when one is set."""

from __future__ import annotations

import io
import json
import socket
from typing import Any

import aiohttp

from tests.conftest import (
    CLIENT_ID,
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


async def test_readyz_ready_when_token_obtainable(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """/readyz fetches the first token and answers 200 with every check ok; later calls reuse it."""
    client = await gateway(cfg)
    status, body = await ready(client)
    assert status == 200
    assert body == {"status": "ready", "checks": {"store": "ok", "tenant:acme": "ok"}}
    assert connexus.emu.token_requests == 1
    status, _ = await ready(client)
    assert status == 200
    assert connexus.emu.token_requests == 1


async def test_readyz_503_with_reason_on_wrong_secret_then_recovers(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Refused client credentials make /readyz 503 naming the tenant; fixed ones bring 200."""
    connexus.emu.clients[CLIENT_ID] = "csk_rotated"  # our configured secret is now wrong
    client = await gateway(cfg)
    status, body = await ready(client)
    assert status == 503
    assert body["status"] == "not ready"
    assert body["checks"]["store"] == "ok"
    reason = body["checks"]["tenant:acme"]
    assert reason.startswith("no token: ")
    assert "Invalid client credentials" in reason
    assert CLIENT_SECRET not in json.dumps(body)
    connexus.emu.clients[CLIENT_ID] = CLIENT_SECRET
    status, body = await ready(client)
    assert status == 200
    assert body["checks"]["tenant:acme"] == "ok"


async def test_readyz_503_while_token_endpoint_fails_then_recovers(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A token endpoint answering 500 on a fresh app makes /readyz 503; once it heals, 200."""
    connexus.emu.fail_token_next = [500] * 10
    client = await gateway(cfg)
    status, body = await ready(client)
    assert status == 503
    assert body["status"] == "not ready"
    assert body["checks"]["tenant:acme"].startswith("no token: ")
    connexus.emu.fail_token_next = []
    status, body = await ready(client)
    assert status == 200
    assert body["status"] == "ready"


async def test_token_endpoint_outage_is_a_gateway_error(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A token endpoint 5xx is a Connexus failure for sends and /readyz, not an unhandled error."""
    connexus.emu.fail_token_next = [500] * 10
    client = await gateway(cfg)
    resp = await client.post("/api/1/sms/out", data=creds(to="6421000000", body="hi"))
    assert resp.status == 500
    text = await resp.text()
    connexus.emu.fail_token_next = [500] * 10
    _, body = await ready(client)
    events = [json.loads(line)["event"] for line in log_stream.getvalue().splitlines()]
    assert "unhandled" not in events
    assert text.startswith("Connexus")
    assert body["checks"]["tenant:acme"].startswith("no token: Connexus")


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
    assert connexus.emu.webhook_url == (
        f"https://sms-gw.example.org/webhooks/connexus/{WEBHOOK_SECRET}"
    )


async def test_webhook_not_registered_by_default(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Without register_on_start the gateway leaves Connexus's webhook setting alone."""
    cfg["server"]["public_url"] = "https://sms-gw.example.org"
    await gateway(cfg)
    assert connexus.emu.webhook_url is None
