"""Fault injection, one row per fault: the legacy answer, what the store keeps, the metrics.
Real loopback servers: the gateway app on a SQLite file, a raw asyncio "Connexus" that refuses,
resets, stalls or garbles, and raw push receivers (docs/reliability.md has the matrix).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bc_proxy import keys
from bc_proxy.connexus.tokens import BACKOFF_INITIAL
from bc_proxy.legacy import settling
from bc_proxy.metrics import Metrics
from bc_proxy.store import SendIntent, Settlement, StatusRecord
from bc_proxy.translate import UNKNOWN_OUTCOME
from tests.conftest import (
    WEBHOOK_SECRET,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
    writer_conn,
)
from tests.sendcalls import post, quiet, sample, send_rows
from tests.served import free_port

TIMEOUT = 0.5  # upstream.timeout_seconds in this suite
HOLD = 3.0  # how long a stalling peer stalls (well past TIMEOUT)
REFUSAL = "Invalid destination number"  # the bulk_partial refusal (legacy NUR)
HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
UP = "bc_proxy_upstream_requests_total"

Writer = asyncio.StreamWriter


def reset(writer: Writer) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def response(status: int, body: bytes, ctype: str = "application/json", **extra: str) -> bytes:
    """A whole HTTP/1.1 answer."""
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in extra.items())
    return head.encode() + b"\r\n" + body


class RawHttp:
    """A minimal HTTP/1.1 server on 127.0.0.1 (asyncio streams) whose answers are scripted by
    `answer(path, body, writer) -> keep_alive`; connections and requests are counted."""

    def __init__(self, answer: Callable[[str, bytes, Writer], Awaitable[bool]]) -> None:
        self.answer = answer
        self.server: asyncio.Server | None = None
        self.port = 0
        self._conns: set[Writer] = set()

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._conns):
                w.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self._conns.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                path = line.split(b" ")[1].decode()
                length = 0
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if not await self.answer(path, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._conns.discard(writer)
            if not writer.transport.is_closing():
                writer.close()


class FakeConnexus:
    """Connexus on a RawHttp: a token endpoint and sms/out, each with a scripted mode.

    sms/out modes: ok, reset (partial answer then RST), slow_headers, slow_body, invalid_json,
    html_502, 503, 429 (Retry-After: 30), 401, bulk_partial (a bulk answer accepting the first
    recipient and refusing the others). Token modes: ok, down (503 HTML)."""

    def __init__(self) -> None:
        self.http = RawHttp(self._answer)
        self.mode = "ok"
        self.script: list[str] = []  # next sms/out modes, then `mode`
        self.token_mode = "ok"
        self.sends = 0  # sms/out requests received whole
        self.before_answer: Callable[[], None] | None = None  # runs as sms/out is answered
        self.tokens = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}/api/connexus"

    async def _answer(self, path: str, body: bytes, w: Writer) -> bool:
        if path.endswith("/auth/token"):
            self.tokens += 1
            if self.token_mode == "down":
                w.write(response(503, b"<html><h1>503</h1></html>", "text/html"))
            else:
                token = {"access_token": f"tok-{self.tokens}", "expires_in": 3600}
                w.write(response(200, json.dumps(token).encode()))
            await w.drain()
            return True
        self.sends += 1
        mode = self.script.pop(0) if self.script else self.mode
        if self.before_answer is not None:
            self.before_answer()
        if mode == "ok":
            answer = {"success": True, "status": "accepted", "message_id": f"cx-{self.sends}"}
            w.write(response(200, json.dumps(answer).encode()))
        elif mode == "bulk_partial":
            to = json.loads(body)["to"]
            items = [{"to": to[0], "success": True, "message_id": f"cx-{self.sends}"}]
            items += [{"to": t, "success": False, "error": REFUSAL} for t in to[1:]]
            w.write(response(200, json.dumps({"success": True, "messages": items}).encode()))
        elif mode == "reset":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            w.write(b'Content-Length: 200\r\n\r\n{"succ')
            await w.drain()
            await asyncio.sleep(0.05)
            reset(w)
            return False
        elif mode == "slow_headers":
            await asyncio.sleep(HOLD)
            return False
        elif mode == "slow_body":
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n"
            )
            for byte in b'{"success":true,':
                w.write(bytes([byte]))
                await w.drain()
                await asyncio.sleep(0.2)
            return False
        elif mode == "invalid_json":
            w.write(response(200, b"{not json at all"))
        elif mode == "html_502":
            w.write(
                response(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
            )
        elif mode == "503":
            w.write(response(503, b'{"error":"unavailable"}'))
        elif mode == "429":
            w.write(response(429, b'{"error":"rate limited"}', Retry_After="30"))
        elif mode == "401":
            w.write(response(401, b'{"error":"invalid_token"}'))
        await w.drain()
        return True


@pytest.fixture
async def fake() -> Any:
    """A FakeConnexus on a loopback port (closed after the test)."""
    f = FakeConnexus()
    await f.http.start()
    yield f
    await f.http.close()


def fault_cfg(tmp_path: Path, base_url: str) -> dict[str, Any]:
    """The suite's configuration: upstream timeout 0.5 s, no background sweep."""
    return quiet(config_dict(tmp_path, base_url), timeout_seconds=TIMEOUT)


