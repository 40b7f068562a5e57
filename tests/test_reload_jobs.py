"""A config reload reconciles the per-tenant jobs with the tenants in force: webhook
registration (`register_on_start`) for an added or re-keyed account and none for a removed one;
pull loops started for a tenant that newly pulls and stopped (its record in flight stored
once) for one removed or back to webhooks; no Connexus call without a tenant's credentials;
and a restart-only change is named by every reload until a restart."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from bc_proxy import keys, registration
from bc_proxy.config import parse
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.errors import GatewayError
from bc_proxy.metrics import Metrics
from bc_proxy.reload import apply
from tests.conftest import (
    CLIENT_ID,
    WEBHOOK_SECRET,
    Connexus,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
)
from tests.test_pull import SLOW_ANSWER, slow_connexus, until  # noqa: F401  (fixture)

PUBLIC = "https://sms-gw.example.org"
PULL = {"mode": "pull", "pull_interval_seconds": 0.1}
HANDSET = "6421000222"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registration retries within the test's patience."""
    monkeypatch.setattr(registration, "BACKOFF_INITIAL", 0.05)


def globex(cfg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A second tenant on the emulator's other account."""
    other: dict[str, Any] = copy.deepcopy(cfg["tenants"][0])
    other.update(
        name="globex",
        legacy={"user_id": "globex-legacy", "password": "globex-pass"},
        connexus={"client_id": "cid_other", "client_secret": "csk_other"},
        senders=["3000"],
        default_from="3000",
    )
    other.update(changes)
    return other


def tenants(cfg: dict[str, Any], *chosen: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out["tenants"] = [copy.deepcopy(t) for t in chosen]
    return out


def configure_calls(connexus: Connexus) -> int:
    return sum(r.path.endswith("/configure") for r in connexus.emu.requests)


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == name]


async def poll(client: GatewayClient, kind: str, **who: str) -> dict[str, str] | None:
    resp = await client.get(f"/api/1/sms/{kind}", params=who or creds())
    if resp.status == 204:
        return None
    assert resp.status == 200
    return dict(parse_qsl(await resp.text(), keep_blank_values=True))


# -- webhook registration --------------------------------------------------------------------


async def test_reload_registers_added_and_rekeyed_accounts_and_stops_removed_ones(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    cfg["server"]["public_url"] = PUBLIC
    cfg["webhook"]["register_on_start"] = True
    acme = cfg["tenants"][0]
    client = await gateway(cfg)
    urls = connexus.emu.webhook_urls
    global_url = f"{PUBLIC}/webhooks/connexus/{WEBHOOK_SECRET}"
    await until(lambda: urls.get(CLIENT_ID) == global_url)

    # Added: registered as at start. One with its own (not yet served) secret: not registered,
    # and the reload says it needs a restart.
    own = globex(
        cfg,
        name="initech",
        legacy={"user_id": "ini", "password": "ini-pass-123"},
        webhook_secret="initech-own-secret",
        senders=["4000"],
        default_from="4000",
    )
    await apply(client.app, parse(tenants(cfg, acme, globex(cfg), own)))
    await until(lambda: urls.get("cid_other") == global_url)
    state = client.app[registration.REGISTRATION]
    await until(lambda: state.get("globex", "").startswith("verified"))
    assert "restart" in state["initech"]
    [restart] = events(log_stream, "config_reload_needs_restart")
    assert restart["sections"] == "tenants[initech].webhook_secret"

    # Re-keyed to another account: that account gets the webhook.
    urls.clear()
    rekeyed = {**acme, "connexus": {"client_id": "cid_other", "client_secret": "csk_other"}}
    await apply(client.app, parse(tenants(cfg, rekeyed)))
    await until(lambda: urls.get("cid_other") == global_url)
    assert sorted(state) == ["acme"]  # the removed tenants' lines went with them

    # Removed while its registration keeps failing: its retries stop.
    urls.clear()
    connexus.emu.webhook_url = "https://elsewhere.example/hook"
    connexus.emu.configure_ignored = True  # every try is a mismatch, retried every 0.05+ s
    await apply(client.app, parse(tenants(cfg, rekeyed, globex(cfg))))
    await until(lambda: state.get("globex", "").startswith("mismatch"))
    await apply(client.app, parse(tenants(cfg, rekeyed)))
    await asyncio.sleep(0.2)  # a configure already on its way is answered
    before = configure_calls(connexus)
    await asyncio.sleep(1.0)  # the backoff (0.05 s doubling) would have retried 3+ times
    assert configure_calls(connexus) == before
    assert client.app[keys.REGISTRATION_JOBS].keys() == {"acme"}


# -- pull loops ------------------------------------------------------------------------------


async def test_a_removed_pull_tenant_stops_pulling(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    """Its loop ends with the reload: no Connexus call without credentials, no pull_failed."""
    cfg["tenants"].append(globex(cfg))
    cfg["tenants"][0]["inbound"] = PULL
    client = await gateway(cfg)
    await until(lambda: connexus.emu.requests != [])
    await asyncio.sleep(0.3)  # a few rounds
    await apply(client.app, parse(tenants(cfg, cfg["tenants"][1])))
    before = len(connexus.emu.requests)
    await asyncio.sleep(0.8)  # eight pull intervals
    assert [r.path for r in connexus.emu.requests[before:]] == []
    assert events(log_stream, "pull_failed") == []
    assert client.app[keys.PULL_JOBS] == {}


async def test_a_tenant_that_newly_pulls_gets_its_loop(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Added in pull mode by a reload: its sms/in records are taken and pollable."""
    client = await gateway(cfg)
    pulling = globex(cfg, inbound=PULL)
    await apply(client.app, parse(tenants(cfg, cfg["tenants"][0], pulling)))
    await connexus.emu.fire_mo(HANDSET, "3000", "Hello globex", account="cid_other")
    await until(lambda: connexus.emu.unread("in", "cid_other") == 0)
    who = {"userId": "globex-legacy", "password": "globex-pass"}
    for _ in range(100):
        record = await poll(client, "in", **who)
        if record is not None:
            break
        await asyncio.sleep(0.05)
    assert record is not None
    assert record["body"] == "Hello globex"


async def send(client: GatewayClient, legacy_id: str) -> None:
    data = creds(to=HANDSET, body="Hi", messageId=legacy_id)
    assert (await client.post("/api/1/sms/out", data=data)).status == 204


def stored_reports(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT in_reply_to FROM records WHERE kind = 'status' ORDER BY id")
        return [r[0] for r in rows]


async def report_on_its_way(
    connexus: Connexus, gateway: GatewayFactory, tmp_path: Path, shutdown: float = 8
) -> tuple[GatewayClient, dict[str, Any], dict[str, Any]]:
    """A gateway whose tenant pulls, with LEG-1's report consumed by its loop and on its way
    back (slow_connexus); (client, the config without pull, the config with it)."""
    emu = connexus.emu
    cfg = config_dict(tmp_path, connexus.base_url, shutdown_timeout_seconds=shutdown)
    pulling = copy.deepcopy(cfg)
    pulling["tenants"][0]["inbound"] = PULL
    client = await gateway(pulling)
    await send(client, "LEG-1")
    await emu.report(emu.sent[-1], 1)
    await until(lambda: emu.unread("status", CLIENT_ID) == 0)  # consumed, answer under way
    return client, cfg, pulling


async def test_a_loop_stopped_by_reload_stores_its_record_once_and_a_new_one_goes_on(
    slow_connexus: Connexus,  # noqa: F811
    gateway: GatewayFactory,
    tmp_path: Path,
) -> None:
    """Back to webhooks while a consumed report is on its way: the reload lets it be stored,
    then nothing more is polled; back to pull, the next report is taken by the new loop. Each
    report is stored exactly once."""
    emu = slow_connexus.emu
    client, cfg, pulling = await report_on_its_way(slow_connexus, gateway, tmp_path)
    await apply(client.app, parse(cfg))  # the loop ends its record, then stops
    await until(lambda: stored_reports(tmp_path / "bc-proxy.db") == ["LEG-1"])
    before = len(emu.requests)
    await send(client, "LEG-2")
    await emu.report(emu.sent[-1], 1)
    await asyncio.sleep(0.5)  # five pull intervals: nobody polls
    polls = ("/sms/in", "/sms/status", "/mo/query")
    assert [r.path for r in emu.requests[before:] if r.path.endswith(polls)] == []
    assert emu.unread("status", CLIENT_ID) == 1

    await apply(client.app, parse(pulling))
    await until(lambda: emu.unread("status", CLIENT_ID) == 0)
    await asyncio.sleep(SLOW_ANSWER + 0.3)
    assert stored_reports(tmp_path / "bc-proxy.db") == ["LEG-1", "LEG-2"]


async def test_a_shutdown_right_after_a_reload_does_not_lose_the_record_in_hand(
    slow_connexus: Connexus,  # noqa: F811
    gateway: GatewayFactory,
    tmp_path: Path,
) -> None:
    """A reload retires the loop while a consumed report is on its way, and the gateway stops
    50 ms later: the shutdown's cancel gives that fetch its grace (the reload no longer
    cancels the loop first, which made the shutdown's cancel a second one that cut the grace
    short), so the report is stored, and no pull task outlives the stop."""
    client, cfg, _ = await report_on_its_way(slow_connexus, gateway, tmp_path, shutdown=4)
    assert client.app is not None
    reloading = asyncio.ensure_future(apply(client.app, parse(cfg)))  # as SIGHUP runs it
    await asyncio.sleep(0.05)
    await client.close()
    await reloading
    assert stored_reports(tmp_path / "bc-proxy.db") == ["LEG-1"]
    assert [t for t in asyncio.all_tasks() if "bc-proxy pull" in t.get_name()] == []


async def test_a_reload_lets_a_fetch_slower_than_the_shutdown_grace_finish(
    slow_connexus: Connexus,  # noqa: F811
    gateway: GatewayFactory,
    tmp_path: Path,
    log_stream: io.StringIO,
) -> None:
    """No shutdown under way: a retired loop's fetch ends by its own upstream timeout, not by
    the shutdown's grace (here 0.3 s, shorter than the 0.5 s answer). Connexus forgot the
    record as it answered, so giving up on it would lose it."""
    client, cfg, _ = await report_on_its_way(slow_connexus, gateway, tmp_path, shutdown=0.6)
    assert client.app is not None
    await apply(client.app, parse(cfg))
    await until(lambda: stored_reports(tmp_path / "bc-proxy.db") == ["LEG-1"])
    assert events(log_stream, "pulled_fetch_abandoned") == []


# -- the client ------------------------------------------------------------------------------


async def test_no_upstream_call_for_a_tenant_not_configured(
    connexus: Connexus, cfg: dict[str, Any]
) -> None:
    """A removed tenant's call (a pull, a send in flight) is a GatewayError, never a request
    without credentials."""
    client = ConnexusClient(parse(cfg), Metrics(process=False))
    await client.start()
    try:
        with pytest.raises(GatewayError, match="not configured"):
            await client.request("ghost", "POST", f"{client.base}/sms/status", b"", {})
        with pytest.raises(GatewayError, match="not configured"):
            await client.mo_query("ghost", {"page": "1"})
    finally:
        await client.close()
    assert connexus.emu.requests == []


# -- restart-only changes --------------------------------------------------------------------


async def test_every_reload_names_what_still_waits_for_a_restart(
    gateway: GatewayFactory, cfg: dict[str, Any], log_stream: io.StringIO
) -> None:
    client = await gateway(cfg)
    changed = copy.deepcopy(cfg)
    changed["upstream"]["timeout_seconds"] = 3
    await apply(client.app, parse(changed))
    await apply(client.app, parse(changed))  # the running timeout is still the old one
    logged = [e["sections"] for e in events(log_stream, "config_reload_needs_restart")]
    assert logged == ["upstream", "upstream"]
    await apply(client.app, parse(cfg))  # back to what runs: nothing waits
    assert len(events(log_stream, "config_reload_needs_restart")) == 2
