"""Delivery reports: one event, one recipient, exactly once, under every reading of the API.

The real gateway on 127.0.0.1 sends through the real emulator, which then reports by its own
`message_id` or by the client's `messageId`, with or without `timestamp` and `details`
(`tests.readings`); records are polled through the legacy API from a real SQLite file.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs

from tests.conftest import WEBHOOK_SECRET, Connexus, GatewayClient, GatewayFactory, creds
from tests.readings import reading_connexus  # noqa: F401 - every test under every reading

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
RECIPIENTS = ["6421000001", "6421000002", "6421000003"]


async def poll_status(client: GatewayClient) -> dict[str, str] | None:
    """One legacy status poll: the record, or None on 204."""
    async with client.get("/api/1/sms/status", params=creds()) as resp:
        if resp.status == 204:
            return None
        assert resp.status == 200, await resp.text()
        parsed = parse_qs(await resp.text(), keep_blank_values=True)
        return {k: v[0] for k, v in parsed.items()}


async def drain(client: GatewayClient) -> list[dict[str, str]]:
    """Every status record waiting, polled one by one until 204."""
    out = []
    while (rec := await poll_status(client)) is not None:
        out.append(rec)
        assert len(out) < 50, "runaway"
    return out


async def test_bulk_reports_in_one_second_without_details(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """3 recipients reported in the same second without details: 3 records, one each, once."""
    connexus.emu.dlr_details = False
    client = await gateway(cfg)
    form = creds(to=",".join(RECIPIENTS), body="bulk", messageId="bulk-1")
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    sent = connexus.emu.sent[-3:]
    assert sorted(s.to for s in sent) == RECIPIENTS
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    second = int(time.time())
    for s in sent:
        payload = await connexus.emu.report(s, 1, timestamp=second)
        assert connexus.emu.webhook_deliveries[-1] == (payload, 200)
    records = await drain(client)
    assert sorted(r["from"] for r in records) == RECIPIENTS
    assert {r["statusCode"] for r in records} == {"RCV"}
    assert {r["inReplyToId"] for r in records} == {"bulk-1"}
    assert len({r["messageId"] for r in records}) == 3
    assert await poll_status(client) is None


async def test_single_send_reports_one_recipient(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A one-recipient send's reports, by whichever id, name that recipient and its messageId."""
    client = await gateway(cfg)
    async with client.post(
        "/api/1/sms/out", data=creds(to=RECIPIENTS[0], body="one", messageId="one-1")
    ) as resp:
        assert resp.status == 204
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    await connexus.emu.report(connexus.emu.sent[-1], 8)
    await connexus.emu.report(connexus.emu.sent[-1], 1)
    records = await drain(client)
    assert [(r["from"], r["statusCode"], r["inReplyToId"]) for r in records] == [
        (RECIPIENTS[0], "SNT", "one-1"),
        (RECIPIENTS[0], "RCV", "one-1"),
    ]


async def test_same_report_five_timestamps_is_one_record(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """The same report delivered 5 times with 5 different timestamps is 1 record."""
    client = await gateway(cfg)
    async with client.post(
        "/api/1/sms/out", data=creds(to=RECIPIENTS[1], body="x", messageId="five-1")
    ) as resp:
        assert resp.status == 204
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    connexus.emu.dlr_timestamp = True
    sent = connexus.emu.sent[-1]
    base = int(time.time())
    for i in range(5):
        payload = await connexus.emu.report(sent, 1, timestamp=base + i * 7)
        assert connexus.emu.webhook_deliveries[-1] == (payload, 200)
    records = await drain(client)
    assert len(records) == 1
    assert records[0]["from"] == RECIPIENTS[1]
    assert records[0]["inReplyToId"] == "five-1"