# -- upstream faults on the send path -----------------------------------------------------------

# (fault, sms/out script, legacy answer, state kept, upstream metric status, retry re-sends)
SEND_FAULTS = [
    ("reset_mid_response", ["reset"], 500, "unknown", "error", False),
    ("slow_headers", ["slow_headers"], 500, "unknown", "timeout", False),
    ("slow_body", ["slow_body"], 500, "unknown", "timeout", False),
    ("invalid_json_200", ["invalid_json"], 204, "accepted", "200", False),
    ("html_error_page_502", ["html_502"], 500, "unknown", "502", False),
    ("rate_limited_429_retry_after", ["429"], 500, "rejected", "429", True),
]


@pytest.mark.parametrize(
    ("script", "legacy", "state", "metric", "resent"),
    [pytest.param(*row[1:], id=row[0]) for row in SEND_FAULTS],
)
async def test_send_fault(
    fake: FakeConnexus,
    gateway: GatewayFactory,
    tmp_path: Path,
    script: list[str],
    legacy: int,
    state: str,
    metric: str,
    resent: bool,
) -> None:
    """One upstream fault: the legacy answer, the sends row state and the upstream metric; the
    legacy retry is sent again only when the first try was definitively refused."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    fake.script = list(script)
    params = creds(to="6421000400", body="fault", messageId="f-1")
    started = time.monotonic()
    status, text = await post(client, params)
    assert time.monotonic() - started < TIMEOUT + 2  # never hangs past the upstream timeout
    assert status == legacy, text
    assert text.count("\n") == (0 if legacy == 204 else 1)
    db = tmp_path / "bc-proxy.db"
    assert send_rows(db) == [("6421000400", "f-1", state)]
    assert sample(metrics, UP, operation="sms_out", status=metric) == 1
    unknown = sample(metrics, "bc_proxy_recipients_unknown_total", tenant="acme")
    assert unknown == (1 if state == "unknown" else 0)
    assert fake.sends == 1
    assert statuses(db) == (1 if state == "unknown" else 0)  # an ERR record says "unknown"
    assert await post(client, params) == (204, "")  # the legacy client's retry
    assert fake.sends == (2 if resent else 1)  # never twice unless definitively refused
    states = [s for _, _, s in send_rows(db)]
    assert states == ([state, "accepted"] if resent else [state])


async def test_upstream_refusing_connections(gateway: GatewayFactory, tmp_path: Path) -> None:
    """Nothing listening upstream: 500, row rejected (never written), token metric error;
    once Connexus is up the retry is sent once."""
    port = free_port()
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, f"http://127.0.0.1:{port}/api/connexus"), metrics)
    params = creds(to="6421000401", body="refused", messageId="f-2")
    assert (await post(client, params))[0] == 500
    assert send_rows(tmp_path / "bc-proxy.db") == [("6421000401", "f-2", "rejected")]
    assert sample(metrics, UP, operation="token", status="error") >= 1
    up = FakeConnexus()
    await up.http.start(port)
    try:
        await asyncio.sleep(BACKOFF_INITIAL)
        assert await post(client, params) == (204, "")
        assert up.sends == 1
    finally:
        await up.http.close()


async def test_5xx_burst(fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path) -> None:
    """Three 503s in a row: three 500s, rows rejected, metric 503 x3; the 4th try is sent."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    fake.script = ["503", "503", "503"]
    params = creds(to="6421000402", body="burst", messageId="f-3")
    answers = [(await post(client, params))[0] for _ in range(4)]
    assert answers == [500, 500, 500, 204]
    states = [s for _, _, s in send_rows(tmp_path / "bc-proxy.db")]
    assert states == ["rejected"] * 3 + ["accepted"]
    assert sample(metrics, UP, operation="sms_out", status="503") == 3
    assert fake.sends == 4


