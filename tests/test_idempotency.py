"""A send is never forwarded twice: write-ahead rows, legacy retries answered from the store.

Real gateway and Connexus emulator on 127.0.0.1, real SQLite files: a timeout after Connexus
took the message, 1,000 concurrent sends with retries, a SIGKILL mid-call, and the failure
classes a retry may send again (never written, definitively refused).
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import aiohttp
import pytest
from aiohttp import web

from bc_proxy import keys
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.connexus.outcomes import send_failure_state
from bc_proxy.connexus.tokens import BACKOFF_INITIAL
from bc_proxy.metrics import Metrics
from bc_proxy.store import MoEvent
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
    with_tenant,
)
from tests.served import Served, free_port, write_config

OUT = "/api/1/sms/out"
STATUS = "/api/1/sms/status"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TIMEOUT = 0.5


def _quiet(cfg: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    cfg["upstream"].update({"mo_query_interval_seconds": 0, **upstream})
    return cfg


async def _post(client: GatewayClient, params: dict[str, str]) -> tuple[int, str]:
    async with client.post(OUT, data=urlencode(params), headers=FORM) as resp:
        return resp.status, await resp.text()


async def _status_records(client: GatewayClient) -> list[dict[str, str]]:
    """Every status record waiting (poll_wait_seconds is 0 in these tests)."""
    out: list[dict[str, str]] = []
    while True:
        async with client.get(STATUS, params=creds()) as resp:
            if resp.status == 204:
                return out
            parsed = parse_qs(await resp.text(), keep_blank_values=True)
        out.append({k: v[0] for k, v in parsed.items()})


def _states(db: Path) -> list[tuple[str, str | None, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT recipient, legacy_id, state FROM sends ORDER BY id").fetchall()
    return [(str(r[0]), r[1], str(r[2])) for r in rows]


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- Connexus answering after the timeout -----------------------------------------------------


@pytest.mark.parametrize("retry_status", [204, 500])
async def test_timeout_after_connexus_took_it_is_never_sent_again(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], retry_status: int
) -> None:
    """Connexus answering after the timeout: 500, unknown metric and ERR record; the retry of
    the same messageId gets the configured answer and no second upstream send."""
    metrics = Metrics(process=False)
    client = await gateway(
        _quiet(cfg, timeout_seconds=TIMEOUT, unknown_retry_status=retry_status), metrics
    )
    connexus.emu.send_response_delay = TIMEOUT * 3  # recorded as sent, answered too late
    params = creds(to="6421000077", body="slow", messageId="slow-1")
    status, text = await _post(client, params)
    assert status == 500
    assert "unknown" in text
    assert [s.to for s in connexus.emu.sent] == ["6421000077"]

    connexus.emu.send_response_delay = 0
    status, _ = await _post(client, params)
    assert status == retry_status
    status, _ = await _post(client, params)  # and again: still nothing goes out
    assert status == retry_status
    assert len(connexus.emu.sms_out_requests()) == 1
    assert len(connexus.emu.sent) == 1

    assert _sample(metrics, "bc_proxy_recipients_unknown_total", tenant="acme") == 1
    repeats = _sample(metrics, "bc_proxy_send_repeats_total", tenant="acme", state="unknown")
    assert repeats == 2
    (record,) = await _status_records(client)
    assert record["statusCode"] == "ERR"
    assert "unknown" in record["error"].lower()
    assert (record["from"], record["to"], record["inReplyToId"]) == ("6421000077", "552", "slow-1")


async def test_bulk_timeout_marks_every_recipient_unknown(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], tmp_path: Path
) -> None:
    """A bulk send answered too late: every recipient unknown, one ERR record each, no re-send."""
    metrics = Metrics(process=False)
    client = await gateway(_quiet(cfg, timeout_seconds=TIMEOUT), metrics)
    connexus.emu.send_response_delay = TIMEOUT * 3
    to = ["6421000001", "6421000002", "6421000003"]
    params = creds(to=",".join(to), body="slow bulk", messageId="bulk-slow")
    assert (await _post(client, params))[0] == 500
    connexus.emu.send_response_delay = 0
    assert (await _post(client, params))[0] == 204
    assert len(connexus.emu.sms_out_requests()) == 1
    assert [s for _, _, s in _states(tmp_path / "bc-proxy.db")] == ["unknown"] * 3
    assert _sample(metrics, "bc_proxy_recipients_unknown_total", tenant="acme") == 3
    records = await _status_records(client)
    assert sorted(r["from"] for r in records) == to
    assert {r["statusCode"] for r in records} == {"ERR"}


# -- repeats ----------------------------------------------------------------------------------


async def test_retry_of_accepted_send_is_204_without_upstream_call(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A retry of a send Connexus accepted answers 204 and calls nobody; a new messageId sends."""
    metrics = Metrics(process=False)
    client = await gateway(_quiet(cfg), metrics)
    params = creds(to="6421000001", body="once", messageId="once-1")
    for _ in range(3):
        assert await _post(client, params) == (204, "")
    assert len(connexus.emu.sms_out_requests()) == 1
    assert _sample(metrics, "bc_proxy_send_repeats_total", tenant="acme", state="accepted") == 2
    assert await _post(client, {**params, "messageId": "once-2"}) == (204, "")
    assert len(connexus.emu.sms_out_requests()) == 2
    assert await _status_records(client) == []


