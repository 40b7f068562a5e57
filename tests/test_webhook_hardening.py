"""Webhook hardening on top of the secret path: the source allowlist (403 before the body is
read) and the HMAC-SHA256 body signature (401), each refusal stored nothing and counted; the
gateway runs on 127.0.0.1 with a real SQLite store."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from bc_proxy import cli, keys, log
from bc_proxy.config import parse
from bc_proxy.errors import ConfigError
from bc_proxy.metrics import Metrics
from tests.conftest import WEBHOOK_SECRET, GatewayClient, GatewayFactory, config_dict
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.sendcalls import sample
from tests.served import write_config
from tests.test_inbound import db_count, mo

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
KEY = "hmac-key-for-tests-0123"
HEADER = "X-Connexus-Signature"


def body(n: int = 1) -> bytes:
    """A valid incoming-SMS webhook body, as bytes."""
    return json.dumps(mo(f"hm-{n}", "+6421000200", "552", "hello")).encode()


def sign(raw: bytes, key: str = KEY) -> str:
    """The hex HMAC-SHA256 of `raw`."""
    return hmac.new(key.encode(), raw, hashlib.sha256).hexdigest()


async def post(client: GatewayClient, raw: bytes, headers: dict[str, str] | None = None) -> int:
    """POST raw bytes to the webhook path; the status."""
    h = {"Content-Type": "application/json", **(headers or {})}
    async with client.post(HOOK, data=raw, headers=h) as resp:
        await resp.read()
        return resp.status


@pytest.mark.parametrize(
    ("sources", "expected"),
    [(["10.0.0.0/8"], 403), (["192.0.2.1/32", "::1/128"], 403), (["127.0.0.0/8"], 200)],
)
async def test_source_allowlist(
    gateway: GatewayFactory, cfg: dict[str, Any], sources: list[str], expected: int
) -> None:
    """A peer outside webhook.allowed_sources gets 403 and stores nothing; inside, 200."""
    cfg["webhook"]["allowed_sources"] = sources
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    assert await post(client, body()) == expected
    stored = db_count(cfg, "records")
    assert stored == (1 if expected == 200 else 0)
    refused = sample(metrics, "bc_proxy_webhooks_refused_total", reason="source")
    assert refused == (1 if expected == 403 else 0)


async def test_source_refused_before_the_body_is_read(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A refused source announcing a 60 KB body and sending none is answered 403 at once."""
    cfg["webhook"]["allowed_sources"] = ["10.0.0.0/8"]
    client = await gateway(cfg)
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 60000\r\n\r\n".encode()
    )
    await writer.drain()
    async with asyncio.timeout(2):  # the read timeout is 15 s: a body wait would fail here
        status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 403")
    writer.close()


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        ("good", 200),
        ("upper", 200),
        (None, 401),
        ("", 401),
        ("wrong-key", 401),
        ("other-body", 401),
        ("truncated", 401),
    ],
)
async def test_hmac_signature(
    gateway: GatewayFactory, cfg: dict[str, Any], signature: str | None, expected: int
) -> None:
    """Only the hex HMAC-SHA256 of the exact raw body under hmac_secret is accepted (any
    case); missing, empty, other key, other body or truncated is 401 and stores nothing."""
    cfg["webhook"].update(hmac_secret=KEY, hmac_header=HEADER)
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    raw = body()
    values = {
        "good": sign(raw),
        "upper": sign(raw).upper(),
        "": "",
        "wrong-key": sign(raw, "another-key-0123"),
        "other-body": sign(body(2)),
        "truncated": sign(raw)[:-2],
    }
    headers = {} if signature is None else {HEADER: values[signature]}
    assert await post(client, raw, headers) == expected
    assert db_count(cfg, "records") == (1 if expected == 200 else 0)
    refused = sample(metrics, "bc_proxy_webhooks_refused_total", reason="signature")
    assert refused == (1 if expected == 401 else 0)


