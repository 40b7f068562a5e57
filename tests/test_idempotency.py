"""A send is never forwarded twice: write-ahead rows, legacy retries answered from the store.

Real gateway and Connexus emulator on 127.0.0.1, real SQLite files: a timeout after Connexus
took the message, repeats per recipient and within the window, 1,000 concurrent sends with
retries, and the table of upstream answers (failures: test_send_failures.py).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import aiohttp
import pytest

from bc_proxy.connexus.outcomes import send_failure_state
from bc_proxy.metrics import Metrics
from tests.conftest import Connexus, GatewayFactory, creds, with_tenant
from tests.sendcalls import FORM, OUT, post, quiet, sample, send_rows, status_records

TIMEOUT = 0.5


# -- Connexus answering after the timeout -----------------------------------------------------


@pytest.mark.parametrize("retry_status", [204, 500])
async def test_timeout_after_connexus_took_it_is_never_sent_again(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], retry_status: int
) -> None:
    """Connexus answering after the timeout: 500, unknown metric and ERR record; the retry of
    the same messageId gets the configured answer and no second upstream send."""
    metrics = Metrics(process=False)
    client = await gateway(
        quiet(cfg, timeout_seconds=TIMEOUT, unknown_retry_status=retry_status), metrics
    )
    connexus.emu.send_response_delay = TIMEOUT * 3  # recorded as sent, answered too late
    params = creds(to="6421000077", body="slow", messageId="slow-1")
    status, text = await post(client, params)
    assert status == 500
    assert "unknown" in text
    assert [s.to for s in connexus.emu.sent] == ["6421000077"]

    connexus.emu.send_response_delay = 0
    status, _ = await post(client, params)
    assert status == retry_status
    status, _ = await post(client, params)  # and again: still nothing goes out
    assert status == retry_status
    assert len(connexus.emu.sms_out_requests()) == 1
    assert len(connexus.emu.sent) == 1

    assert sample(metrics, "bc_proxy_recipients_unknown_total", tenant="acme") == 1
    repeats = sample(metrics, "bc_proxy_send_repeats_total", tenant="acme", state="unknown")
    assert repeats == 2
    (record,) = await status_records(client)
    assert record["statusCode"] == "ERR"
    assert "unknown" in record["error"].lower()
    assert (record["from"], record["to"], record["inReplyToId"]) == ("6421000077", "552", "slow-1")


async def test_bulk_timeout_marks_every_recipient_unknown(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], tmp_path: Path
) -> None:
    """A bulk send answered too late: every recipient unknown, one ERR record each, no re-send."""
    metrics = Metrics(process=False)
    client = await gateway(quiet(cfg, timeout_seconds=TIMEOUT), metrics)
    connexus.emu.send_response_delay = TIMEOUT * 3
    to = ["6421000001", "6421000002", "6421000003"]
    params = creds(to=",".join(to), body="slow bulk", messageId="bulk-slow")
    assert (await post(client, params))[0] == 500
    connexus.emu.send_response_delay = 0
    assert (await post(client, params))[0] == 204
    assert len(connexus.emu.sms_out_requests()) == 1
    assert [s for _, _, s in send_rows(tmp_path / "bc-proxy.db")] == ["unknown"] * 3
    assert sample(metrics, "bc_proxy_recipients_unknown_total", tenant="acme") == 3
    records = await status_records(client)
    assert sorted(r["from"] for r in records) == to
    assert {r["statusCode"] for r in records} == {"ERR"}


# -- repeats ----------------------------------------------------------------------------------


async def test_retry_of_accepted_send_is_204_without_upstream_call(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A retry of a send Connexus accepted answers 204 and calls nobody; a new messageId sends."""
    metrics = Metrics(process=False)
    client = await gateway(quiet(cfg), metrics)
    params = creds(to="6421000001", body="once", messageId="once-1")
    for _ in range(3):
        assert await post(client, params) == (204, "")
    assert len(connexus.emu.sms_out_requests()) == 1
    assert sample(metrics, "bc_proxy_send_repeats_total", tenant="acme", state="accepted") == 2
    assert await post(client, {**params, "messageId": "once-2"}) == (204, "")
    assert len(connexus.emu.sms_out_requests()) == 2
    assert await status_records(client) == []


