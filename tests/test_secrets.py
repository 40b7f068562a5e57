"""Secrets never leave bc-proxy: a full run with distinctive credentials leaves none of them in
logs (in-process and `bc-proxy serve`'s stderr), /metrics or answers, and numbers are masked."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bc_proxy import log
from bc_proxy.config import parse
from bc_proxy.connexus.emulator import Emulator
from bc_proxy.errors import GatewayError
from bc_proxy.log import mask_number
from bc_proxy.recovery import sweep_tenant
from tests.conftest import CLIENT_ID, Connexus, GatewayFactory
from tests.test_shutdown import free_port, serve

ACME_USER = "acme-legacy"
ACME_PASSWORD = "LgAcmePW-51f0c9e2"
BETA_USER = "beta-legacy"
BETA_PASSWORD = "LgBetaPW-8c2e41d7"
CLIENT_SECRET = "cskSECRET-7d21b8e4a9"
CX_USER = "beta@example.org"
CX_PASSWORD = "cxPASSWORD-5e9c0a77f3"
HOOK_SECRET = "whSECRET-3b8f6d2a91c4"
CONFIGURED = (ACME_PASSWORD, BETA_PASSWORD, CLIENT_SECRET, CX_PASSWORD, HOOK_SECRET)
NUMBERS = ("64211230001", "64211230002", "64211230003", "64277700004", "64277700005")


def secret_config(tmp_path: Path, base_url: str, **server: Any) -> dict[str, Any]:
    """Two tenants: acme with token auth, beta with Connexus password auth; distinct secrets."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "upstream": {"base_url": base_url, "timeout_seconds": 3, "mo_query_interval_seconds": 0},
        "store": {"url": f"sqlite:///{tmp_path / 'secrets.db'}"},
        "webhook": {"secret": HOOK_SECRET},
        "tenants": [
            {
                "name": "acme",
                "legacy": {"user_id": ACME_USER, "password": ACME_PASSWORD},
                "connexus": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
                "senders": ["552"],
                "poll_wait_seconds": 0,
            },
            {
                "name": "beta",
                "legacy": {"user_id": BETA_USER, "password": BETA_PASSWORD},
                "connexus": {"user_id": CX_USER, "password": CX_PASSWORD},
                "senders": ["3300"],
                "poll_wait_seconds": 0,
            },
        ],
        "log": {"level": "debug", "format": "json"},
    }


def arm(emu: Emulator) -> None:
    """Teach the emulator our distinctive upstream credentials."""
    emu.clients[CLIENT_ID] = CLIENT_SECRET
    emu.users[CX_USER] = CX_PASSWORD


def issued_tokens(emu: Emulator) -> set[str]:
    """Every bearer token the emulator issued, as seen on the wire."""
    out = set()
    for r in emu.requests:
        scheme, _, token = r.headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer" and token:
            out.add(token)
    return out


