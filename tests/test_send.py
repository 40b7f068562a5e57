"""The legacy send path end to end: the real gateway against the real Connexus emulator.

Covers recipient splitting and bulk chunking, token single-flight/expiry/401 recovery, the
400/401/413 answers of design.md section 3, upstream failures, /sms/test, partial rejection
status records, outcome mapping, what does and does not go upstream, and wire leniency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer
from yarl import URL

from bc_proxy.connexus.emulator import Emulator, RecordedRequest, create_emulator_app
from bc_proxy.connexus.tokens import BACKOFF_INITIAL
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEGACY_PASSWORD,
    LEGACY_USER,
    Connexus,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
    with_tenant,
)

OUT = "/api/1/sms/out"
TEST = "/api/1/sms/test"
STATUS = "/api/1/sms/status"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
STATUS_KEYS = {"messageId", "from", "to", "statusCode", "inReplyToId", "error"}


# -- helpers ---------------------------------------------------------------------------------


def _quiet(cfg: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    """`cfg` with the missed-webhook sweep off (no stray upstream calls) and upstream changes."""
    cfg["upstream"].update({"mo_query_interval_seconds": 0, **upstream})
    return cfg


@pytest.fixture
async def gw(gateway: GatewayFactory, cfg: dict[str, Any]) -> GatewayClient:
    """The gateway with the default test tenant and no background upstream traffic."""
    return await gateway(_quiet(cfg))


async def _post(
    client: GatewayClient, params: dict[str, str], path: str = OUT, **kw: Any
) -> tuple[int, str]:
    """POST params as a form body; (status, body text)."""
    async with client.post(path, data=urlencode(params), headers=FORM, **kw) as resp:
        return resp.status, await resp.text()


def _form(req: RecordedRequest) -> dict[str, list[str]]:
    return parse_qs(req.body.decode(), keep_blank_values=True)


def _json(req: RecordedRequest) -> dict[str, Any]:
    assert req.headers.get("Content-Type", "").startswith("application/json")
    data = json.loads(req.body)
    assert isinstance(data, dict)
    return data


def _header_names(req: RecordedRequest) -> set[str]:
    return {k.lower() for k in req.headers}


def _assert_one_line(text: str, *words: str) -> None:
    """An error answer: one short plain-text line that names what is wrong."""
    line = text.rstrip("\n")
    assert line, "empty error reason"
    assert "\n" not in line
    assert len(line) <= 200
    for word in words:
        assert word.lower() in line.lower(), (word, line)


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def _poll_status(client: GatewayClient) -> dict[str, str] | None:
    async with client.get(STATUS, params=creds()) as resp:
        if resp.status == 204:
            assert await resp.read() == b""
            return None
        assert resp.status == 200
        assert resp.content_type == "application/x-www-form-urlencoded"
        parsed = parse_qs(await resp.text(), keep_blank_values=True)
    assert set(parsed) == STATUS_KEYS
    assert all(len(v) == 1 for v in parsed.values())
    return {k: v[0] for k, v in parsed.items()}


def _raw(client: GatewayClient, path_and_query: str) -> URL:
    """An absolute URL to the gateway sent exactly as written (no re-quoting by yarl)."""
    return URL(f"http://127.0.0.1:{client.port}{path_and_query}", encoded=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- 1. recipients, bulk chunking, store ------------------------------------------------------


async def test_450_recipients_become_three_bulk_requests_and_450_stored_sends(
    connexus: Connexus, gw: GatewayClient, tmp_path: Path
) -> None:
    """450 mixed-separator recipients go out as JSON bulks of 200, 200 and 50, all stored."""
    rng = random.Random(450)
    numbers = [f"6421{i:07d}" for i in range(450)]
    parts = [("+" + n if i % 7 == 0 else n) for i, n in enumerate(numbers)]
    to = parts[0] + "".join(rng.choice([" ", ",", ", ", "  ", " ,"]) + p for p in parts[1:])
    assert all(sep in to for sep in "+, ")

    status, text = await _post(gw, creds(to=to, body="Bulk hello", messageId="bulk-1"))
    assert (status, text) == (204, "")

    reqs = connexus.emu.sms_out_requests()
    bodies = [_json(r) for r in reqs]
    assert sorted(len(b["to"]) for b in bodies) == [50, 200, 200]
    sent: list[str] = [n for b in bodies for n in b["to"]]
    assert sorted(sent) == numbers  # every number exactly once, '+' stripped
    assert all(b["body"] == "Bulk hello" for b in bodies)
    assert all("messageId" not in b for b in bodies)  # one id would name 200 recipients
    assert all(r.headers["Authorization"].startswith("Bearer ") for r in reqs)

    with sqlite3.connect(tmp_path / "bc-proxy.db") as db:
        rows = db.execute("SELECT recipient, legacy_id, connexus_id, state FROM sends").fetchall()
    assert len(rows) == 450
    assert sorted(r[0] for r in rows) == numbers
    assert {r[1] for r in rows} == {"bulk-1"}
    assert {r[3] for r in rows} == {"accepted"}
    ids = [r[2] for r in rows]
    assert all(ids)
    assert len(set(ids)) == 450


# -- 2. tokens --------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client limited to 100 connections, shared by concurrent senders."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as s:
        yield s


async def _send_url(session: aiohttp.ClientSession, url: str, to: str) -> int:
    data = urlencode(creds(to=to, body="storm"))
    async with session.post(url, data=data, headers=FORM) as resp:
        await resp.read()
        return resp.status


async def test_thousand_concurrent_sends_on_cold_token_fetch_one_token(
    connexus: Connexus, gw: GatewayClient, session: aiohttp.ClientSession
) -> None:
    """1,000 concurrent sends on a cold token all get 204 and cause exactly one token request."""
    url = str(gw.make_url(OUT))
    started = time.monotonic()
    statuses = await asyncio.gather(*(_send_url(session, url, f"6422{i:07d}") for i in range(1000)))
    assert time.monotonic() - started < 40
    assert statuses == [204] * 1000
    assert connexus.emu.token_requests == 1
    assert len(connexus.emu.sms_out_requests()) == 1000


async def test_token_expiring_mid_run_is_renewed_without_failed_sends(
    connexus: Connexus, gw: GatewayClient, session: aiohttp.ClientSession
) -> None:
    """With a 1 s token lifetime, sends spread over 3 s all succeed and the token is renewed."""
    connexus.emu.token_ttl = 1
    url = str(gw.make_url(OUT))
    tasks: list[asyncio.Task[int]] = []
    for i in range(30):
        tasks += [
            asyncio.create_task(_send_url(session, url, f"6423{i:03d}{j:04d}")) for j in range(4)
        ]
        await asyncio.sleep(0.1)
    statuses = await asyncio.gather(*tasks)
    assert statuses == [204] * len(tasks)
    assert connexus.emu.token_requests > 1
    accepted = [r for r in connexus.emu.sms_out_requests() if r.status == 200]
    assert len(accepted) == len(tasks)


async def test_upstream_401_refreshes_token_once_and_retries(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """A token Connexus stops accepting is replaced by one refresh and the send still gets 204."""
    assert await _post(gw, creds(to="6421000001", body="one")) == (204, "")
    assert connexus.emu.token_requests == 1
    connexus.emu.revoke_tokens()
    assert await _post(gw, creds(to="6421000002", body="two")) == (204, "")
    assert connexus.emu.token_requests == 2
    assert [r.status for r in connexus.emu.sms_out_requests()] == [200, 401, 200]
    retried = connexus.emu.sms_out_requests()[2]
    assert _form(retried)["to"] == ["6421000002"]
    assert (
        retried.headers["Authorization"]
        != connexus.emu.sms_out_requests()[1].headers["Authorization"]
    )


async def test_upstream_401_on_bulk_refreshes_once(connexus: Connexus, gw: GatewayClient) -> None:
    """Concurrent bulk chunks hitting a revoked token share one refresh; the send gets 204."""
    assert await _post(gw, creds(to="6421000001", body="warm")) == (204, "")
    connexus.emu.revoke_tokens()
    to = " ".join(f"6424{i:07d}" for i in range(450))
    assert await _post(gw, creds(to=to, body="bulk")) == (204, "")
    assert connexus.emu.token_requests == 2
    accepted = [r for r in connexus.emu.sms_out_requests() if r.status == 200]
    assert sorted(len(_json(r)["to"]) for r in accepted[1:]) == [50, 200, 200]


async def test_connexus_refusing_fresh_token_too_gives_500(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """A 401 that persists after the one refresh means our credentials are wrong: 500, not 401."""
    assert await _post(gw, creds(to="6421000001", body="warm")) == (204, "")
    connexus.emu.revoke_tokens()
    connexus.emu.fail_next = [401, 401]
    status, text = await _post(gw, creds(to="6421000002", body="x"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert connexus.emu.token_requests == 2  # refreshed once, not in a loop


# -- 3. rejected before upstream --------------------------------------------------------------

_FORTY = "x" * 37

REJECTED: list[tuple[str, dict[str, str], int, tuple[str, ...]]] = [
    ("missing to", creds(body="hi"), 400, ("to",)),
    ("blank to", creds(to="  ", body="hi"), 400, ("to",)),
    ("to without digits", creds(to=" + , ", body="hi"), 400, ("to",)),
    ("missing body", creds(to="6421000000"), 400, ("body",)),
    ("empty body", creds(to="6421000000", body=""), 400, ("body",)),
    ("messageId 37", creds(to="6421000000", body="hi", messageId=_FORTY), 400, ("messageId",)),
    (
        "from and rateCode",
        creds(to="6421000000", body="hi", **{"from": "552"}, rateCode="R1"),
        400,
        ("from", "rateCode"),
    ),
    (
        "fragmentationLimit 4",
        creds(to="6421000000", body="hi", fragmentationLimit="4"),
        400,
        ("fragmentationLimit",),
    ),
    (
        "fragmentationLimit -1",
        creds(to="6421000000", body="hi", fragmentationLimit="-1"),
        400,
        ("fragmentationLimit",),
    ),
    (
        "fragmentationLimit x",
        creds(to="6421000000", body="hi", fragmentationLimit="x"),
        400,
        ("fragmentationLimit",),
    ),
    (
        "fragmentationLimit superscript two",
        creds(to="6421000000", body="hi", fragmentationLimit="\u00b2"),
        400,
        ("fragmentationLimit",),
    ),
    (
        "schedule not a timestamp",
        creds(to="6421000000", body="hi", schedule="tomorrow"),
        400,
        ("schedule",),
    ),
    (
        "wrong password",
        {"userId": LEGACY_USER, "password": "nope", "to": "6421000000", "body": "hi"},
        401,
        ("credentials",),
    ),
    (
        "unknown user",
        {"userId": "nobody", "password": LEGACY_PASSWORD, "to": "6421000000", "body": "hi"},
        401,
        ("credentials",),
    ),
    ("no credentials", {"to": "6421000000", "body": "hi"}, 401, ("credentials",)),
    ("user without password", {"userId": LEGACY_USER, "to": "1", "body": "hi"}, 401, ()),
]


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [pytest.param(p, s, w, id=name) for name, p, s, w in REJECTED],
)
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_invalid_send_answers_one_line_and_stays_local(
    connexus: Connexus,
    gw: GatewayClient,
    params: dict[str, str],
    status: int,
    words: tuple[str, ...],
    method: str,
) -> None:
    """Each section 3 error gets its status and a one-line plain-text reason, no upstream call."""
    if method == "POST":
        resp = await gw.post(OUT, data=urlencode(params), headers=FORM)
    else:
        resp = await gw.get(f"{OUT}?{urlencode(params)}")
    async with resp:
        assert resp.status == status
        assert resp.content_type == "text/plain"
        _assert_one_line(await resp.text(), *words)
    assert connexus.emu.requests == []
    assert connexus.emu.token_requests == 0


async def test_message_id_of_36_chars_is_accepted(connexus: Connexus, gw: GatewayClient) -> None:
    """A messageId of exactly 36 characters (the limit) is accepted."""
    assert await _post(gw, creds(to="6421000000", body="hi", messageId="y" * 36)) == (204, "")


async def test_http_basic_credentials_work(connexus: Connexus, gw: GatewayClient) -> None:
    """Legacy credentials in an HTTP Basic header authenticate the send, and never go upstream."""
    data = urlencode({"to": "6421000000", "body": "basic"})
    headers = {**FORM, **_basic(LEGACY_USER, LEGACY_PASSWORD)}
    async with gw.post(OUT, data=data, headers=headers) as resp:
        assert resp.status == 204
    (req,) = connexus.emu.sms_out_requests()
    assert req.headers["Authorization"].startswith("Bearer ")
    assert LEGACY_PASSWORD not in req.body.decode()


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(_basic(LEGACY_USER, "wrong")["Authorization"], id="wrong-password"),
        pytest.param(_basic("nobody", LEGACY_PASSWORD)["Authorization"], id="unknown-user"),
        pytest.param("Basic !!!not-base64!!!", id="not-base64"),
        pytest.param("Basic " + base64.b64encode(b"no-colon").decode(), id="no-colon"),
        pytest.param("Bearer " + LEGACY_PASSWORD, id="bearer"),
    ],
)
async def test_wrong_http_basic_is_401(
    connexus: Connexus, gw: GatewayClient, authorization: str
) -> None:
    """Wrong or malformed HTTP Basic credentials get 401 and nothing goes upstream."""
    data = urlencode({"to": "6421000000", "body": "basic"})
    async with gw.post(OUT, data=data, headers={**FORM, "Authorization": authorization}) as resp:
        assert resp.status == 401
        _assert_one_line(await resp.text())
    assert connexus.emu.requests == []


async def test_oversized_body_is_413(connexus: Connexus, gw: GatewayClient) -> None:
    """A form body over server.max_body_bytes gets 413 and nothing goes upstream."""
    data = urlencode(creds(to="6421000000", body="x" * 70_000))
    async with gw.post(OUT, data=data, headers=FORM) as resp:
        assert resp.status == 413
        _assert_one_line(await resp.text())
    assert connexus.emu.requests == []


async def test_oversized_chunked_body_is_413(connexus: Connexus, gw: GatewayClient) -> None:
    """An oversized body sent chunked (no Content-Length) also gets 413."""

    async def chunks() -> AsyncIterator[bytes]:
        yield urlencode(creds(to="6421000000")).encode() + b"&body="
        for _ in range(20):
            yield b"y" * 4096

    async with gw.post(OUT, data=chunks(), headers=FORM) as resp:
        assert resp.status == 413
    assert connexus.emu.requests == []


_GARBAGE = b"\xff\xfe" + random.Random(7).randbytes(300) + b"\xc3"


@pytest.mark.parametrize(
    ("body", "query"),
    [
        pytest.param(b"to=6421000000&body=%zz", "", id="body-%zz"),
        pytest.param(b"to=6421000000&body=%E0%A4%A", "", id="body-truncated-utf8-escape"),
        pytest.param(b"to=6421000000&body=%E0%A4", "", id="body-incomplete-utf8"),
        pytest.param(b"to=6421000000&body=%", "", id="body-lone-percent"),
        pytest.param(b"", "to=6421000000&body=%zz", id="query-%zz"),
        pytest.param(b"", "to=6421000000&body=%E0%A4%A", id="query-truncated-utf8-escape"),
        pytest.param(b"", "to=6421000000&body=%FF", id="query-not-utf8"),
        pytest.param(_GARBAGE, "", id="binary-garbage"),
        pytest.param(b"to=6421000000&body=caf\xe9", "", id="latin1-body"),
        pytest.param(b"to=6421000000&body=a%00b", "", id="nul"),
    ],
)
@pytest.mark.parametrize("with_creds_in_query", [True, False])
async def test_malformed_encoding_is_400(
    connexus: Connexus, gw: GatewayClient, body: bytes, query: str, with_creds_in_query: bool
) -> None:
    """Bad percent-encoding, non-UTF-8 bytes and binary garbage get 400, never 500 or upstream."""
    auth = urlencode(creds()) if with_creds_in_query else ""
    qs = "&".join(p for p in (query, auth) if p)
    url = _raw(gw, f"{OUT}?{qs}" if qs else OUT)
    async with gw.session.post(url, data=body, headers=FORM) as resp:
        assert resp.status == 400
        _assert_one_line(await resp.text())
    assert connexus.emu.requests == []


@pytest.mark.parametrize("seed", range(5))
async def test_random_binary_bodies_never_500(
    connexus: Connexus, gw: GatewayClient, seed: int
) -> None:
    """Random non-UTF-8 byte bodies of any content type get 400, never 500 or an upstream call."""
    rng = random.Random(seed)
    body = b"\x80" + rng.randbytes(rng.randint(1, 2000))
    for ctype in ("application/x-www-form-urlencoded", "application/octet-stream", "text/plain"):
        async with gw.post(
            f"{OUT}?{urlencode(creds())}", data=body, headers={"Content-Type": ctype}
        ) as resp:
            assert resp.status == 400
    assert connexus.emu.requests == []


# -- 4. upstream failures ---------------------------------------------------------------------

TIMEOUT = 0.5
MARGIN = 1.0


async def _timed_post(client: GatewayClient, params: dict[str, str]) -> tuple[int, str, float]:
    started = time.monotonic()
    status, text = await _post(client, params)
    return status, text, time.monotonic() - started


async def test_upstream_down_gives_500_then_recovers(
    aiohttp_server: AiohttpServer, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """With Connexus unreachable a send gets 500 promptly; once it is up the next gets 204."""
    port = _closed_port()
    cfg = _quiet(
        config_dict(tmp_path, f"http://127.0.0.1:{port}/api/connexus"), timeout_seconds=TIMEOUT
    )
    client = await gateway(cfg)
    status, text, took = await _timed_post(client, creds(to="6421000000", body="down"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert took < TIMEOUT + MARGIN

    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET})
    await aiohttp_server(create_emulator_app(emu), host="127.0.0.1", port=port)
    await asyncio.sleep(BACKOFF_INITIAL)  # the failed token fetch's shared backoff
    assert await _post(client, creds(to="6421000000", body="up")) == (204, "")
    assert len(emu.sms_out_requests()) == 1


@pytest.mark.parametrize("warm", [True, False], ids=["warm-token", "cold-token"])
async def test_upstream_slower_than_timeout_gives_500_in_time(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], warm: bool
) -> None:
    """A Connexus slower than the upstream timeout gives 500 in time, then 204 when healthy."""
    client = await gateway(_quiet(cfg, timeout_seconds=TIMEOUT))
    if warm:
        assert await _post(client, creds(to="6421000000", body="warm")) == (204, "")
    connexus.emu.latency = 3.0
    status, text, took = await _timed_post(client, creds(to="6421000001", body="slow"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert took < TIMEOUT + MARGIN
    connexus.emu.latency = 0.0
    if not warm:
        await asyncio.sleep(3 * TIMEOUT + 0.3)  # let the abandoned token fetch give up
    assert await _post(client, creds(to="6421000002", body="fast")) == (204, "")


@pytest.mark.parametrize("status_code", [500, 502, 503])
async def test_upstream_5xx_gives_500_then_recovers(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], status_code: int
) -> None:
    """A 5xx from Connexus sms/out gives the legacy client 500 in time; the next send gets 204."""
    client = await gateway(_quiet(cfg, timeout_seconds=TIMEOUT))
    connexus.emu.fail_next = [status_code]
    status, text, took = await _timed_post(client, creds(to="6421000000", body="x"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert took < TIMEOUT + MARGIN
    assert await _post(client, creds(to="6421000000", body="y")) == (204, "")


async def test_token_endpoint_5xx_gives_500_then_recovers(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A token endpoint failing every retry gives 500 (no send); later a send gets 204."""
    client = await gateway(_quiet(cfg, timeout_seconds=TIMEOUT))
    connexus.emu.fail_token_next = [503, 503, 503]
    status, text, took = await _timed_post(client, creds(to="6421000000", body="x"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert took < TIMEOUT + MARGIN
    assert connexus.emu.sms_out_requests() == []
    await asyncio.sleep(2 * TIMEOUT)
    connexus.emu.fail_token_next = []
    assert await _post(client, creds(to="6421000000", body="y")) == (204, "")


@pytest.mark.parametrize("status_code", [503, 429])
async def test_bulk_refused_by_every_chunk_gives_500_and_records_nothing(
    connexus: Connexus, gw: GatewayClient, tmp_path: Path, status_code: int
) -> None:
    """A bulk send Connexus refuses (503, 429) answers 500, records nothing, settles rejected."""
    connexus.emu.fail_next = [status_code]
    status, _ = await _post(gw, creds(to="6421000001 6421000002", body="x"))
    assert status == 500
    assert await _poll_status(gw) is None
    with sqlite3.connect(tmp_path / "bc-proxy.db") as db:
        states = {r[0] for r in db.execute("SELECT state FROM sends")}
    assert states == {"rejected"}


@pytest.mark.parametrize("status_code", [500, 502, 504])
async def test_bulk_5xx_of_unknown_outcome_gives_500_and_err_records(
    connexus: Connexus, gw: GatewayClient, tmp_path: Path, status_code: int
) -> None:
    """A 500/502/504 may come after the message went out: 500, unknown rows, ERR records."""
    connexus.emu.fail_next = [status_code]
    status, text = await _post(gw, creds(to="6421000001 6421000002", body="x", messageId="u5"))
    assert status == 500
    _assert_one_line(text, "unknown")
    records = [await _poll_status(gw) for _ in range(2)]
    assert sorted(r["from"] for r in records if r) == ["6421000001", "6421000002"]
    assert all(r and r["statusCode"] == "ERR" and "unknown" in r["error"] for r in records)
    assert {r["inReplyToId"] for r in records if r} == {"u5"}
    with sqlite3.connect(tmp_path / "bc-proxy.db") as db:
        states = {r[0] for r in db.execute("SELECT state FROM sends")}
    assert states == {"unknown"}


async def test_bulk_with_one_chunk_failing_is_partial(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """When one bulk chunk gets a 5xx and the others go out, the call is 204 with ERR records."""
    connexus.emu.fail_next = [500]
    to = " ".join(f"6425{i:07d}" for i in range(450))
    assert await _post(gw, creds(to=to, body="x", messageId="part-1")) == (204, "")
    accepted = [r for r in connexus.emu.sms_out_requests() if r.status == 200]
    assert len(accepted) == 2
    failed = 450 - sum(len(_json(r)["to"]) for r in accepted)
    async with gw.get("/api/1/sms/queue", params=creds()) as resp:
        assert await resp.text() == f"inCount=0&statusCount={failed}"
    record = await _poll_status(gw)
    assert record is not None
    assert record["statusCode"] == "ERR"
    assert record["inReplyToId"] == "part-1"
    assert record["error"]


# -- 5. /sms/test -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_test_endpoint_validates_like_out_and_never_forwards(
    connexus: Connexus, gw: GatewayClient, method: str
) -> None:
    """/sms/test gives 204 for a too-short number, 400 for a missing to, and never calls out."""

    async def call(params: dict[str, str]) -> int:
        if method == "POST":
            resp = await gw.post(TEST, data=urlencode(params), headers=FORM)
        else:
            resp = await gw.get(f"{TEST}?{urlencode(params)}")
        async with resp:
            if resp.status == 204:
                assert await resp.read() == b""
            return resp.status

    assert await call(creds(to="123", body="short number")) == 204
    assert await call(creds(to="6421000000 6421000001", body="two", messageId="t-1")) == 204
    assert await call(creds(body="no to")) == 400
    assert await call(creds(to="6421000000")) == 400
    assert await call(creds(to="6421000000", body="x", messageId="z" * 37)) == 400
    assert await call(creds(to="6421000000", body="x", fragmentationLimit="9")) == 400
    assert await call({"userId": LEGACY_USER, "password": "bad", "to": "1", "body": "x"}) == 401
    assert connexus.emu.requests == []
    assert connexus.emu.token_requests == 0
    assert await _poll_status(gw) is None


# -- 6. partial rejection ---------------------------------------------------------------------

REASON = "Invalid destination number"


async def test_rejected_recipient_in_bulk_becomes_nur_status_record(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """A recipient rejected inside a bulk send gives 204 and one NUR status record for it."""
    connexus.emu.reject = {"6421000002": REASON}
    params = creds(to="6421000001, +6421000002 6421000003", body="hi", messageId="legacy-42")
    assert await _post(gw, params) == (204, "")
    record = await _poll_status(gw)
    assert record is not None
    assert record["statusCode"] == "NUR"
    assert record["error"] == REASON
    assert record["inReplyToId"] == "legacy-42"
    assert record["from"] == "6421000002"
    assert record["to"] == "552"
    assert 0 < len(record["messageId"]) <= 50
    assert await _poll_status(gw) is None  # only the rejected recipient gets a record


async def test_rejected_single_recipient_becomes_nur_status_record(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """A rejected single recipient gives 204 and a NUR status record with the reason."""
    connexus.emu.reject = {"6421999999": REASON}
    params = creds(to="+6421999999", body="hi", messageId="1700000000.1234", **{"from": "2190"})
    assert await _post(gw, params) == (204, "")
    record = await _poll_status(gw)
    assert record is not None
    assert record == {
        "messageId": record["messageId"],
        "from": "6421999999",
        "to": "2190",
        "statusCode": "NUR",
        "inReplyToId": "1700000000.1234",
        "error": REASON,
    }
    assert await _poll_status(gw) is None


async def test_rejection_without_legacy_message_id_has_empty_in_reply_to(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """A rejection for a send without messageId has an empty inReplyToId."""
    connexus.emu.reject = {"6421000005": REASON}
    assert await _post(gw, creds(to="6421000005", body="hi")) == (204, "")
    record = await _poll_status(gw)
    assert record is not None
    assert record["inReplyToId"] == ""
    assert record["statusCode"] == "NUR"


async def test_status_records_have_unique_receipt_ids(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """Each rejected recipient of a bulk gets its own status record with a distinct messageId."""
    rejected = [f"6421{i:07d}" for i in range(5)]
    connexus.emu.reject = dict.fromkeys(rejected, REASON)
    to = ",".join([*rejected, "6429999999"])
    assert await _post(gw, creds(to=to, body="hi", messageId="m-5")) == (204, "")
    records = [await _poll_status(gw) for _ in range(6)]
    got = [r for r in records if r is not None]
    assert sorted(r["from"] for r in got) == rejected
    assert len({r["messageId"] for r in got}) == 5
    assert {r["inReplyToId"] for r in got} == {"m-5"}


# -- 7. outcome mapping -----------------------------------------------------------------------


async def test_insufficient_funds_is_403(connexus: Connexus, gw: GatewayClient) -> None:
    """Connexus 'insufficient funds' becomes a 403 for the legacy client."""
    connexus.emu.insufficient_funds = True
    status, text = await _post(gw, creds(to="6421000000", body="hi"))
    assert status == 403
    _assert_one_line(text, "fund")
    status, _ = await _post(gw, creds(to="6421000000 6421000001", body="hi"))
    assert status == 403


async def test_upstream_400_is_400_with_reason(connexus: Connexus, gw: GatewayClient) -> None:
    """A 400 from Connexus for the whole request becomes a 400 carrying the upstream reason."""
    connexus.emu.fail_next = [400]
    status, text = await _post(gw, creds(to="6421000000", body="hi"))
    assert status == 400
    _assert_one_line(text, "Server error")  # the emulator's scripted reason
    assert await _post(gw, creds(to="6421000000", body="hi")) == (204, "")


PASSWORD_TENANT = {"user_id": "demo@example.org", "password": "demo-password"}


@pytest.mark.parametrize("to", ["6421000000", "6421000000,6421000001"], ids=["single", "bulk"])
async def test_password_tenant_sends_user_and_password_upstream(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], to: str
) -> None:
    """A password tenant sends Connexus userId/password as parameters, no Authorization."""
    client = await gateway(with_tenant(_quiet(cfg), connexus=PASSWORD_TENANT))
    assert await _post(client, creds(to=to, body="pw", messageId="pw-1")) == (204, "")
    (req,) = connexus.emu.sms_out_requests()
    assert "authorization" not in _header_names(req)
    if "," in to:
        params: dict[str, Any] = _json(req)
    else:
        params = {k: v[0] for k, v in _form(req).items()}
    assert params["userId"] == "demo@example.org"
    assert params["password"] == "demo-password"
    raw = req.body.decode()
    for secret in (LEGACY_USER, LEGACY_PASSWORD, "pw-1"):
        assert secret not in raw
    assert connexus.emu.token_requests == 0


async def test_password_tenant_with_wrong_password_gives_500(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A password-auth tenant whose Connexus password is wrong gives 500, not the caller's 401."""
    tenant = {**PASSWORD_TENANT, "password": "not-the-password"}
    client = await gateway(with_tenant(_quiet(cfg), connexus=tenant))
    status, text = await _post(client, creds(to="6421000000", body="pw"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert [r.status for r in connexus.emu.sms_out_requests()][:1] == [401]


async def test_wrong_client_secret_gives_500(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A token tenant whose client secret Connexus refuses gives 500 and sends nothing."""
    tenant = {"client_id": CLIENT_ID, "client_secret": "wrong"}
    client = await gateway(with_tenant(_quiet(cfg), connexus=tenant))
    status, text = await _post(client, creds(to="6421000000", body="x"))
    assert status == 500
    _assert_one_line(text, "Connexus")
    assert connexus.emu.sms_out_requests() == []


# -- 8. what goes upstream --------------------------------------------------------------------


async def test_legacy_message_id_and_credentials_never_go_upstream(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """The legacy messageId and credentials stay local: a single send carries a fresh id of at
    most 36 characters, a bulk one none."""
    legacy_id = "6b06fbc6a1b501.29755622"
    assert await _post(gw, creds(to="6421000000", body="a", messageId=legacy_id)) == (204, "")
    assert await _post(gw, creds(to="6421000002 6421000003", body="b", messageId=legacy_id)) == (
        204,
        "",
    )
    single, bulk = connexus.emu.sms_out_requests()
    upstream_id = _form(single)["messageId"][0]
    assert upstream_id != legacy_id
    assert 0 < len(upstream_id) <= 36
    assert "messageId" not in _json(bulk)
    for req in (single, bulk):
        wire = req.path + req.body.decode() + json.dumps(req.headers)
        for secret in (legacy_id, LEGACY_USER, LEGACY_PASSWORD, CLIENT_SECRET):
            assert secret not in wire
    assert "userId" not in _form(single)
    assert "password" not in _json(bulk)


async def test_from_defaults_to_tenant_default_from(connexus: Connexus, gw: GatewayClient) -> None:
    """Without from, the tenant's default_from is sent; a given from passes through unchanged."""
    assert await _post(gw, creds(to="6421000000", body="a")) == (204, "")
    assert await _post(gw, creds(to="6421000000", body="b", **{"from": "2190"})) == (204, "")
    assert await _post(gw, creds(to="6421000000 6421000001", body="c")) == (204, "")
    a, b, c = connexus.emu.sms_out_requests()
    assert _form(a)["from"] == ["552"]
    assert _form(b)["from"] == ["2190"]
    assert _json(c)["from"] == "552"


async def test_no_default_from_sends_no_from(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A tenant without default_from sends no from when the legacy call has none."""
    client = await gateway(with_tenant(_quiet(cfg), default_from=None))
    assert await _post(client, creds(to="6421000000", body="a")) == (204, "")
    (req,) = connexus.emu.sms_out_requests()
    assert "from" not in _form(req)


async def test_options_pass_through_single(connexus: Connexus, gw: GatewayClient) -> None:
    """rateCode, contentType, fragmentationLimit, schedule pass through; no default from."""
    params = creds(
        to="6421000000",
        body="opts",
        rateCode="R42",
        contentType="text/plain",
        fragmentationLimit="3",
        schedule="1893456000",
    )
    assert await _post(gw, params) == (204, "")
    (req,) = connexus.emu.sms_out_requests()
    form = _form(req)
    assert form["rateCode"] == ["R42"]
    assert form["contentType"] == ["text/plain"]
    assert form["fragmentationLimit"] == ["3"]
    assert form["schedule"] == ["1893456000"]
    assert "from" not in form


async def test_options_pass_through_bulk(connexus: Connexus, gw: GatewayClient) -> None:
    """In a bulk JSON request from, contentType, fragmentationLimit and schedule pass through."""
    params = creds(
        to="6421000000,6421000001",
        body="opts",
        contentType="text/plain",
        fragmentationLimit="0",
        schedule="1893456000",
        **{"from": "2190"},
    )
    assert await _post(gw, params) == (204, "")
    (req,) = connexus.emu.sms_out_requests()
    data = _json(req)
    assert data["from"] == "2190"
    assert data["contentType"] == "text/plain"
    assert data["fragmentationLimit"] == 0
    assert str(data["schedule"]) == "1893456000"
    assert data["to"] == ["6421000000", "6421000001"]


# -- 9. wire leniency -------------------------------------------------------------------------


async def test_get_works_like_post(connexus: Connexus, gw: GatewayClient) -> None:
    """A GET with everything in the query string sends like a POST and answers 204."""
    query = urlencode(creds(to="6421000000", body="via get", messageId="g-1"))
    async with gw.get(f"{OUT}?{query}") as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    (req,) = connexus.emu.sms_out_requests()
    assert _form(req)["body"] == ["via get"]


async def test_params_split_between_query_and_body_are_merged(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """Credentials and to in the query plus body in the form body make one valid send."""
    query = urlencode(creds(to="6421000000"))
    async with gw.post(f"{OUT}?{query}", data=urlencode({"body": "merged"}), headers=FORM) as r:
        assert r.status == 204
    async with gw.get(
        f"{OUT}?{urlencode({'to': '6421000001'})}",
        data=urlencode({"body": "get body", "userId": LEGACY_USER, "password": LEGACY_PASSWORD}),
        headers=FORM,
    ) as r:
        assert r.status == 204
    a, b = connexus.emu.sms_out_requests()
    assert (_form(a)["to"], _form(a)["body"]) == (["6421000000"], ["merged"])
    assert (_form(b)["to"], _form(b)["body"]) == (["6421000001"], ["get body"])


async def test_plus_decodes_to_space(connexus: Connexus, gw: GatewayClient) -> None:
    """'+' decodes to a space in query and body, and %2B stays a literal plus."""
    raw = f"userId={LEGACY_USER}&password={LEGACY_PASSWORD}&to=%2B6421000000"
    url = _raw(gw, f"{OUT}?{raw}&body=Hello+there+%2B1")
    async with gw.session.post(url, headers={"Content-Length": "0"}) as r:
        assert r.status == 204
    async with gw.post(OUT, data=f"{raw}&body=Two+words%2B", headers=FORM) as r:
        assert r.status == 204
    a, b = connexus.emu.sms_out_requests()
    assert _form(a)["body"] == ["Hello there +1"]
    assert _form(a)["to"] == ["6421000000"]
    assert _form(b)["body"] == ["Two words+"]


async def test_unknown_params_are_ignored(connexus: Connexus, gw: GatewayClient) -> None:
    """Unknown parameters do not fail the send and are not forwarded."""
    params = creds(to="6421000000", body="hi", foo="bar", replyTo="x", **{"a b": "c"})
    assert await _post(gw, params) == (204, "")
    (req,) = connexus.emu.sms_out_requests()
    assert set(_form(req)) <= {"to", "body", "messageId", "from"}


@pytest.mark.parametrize(
    "accept",
    ["text/plain", "application/json", "text/html;q=0.1", "*/*", "image/png", "garbage;;;"],
)
async def test_accept_header_never_yields_406(
    connexus: Connexus, gw: GatewayClient, accept: str
) -> None:
    """Any Accept header gets the normal answers (204 for a send, 400 for an error), never 406."""
    headers = {**FORM, "Accept": accept}
    async with gw.post(OUT, data=urlencode(creds(to="6421000000", body="a")), headers=headers) as r:
        assert r.status == 204
    async with gw.post(OUT, data=urlencode(creds(to="6421000000")), headers=headers) as r:
        assert r.status == 400
    async with gw.get(f"{TEST}?{urlencode(creds(to='1', body='t'))}", headers=headers) as r:
        assert r.status == 204


async def test_query_only_post_without_content_type(connexus: Connexus, gw: GatewayClient) -> None:
    """An empty POST without Content-Type and every parameter in the query is a valid send."""
    query = urlencode(creds(to="6421000000", body="q"))
    async with gw.post(
        f"{OUT}?{query}", headers={"Content-Length": "0"}, skip_auto_headers=["Content-Type"]
    ) as r:
        assert r.status == 204
    assert len(connexus.emu.sms_out_requests()) == 1


async def test_first_value_of_a_key_wins_query_before_body(
    connexus: Connexus, gw: GatewayClient
) -> None:
    """When a key is in both query and body the query's value is used."""
    query = urlencode(creds(to="6421000000", body="from query"))
    async with gw.post(f"{OUT}?{query}", data=urlencode({"body": "from body"}), headers=FORM) as r:
        assert r.status == 204
    (req,) = connexus.emu.sms_out_requests()
    assert _form(req)["body"] == ["from query"]


async def test_multipart_form_body_is_accepted(connexus: Connexus, gw: GatewayClient) -> None:
    """A multipart/form-data body carries legacy parameters like a urlencoded one."""
    form = aiohttp.FormData()
    for k, v in creds(to="6421000000", body="multi part").items():
        form.add_field(k, v)
    form.add_field("file", b"\x00\x01", filename="x.bin")  # files are ignored
    async with gw.post(OUT, data=form) as r:
        assert r.status == 204
    (req,) = connexus.emu.sms_out_requests()
    assert _form(req)["body"] == ["multi part"]


async def test_utf8_body_round_trips(connexus: Connexus, gw: GatewayClient) -> None:
    """A UTF-8 body with reserved characters reaches Connexus unchanged."""
    text = "Hello & welcome = ü — 你好 +1 100%"
    assert await _post(gw, creds(to="6421000000", body=text)) == (204, "")
    (req,) = connexus.emu.sms_out_requests()
    assert _form(req)["body"] == [text]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Basic éé"},
        {"Authorization": "Basic \u00ff\u00fe"},
    ],
)
async def test_non_ascii_basic_credentials_are_401(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], headers: dict[str, str]
) -> None:
    """Basic credentials that are not even base64 text get 401, not a 500."""
    client = await gateway(cfg)
    resp = await client.post(
        "/api/1/sms/out", data={"to": "6421000001", "body": "x"}, headers=headers
    )
    assert resp.status == 401


@pytest.mark.parametrize("frag", ["0" * 5000, "03", " 1"])
async def test_odd_fragmentation_limits_are_400(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], frag: str
) -> None:
    """A fragmentationLimit that is not exactly 0-3 is a 400, never a 500."""
    client = await gateway(cfg)
    resp = await client.post(
        "/api/1/sms/out", data=creds(to="6421000001", body="x", fragmentationLimit=frag)
    )
    assert resp.status == 400


async def test_bare_204_from_connexus_is_a_sent_message(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Connexus answering 204 with no body accepted the message: 204, recorded, no ERR status."""
    client = await gateway(cfg)
    connexus.emu.fail_next = [204]
    resp = await client.post(
        "/api/1/sms/out", data=creds(to="6421000001", body="x", messageId="m1")
    )
    assert resp.status == 204
    queue = await client.get("/api/1/sms/queue", params=creds())
    assert await queue.text() == "inCount=0&statusCount=0"
