"""Logs that explain failures: the request id on every line of a request, echoed and sent
upstream; warnings with their cause; start and stop lines; phone numbers masked by shape."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

from bc_proxy import access_log, log
from bc_proxy.log import mask_phones, new_request_id
from tests.conftest import WEBHOOK_SECRET, Connexus, GatewayFactory, creds, with_tenant


@contextlib.contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """The request id bound as bc_proxy/edge.py binds it for the request a route handles."""
    token = log.REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        log.REQUEST_ID.reset(token)

OUT = "/api/1/sms/out"


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every JSON log line written so far."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


async def test_upstream_failure_warns_with_cause_and_the_echoed_request_id(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A send Connexus answers 500 logs a warning naming the cause, carrying the request id
    the client received in X-Request-Id; the request line carries it too."""
    client = await gateway(cfg)
    connexus.emu.fail_next = [500]
    resp = await client.post(OUT, data=creds(to="6421000001", body="hi"))
    assert resp.status == 500
    rid = resp.headers["X-Request-Id"]
    assert rid
    mine = [e for e in lines(log_stream) if e.get("request_id") == rid]
    warnings = [e for e in mine if e["level"] == "warning"]
    assert warnings, mine
    assert any("cause" in e and e["cause"] for e in warnings)
    assert any(e["event"] == "request" and e["status"] == 500 for e in mine)


