"""Pull mode: a tenant without a public URL gets its replies and delivery reports by fetching
Connexus mo/query, sms/in and sms/status; the emulator serves the Bulletin-compatible polls."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from bc_proxy import keys, pull
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.connexus.models import parse_webhook, webhook_body
from bc_proxy.metrics import Metrics
from bc_proxy.pull import (
    dlr_from_record,
    inverse_status_map,
    loggable_body,
    mo_from_record,
)
from bc_proxy.store import DlrEvent, MoEvent
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    WEBHOOK_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
    writer_conn,
)

HANDSET = "6421000222"
PULL = {"mode": "pull", "pull_interval_seconds": 0.1}
BEARERLESS = {"userId": "demo@example.org", "password": "demo-password"}
SLOW_ANSWER = 0.5  # seconds an sms/status record spends on its way back (slow_connexus)


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


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `condition()` holds (or fail after `within` seconds)."""
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


def status_polls(connexus: Connexus) -> int:
    return sum(r.path.endswith("/sms/status") for r in connexus.emu.requests)


def stored_reports(db: Path) -> list[str]:
    """The legacy ids of the status records in a (stopped) gateway's SQLite file."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT in_reply_to FROM records WHERE kind = 'status' ORDER BY id")
        return [r[0] for r in rows]


def log_events(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == event]


@pytest.fixture
async def slow_connexus(aiohttp_server: AiohttpServer) -> Connexus:
    """The emulator, whose sms/status answers leave SLOW_ANSWER seconds after the record was
    consumed (a slow network back from Connexus)."""
    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET})

    @web.middleware
    async def late(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if request.path.endswith("/sms/status") and response.status == 200:
            await asyncio.sleep(SLOW_ANSWER)
        return response

    app = create_emulator_app(emu)
    app.middlewares.append(late)
    return Connexus(emu, await aiohttp_server(app, host="127.0.0.1"))


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


@pytest.mark.parametrize(
    ("where", "status_map", "code", "legacy"),
    [
        ("global", {16: "NRCV"}, 16, "NRCV"),  # as config/bc-proxy.example.yaml
        ("tenant", {4: "INF"}, 4, "INF"),  # as the example's tenant
        ("none", {}, 2, "NRCV"),
    ],
)
async def test_pulled_reports_follow_the_configured_status_map(
    connexus: Connexus,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    where: str,
    status_map: dict[int, str],
    code: int,
    legacy: str,
) -> None:
    """Connexus renders sms/status records by its own (Bulletin's) table: undeliverable (16) is
    NUR there. The gateway reads it back by that table and renders it by the configured map,
    as a webhook's report: NRCV under the example config's `16: NRCV`, not ERR (the tenant's
    map, inverted, had no code for NUR), and INF for QUEUED under a tenant's `4: INF`."""
    if where == "global":
        cfg["status_map"] = status_map
    elif where == "tenant":
        cfg["tenants"][0]["status_map"] = status_map
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    await send(client, f"LEG-{code}")
    await connexus.emu.report(connexus.emu.sent[-1], code)
    record = await poll_until(client, "status")
    assert (record["statusCode"], record["inReplyToId"], record["error"]) == (
        legacy,
        f"LEG-{code}",
        "",
    )
    await drained(connexus)
    assert (await client.get("/api/1/sms/status", params=creds())).status == 204  # one record


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


@pytest.mark.parametrize(
    "event",
    [
        DlrEvent("m-1", 1, ""),
        DlrEvent("m-2", 0, "EXPIRED"),
        DlrEvent("1234567", 4, ""),
        DlrEvent("0123456", 4, ""),
        MoEvent("7", "6421000222", "552", "Yes \u00e9", "m-1"),
        MoEvent("8", "6421000222", "552", "", None),
    ],
)
def test_webhook_body_is_the_same_event(event: DlrEvent | MoEvent) -> None:
    """The re-injectable bodies of a pulled event parse, as a webhook, into that event."""
    assert parse_webhook(json.dumps(webhook_body(event)).encode()) == event
    assert parse_webhook(json.dumps(loggable_body(event)).encode()) == event


async def test_report_held_while_store_refuses_is_stored_once_when_back(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A report pulled while the store refuses writes is held and retried with nothing else
    fetched meanwhile, and stored exactly once when the store is back."""
    cfg["tenants"][0]["inbound"] = PULL
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    await send(client, "LEG-3")
    await send(client, "LEG-4")
    first, second = connexus.emu.sent[-2:]
    conn = writer_conn(client)
    conn.execute("PRAGMA query_only = ON")
    await connexus.emu.report(first, 1)
    await connexus.emu.report(second, 1)
    await until(lambda: connexus.emu.unread("status", CLIENT_ID) == 1)  # the first is held
    polls = status_polls(connexus)
    await asyncio.sleep(1.2)  # a dozen pull intervals; store attempts at 0, 0.5 s (next 1.5 s)
    assert status_polls(connexus) == polls  # no further record asked for while one is held
    assert connexus.emu.unread("status", CLIENT_ID) == 1
    conn.execute("PRAGMA query_only = OFF")
    assert (await poll_until(client, "status"))["inReplyToId"] == "LEG-3"
    assert (await poll_until(client, "status"))["inReplyToId"] == "LEG-4"
    await drained(connexus)
    assert (await client.get("/api/1/sms/status", params=creds())).status == 204
    failures = log_events(log_stream, "pulled_record_store_failed")
    assert [e["retry_in_s"] for e in failures[:2]] == [0.5, 1.0]  # growing pauses
    assert all(e["level"] == "error" and e["source"] == "sms_status" for e in failures)
    assert not any({"from", "to", "body", "reinject"} & set(e) for e in failures)
    labels = {"tenant": "acme", "source": "sms_status", "outcome": "error"}
    assert metrics.registry.get_sample_value("bc_proxy_pulls_total", labels) == len(failures)


async def test_shutdown_stores_a_report_still_on_its_way(
    slow_connexus: Connexus, gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A shutdown while a consumed sms/status record is on its way back stores it first."""
    await shut_down_with_a_report_on_its_way(slow_connexus, gateway, tmp_path, "LEG-5")
    assert stored_reports(tmp_path / "bc-proxy.db") == ["LEG-5"]


async def shut_down_with_a_report_on_its_way(
    slow_connexus: Connexus, gateway: GatewayFactory, tmp_path: Path, legacy_id: str, **server: Any
) -> None:
    """A pull gateway sends, its report is consumed from sms/status, and the gateway shuts
    down while the answer is on its way back."""
    cfg = config_dict(tmp_path, slow_connexus.base_url, **server)
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    emu = slow_connexus.emu
    await send(client, legacy_id)
    await emu.report(emu.sent[-1], 1)
    await until(lambda: emu.unread("status", CLIENT_ID) == 0)  # consumed, answer under way
    await client.close()


async def test_shutdown_with_store_refusing_logs_the_report_to_reinject(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A report the store still refuses at shutdown gets one last attempt, then an error line
    whose webhook body, POSTed by an operator, stores it."""
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    await send(client, "LEG-6")
    conn = writer_conn(client)
    conn.execute("PRAGMA query_only = ON")
    await connexus.emu.report(connexus.emu.sent[-1], 1)
    await until(lambda: connexus.emu.unread("status", CLIENT_ID) == 0)
    await asyncio.sleep(0.2)  # its first store attempt has failed
    await client.close()
    lost = log_events(log_stream, "pulled_record_not_stored")
    assert len(lost) == 1, "the report left no trace"
    assert lost[0]["level"] == "error"
    attempts = log_events(log_stream, "pulled_record_store_failed")
    assert attempts[-1]["retry_in_s"] is None  # the last attempt, at stop
    assert lost[0]["tenant"] == "acme"
    again = await gateway(cfg)  # the operator's re-injection, once the store is back
    url = f"/webhooks/connexus/{WEBHOOK_SECRET}"
    assert (await again.post(url, data=json.dumps(lost[0]["reinject"]))).status == 200
    assert (await poll_until(again, "status"))["inReplyToId"] == "LEG-6"


async def test_unusable_pulled_record_is_kept_with_rejected_webhooks(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A pulled record we cannot use is kept verbatim in the rejected-webhooks table."""
    cfg["tenants"][0]["inbound"] = PULL
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    await connexus.emu.fire_dlr("", 1)  # a report naming no message
    store = client.app[keys.STORE]
    await until(lambda: not connexus.emu.unread("status", None))
    await drained(connexus)
    [kept] = await store.rejected_webhooks()
    assert kept.reason == "sms_status_unusable"
    assert dict(parse_qsl(kept.body.decode(), keep_blank_values=True))["inReplyToId"] == ""
    labels = {"reason": "sms_status_unusable"}
    assert metrics.registry.get_sample_value("bc_proxy_webhooks_rejected_total", labels) == 1


async def test_a_report_the_store_refuses_alone_is_kept_and_the_round_goes_on(
    connexus: Connexus,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store that takes other writes but refuses one pulled report for good (a row it can
    never hold) keeps it with the rejected webhooks after a few attempts, and the tenant's
    next records are pulled and stored: one bad record does not stop the tenant's traffic."""
    monkeypatch.setattr(pull, "STORE_RETRY_FIRST", 0.01)
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    await send(client, "LEG-7")
    await send(client, "LEG-8")
    first, second = connexus.emu.sent[-2:]
    conn = writer_conn(client)
    key = f"dlr:{connexus.emu.report_id(first)}:1"
    conn.execute(
        "CREATE TEMP TRIGGER refuse_one BEFORE INSERT ON records "
        f"WHEN NEW.event_key = '{key}' BEGIN SELECT RAISE(ABORT, 'never fits'); END"
    )
    await connexus.emu.report(first, 1)
    await connexus.emu.report(second, 1)
    assert (await poll_until(client, "status"))["inReplyToId"] == "LEG-8"
    [kept] = await client.app[keys.STORE].rejected_webhooks()
    assert kept.reason == "sms_status_refused"
    assert parse_webhook(kept.body) == DlrEvent(connexus.emu.report_id(first), 1, "")


async def test_an_incoming_sms_the_store_refuses_at_shutdown_is_left_to_the_sweep(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """An incoming SMS still refused at shutdown is logged by its id only: its numbers would
    come out of the log masked, and re-injected so they would be stored wrong. The mo/query
    sweep of the next start stores it."""
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    conn = writer_conn(client)
    conn.execute("PRAGMA query_only = ON")
    await connexus.emu.fire_mo(HANDSET, "552", "call me on 6421555888", deliver=False)
    await until(lambda: connexus.emu.unread("in", CLIENT_ID) == 0)
    await asyncio.sleep(0.2)  # its first store attempt has failed
    await client.close()
    [lost] = log_events(log_stream, "pulled_record_not_stored")
    assert lost["source"] == "sms_in"
    assert lost["recovered_by"] == "the mo/query sweep"
    assert "reinject" not in lost
    again = await gateway(cfg)
    record = await poll_until(again, "in")
    assert (record["from"], record["body"]) == (HANDSET, "call me on 6421555888")


async def test_a_fetch_cut_short_at_shutdown_leaves_a_trace(
    slow_connexus: Connexus, gateway: GatewayFactory, tmp_path: Path, log_stream: io.StringIO
) -> None:
    """A record whose answer is still on its way when the shutdown's grace ends (half of a
    0.4 s shutdown timeout, the answer 0.5 s away) cannot be stored: an error line says a
    fetch was abandoned, so the operator knows a record Connexus handed out may be missing."""
    await shut_down_with_a_report_on_its_way(
        slow_connexus, gateway, tmp_path, "LEG-9", shutdown_timeout_seconds=0.4
    )
    assert stored_reports(tmp_path / "bc-proxy.db") == []
    [abandoned] = log_events(log_stream, "pulled_fetch_abandoned")
    assert (abandoned["level"], abandoned["tenant"]) == ("error", "acme")


async def test_an_unusable_record_the_store_cannot_keep_is_logged_with_numbers_masked(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A pulled record we cannot use, with the store refusing writes too, is logged as its
    fields: the log's scrubber masks the handset numbers in them (form-encoded, "%2B64..." it
    would not have recognised)."""
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    writer_conn(client).execute("PRAGMA query_only = ON")
    # An incoming SMS to no number: unusable, and its sender's number in the record.
    await connexus.emu.fire_mo("+6421000777", "", "hi", deliver=False)
    await until(lambda: not connexus.emu.unread("in", None))
    await until(lambda: bool(log_events(log_stream, "pulled_record_unusable")))
    writer_conn(client).execute("PRAGMA query_only = OFF")
    [line] = log_events(log_stream, "pulled_record_unusable")
    assert line["source"] == "sms_in"
    record = line["record"]
    assert isinstance(record, dict)
    assert record["from"] != "6421000777"
    assert "*" in record["from"]
    assert "6421000777" not in log_stream.getvalue()