async def test_token_endpoint_down_at_start(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Token endpoint 503 from the start: sends are 500 with rejected rows and no sms/out
    call; /readyz stays 200 (intake goes on) and names the token problem; once it is back the
    retry is sent once."""
    fake.token_mode = "down"
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    params = creds(to="6421000403", body="no token", messageId="f-4")
    status, text = await post(client, params)
    assert status == 500
    assert "token" in text
    assert send_rows(tmp_path / "bc-proxy.db") == [("6421000403", "f-4", "rejected")]
    assert fake.sends == 0
    assert sample(metrics, UP, operation="token", status="503") >= 1
    async with client.get("/readyz?verbose") as resp:
        assert resp.status == 200
        assert "no token" in await resp.text()
    fake.token_mode = "ok"
    await asyncio.sleep(BACKOFF_INITIAL)
    assert await post(client, params) == (204, "")
    assert fake.sends == 1


async def test_token_endpoint_down_mid_run(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Token revoked and the token endpoint down mid-run: the send answered 401 is 500 and
    kept rejected (Connexus refused it); after recovery the retry is sent once more."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    assert await post(client, creds(to="6421000404", body="one", messageId="f-5")) == (204, "")
    fake.token_mode = "down"
    fake.script = ["401"]
    params = creds(to="6421000405", body="two", messageId="f-6")
    assert (await post(client, params))[0] == 500
    rows = send_rows(tmp_path / "bc-proxy.db")
    assert rows == [("6421000404", "f-5", "accepted"), ("6421000405", "f-6", "rejected")]
    assert sample(metrics, UP, operation="sms_out", status="error") == 1  # the refresh failed
    assert sample(metrics, UP, operation="token", status="503") >= 1
    fake.token_mode = "ok"
    await asyncio.sleep(BACKOFF_INITIAL)
    assert await post(client, params) == (204, "")
    assert fake.sends == 3  # f-5 once, f-6 refused (401) then sent


def statuses(db: Path) -> int:
    """Status records waiting in the gateway's SQLite file."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM records WHERE kind = 'status'").fetchone()[0])


# -- the store failing ------------------------------------------------------------------------


def mo_payload(n: int) -> dict[str, Any]:
    """An incoming-SMS webhook to tenant acme's sender 552."""
    return {"type": "mo", "messageId": f"mo-{n}", "from": "+6421000500", "to": "552",
            "body": f"hello {n}", "timestamp": int(time.time())}  # fmt: skip


async def webhook(client: GatewayClient, n: int) -> int:
    async with client.post(HOOK, json=mo_payload(n)) as resp:
        await resp.read()
        return resp.status


def records(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


async def test_store_read_only(fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path) -> None:
    """Store read-only mid-run (query_only): a send is 500 'Storage failure' with nothing sent
    upstream, a webhook 503 (Connexus retries), queue still answers; once writable the retry of
    each succeeds once."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    conn = writer_conn(client)
    conn.execute("PRAGMA query_only = ON")
    params = creds(to="6421000406", body="ro", messageId="f-7")
    assert await post(client, params) == (500, "Storage failure\n")
    assert fake.sends == 0
    assert await webhook(client, 1) == 503
    async with client.get("/api/1/sms/queue", params=creds()) as resp:
        assert (resp.status, await resp.text()) == (200, "inCount=0&statusCount=0")
    labels = {"route": "/api/1/sms/out", "tenant": "acme", "status": "500"}
    assert sample(metrics, "bc_proxy_legacy_requests_total", **labels) == 1
    db = tmp_path / "bc-proxy.db"
    assert send_rows(db) == []
    assert records(db) == 0
    conn.execute("PRAGMA query_only = OFF")
    assert await post(client, params) == (204, "")
    assert await webhook(client, 1) == 200
    assert fake.sends == 1
    assert send_rows(db) == [("6421000406", "f-7", "accepted")]
    assert records(db) == 1


def read_only_as_connexus_answers(fake: FakeConnexus, client: GatewayClient) -> sqlite3.Connection:
    """The store turns read-only while the fake Connexus answers the next sms/out (the settle
    commit after it fails); the writer connection, to make it writable again."""
    conn = writer_conn(client)

    def read_only() -> None:
        conn.execute("PRAGMA query_only = ON")

    fake.before_answer = read_only
    return conn


async def _state_becomes(db: Path, want: str, within: float) -> list[tuple[Any, ...]]:
    """The send rows once the first is in state `want`, or as they are after `within` s."""
    deadline = time.monotonic() + within
    while True:
        rows = send_rows(db)
        if rows[0][2] == want or time.monotonic() >= deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_store_fails_after_connexus_accepted(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The store turns read-only while Connexus accepts a send: the settle commit fails. The
    SMS went out, so the client gets 204; the row stays pending and the settle is retried in
    the background: once the store is writable again the row is `accepted` with its Connexus
    id, and a retry is 204 from it, not sent again."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    conn = read_only_as_connexus_answers(fake, client)
    params = creds(to="6421000408", body="settle", messageId="f-8")
    assert await post(client, params) == (204, "")
    assert fake.sends == 1
    fake.before_answer = None
    db = tmp_path / "bc-proxy.db"
    assert send_rows(db) == [("6421000408", "f-8", "pending")]
    conn.execute("PRAGMA query_only = OFF")
    assert await _state_becomes(db, "accepted", 5) == [("6421000408", "f-8", "accepted")]
    (cid,) = sqlite3.connect(db).execute("SELECT connexus_id FROM sends").fetchone()
    assert cid
    assert await post(client, params) == (204, "")
    assert fake.sends == 1
    assert sample(metrics, "bc_proxy_send_repeats_total", tenant="acme", state="accepted") == 1
    assert records(db) == 0  # no status record: an accepted SMS has none until its report
    settles = {
        o: sample(metrics, "bc_proxy_settles_deferred_total", tenant="acme", outcome=o)
        for o in ("deferred", "recovered", "abandoned")
    }
    assert settles == {"deferred": 1, "recovered": 1, "abandoned": 0}


def status_records(db: Path) -> list[tuple[str, str, str]]:
    """(msisdn_from, status_code, error) of every status record, oldest first."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT msisdn_from, status_code, error FROM records WHERE kind = 'status' ORDER BY id"
        ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


async def test_a_partial_bulk_settle_is_retried_and_stores_its_refusals_once(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The store turns read-only while Connexus accepts one recipient of a bulk send and
    refuses the other: the settle, which carries the refusal's NUR record, fails. The client
    gets 204 (one SMS went out); the settle is retried until it commits, leaving the accepted
    row `accepted`, the refused one `rejected` and exactly one NUR record, which a settle
    repeated after that commit does not store again."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    conn = read_only_as_connexus_answers(fake, client)
    fake.mode = "bulk_partial"
    params = creds(to="6421000411 6421000412", body="bulk", messageId="f-11")
    assert await post(client, params) == (204, "")
    fake.before_answer = None
    db = tmp_path / "bc-proxy.db"
    assert [r[2] for r in send_rows(db)] == ["pending", "pending"]
    conn.execute("PRAGMA query_only = OFF")
    rows = await _state_becomes(db, "accepted", 5)
    assert rows == [("6421000411", "f-11", "accepted"), ("6421000412", "f-11", "rejected")]
    assert status_records(db) == [("6421000412", "NUR", REFUSAL)]
    settles = {
        o: sample(metrics, "bc_proxy_settles_deferred_total", tenant="acme", outcome=o)
        for o in ("deferred", "recovered", "abandoned")
    }
    assert settles == {"deferred": 1, "recovered": 1, "abandoned": 0}
    # A settle of the same rows again (its first commit's answer lost): nothing stored twice.
    store = client.app[keys.STORE]
    with sqlite3.connect(db) as c:
        refs = [str(r[0]) for r in c.execute("SELECT upstream_ref FROM sends ORDER BY id")]
    statuses = [StatusRecord("acme", "6421000412", "", "f-11", "NUR", REFUSAL, refs[1])]
    await store.settle_send(
        [Settlement(refs[0], "accepted", "cx-1"), Settlement(refs[1], "rejected")], statuses
    )
    assert status_records(db) == [("6421000412", "NUR", REFUSAL)]
    assert fake.sends == 1


async def test_a_cut_short_settle_the_store_refuses_is_retried(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A call cut short (its handler cancelled mid-call) is settled `unknown` with an ERR
    record in a task of its own; when the store refuses that commit, it is retried until the
    store takes it, not dropped (which left the row pending until expiry)."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    store = client.app[keys.STORE]
    intent = SendIntent("acme", "f-12", ("6421000413",), "552")
    (planned,) = (await store.begin_send(intent, time.time())).to_send
    conn = writer_conn(client)
    conn.execute("PRAGMA query_only = ON")
    refs = {planned.recipient: planned.upstream_ref}
    settling.settle_cut_short(store, metrics, intent, refs, time.time() + 10)
    db = tmp_path / "bc-proxy.db"
    await asyncio.sleep(0.3)
    assert send_rows(db) == [("6421000413", "f-12", "pending")]
    conn.execute("PRAGMA query_only = OFF")
    assert await _state_becomes(db, "unknown", 5) == [("6421000413", "f-12", "unknown")]
    assert status_records(db) == [("6421000413", "ERR", UNKNOWN_OUTCOME)]
    recovered = "bc_proxy_settles_deferred_total"
    assert sample(metrics, recovered, tenant="acme", outcome="recovered") == 1


async def test_a_deferred_settle_makes_its_last_attempt_as_the_gateway_stops(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The gateway stops while a settle waits for its next retry: the settle is tried once
    more before the store closes, so the SMS that went out is recorded `accepted` rather
    than left to expiry's "outcome unknown"."""
    client = await gateway(fault_cfg(tmp_path, fake.base_url), Metrics(process=False))
    conn = read_only_as_connexus_answers(fake, client)
    assert await post(client, creds(to="6421000410", body="x", messageId="f-10")) == (204, "")
    fake.before_answer = None
    conn.execute("PRAGMA query_only = OFF")
    await client.close()  # before the first retry (0.2 s): only the drain can settle it
    assert send_rows(tmp_path / "bc-proxy.db") == [("6421000410", "f-10", "accepted")]


async def test_settle_retries_stop_before_expiry(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A store that stays read-only past the pending row's expiry horizon: the background
    settle gives up before it (expiry says `unknown`, with an ERR record, and no late settle
    may contradict that), and the row is still pending when the store comes back."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    conn = read_only_as_connexus_answers(fake, client)
    assert await post(client, creds(to="6421000409", body="x", messageId="f-9")) == (204, "")
    fake.before_answer = None
    horizon = settling.pending_expiry_seconds(TIMEOUT) - settling.EXPIRY_SAFETY_SECONDS
    await asyncio.sleep(horizon + 0.5)
    conn.execute("PRAGMA query_only = OFF")
    db = tmp_path / "bc-proxy.db"
    assert await _state_becomes(db, "accepted", 2.5) == [("6421000409", "f-9", "pending")]
    abandoned = "bc_proxy_settles_deferred_total"
    assert sample(metrics, abandoned, tenant="acme", outcome="abandoned") == 1
    assert sample(metrics, abandoned, tenant="acme", outcome="recovered") == 0


async def test_store_disk_full(fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path) -> None:
    """Database full (max_page_count at its size): sends and webhooks go on until a write
    fails; then 500 / 503, each answered 204 or 200 is kept, nothing is sent twice, and after
    space returns every retry succeeds and every messageId was sent exactly once."""
    metrics = Metrics(process=False)
    client = await gateway(fault_cfg(tmp_path, fake.base_url), metrics)
    conn = writer_conn(client)
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    answers: dict[str, int] = {}
    hooks: dict[int, int] = {}
    for i in range(400):
        answers[f"full-{i}"] = (await post(client, creds(to="6421000407", body="x" * 100,
                                                         messageId=f"full-{i}")))[0]  # fmt: skip
        hooks[i] = await webhook(client, i)
        if 500 in answers.values() and 503 in hooks.values():
            break
    assert set(answers.values()) <= {204, 500}
    assert set(hooks.values()) <= {200, 503}
    assert 500 in answers.values()
    assert 503 in hooks.values()
    db = tmp_path / "bc-proxy.db"
    kept = {legacy_id for _, legacy_id, s in send_rows(db) if s == "accepted"}
    assert {m for m, s in answers.items() if s == 204} <= kept
    assert fake.sends <= len(answers)
    assert records(db) == sum(1 for s in hooks.values() if s == 200)
    conn.execute("PRAGMA max_page_count = 1073741823")
    for m in answers:
        assert await post(client, creds(to="6421000407", body="x" * 100, messageId=m)) == (204, "")
    for i in hooks:
        assert await webhook(client, i) == 200
    assert fake.sends == len(answers)  # every messageId went upstream exactly once
    assert records(db) == len(hooks)


# -- push receivers that misbehave --------------------------------------------------------------


class Receiver:
    """A push receiver on RawHttp: ok, hang, redirect_loop, 302_to_ok, 404, 500."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.http = RawHttp(self._answer)
        self.bodies: list[tuple[str, bytes]] = []

    async def _answer(self, path: str, body: bytes, w: Writer) -> bool:
        self.bodies.append((path, body))
        mode = "ok" if path == "/elsewhere" else self.mode
        if mode == "hang":
            await asyncio.sleep(HOLD)
            return False
        if mode == "redirect_loop":
            w.write(response(302, b"", Location="/push"))
        elif mode == "302_to_ok":
            w.write(response(302, b"", Location="/elsewhere"))
        elif mode in ("404", "500"):
            w.write(response(int(mode), b"no", "text/plain"))
        else:
            w.write(response(200, b"OK", "text/plain"))
        await w.drain()
        return True


# A push answered with a redirect is a failed attempt (never followed: it would turn the POST
# into a body-less GET taken as delivered, and could point anywhere).
PUSH_FAULTS = [
    pytest.param("ok", "success", "", id="ok"),
    pytest.param("hang", "failure", "TimeoutError", id="hang"),
    pytest.param("redirect_loop", "failure", "HTTP 302", id="redirect_loop"),
    pytest.param("302_to_ok", "failure", "HTTP 302", id="302_to_ok"),
    pytest.param("404", "failure", "HTTP 404", id="404"),
    pytest.param("500", "failure", "HTTP 500", id="500"),
]


@pytest.mark.parametrize(("mode", "outcome", "error"), PUSH_FAULTS)
async def test_push_receiver_fault(
    fake: FakeConnexus, gateway: GatewayFactory, tmp_path: Path, mode: str, outcome: str, error: str
) -> None:
    """One push receiver behaviour: the push attempt's metric outcome and the record kept
    (done on success; else pending with its error and a later retry, not dead)."""
    receiver = Receiver(mode)
    await receiver.http.start()
    try:
        cfg = fault_cfg(tmp_path, fake.base_url)
        cfg["store"]["lease_seconds"] = 1
        cfg["tenants"][0]["push"] = {
            "incoming_url": f"http://127.0.0.1:{receiver.http.port}/push",
            "timeout_seconds": TIMEOUT,
            "retry_initial_seconds": 60,
        }
        metrics = Metrics(process=False)
        client = await gateway(cfg, metrics)
        assert await webhook(client, 1) == 200
        deadline = time.monotonic() + 5
        name = "bc_proxy_push_attempts_total"
        while sample(metrics, name, tenant="acme", kind="in", outcome=outcome) < 1:
            assert time.monotonic() < deadline, "no push attempt"
            await asyncio.sleep(0.02)
        with sqlite3.connect(tmp_path / "bc-proxy.db") as conn:
            row = conn.execute(
                "SELECT push_due IS NULL, push_attempts, push_error, dead FROM records"
            ).fetchone()
        if outcome == "success":
            assert row[0] == 1  # nothing more to push
        else:
            assert row[1:] == (1, error, 0)
            assert row[0] == 0  # a retry is due later
        assert receiver.bodies[0][0] == "/push"
        assert b"body=hello+1" in receiver.bodies[0][1]
        assert all(p != "/elsewhere" for p, _ in receiver.bodies)  # redirects not followed
    finally:
        await receiver.http.close()
