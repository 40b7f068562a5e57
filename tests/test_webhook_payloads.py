"""Webhook payloads and secrets: what is usable is stored, what is not is kept verbatim and listed.

A table of odd-but-usable payloads (fields we do not use in any shape) and of unusable ones
(a field we use missing or unusable), checked by the parser and end to end through the real
gateway, its SQLite file and `bc-proxy rejected-webhooks list`; plus per-tenant secrets and
the 503 that makes Connexus retry when the store fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from bc_proxy import keys
from bc_proxy.connexus.models import REASONS, Unusable, parse_webhook
from bc_proxy.errors import StoreError
from bc_proxy.metrics import Metrics
from bc_proxy.store import DlrEvent, IngestResult, MoEvent
from tests.conftest import (
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    Connexus,
    GatewayClient,
    GatewayFactory,
)
from tests.served import run_cli

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
HANDSET = "6421000111"

# Odd but usable: the fields we use are fine, the others are in any shape or absent.
USABLE: dict[str, dict[str, Any]] = {
    "dlr-fractional-timestamp": {"type": "dlr", "messageId": "a1", "statusCode": 1,
                                 "timestamp": 1700000000.25},
    "dlr-string-timestamp": {"type": "dlr", "messageId": "a2", "statusCode": 1,
                             "timestamp": "2025-01-15 14:30:00"},
    "dlr-status-null": {"type": "dlr", "messageId": "a3", "statusCode": 2, "status": None},
    "dlr-body-null": {"type": "dlr", "messageId": "a4", "statusCode": 1, "body": None},
    "dlr-details-list": {"type": "dlr", "messageId": "a5", "statusCode": 8, "details": []},
    "dlr-integer-id": {"type": "dlr", "messageId": 1158493, "statusCode": 4},
    "dlr-extra-keys": {"type": "dlr", "messageId": "a6", "statusCode": 16, "status": "UNDELIV",
                       "details": {"smsc": None, "smscid": 5, "x": [1]}, "new": {"a": 1}},
    "mo-fractional-timestamp": {"type": "mo", "messageId": "m1", "from": "+" + HANDSET,
                                "to": "552", "body": "one", "timestamp": 1.5},
    "mo-string-timestamp": {"type": "mo", "messageId": "m2", "from": HANDSET, "to": "552",
                            "body": "two", "timestamp": "yesterday", "network": None},
    "mo-integer-numbers": {"type": "mo", "messageId": 77, "from": 6421000111, "to": 552,
                           "body": "three", "encoding": 8},
    "mo-empty-body": {"type": "mo", "messageId": "m4", "from": HANDSET, "to": "552", "body": "",
                      "relatedMessageId": {"odd": True}},
}  # fmt: skip

# Unusable: (raw body, reason category).
UNUSABLE: dict[str, tuple[bytes, str]] = {
    "bad-json": (b"{not json", "bad_json"),
    "empty": (b"", "bad_json"),
    "not-utf8": (b'{"type": "mo", "body": "\xff"}', "bad_json"),
    "array": (b"[]", "not_an_object"),
    "string": (b'"mo"', "not_an_object"),
    "unknown-type": (b'{"type": "delivery", "messageId": "1", "statusCode": 1}', "unknown_type"),
    "no-type": (b'{"messageId": "1", "statusCode": 1}', "unknown_type"),
    "escaped-type": (b'{"type": "d\\\\q\\"\\u0001", "messageId": "1"}', "unknown_type"),
    "dlr-no-id": (b'{"type": "dlr", "statusCode": 1}', "bad_message_id"),
    "dlr-empty-id": (b'{"type": "dlr", "messageId": "", "statusCode": 1}', "bad_message_id"),
    "dlr-list-id": (b'{"type": "dlr", "messageId": ["1"], "statusCode": 1}', "bad_message_id"),
    "dlr-no-status": (b'{"type": "dlr", "messageId": "1"}', "bad_status_code"),
    "dlr-text-status": (
        b'{"type": "dlr", "messageId": "1", "statusCode": "delivered"}', "bad_status_code"),
    "dlr-bool-status": (
        b'{"type": "dlr", "messageId": "1", "statusCode": true}', "bad_status_code"),
    "dlr-float-status": (
        b'{"type": "dlr", "messageId": "1", "statusCode": 1.0}', "bad_status_code"),
    "dlr-negative-status": (
        b'{"type": "dlr", "messageId": "1", "statusCode": -1}', "bad_status_code"),
    "mo-no-id": (b'{"type": "mo", "from": "+6421000111", "to": "552", "body": "x"}',
                 "bad_message_id"),
    "mo-no-from": (b'{"type": "mo", "messageId": "1", "to": "552", "body": "x"}', "bad_from"),
    "mo-plus-only-from": (
        b'{"type": "mo", "messageId": "1", "from": "+", "to": "552", "body": "x"}', "bad_from"),
    "mo-no-to": (b'{"type": "mo", "messageId": "1", "from": "+6421000111", "body": "x"}',
                 "bad_to"),
    "mo-null-body": (
        b'{"type": "mo", "messageId": "1", "from": "6421", "to": "552", "body": null}', "bad_body"),
    "mo-no-body": (b'{"type": "mo", "messageId": "1", "from": "6421", "to": "552"}', "bad_body"),
}  # fmt: skip


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


async def post(client: GatewayClient, raw: bytes, path: str = HOOK) -> tuple[int, dict[str, Any]]:
    async with client.post(path, data=raw, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


# -- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(USABLE))
def test_odd_payload_parses(name: str) -> None:
    """Each odd-but-usable payload parses to the event of the fields we use."""
    payload = USABLE[name]
    event = parse_webhook(json.dumps(payload).encode())
    assert event.message_id == str(payload["messageId"])
    if payload["type"] == "dlr":
        assert isinstance(event, DlrEvent)
        assert event.status == payload["statusCode"]
        status = payload.get("status")
        assert event.status_text == (status if isinstance(status, str) else "")
    else:
        assert isinstance(event, MoEvent)
        assert event.sender == HANDSET
        assert event.to == "552"
        assert event.body == payload["body"]
        assert event.related_id is None
        assert event.received_at == ""


def test_dlr_identity_ignores_timestamp_and_details() -> None:
    """Two reports differing only in timestamp and details parse to equal events."""
    first = {"type": "dlr", "messageId": "x", "statusCode": 1, "status": "DELIVRD"}
    second = {**first, "timestamp": 5, "details": {"smscid": "abc"}}
    assert parse_webhook(json.dumps(first).encode()) == parse_webhook(json.dumps(second).encode())
    assert parse_webhook(json.dumps(first).encode()) == DlrEvent("x", 1, "DELIVRD")


@pytest.mark.parametrize("name", list(UNUSABLE))
def test_unusable_payload_reason(name: str) -> None:
    """Each unusable payload raises Unusable with its bounded reason category."""
    raw, reason = UNUSABLE[name]
    with pytest.raises(Unusable) as caught:
        parse_webhook(raw)
    assert caught.value.reason == reason
    assert reason in REASONS


# -- end to end ---------------------------------------------------------------------------------


async def test_odd_payloads_stored(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """Every odd-but-usable payload answers 200 and becomes one record; none is rejected."""
    metrics = Metrics(CollectorRegistry(), process=False)
    client = await gateway(cfg, metrics)
    for name, payload in USABLE.items():
        status, answer = await post(client, json.dumps(payload).encode())
        assert (status, answer) == (200, {"success": True}), name
    records = await client.app[keys.STORE].rejected_webhooks()
    assert records == []
    mos = sum(1 for p in USABLE.values() if p["type"] == "mo")
    params = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
    async with client.get("/api/1/sms/queue", params=params) as resp:
        assert await resp.read() == f"inCount={mos}&statusCount=0".encode()
    dlrs = len(USABLE) - mos
    assert value(metrics, "bc_proxy_webhooks_total", type="dlr", outcome="unmatched") == dlrs
    assert value(metrics, "bc_proxy_webhooks_total", type="mo", outcome="stored") == mos


async def test_unusable_payloads_kept_and_listed(
    gateway: GatewayFactory, cfg: dict[str, Any], tmp_path: Path
) -> None:
    """Each unusable payload is 400, counted by reason, kept verbatim and listed by the CLI."""
    metrics = Metrics(CollectorRegistry(), process=False)
    client = await gateway(cfg, metrics)
    for name, (raw, reason) in UNUSABLE.items():
        status, answer = await post(client, raw)
        assert status == 400, name
        assert answer["success"] is False
        assert answer["error"].startswith(reason)
        assert "\\q" not in answer["error"]  # client text is never echoed
        assert "delivery" not in answer["error"]
    for reason in set(r for _, r in UNUSABLE.values()):
        expected = sum(1 for _, r in UNUSABLE.values() if r == reason)
        assert value(metrics, "bc_proxy_webhooks_rejected_total", reason=reason) == expected
    total = sum(
        value(metrics, "bc_proxy_webhooks_total", type=t, outcome="rejected")
        for t in ("mo", "dlr", "unknown")
    )
    assert total == len(UNUSABLE)
    kept = await client.app[keys.STORE].rejected_webhooks()
    assert sorted((r.body, r.reason) for r in kept) == sorted(UNUSABLE.values())
    await client.close()

    config_file = tmp_path / "bc-proxy.yaml"
    config_file.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, out, err = await run_cli("rejected-webhooks", "list", "--config", str(config_file))
    assert code == 0, err
    assert f"{len(UNUSABLE)} rejected webhook(s)" in err
    listed = []
    for line in out.strip().splitlines():
        _id, _when, reason, text = line.split("\t")
        listed.append((json.loads(text).encode("utf-8", "surrogateescape"), reason))
    bodies = {b for b, _ in listed}
    for raw, reason in UNUSABLE.values():
        if raw == b'{"type": "mo", "body": "\xff"}':
            assert b'{"type": "mo", "body": "\\xff"}' in bodies  # undecodable bytes escaped
        else:
            assert (raw, reason) in listed


async def test_tenant_secret_names_the_account(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A mo to an unlisted number: the tenant's on its own secret path, unmatched on the global."""
    config = json.loads(json.dumps(cfg))
    config["tenants"][0]["webhook_secret"] = "acme-own-secret-1"
    config["tenants"].append(
        {
            "name": "globex",
            "legacy": {"user_id": "globex-legacy", "password": "globex-legacy-pass"},
            "connexus": {"client_id": "cid_other", "client_secret": "csk_other"},
            "senders": ["3000"],
            "poll_wait_seconds": 0,
            "webhook_secret": "globex-own-secret-2",
        }
    )
    metrics = Metrics(CollectorRegistry(), process=False)
    client = await gateway(config, metrics)

    def mo(mid: str) -> bytes:
        return json.dumps(
            {"type": "mo", "messageId": mid, "from": HANDSET, "to": "64900000", "body": mid}
        ).encode()

    assert (await post(client, mo("g1")))[0] == 200
    assert (await post(client, mo("o1"), "/webhooks/connexus/globex-own-secret-2"))[0] == 200
    assert (await post(client, mo("o2"), "/webhooks/connexus/globex-own-secret-")) == (
        401,
        {"success": False, "error": "unknown webhook"},
    )
    assert value(metrics, "bc_proxy_webhooks_total", type="mo", outcome="unmatched") == 1
    assert value(metrics, "bc_proxy_webhooks_total", type="mo", outcome="stored") == 1
    params = {"userId": "globex-legacy", "password": "globex-legacy-pass"}
    async with client.get("/api/1/sms/in", params=params) as resp:
        assert "body=o1" in (await resp.text())
    # The unmatched one, delivered again through acme's own path: assigned to acme.
    assert (await post(client, mo("g1"), "/webhooks/connexus/acme-own-secret-1"))[0] == 200
    assert value(metrics, "bc_proxy_webhooks_total", type="mo", outcome="assigned") == 1
    params = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
    async with client.get("/api/1/sms/in", params=params) as resp:
        assert "body=g1" in (await resp.text())


async def test_store_failure_answers_503_and_the_retry_stores_once(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A StoreError while storing a usable webhook is 503; Connexus's retry stores it once."""
    client = await gateway(cfg)
    store = client.app[keys.STORE]
    real = store.add_dlr
    failures = [StoreError("disk full")]

    async def flaky(event: DlrEvent) -> IngestResult:
        if failures:
            raise failures.pop()
        return await real(event)

    store.add_dlr = flaky  # type: ignore[method-assign]
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    payload = await connexus.emu.fire_dlr("cx-unknown", 1)
    assert [s for p, s in connexus.emu.webhook_deliveries if p is payload] == [503, 200]
    store.add_dlr = real  # type: ignore[method-assign]
    assert await store.add_dlr(DlrEvent("cx-unknown", 1, "DELIVRD")) == IngestResult(
        "duplicate", None
    )