async def test_retry_after_the_idempotency_window_is_a_new_send(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Past the tenant's idempotency_window_seconds the same messageId is a new send."""
    client = await gateway(with_tenant(_quiet(cfg), idempotency_window_seconds=1))
    params = creds(to="6421000001", body="later", messageId="win-1")
    assert await _post(client, params) == (204, "")
    assert await _post(client, params) == (204, "")
    assert len(connexus.emu.sent) == 1
    await asyncio.sleep(1.2)
    assert await _post(client, params) == (204, "")
    assert len(connexus.emu.sent) == 2


async def test_retry_with_an_added_recipient_sends_only_the_new_one(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Idempotency is per recipient: a retry naming one more number sends to that number only."""
    client = await gateway(_quiet(cfg))
    base = creds(body="grow", messageId="grow-1")
    assert await _post(client, {**base, "to": "6421000001 6421000002"}) == (204, "")
    assert await _post(client, {**base, "to": "6421000001 6421000002 6421000003"}) == (204, "")
    assert sorted(s.to for s in connexus.emu.sent) == ["6421000001", "6421000002", "6421000003"]
    last = connexus.emu.sms_out_requests()[-1]
    assert parse_qs(last.body.decode())["to"] == ["6421000003"]  # a single send: form, own ref


async def test_without_message_id_nothing_is_a_repeat(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Two identical sends without messageId both go out: there is nothing to recognise."""
    client = await gateway(_quiet(cfg))
    params = creds(to="6421000001", body="same")
    assert await _post(client, params) == (204, "")
    assert await _post(client, params) == (204, "")
    assert len(connexus.emu.sent) == 2


async def test_thousand_concurrent_sends_with_ten_percent_retries(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """1,000 concurrent legacy sends, 100 of them retries of earlier messageIds: exactly the 900
    unique ones reach Connexus, each once, and every call answers 204."""
    client = await gateway(_quiet(cfg))
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


# -- failures a retry may send again ----------------------------------------------------------


PASSWORD_TENANT = {"user_id": "demo@example.org", "password": "demo-password"}


@pytest.mark.parametrize("auth", ["token", "password"])
async def test_connection_refused_is_rejected_and_the_retry_sends(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, tmp_path: Path, auth: str
) -> None:
    """Connexus refusing connections: 500 and state rejected (never written); once it is up,
    the legacy retry of the same messageId is sent."""
    port = free_port()  # nothing listens there yet
    cfg = _quiet(config_dict(tmp_path, f"http://127.0.0.1:{port}/api/connexus"))
    if auth == "password":
        cfg = with_tenant(cfg, connexus=PASSWORD_TENANT)
    client = await gateway(cfg)
    params = creds(to="6421000009", body="refused", messageId="ref-1")
    status, text = await _post(client, params)
    assert status == 500
    assert "unknown" not in text
    assert _states(tmp_path / "bc-proxy.db") == [("6421000009", "ref-1", "rejected")]

    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET})
    await aiohttp_server(create_emulator_app(emu), host="127.0.0.1", port=port)
    if auth == "token":
        await asyncio.sleep(BACKOFF_INITIAL)  # the failed token fetch's shared backoff
    assert await _post(client, params) == (204, "")
    assert [s.to for s in emu.sent] == ["6421000009"]
    assert [s for _, _, s in _states(tmp_path / "bc-proxy.db")] == ["rejected", "accepted"]
    assert await _post(client, params) == (204, "")  # now accepted: not sent a third time
    assert len(emu.sent) == 1


@pytest.mark.parametrize(("upstream", "legacy"), [(400, 400), (403, 403), (503, 500)])
async def test_definitive_refusal_is_rejected_and_the_retry_sends(
    connexus: Connexus,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    tmp_path: Path,
    upstream: int,
    legacy: int,
) -> None:
    """A definitive 4xx (or 503) answers per design.md section 4; the retry sends again."""
    client = await gateway(_quiet(cfg))
    connexus.emu.fail_next = [upstream]
    params = creds(to="6421000010", body="refused", messageId="no-1")
    assert (await _post(client, params))[0] == legacy
    assert await _post(client, params) == (204, "")
    assert [s.to for s in connexus.emu.sent] == ["6421000010"]
    assert [s for _, _, s in _states(tmp_path / "bc-proxy.db")] == ["rejected", "accepted"]


# -- a SIGKILL between Connexus accepting and the 204 -----------------------------------------


STALE_AFTER = 2 * 1 + 5  # app.py: pending rows older than twice the timeout plus 5 s, at start


async def test_sigkill_mid_call_then_retry_is_not_sent_again(
    tmp_path: Path, connexus: Connexus
) -> None:
    """The gateway killed after Connexus took the send, before its 204: after a restart the
    retry is answered 204 from the pending row, and after a later restart (row now unknown) with
    the configured 500, never with an upstream call."""
    port = free_port()
    cfg = _quiet(config_dict(tmp_path, connexus.base_url), timeout_seconds=1)
    cfg["server"]["port"] = port
    config = write_config(tmp_path / "bc-proxy.yaml", cfg)
    emu = connexus.emu
    params = creds(to="6421000123", body="killed", messageId="kill-1")
    db = tmp_path / "bc-proxy.db"

    async def retry(http: aiohttp.ClientSession, expected: int) -> None:
        served = Served(config, port, log)
        await served.start(http)
        try:
            for _ in range(2):
                async with http.post(served.base + OUT, data=params) as resp:
                    assert resp.status == expected
        finally:
            await served.stop()

    with (tmp_path / "gateway.log").open("w") as log:
        async with aiohttp.ClientSession() as http:
            first = Served(config, port, log)
            await first.start(http)
            emu.send_response_delay = 3  # Connexus takes it, then holds its answer

            async def send_once() -> int:
                async with http.post(first.base + OUT, data=params) as resp:
                    return resp.status

            sending = asyncio.create_task(send_once())
            deadline = time.monotonic() + 10
            while not emu.sent:
                assert time.monotonic() < deadline, "the send never reached Connexus"
                await asyncio.sleep(0.005)
            first.signal(signal.SIGKILL)
            killed = time.monotonic()
            assert first.proc is not None
            await first.proc.wait()
            with pytest.raises(aiohttp.ClientError):
                await sending
            assert _states(db) == [("6421000123", "kill-1", "pending")]

            emu.send_response_delay = 0
            await retry(http, 204)  # pending: upstream.unknown_retry_status, default 204
            assert _states(db) == [("6421000123", "kill-1", "pending")]

            await asyncio.sleep(max(0.0, killed + STALE_AFTER + 0.5 - time.monotonic()))
            cfg["upstream"]["unknown_retry_status"] = 500
            write_config(config, cfg)
            await retry(http, 500)  # became unknown at start; the configured answer
            assert _states(db) == [("6421000123", "kill-1", "unknown")]
    assert [s.to for s in emu.sent] == ["6421000123"]
    assert len(emu.sms_out_requests()) == 1


# -- the upstream client never repeats a written send ------------------------------------------


@dataclass
class DroppingConnexus:
    """A Connexus stub that accepts sends, or reads one and drops the connection unanswered."""

    sends: int = 0
    drop: bool = False


def _dropping_app(stub: DroppingConnexus) -> web.Application:
    async def token(_: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok", "expires_in": 3600})

    async def sms_out(request: web.Request) -> web.StreamResponse:
        await request.read()
        stub.sends += 1
        if stub.drop:
            assert request.transport is not None
            request.transport.abort()  # reset after the request was read: outcome unknown
            raise web.HTTPInternalServerError
        return web.json_response({"success": True, "message_id": f"c{stub.sends}"})

    app = web.Application()
    app.router.add_post("/api/connexus/auth/token", token)
    app.router.add_post("/api/connexus/sms/out", sms_out)
    return app


async def test_reset_after_the_request_was_read_is_unknown_and_never_repeated(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Connexus dropping a keep-alive connection after reading a send: one request only (no
    automatic retry), 500, state unknown; the legacy retry is not sent either."""
    stub = DroppingConnexus()
    server = await aiohttp_server(_dropping_app(stub), host="127.0.0.1")
    cfg = _quiet(config_dict(tmp_path, str(server.make_url("/api/connexus"))))
    client = await gateway(cfg)
    assert await _post(client, creds(to="6421000001", body="warm")) == (204, "")  # keep-alive
    stub.drop = True
    params = creds(to="6421000002", body="dropped", messageId="drop-1")
    status, text = await _post(client, params)
    assert status == 500
    assert "unknown" in text
    assert stub.sends == 2
    assert _states(tmp_path / "bc-proxy.db")[-1] == ("6421000002", "drop-1", "unknown")
    stub.drop = False
    assert await _post(client, params) == (204, "")
    assert stub.sends == 2


async def test_blocked_handset_is_not_sent_and_counted(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A handset that sent STOP is not forwarded to: 204, a NUR record, the blocked metric."""
    metrics = Metrics(process=False)
    client = await gateway(_quiet(cfg), metrics)
    stop = MoEvent(message_id="mo-stop", sender="6421000444", to="552", body="STOP")
    await client.app[keys.STORE].add_mo(stop, account="acme")
    params = creds(to="6421000444 6421000445", body="offer", messageId="offer-1")
    assert await _post(client, params) == (204, "")
    assert [s.to for s in connexus.emu.sent] == ["6421000445"]
    assert _sample(metrics, "bc_proxy_recipients_blocked_total", tenant="acme") == 1
    (record,) = await _status_records(client)
    assert (record["from"], record["statusCode"]) == ("6421000444", "NUR")
    assert "Blocked" in record["error"]


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