async def test_each_webhook_is_checked_against_its_own_body(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """One gateway checks many signed webhooks: each signature is of its own body alone (the
    key's HMAC state is copied per webhook, never fed the bodies before it)."""
    cfg["webhook"].update(hmac_secret=KEY, hmac_header=HEADER)
    client = await gateway(cfg)
    for n in range(1, 4):
        raw = body(n)
        assert await post(client, raw, {HEADER: sign(raw)}) == 200
    assert await post(client, body(9), {HEADER: sign(body(8))}) == 401
    assert db_count(cfg, "records") == 3


async def test_a_signature_header_of_bytes_no_text_is_401_not_500(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A signature header whose bytes are not UTF-8 (aiohttp hands them on as surrogates)
    is a request not signed: 401, nothing stored; it was a 500."""
    cfg["webhook"].update(hmac_secret=KEY, hmac_header=HEADER)
    client = await gateway(cfg)
    raw = body()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + HEADER.encode() + b": \xff\xfe" + sign(raw).encode()[2:] + b"\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(raw) + raw
    )  # fmt: skip
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"401", answer[:200]
    assert db_count(cfg, "records") == 0


async def test_signature_checked_after_the_path_secret(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A good signature does not stand in for the path secret: a wrong path is still 401."""
    cfg["webhook"].update(hmac_secret=KEY)
    client = await gateway(cfg)
    raw = body()
    async with client.post(
        "/webhooks/connexus/not-the-secret-000", data=raw, headers={HEADER: sign(raw)}
    ) as resp:
        assert resp.status == 401
    assert db_count(cfg, "records") == 0


async def test_both_checks_together(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """Allowlist and signature both on: a loopback peer with a signed body is stored."""
    cfg["webhook"].update(hmac_secret=KEY, allowed_sources=["127.0.0.1/32"])
    client = await gateway(cfg)
    raw = body()
    assert await post(client, raw, {HEADER: sign(raw)}) == 200
    assert await post(client, raw, {HEADER: sign(raw)}) == 200  # duplicate: 200 again
    assert db_count(cfg, "records") == 1


def test_serve_scrubs_webhook_secrets_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` hands the log scrubber the HMAC key and every tenant's own webhook secret."""
    cfg = config_dict(tmp_path, "http://127.0.0.1:9/api/connexus")
    cfg["webhook"]["hmac_secret"] = KEY
    cfg["tenants"][0]["webhook_secret"] = "tenant-own-secret-0123"
    config = write_config(tmp_path / "bc-proxy.yaml", cfg)
    handed: list[str] = []

    def setup(level: str, fmt: str, secrets: list[str], **kw: Any) -> None:
        handed.extend(secrets)
        raise ConfigError("stop here")  # nothing of serve runs past the logging set-up

    monkeypatch.setattr(log, "setup", setup)
    assert cli.main(["serve", "--config", str(config)]) == 2
    assert KEY in handed
    assert "tenant-own-secret-0123" in handed
    assert WEBHOOK_SECRET in handed


@pytest.mark.parametrize("value", ["", "short"])
def test_empty_or_short_hmac_secret_is_a_config_error(tmp_path: Path, value: str) -> None:
    """An empty (unset-but-empty ${VAR}) or short webhook.hmac_secret is refused, naming it."""
    cfg = config_dict(tmp_path, "http://127.0.0.1:9/api/connexus")
    cfg["webhook"]["hmac_secret"] = value
    with pytest.raises(ConfigError, match="hmac_secret"):
        parse(cfg)


@pytest.mark.postgres
async def test_an_event_postgresql_cannot_hold_is_refused_and_kept(
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    pg_url: str,  # noqa: F811
) -> None:
    """An incoming SMS whose text holds a NUL, which PostgreSQL cannot store: not 503 (Connexus
    would retry it, be refused the same way and drop it) but 400, with the payload kept in
    the rejected webhooks; the next webhook is stored as usual."""
    cfg["store"]["url"] = pg_url
    cfg["upstream"]["mo_query_interval_seconds"] = 0
    client = await gateway(cfg)
    hook = f"/webhooks/connexus/{WEBHOOK_SECRET}"
    bad = mo("nul-1", "6421000001", "552", "a\u0000b")
    resp = await client.post(hook, data=json.dumps(bad))
    assert resp.status == 400
    assert "store_refused" in await resp.text()
    [kept] = await client.app[keys.STORE].rejected_webhooks()
    assert (kept.reason, json.loads(kept.body)["messageId"]) == ("store_refused", "nul-1")
    ok = mo("ok-1", "6421000001", "552", "fine")
    assert (await client.post(hook, data=json.dumps(ok))).status == 200