async def test_retry_after_the_idempotency_window_is_a_new_send(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Past the tenant's idempotency_window_seconds the same messageId is a new send."""
    client = await gateway(with_tenant(quiet(cfg), idempotency_window_seconds=1))
    params = creds(to="6421000001", body="later", messageId="win-1")
    assert await post(client, params) == (204, "")
    assert await post(client, params) == (204, "")
    assert len(connexus.emu.sent) == 1
    await asyncio.sleep(1.2)
    assert await post(client, params) == (204, "")
    assert len(connexus.emu.sent) == 2


async def test_retry_with_an_added_recipient_sends_only_the_new_one(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Idempotency is per recipient: a retry naming one more number sends to that number only."""
    client = await gateway(quiet(cfg))
    base = creds(body="grow", messageId="grow-1")
    assert await post(client, {**base, "to": "6421000001 6421000002"}) == (204, "")
    assert await post(client, {**base, "to": "6421000001 6421000002 6421000003"}) == (204, "")
    assert sorted(s.to for s in connexus.emu.sent) == ["6421000001", "6421000002", "6421000003"]
    last = connexus.emu.sms_out_requests()[-1]
    assert parse_qs(last.body.decode())["to"] == ["6421000003"]  # a single send: form, own ref


async def test_without_message_id_nothing_is_a_repeat(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Two identical sends without messageId both go out: there is nothing to recognise."""
    client = await gateway(quiet(cfg))
    params = creds(to="6421000001", body="same")
    assert await post(client, params) == (204, "")
    assert await post(client, params) == (204, "")
    assert len(connexus.emu.sent) == 2


async def test_thousand_concurrent_sends_with_ten_percent_retries(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """1,000 concurrent legacy sends, 100 of them retries of earlier messageIds: exactly the 900
    unique ones reach Connexus, each once, and every call answers 204."""
    client = await gateway(quiet(cfg))
    url = str(client.make_url(OUT))
    rng = random.Random(1000)
    originals = [(f"m-{i}", f"64220{i:06d}") for i in range(900)]
    calls = list(originals)
    for _ in range(100):  # a retry goes somewhere after the call it repeats
        pick = originals[rng.randrange(900)]
        calls.insert(rng.randrange(calls.index(pick) + 1, len(calls) + 1), pick)
    assert len(calls) == 1000

    async def one(session: aiohttp.ClientSession, message_id: str, to: str) -> int:
        data = urlencode(creds(to=to, body=f"body {message_id}", messageId=message_id))
        async with session.post(url, data=data, headers=FORM) as resp:
            await resp.read()
            return resp.status

    connector = aiohttp.TCPConnector(limit=100)  # bounded concurrency on loopback
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = await asyncio.gather(*(one(session, m, to) for m, to in calls))
    assert statuses == [204] * 1000
    bodies = [s.body for s in connexus.emu.sent]
    assert len(bodies) == 900
    assert sorted(bodies) == sorted(f"body m-{i}" for i in range(900))


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (200, None),
        (204, None),
        (301, "rejected"),
        (307, "rejected"),
        (400, "rejected"),
        (401, "rejected"),
        (403, "rejected"),
        (429, "rejected"),
        (501, "rejected"),
        (503, "rejected"),
        (500, "unknown"),
        (502, "unknown"),
        (504, "unknown"),
        (599, "unknown"),
    ],
)
def test_send_failure_state_table(status: int, state: str | None) -> None:
    """A non-2xx sms/out answer leaves its recipients rejected (definitive) or unknown."""
    assert send_failure_state(status) == state
