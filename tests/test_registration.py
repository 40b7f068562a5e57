"""Verified webhook registration: configure, read back, report (log, metric, /readyz?verbose);
a mismatch or failure is retried with backoff in the background and never stops the gateway."""

from __future__ import annotations

import asyncio
import copy
import io
from typing import Any

import pytest

from bc_proxy import registration
from bc_proxy.metrics import Metrics
from tests.conftest import WEBHOOK_SECRET, Connexus, GatewayClient, GatewayFactory

PUBLIC = "https://sms-gw.example.org"
OWN_SECRET = "globex-own-secret-987"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries within the test's patience."""
    monkeypatch.setattr(registration, "BACKOFF_INITIAL", 0.05)


def registering(cfg: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out["server"]["public_url"] = PUBLIC + "/"
    out["webhook"]["register_on_start"] = True
    return out


def with_globex(cfg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    other = copy.deepcopy(out["tenants"][0])
    other.update(
        name="globex",
        legacy={"user_id": "globex-legacy", "password": "globex-pass"},
        connexus={"client_id": "cid_other", "client_secret": "csk_other"},
        senders=["3000"],
        **changes,
    )
    out["tenants"].append(other)
    return out


async def verbose(client: GatewayClient) -> dict[str, Any]:
    resp = await client.get("/readyz", params={"verbose": ""})
    assert resp.status == 200  # registration trouble never makes the replica unready
    body: dict[str, Any] = await resp.json()
    return body


async def wait_line(client: GatewayClient, tenant: str, prefix: str) -> str:
    """The tenant's /readyz?verbose registration line once it starts with `prefix`."""
    line = ""
    for _ in range(100):
        line = str((await verbose(client))["webhook_registration"].get(tenant, ""))
        if line.startswith(prefix):
            return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant}: {line!r} never started with {prefix!r}")


async def test_registration_is_read_back_and_reported(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """The webhook is set, read back, and reported verified in a log line, metric and readyz."""
    metrics = Metrics(process=False)
    client = await gateway(registering(cfg), metrics)
    line = await wait_line(client, "acme", "verified")
    assert connexus.emu.webhook_urls["cid_demo"] == f"{PUBLIC}/webhooks/connexus/{WEBHOOK_SECRET}"
    assert [r.method for r in connexus.emu.requests if r.path.endswith("/configure")] == [
        "POST",
        "GET",
    ]
    labels = {"tenant": "acme", "outcome": "verified"}
    assert metrics.registry.get_sample_value("bc_proxy_webhook_registrations_total", labels) == 1
    logged = log_stream.getvalue()
    assert '"webhook_registration"' in logged
    assert '"verified"' in logged
    assert WEBHOOK_SECRET not in logged + line


async def test_tenant_with_own_secret_registers_its_own_path(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Each account points at its own path: the global secret, or the tenant's webhook_secret."""
    client = await gateway(registering(with_globex(cfg, webhook_secret=OWN_SECRET)))
    await wait_line(client, "acme", "verified")
    await wait_line(client, "globex", "verified")
    urls = connexus.emu.webhook_urls
    assert urls["cid_demo"] == f"{PUBLIC}/webhooks/connexus/{WEBHOOK_SECRET}"
    assert urls["cid_other"] == f"{PUBLIC}/webhooks/connexus/{OWN_SECRET}"


async def test_mismatch_is_retried_until_verified(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Connexus keeping another URL is a mismatch, retried with backoff until it holds."""
    connexus.emu.configure_ignored = True
    connexus.emu.webhook_url = "https://elsewhere.example/hook"
    metrics = Metrics(process=False)
    client = await gateway(registering(cfg), metrics)
    line = await wait_line(client, "acme", "mismatch")
    assert "another URL" in line
    assert "retrying" in line
    connexus.emu.configure_ignored = False
    await wait_line(client, "acme", "verified")
    labels = {"tenant": "acme", "outcome": "mismatch"}
    assert (
        metrics.registry.get_sample_value("bc_proxy_webhook_registrations_total", labels) or 0
    ) >= 1


async def test_upstream_failure_is_not_fatal(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """configure failing is an error line, the gateway serves meanwhile, and a retry succeeds."""
    connexus.emu.fail_next = [500, 503]
    client = await gateway(registering(cfg))
    assert (await client.get("/healthz")).status == 200
    await wait_line(client, "acme", "verified")
    statuses = [r.status for r in connexus.emu.requests if r.path.endswith("/configure")]
    assert statuses[:2] == [500, 503]


async def test_pull_tenant_registers_nothing(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A tenant in pull mode needs no webhook: its account's configure is never called."""
    config = registering(with_globex(cfg, inbound={"mode": "pull", "pull_interval_seconds": 60}))
    client = await gateway(config)
    await wait_line(client, "acme", "verified")
    assert (await verbose(client))["webhook_registration"]["globex"].startswith("pull mode")
    assert "cid_other" not in connexus.emu.webhook_urls


async def test_no_registration_without_register_on_start(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Without register_on_start nothing is configured and readyz lists no registration."""
    client = await gateway(cfg)
    await asyncio.sleep(0.2)
    assert (await verbose(client))["webhook_registration"] == {}
    assert not [r for r in connexus.emu.requests if r.path.endswith("/configure")]