async def test_timeout_warns_with_cause(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A send Connexus never answers in time logs an upstream_timeout warning for its request."""
    cfg = {**cfg, "upstream": {**cfg["upstream"], "timeout_seconds": 0.3}}
    client = await gateway(cfg)
    await client.post(OUT, data=creds(to="6421000001", body="warm the token"))
    connexus.emu.latency = 1.0
    resp = await client.post(OUT, data=creds(to="6421000002", body="slow"))
    assert resp.status == 500
    rid = resp.headers["X-Request-Id"]
    events = {e["event"] for e in lines(log_stream) if e.get("request_id") == rid}
    assert "upstream_timeout" in events


async def test_incoming_request_id_is_echoed_and_sent_upstream(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A sane incoming X-Request-Id is echoed, bound to the log line and sent to Connexus."""
    client = await gateway(cfg)
    resp = await client.post(
        OUT, data=creds(to="6421000001", body="hi"), headers={"X-Request-Id": "abc-123.x"}
    )
    assert resp.status == 204
    assert resp.headers["X-Request-Id"] == "abc-123.x"
    sent = connexus.emu.sms_out_requests()[-1]
    sent_headers = {k.lower(): v for k, v in sent.headers.items()}
    assert sent_headers.get("x-request-id") == "abc-123.x"
    assert any(e.get("request_id") == "abc-123.x" for e in lines(log_stream))


async def test_insane_request_id_is_replaced(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """An X-Request-Id with spaces or over 64 characters is replaced by a generated one."""
    client = await gateway(cfg)
    for bad in ("has space", "x" * 65, 'quote"d'):
        resp = await client.get("/api/1/sms/queue", params=creds(), headers={"X-Request-Id": bad})
        assert resp.headers["X-Request-Id"] != bad
        assert len(resp.headers["X-Request-Id"]) == 16


async def test_every_response_carries_a_request_id(
    gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """Answers of routes, of streamed long-polls and of unknown paths (404) carry an id; the
    404 is logged with the client address and without its path."""
    client = await gateway(with_tenant(cfg, poll_wait_seconds=0))
    for path in ("/healthz", "/api/1/sms/in", "/nowhere/secret-ish"):
        resp = await client.get(path, params=creds())
        assert resp.headers.get("X-Request-Id"), path
    hook = await client.post(
        f"/webhooks/connexus/{WEBHOOK_SECRET}",
        json={"type": "mo", "messageId": "m-1", "from": "+6421000009", "to": "552", "body": "x"},
    )
    assert hook.headers.get("X-Request-Id")
    handed = await client.get("/api/1/sms/in", params=creds())  # prepared inside the handler
    assert handed.status == 200
    assert handed.headers.get("X-Request-Id")
    unmatched = [e for e in lines(log_stream) if e.get("route") == "unmatched"]
    assert unmatched
    assert unmatched[0]["status"] == 404
    assert unmatched[0]["client"] == "127.0.0.1"
    assert "secret-ish" not in log_stream.getvalue()


async def test_401_line_names_the_client(
    gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """A refused login's request line carries the client address."""
    client = await gateway(cfg)
    resp = await client.post(OUT, data={"userId": "nobody", "password": "nope", "to": "1"})
    assert resp.status == 401
    refused = [e for e in lines(log_stream) if e.get("status") == 401]
    assert refused
    assert refused[0]["client"] == "127.0.0.1"


async def test_start_and_stop_lines(
    gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """Start-up logs version, listen address, tenants, store (no credentials), durability and
    workers; clean-up logs a stop line."""
    client = await gateway(cfg)
    started = [e for e in lines(log_stream) if e["event"] == "started"]
    assert len(started) == 1
    line = started[0]
    assert line["version"]
    assert line["listen"]
    assert line["tenants"] == ["acme"]
    assert line["store"].startswith("sqlite ")
    assert line["durability"] == "no-fsync"
    assert line["workers"] == 1
    await client.close()
    assert [e for e in lines(log_stream) if e["event"] == "stopped"]


def test_phone_numbers_masked_in_every_string_value() -> None:
    """A phone number inside free text, a list or an exception is masked; ids stay readable."""
    stream = io.StringIO()
    log.setup("info", "json", (), stream=stream)
    logger = log.get_logger("bc_proxy.test")
    logger.warning(
        "probe",
        error="Invalid number +6421234567 for send",
        numbers=["6421000001", "ok"],
        cause=ValueError("to=64211234567"),
        request_id="a1234567890b",
        message_id="legacy-msg-77",
        when="2026-11-29T18:00:00Z",
    )
    text = stream.getvalue()
    for raw in ("6421234567", "6421000001", "64211234567"):
        assert raw not in text
    event = json.loads(text.splitlines()[0])
    assert event["error"] == "Invalid number +*******567 for send"
    assert event["request_id"] == "a1234567890b"
    assert event["message_id"] == "legacy-msg-77"
    assert event["when"] == "2026-11-29T18:00:00Z"


def test_mask_rule_boundaries() -> None:
    """Runs of 7-15 digits standing alone are masked; shorter runs and digits glued to letters
    (hex ids) are not."""
    assert mask_phones("sender 552 port 8080") == "sender 552 port 8080"
    assert mask_phones("n=1234567") == "n=****567"
    assert mask_phones("id deadbeef12345678") == "id deadbeef12345678"
    assert mask_phones("x" + "1" * 16) == "x" + "1" * 16
    assert mask_phones("to=6421234567,+6427000111") == "to=*******567,+*******111"
    assert mask_phones("id 1234 x") == "id 1234 x"


def test_generated_request_ids_are_never_masked() -> None:
    """A generated request id has no digit, so the phone mask can never hide it."""
    for _ in range(200):
        rid = new_request_id(None)
        assert mask_phones(rid) == rid
        assert len(rid) == 16


def test_access_line_is_the_line_the_structlog_chain_renders() -> None:
    """The render-once access line has the keys, order, values and timestamp format of the
    same fields logged through structlog's chain and the stdlib formatter; secrets and phone
    numbers are scrubbed in it exactly as there; an incoming id is kept, not replaced."""
    stream = io.StringIO()
    log.setup("info", "json", ["hunter2-secret"], stream=stream)
    fields: dict[str, Any] = {
        "tenant": "acme",
        "route": "/api/1/sms/out",
        "method": "POST",
        "status": 401,
        "duration_ms": 1.25,
        "client": "x hunter2-secret 6421234567",
    }
    with request_context("rid-1"):
        access_log.access(dict(fields))
        log.get_logger("bc_proxy.http").info("request", **fields)
    access_log.access({"request_id": "theirs", "route": "unmatched", "status": 404})
    fast, chained, unmatched = lines(stream)
    assert list(fast) == list(chained)
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {
        k: v for k, v in chained.items() if k != "timestamp"
    }
    assert fast["client"] == "x *** *******567"
    assert fast["request_id"] == "rid-1"
    assert len(fast["timestamp"]) == len(chained["timestamp"])
    assert fast["timestamp"][:16] == chained["timestamp"][:16]
    assert fast["timestamp"].endswith("Z")
    assert unmatched["request_id"] == "theirs"
    assert list(unmatched) == ["request_id", "route", "status", "event", "level", "timestamp"]


def test_access_line_text_is_json_dumps_text() -> None:
    """The access line's encoder, built once, writes what `json.dumps(..., default=repr)`
    writes: its separators, non-ASCII escaped, None, nested values, and the repr of a value
    JSON cannot hold."""

    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    stream = io.StringIO()
    log.setup("info", "json", [], stream=stream)
    access_log.access({"tenant": 'f\u00fcr "x"', "n": None, "list": [1, 2.5, "a"], "odd": Odd()})
    raw = stream.getvalue().splitlines()[-1]
    parsed = json.loads(raw)
    assert raw == json.dumps(parsed)
    assert "\\u00fc" in raw
    assert parsed["odd"] == "<odd>"
    assert (parsed["n"], parsed["list"]) == (None, [1, 2.5, "a"])


def test_a_routed_requests_line_is_the_line_of_its_fields() -> None:
    """`access_request`, which renders a tenant, route and method once, writes the text that
    `access` writes for the same fields, and the chain's line: secrets, phone-shaped values and
    non-ASCII scrubbed and escaped alike, with a request id bound or none, on the first line
    and from memory; a secret a reload adds is scrubbed from a head rendered before it."""
    stream = io.StringIO()
    log.setup("info", "json", ["hunter2-secret"], stream=stream)
    ts = re.compile(r'"timestamp": "[^"]*"')

    def texts(n: int) -> list[str]:
        return [ts.sub('"timestamp": "T"', t) for t in stream.getvalue().splitlines()[-n:]]

    cases = [
        ("acme", "/api/1/sms/out", "POST", 204, 1.25, "rid-1"),
        ("t hunter2-secret", "/r\u00fcte", "6421234567", 401, 0.5, None),
        ("acme", "/api/1/sms/out", "POST", 500, 12.0, "6421234568"),  # a head from memory
    ]
    for tenant, route, method, status, duration, rid in cases:
        fields = {"tenant": tenant, "route": route, "method": method, "status": status}
        fields["duration_ms"] = duration
        with contextlib.ExitStack() as stack:
            if rid is not None:
                stack.enter_context(request_context(rid))
            access_log.access_request(tenant, route, method, status, duration)
            access_log.access(dict(fields))
            log.get_logger("bc_proxy.http").info("request", **fields)
        fast, generic, chained = texts(3)
        assert fast == generic
        assert json.loads(fast) == json.loads(chained)
        assert list(json.loads(fast)) == list(json.loads(chained))
    assert json.loads(texts(3)[0])["request_id"] == "*******568"
    assert json.loads(stream.getvalue().splitlines()[3])["tenant"] == "t ***"
    log.add_secrets(["acme"])
    access_log.access_request("acme", "/api/1/sms/out", "POST", 204, 1.0)
    assert json.loads(texts(1)[0])["tenant"] == "***"


def test_access_line_values_seen_before_are_scrubbed_as_the_first_time() -> None:
    """The access line remembers how it scrubbed a recurring value (a tenant, a route): the
    second line is the chain's line too, a client's phone-shaped request id is masked on every
    line, and a secret a reload adds is scrubbed from a value remembered before it."""
    stream = io.StringIO()
    year = f"{time.gmtime().tm_year}-"  # a secret our own clock shows (left alone by both)
    log.setup("info", "json", ["hunter2-secret", year], stream=stream)
    fields = {
        "tenant": "t hunter2-secret",
        "route": "/api/1/sms/out",
        "to": "021 555 1234",  # a number key: masked whatever its shape
        "status": 204,
    }
    for rid in ("6421234567", "6421234568"):
        with request_context(rid):
            access_log.access(dict(fields))
            log.get_logger("bc_proxy.http").info("request", **fields)
    first, chained1, second, chained2 = lines(stream)
    for fast, chained in ((first, chained1), (second, chained2)):
        assert {k: v for k, v in fast.items() if k != "timestamp"} == {
            k: v for k, v in chained.items() if k != "timestamp"
        }
    assert second["tenant"] == "t ***"
    assert second["to"] == "*** *** *234"
    assert (first["request_id"], second["request_id"]) == ("*******567", "*******568")
    assert second["timestamp"].startswith(year)
    assert chained2["timestamp"].startswith(year)
    access_log.access({"tenant": "t reloaded-secret", "status": 204})
    log.add_secrets(["reloaded-secret"])
    access_log.access({"tenant": "t reloaded-secret", "status": 204})
    before, after = lines(stream)[-2:]
    assert before["tenant"] == "t reloaded-secret"  # not yet a secret when it was logged
    assert after["tenant"] == "t ***"


def test_access_line_follows_the_level_and_the_console_format() -> None:
    """At level warning no access line is written; with console output it goes through the
    console renderer (not JSON)."""
    stream = io.StringIO()
    log.setup("warning", "json", [], stream=stream)
    access_log.access({"route": "/x", "status": 204})
    assert stream.getvalue() == ""
    log.setup("info", "console", [], stream=stream)
    access_log.access({"route": "/x", "status": 204})
    text = stream.getvalue()
    assert "request" in text
    assert "/x" in text
    assert not text.startswith("{")
