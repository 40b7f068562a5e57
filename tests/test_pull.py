"""Pull mode: a tenant without a public URL gets its replies and delivery reports by fetching
Connexus mo/query, sms/in and sms/status; the emulator serves the Bulletin-compatible polls."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl

import pytest

from bc_proxy.metrics import Metrics
from bc_proxy.pull import dlr_from_record, inverse_status_map, mo_from_record
from bc_proxy.store import DlrEvent, MoEvent
from tests.conftest import (
    CLIENT_ID,
    WEBHOOK_SECRET,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
)

HANDSET = "6421000222"
PULL = {"mode": "pull", "pull_interval_seconds": 0.1}
BEARERLESS = {"userId": "demo@example.org", "password": "demo-password"}


async def poll_until(client: GatewayClient, kind: str, within: float = 5.0) -> dict[str, str]:
    """Poll /api/1/sms/{kind} until a record comes (or fail after `within` seconds)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        resp = await client.get(f"/api/1/sms/{kind}", params=creds())
        if resp.status == 200:
            return dict(parse_qsl(await resp.text(), keep_blank_values=True))
        assert resp.status == 204
        assert asyncio.get_running_loop().time() < deadline, f"no {kind} record arrived"
        await asyncio.sleep(0.05)


async def send(client: GatewayClient, legacy_id: str) -> None:
    resp = await client.post(
        "/api/1/sms/out", data=creds(to=HANDSET, body="Hi", messageId=legacy_id)
    )
    assert resp.status == 204


async def drained(connexus: Connexus, within: float = 5.0) -> None:
    """Wait until the emulator's polls are empty and one more pull round has passed."""
    for _ in range(int(within / 0.05)):
        if not connexus.emu.unread("in", CLIENT_ID) and not connexus.emu.unread(
            "status", CLIENT_ID
        ):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