BACKOFF_MAX_AFTER_TWO = 2.2  # tokens.BACKOFF_INITIAL doubled once, plus a margin


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def full_run(http: aiohttp.ClientSession, base: str, emu: Emulator) -> list[str]:
    """Sends, webhooks, polls, passthrough and every kind of failure; all answers as text."""
    seen: list[str] = []
    acme = {"userId": ACME_USER, "password": ACME_PASSWORD}
    beta = {"userId": BETA_USER, "password": BETA_PASSWORD}
    hook = f"/webhooks/connexus/{HOOK_SECRET}"

    async def call(method: str, path: str, expect: int, **kw: Any) -> str:
        async with http.request(method, base + path, **kw) as resp:
            text = await resp.text()
            seen.append(f"{resp.status} {dict(resp.headers)} {text}")
            assert resp.status == expect, f"{method} {path}: {resp.status} {text}"
            return text

    out = "/api/1/sms/out"
    await call("POST", out, 204, data={**acme, "to": NUMBERS[0], "body": "one"})
    await call("POST", out, 204, data={**acme, "to": f"{NUMBERS[1]},{NUMBERS[2]}", "body": "two"})
    await call("POST", out, 204, data={**beta, "to": NUMBERS[3], "body": "three"})
    emu.revoke_tokens()  # the next acme call meets a 401 and refreshes
    await call("GET", out, 204, params={**acme, "to": NUMBERS[0], "body": "four"})
    emu.webhook_url = base + hook
    await emu.fire_mo(f"+{NUMBERS[4]}", "552", "for acme")
    await emu.fire_mo(NUMBERS[4], "3300", "for beta")
    await emu.fire_dlr(emu.sent[0].message_id, 2)
    assert all(status == 200 for _, status in emu.webhook_deliveries)
    await call("GET", "/api/1/sms/in", 200, headers=basic(ACME_USER, ACME_PASSWORD))
    await call("POST", "/api/1/sms/status", 200, data=acme)
    await call("GET", "/api/1/sms/in", 200, params=beta)
    await call("GET", "/api/1/sms/queue", 200, params=acme)
    # failures: legacy credentials, upstream errors, token refusal, bad webhooks
    await call("POST", out, 401, data={**acme, "password": ACME_PASSWORD + "x", "to": "1"})
    await call("GET", "/api/1/sms/in", 401, headers=basic(ACME_USER, BETA_PASSWORD))
    emu.fail_next = [500]
    await call("POST", out, 500, data={**acme, "to": NUMBERS[0], "body": "upstream down"})
    emu.fail_next = [500]
    await call("POST", out, 500, data={**beta, "to": NUMBERS[3], "body": "upstream down"})
    emu.users[CX_USER] = "rotated"
    await call("POST", out, 500, data={**beta, "to": NUMBERS[3], "body": "refused"})
    emu.users[CX_USER] = CX_PASSWORD
    emu.revoke_tokens()
    emu.clients[CLIENT_ID] = "rotated-secret"
    await call("POST", out, 500, data={**acme, "to": NUMBERS[0], "body": "token refused"})
    await call("GET", "/readyz?verbose", 200)  # the token error text is on the verbose page
    emu.clients[CLIENT_ID] = CLIENT_SECRET
    emu.fail_token_next = [500] * 3
    await call("POST", out, 500, data={**acme, "to": NUMBERS[0], "body": "token down"})
    emu.fail_token_next = []
    await call("GET", "/readyz", 200)
    # /readyz fetches no token any more: wait out the failure backoff before the token calls.
    await asyncio.sleep(BACKOFF_MAX_AFTER_TWO)
    await call("POST", "/webhooks/connexus/wrong-secret-value", 401, json={"type": "mo"})
    await call("POST", hook, 400, data=b"{broken", headers={"Content-Type": "application/json"})
    await call("POST", hook, 400, json={"type": "dlr", "messageId": CX_PASSWORD})
    # the modern passthrough, with both auth modes and an upstream failure
    await call("GET", "/api/connexus/sms/balance", 200, headers=basic(ACME_USER, ACME_PASSWORD))
    await call("GET", "/api/connexus/sms/balance", 200, params=beta)
    emu.fail_next = [502]
    await call("GET", "/api/connexus/sms/balance", 502, params=beta)
    await call("GET", "/healthz", 200)
    return seen


