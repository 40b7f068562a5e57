"""Send failures: which ones a legacy retry may send again, and which never.

Real gateway on 127.0.0.1 against the emulator or small stubs, real SQLite files: connection
refused and definitive refusals (sent again), a connection dropped after the request was read
and a SIGKILL mid-call (never sent again), and a handset that opted out (never sent).
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bc_proxy import keys
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.connexus.tokens import BACKOFF_INITIAL
from bc_proxy.metrics import Metrics
from bc_proxy.store import MoEvent
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    AiohttpServer,
    Connexus,
    GatewayFactory,
    config_dict,
    creds,
    with_tenant,
)
from tests.sendcalls import OUT, post, quiet, sample, send_rows, status_records
from tests.served import Served, free_port, write_config

# -- failures a retry may send again ----------------------------------------------------------


PASSWORD_TENANT = {"user_id": "demo@example.org", "password": "demo-password"}


@pytest.mark.parametrize("auth", ["token", "password"])
async def test_connection_refused_is_rejected_and_the_retry_sends(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, tmp_path: Path, auth: str
) -> None:
    """Connexus refusing connections: 500 and state rejected (never written); once it is up,
    the legacy retry of the same messageId is sent."""
    port = free_port()  # nothing listens there yet
    cfg = quiet(config_dict(tmp_path, f"http://127.0.0.1:{port}/api/connexus"))
    if auth == "password":
        cfg = with_tenant(cfg, connexus=PASSWORD_TENANT)
    client = await gateway(cfg)
    params = creds(to="6421000009", body="refused", messageId="ref-1")
    status, text = await post(client, params)
    assert status == 500
    assert "unknown" not in text
    assert send_rows(tmp_path / "bc-proxy.db") == [("6421000009", "ref-1", "rejected")]

    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET})
    await aiohttp_server(create_emulator_app(emu), host="127.0.0.1", port=port)
    if auth == "token":
        await asyncio.sleep(BACKOFF_INITIAL)  # the failed token fetch's shared backoff
    assert await post(client, params) == (204, "")
    assert [s.to for s in emu.sent] == ["6421000009"]
    assert [s for _, _, s in send_rows(tmp_path / "bc-proxy.db")] == ["rejected", "accepted"]
    assert await post(client, params) == (204, "")  # now accepted: not sent a third time
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
    client = await gateway(quiet(cfg))
    connexus.emu.fail_next = [upstream]
    params = creds(to="6421000010", body="refused", messageId="no-1")
    assert (await post(client, params))[0] == legacy
    assert await post(client, params) == (204, "")
    assert [s.to for s in connexus.emu.sent] == ["6421000010"]
    assert [s for _, _, s in send_rows(tmp_path / "bc-proxy.db")] == ["rejected", "accepted"]


# -- a SIGKILL between Connexus accepting and the 204 -----------------------------------------


STALE_AFTER = 2 * 1 + 5  # app.py: pending rows older than twice the timeout plus 5 s, at start


async def test_sigkill_mid_call_then_retry_is_not_sent_again(
    tmp_path: Path, connexus: Connexus
) -> None:
    """The gateway killed after Connexus took the send, before its 204: after a restart the
    retry is answered 204 from the pending row, and after a later restart (row now unknown) with
    the configured 500, never with an upstream call."""
    port = free_port()
    cfg = quiet(config_dict(tmp_path, connexus.base_url), timeout_seconds=1)
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
            assert send_rows(db) == [("6421000123", "kill-1", "pending")]

            emu.send_response_delay = 0
            await retry(http, 204)  # pending: upstream.unknown_retry_status, default 204
            assert send_rows(db) == [("6421000123", "kill-1", "pending")]

            await asyncio.sleep(max(0.0, killed + STALE_AFTER + 0.5 - time.monotonic()))
            cfg["upstream"]["unknown_retry_status"] = 500
            write_config(config, cfg)
            await retry(http, 500)  # became unknown at start; the configured answer
            assert send_rows(db) == [("6421000123", "kill-1", "unknown")]
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
    cfg = quiet(config_dict(tmp_path, str(server.make_url("/api/connexus"))))
    client = await gateway(cfg)
    assert await post(client, creds(to="6421000001", body="warm")) == (204, "")  # keep-alive
    stub.drop = True
    params = creds(to="6421000002", body="dropped", messageId="drop-1")
    status, text = await post(client, params)
    assert status == 500
    assert "unknown" in text
    assert stub.sends == 2
    assert send_rows(tmp_path / "bc-proxy.db")[-1] == ("6421000002", "drop-1", "unknown")
    stub.drop = False
    assert await post(client, params) == (204, "")
    assert stub.sends == 2


async def test_blocked_handset_is_not_sent_and_counted(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A handset that sent STOP is not forwarded to: 204, a NUR record, the blocked metric."""
    metrics = Metrics(process=False)
    client = await gateway(quiet(cfg), metrics)
    stop = MoEvent(message_id="mo-stop", sender="6421000444", to="552", body="STOP")
    await client.app[keys.STORE].add_mo(stop, account="acme")
    params = creds(to="6421000444 6421000445", body="offer", messageId="offer-1")
    assert await post(client, params) == (204, "")
    assert [s.to for s in connexus.emu.sent] == ["6421000445"]
    assert sample(metrics, "bc_proxy_recipients_blocked_total", tenant="acme") == 1
    (record,) = await status_records(client)
    assert (record["from"], record["statusCode"]) == ("6421000444", "NUR")
    assert "Blocked" in record["error"]