async def test_pull_tenant_without_webhook_gets_reply_and_report(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """With no webhook anywhere, a reply and a delivery report reach /api/1/sms/in and status."""
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    await send(client, "LEG-1")
    sent = connexus.emu.sent[-1]
    await connexus.emu.report(sent, 1)
    await connexus.emu.fire_mo(HANDSET, "552", "Yes please", account=CLIENT_ID)
    assert connexus.emu.webhook_deliveries == []  # nothing was ever pushed to the gateway
    status = await poll_until(client, "status")
    assert status["statusCode"] == "RCV"
    assert status["inReplyToId"] == "LEG-1"
    assert status["from"] == HANDSET
    incoming = await poll_until(client, "in")
    assert incoming["body"] == "Yes please"
    assert incoming["from"] == HANDSET
    assert incoming["inReplyToId"] == "LEG-1"


async def test_same_events_by_pull_and_webhook_are_one_record(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A reply and a report that come by webhook, sms/in, mo/query and sms/status are one each."""
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    connexus.emu.webhook_url = str(client.make_url(f"/webhooks/connexus/{WEBHOOK_SECRET}"))
    await send(client, "LEG-2")
    await connexus.emu.report(connexus.emu.sent[-1], 1)
    await connexus.emu.fire_mo(HANDSET, "552", "Twice?", account=CLIENT_ID)
    assert [status for _, status in connexus.emu.webhook_deliveries] == [200, 200]
    await drained(connexus)
    assert any(r.path.endswith("/mo/query") for r in connexus.emu.requests)
    assert (await poll_until(client, "status"))["inReplyToId"] == "LEG-2"
    assert (await poll_until(client, "in"))["body"] == "Twice?"
    assert (await client.get("/api/1/sms/status", params=creds())).status == 204
    assert (await client.get("/api/1/sms/in", params=creds())).status == 204


async def test_webhook_tenant_does_not_pull(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A tenant in webhook mode leaves Connexus's sms/in and sms/status alone."""
    await gateway(cfg)
    await connexus.emu.fire_mo(HANDSET, "552", "hello", account=CLIENT_ID)
    await asyncio.sleep(0.4)
    assert connexus.emu.unread("in", CLIENT_ID) == 1
    assert not [r for r in connexus.emu.requests if r.path.endswith(("/sms/in", "/sms/status"))]


async def test_pull_failure_is_counted_and_retried(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A failing pull is counted as an error, and the next round still fetches the record."""
    cfg["tenants"][0]["inbound"] = PULL
    connexus.emu.fail_next = [500, 500, 500, 500]
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    await connexus.emu.fire_mo(HANDSET, "552", "after a failure", account=CLIENT_ID)
    assert (await poll_until(client, "in"))["body"] == "after a failure"
    errors = sum(
        metrics.registry.get_sample_value(
            "bc_proxy_pulls_total", {"tenant": "acme", "source": s, "outcome": "error"}
        )
        or 0
        for s in ("mo_query", "sms_in", "sms_status")
    )
    assert errors >= 1


async def test_emulator_polls_consume_one_record_per_call_per_account(
    connexus: Connexus, aiohttp_client: Any
) -> None:
    """sms/in hands out each unread record once, only to its account, then answers 204."""
    client = await aiohttp_client(connexus.server)
    await connexus.emu.fire_mo(HANDSET, "552", "one", account="demo@example.org")
    await connexus.emu.fire_mo(HANDSET, "552", "two", account="demo@example.org")
    token = await client.post(
        "/api/connexus/auth/token", data={"client_id": "cid_other", "client_secret": "csk_other"}
    )
    bearer = {"Authorization": f"Bearer {(await token.json())['access_token']}"}
    assert (await client.post("/api/connexus/sms/in", headers=bearer)).status == 204
    bodies = []
    for _ in range(2):
        resp = await client.post("/api/connexus/sms/in", data=BEARERLESS)
        assert resp.status == 200
        assert resp.content_type == "application/x-www-form-urlencoded"
        record = dict(parse_qsl(await resp.text(), keep_blank_values=True))
        assert set(record) == {"messageId", "from", "to", "body", "rateCode", "inReplyToId"}
        bodies.append(record["body"])
    assert bodies == ["one", "two"]
    assert (await client.post("/api/connexus/sms/in", data=BEARERLESS)).status == 204
    assert (await client.post("/api/connexus/sms/status")).status == 401


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"inReplyToId": "ref1", "statusCode": "RCV"}, DlrEvent("ref1", 1, "")),
        ({"inReplyToId": "ref1", "statusCode": "NRCV"}, DlrEvent("ref1", 2, "")),
        ({"inReplyToId": "ref1", "statusCode": "SNT"}, DlrEvent("ref1", 4, "")),
        ({"inReplyToId": "ref1", "statusCode": "NUR"}, DlrEvent("ref1", 16, "")),
        ({"inReplyToId": "r", "statusCode": "ERR", "error": "BOOM"}, DlrEvent("r", 0, "BOOM")),
        ({"inReplyToId": "r", "statusCode": "EXP"}, DlrEvent("r", 0, "EXP")),
        ({"inReplyToId": "", "statusCode": "RCV"}, None),
        ({"inReplyToId": "r", "statusCode": ""}, None),
    ],
)
def test_status_record_as_report(record: dict[str, str], expected: DlrEvent | None) -> None:
    """A pulled status record becomes the report whose code the tenant's map turns back into it."""
    inverse = inverse_status_map({1: "RCV", 2: "NRCV", 4: "SNT", 8: "SNT", 16: "NUR"})
    assert dlr_from_record(record, inverse) == expected


def test_in_record_as_incoming_sms() -> None:
    """A pulled incoming record becomes the same event a webhook would give; junk is None."""
    record = {"messageId": "7", "from": "+6421", "to": "552", "body": "x", "inReplyToId": ""}
    assert mo_from_record(record) == MoEvent("7", "6421", "552", "x", None)
    assert mo_from_record({"messageId": "", "from": "1", "to": "2", "body": ""}) is None
