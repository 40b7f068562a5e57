"""Opt-out as Bulletin Connect did it (issue 10 point 8): an incoming STOP blocks the handset for
its tenant, a send to it is not forwarded and yields a NUR status record; START unblocks."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from tests.conftest import (
    WEBHOOK_SECRET,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
    with_tenant,
)

HANDSET = "6421000077"


async def incoming(client: GatewayClient, message_id: str, body: str) -> None:
    resp = await client.post(
        f"/webhooks/connexus/{WEBHOOK_SECRET}",
        json={
            "type": "mo",
            "messageId": message_id,
            "from": f"+{HANDSET}",
            "to": "552",
            "body": body,
        },
    )
    assert resp.status == 200, await resp.text()


async def poll(client: GatewayClient, kind: str) -> dict[str, str] | None:
    resp = await client.post(f"/api/1/sms/{kind}", data=creds())
    if resp.status == 204:
        return None
    assert resp.status == 200
    return {k: v[0] for k, v in parse_qs(await resp.text(), keep_blank_values=True).items()}


async def test_stop_start_round_trip(
    gateway: GatewayFactory, cfg: dict[str, Any], connexus: Connexus
) -> None:
    """STOP blocks: the send is not forwarded and a NUR "(Number in Blocked List)" record
    appears; START unblocks: the next send goes out."""
    client = await gateway(cfg)
    await incoming(client, "mo-stop-1", "Stop")
    stop = await poll(client, "in")
    assert stop is not None
    assert stop["body"] == "Stop"  # the legacy side still sees the STOP itself

    resp = await client.post(
        "/api/1/sms/out", data=creds(to=HANDSET, body="promo", messageId="blocked-1")
    )
    assert resp.status == 204
    assert connexus.emu.sms_out_requests() == []
    status = await poll(client, "status")
    assert status is not None
    assert status["statusCode"] == "NUR"
    assert status["error"] == "(Number in Blocked List)"
    assert status["from"] == HANDSET
    assert status["inReplyToId"] == "blocked-1"

    await incoming(client, "mo-start-1", "START")
    assert await poll(client, "in") is not None
    resp = await client.post(
        "/api/1/sms/out", data=creds(to=HANDSET, body="welcome back", messageId="after-1")
    )
    assert resp.status == 204
    assert len(connexus.emu.sms_out_requests()) == 1


async def test_blocked_recipient_of_a_bulk_send_only(
    gateway: GatewayFactory, cfg: dict[str, Any], connexus: Connexus
) -> None:
    """In a multi-recipient send only the blocked handset is held back; the others go out."""
    client = await gateway(cfg)
    await incoming(client, "mo-stop-2", "STOP")
    resp = await client.post(
        "/api/1/sms/out", data=creds(to=f"{HANDSET},6421000078", body="hi", messageId="bulk-1")
    )
    assert resp.status == 204
    (sent,) = connexus.emu.sms_out_requests()
    assert HANDSET not in sent.body.decode()
    assert "6421000078" in sent.body.decode()


async def test_opt_out_off_for_a_tenant(
    gateway: GatewayFactory, cfg: dict[str, Any], connexus: Connexus
) -> None:
    """With opt_out: false, STOP is an ordinary message and the handset keeps receiving."""
    client = await gateway(with_tenant(cfg, opt_out=False))
    await incoming(client, "mo-stop-3", "STOP")
    resp = await client.post("/api/1/sms/out", data=creds(to=HANDSET, body="still"))
    assert resp.status == 204
    assert len(connexus.emu.sms_out_requests()) == 1


async def test_stop_inside_a_sentence_does_not_block(
    gateway: GatewayFactory, cfg: dict[str, Any], connexus: Connexus
) -> None:
    """Only a message that is the STOP word itself blocks ("please don't stop" does not)."""
    client = await gateway(cfg)
    await incoming(client, "mo-stop-4", "please don't stop")
    resp = await client.post("/api/1/sms/out", data=creds(to=HANDSET, body="ok"))
    assert resp.status == 204
    assert len(connexus.emu.sms_out_requests()) == 1
