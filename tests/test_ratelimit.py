"""Per-tenant send rate limit: the send over the burst is 429 in the legacy one-line shape,
never reaches Connexus, is counted, and leaves other tenants alone (gateway and emulator on
loopback, real SQLite store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bc_proxy import keys
from bc_proxy.legacy.ratelimit import TokenBucket
from bc_proxy.metrics import Metrics
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Connexus, GatewayFactory, creds
from tests.sendcalls import post, quiet, sample, send_rows


def test_bucket_refills_at_its_rate() -> None:
    """A bucket of 5 at 5/s refuses the 6th take and has one token again 0.2 s later."""
    now = [100.0]
    bucket = TokenBucket(5, 5, clock=lambda: now[0])
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.2
    assert bucket.take() is True
    assert bucket.take() is False


async def test_sixth_immediate_send_is_429_and_not_sent(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], tmp_path: Path
) -> None:
    """Tenant acme at 5/s, burst 5: the 6th immediate send is 429 with one line, no upstream
    call and no sends row; tenant other (no rate) sends 10 in a row."""
    cfg = quiet(cfg)
    cfg["tenants"][0].update(send_rate_per_second=5, send_burst=5)
    other = {
        "name": "other",
        "legacy": {"user_id": "other-legacy", "password": "other-legacy-pass"},
        "connexus": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "default_from": "553",
        "senders": ["553"],
        "poll_wait_seconds": 0,
    }
    cfg["tenants"].append(other)
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    answers = [await post(client, creds(to="6421000100", body=f"m{i}")) for i in range(6)]
    assert answers[:5] == [(204, "")] * 5
    status, text = answers[5]
    assert status == 429
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert "rate limit" in text
    assert len(connexus.emu.sent) == 5
    assert len(send_rows(tmp_path / "bc-proxy.db")) == 5
    assert sample(metrics, "bc_proxy_sends_rate_limited_total", tenant="acme") == 1
    route = "/api/1/sms/out"
    labels = {"route": route, "tenant": "acme", "status": "429"}
    assert sample(metrics, "bc_proxy_legacy_requests_total", **labels) == 1
    theirs = {"userId": "other-legacy", "password": "other-legacy-pass"}
    for i in range(10):
        assert await post(client, {**theirs, "to": "6421000101", "body": f"o{i}"}) == (204, "")
    assert sample(metrics, "bc_proxy_sends_rate_limited_total", tenant="other") == 0
    assert len(connexus.emu.sent) == 15


async def test_rate_follows_the_runtime_tenants(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A rate set on the runtime's tenant (what a SIGHUP reload swaps) applies to the next
    send, and removing it lifts the limit."""
    client = await gateway(quiet(cfg))
    rt = client.app[keys.RUNTIME]
    acme = rt.tenants["acme"]
    assert await post(client, creds(to="6421000102", body="a")) == (204, "")
    rt.tenants = {"acme": acme.model_copy(update={"send_rate_per_second": 0.01, "send_burst": 1})}
    assert await post(client, creds(to="6421000102", body="b")) == (204, "")
    assert (await post(client, creds(to="6421000102", body="c")))[0] == 429
    rt.tenants = {"acme": acme}
    assert await post(client, creds(to="6421000102", body="d")) == (204, "")
    assert len(connexus.emu.sent) == 3