def assert_clean(where: str, text: str, secrets: set[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{where} contains {secret!r}"


async def test_in_process_run_leaks_no_secret(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory, log_stream: io.StringIO
) -> None:
    """Logs, /metrics and every answer of a full run hold no configured secret and no token."""
    arm(connexus.emu)
    client = await gateway(secret_config(tmp_path, connexus.base_url))
    async with aiohttp.ClientSession() as http:
        answers = await full_run(http, str(client.make_url("")).rstrip("/"), connexus.emu)
        async with http.get(str(client.make_url("/metrics"))) as resp:
            metrics = await resp.text()
    tokens = issued_tokens(connexus.emu)
    assert len(tokens) >= 2  # the first token and the one fetched after revocation
    secrets = {*CONFIGURED, *tokens}
    logs = log_stream.getvalue()
    lines = [json.loads(line) for line in logs.splitlines()]
    assert any(e["event"] == "request" for e in lines)
    assert_clean("the logs", logs, secrets)
    assert_clean("/metrics", metrics, secrets)
    for answer in answers:
        assert_clean("an answer", answer, secrets)
    for number in NUMBERS:
        assert number not in logs, f"unmasked number {number} in the logs"


def test_scrubber_masks_numbers_and_secrets(log_stream: io.StringIO) -> None:
    """With secrets configured, a phone number under a number key is masked and secrets vanish."""
    stream = io.StringIO()
    log.setup("info", "json", CONFIGURED, stream=stream)
    logger = log.get_logger("bc_proxy.test")
    logger.info("probe", to=NUMBERS[0], msisdn=f"+{NUMBERS[1]}", error=f"refused {CLIENT_SECRET}")
    logging.getLogger("aiohttp.server").warning("peer sent %s", HOOK_SECRET)
    text = stream.getvalue()
    event = json.loads(text.splitlines()[0])
    assert event["to"] == mask_number(NUMBERS[0]) == "********001"
    assert event["msisdn"] == mask_number(f"+{NUMBERS[1]}")
    assert event["msisdn"].endswith("002")
    assert event["error"] == "refused ***"
    assert_clean("scrubbed logs", text, {*CONFIGURED, *NUMBERS})


async def test_served_process_leaks_no_secret(tmp_path: Path, connexus: Connexus) -> None:
    """`bc-proxy serve`'s stderr over a full run and a SIGTERM holds no secret and no raw number."""
    arm(connexus.emu)
    port = free_port()
    cfg = secret_config(tmp_path, connexus.base_url, port=port, shutdown_timeout_seconds=3)
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    parse(cfg)  # the file is a valid configuration
    async with serve(path, port) as gw, aiohttp.ClientSession() as http:
        answers = await full_run(http, gw.base, connexus.emu)
        async with http.get(gw.base + "/metrics") as resp:
            metrics = await resp.text()
        gw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
    tokens = issued_tokens(connexus.emu)
    assert len(tokens) >= 2
    secrets = {*CONFIGURED, *tokens}
    logs = gw.log
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert sum(e["event"] == "request" for e in events) >= 20
    assert "***" not in logs  # nothing even reached the scrubber
    assert_clean("bc-proxy serve stderr", logs, secrets)
    assert_clean("/metrics", metrics, secrets)
    for answer in answers:
        assert_clean("an answer", answer, secrets)
    for number in NUMBERS:
        assert number not in logs


async def test_unparseable_request_does_not_echo_the_password(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A request line aiohttp cannot parse gets a 400 whose body does not quote the password."""
    client = await gateway(cfg)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET /api/1/sms/in?userId=acme-legacy&password=S3cr\xffet-pw HTTP/1.1\r\n"
        b"Host: x\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer[:300]
    assert b"S3cr" not in answer
    assert b"password" not in answer


def test_parse_error_log_does_not_quote_the_request_line(log_stream: io.StringIO) -> None:
    """aiohttp's log line for an unparseable request keeps the error class, not its text."""
    from aiohttp.http_exceptions import BadStatusLine

    try:
        raise BadStatusLine("GET /api/1/sms/out?userId=u&password=p%26ss%3Dw%C3%B6rd&body=x y")
    except BadStatusLine:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "1.2.3.4")
    out = log_stream.getvalue()
    assert "BadStatusLine" in out
    assert "p%26ss" not in out
    assert "password" not in out


def test_parse_error_patch_is_in_place_and_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """plain_parse_errors wraps aiohttp's handle_error once, and patches nothing when the
    method's signature is not the one it was written for."""
    from aiohttp.web_protocol import RequestHandler

    from bc_proxy.edge import plain_parse_errors

    assert plain_parse_errors()
    assert getattr(RequestHandler.handle_error, "_bc_proxy", False)

    def changed(self: Any, request: Any, status: int = 500, *, reason: str = "") -> Any:
        raise AssertionError("never called here")

    monkeypatch.setattr(RequestHandler, "handle_error", changed)
    assert not plain_parse_errors()
    assert RequestHandler.handle_error is changed


FETCHED_TOKEN = "wst_Qx9fLk2PzA8bT3mYv7Rw"  # no configured secret: only its shape gives it away


async def test_a_malformed_upstream_answer_logs_no_bearer_token(
    tmp_path: Path, gateway: GatewayFactory, log_stream: io.StringIO
) -> None:
    """Connexus (or something in front of it) answers mo/query with a header aiohttp cannot
    parse: aiohttp's ClientResponseError carries the request's headers, the bearer token
    bc-proxy fetched among them, and its repr went into the `upstream_failed` line."""
    token_answer = json.dumps({"access_token": FETCHED_TOKEN, "expires_in": 86400}).encode()

    async def connexus(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(h.split(b":")[1]) for h in head.lower().split(b"\r\n")
                     if h.startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                await reader.readexactly(length)
                if b"/auth/token" in head.split(b"\r\n")[0]:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(token_answer), token_answer)
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connexus, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        cfg = secret_config(tmp_path, f"http://127.0.0.1:{port}/api/connexus")
        client = await gateway(cfg)
        with pytest.raises(GatewayError):
            await sweep_tenant(client.app, "acme")
    finally:
        server.close()
        await server.wait_closed()
    logs = log_stream.getvalue()
    failed = [e for e in map(json.loads, logs.splitlines()) if e["event"] == "upstream_failed"]
    assert failed, logs  # the failure is logged, with its cause
    assert "ClientResponseError" in failed[0]["cause"]
    assert FETCHED_TOKEN not in logs


def test_bearer_tokens_are_masked_wherever_they_appear(log_stream: io.StringIO) -> None:
    """A token nobody configured is masked by its shape: in a string, in a nested value, in an
    exception logged as a value (its class and message, never its repr) and in a traceback."""
    logger = log.get_logger("bc_proxy.test")
    header = f"Bearer {FETCHED_TOKEN}"
    logger.warning("probe", error=f"refused: {{'Authorization': '{header}'}}")
    logger.warning("probe", headers={"Authorization": header.upper()})
    logger.warning("probe", answer=f'{{"access_token": "{FETCHED_TOKEN}", "expires_in": 60}}')
    logger.warning("probe", error=RuntimeError(f"with {header}"))
    try:
        raise RuntimeError(f"authorization: bearer {FETCHED_TOKEN}")
    except RuntimeError:
        logger.exception("probe")
    logs = log_stream.getvalue()
    events = [json.loads(line) for line in logs.splitlines()]
    assert len(events) == 5
    assert FETCHED_TOKEN not in logs
    assert FETCHED_TOKEN.upper() not in logs
    assert events[0]["error"] == "refused: {'Authorization': 'Bearer ***'}"
    assert events[3]["error"] == "RuntimeError: with Bearer ***"
