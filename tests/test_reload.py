"""Configuration reload on SIGHUP: a running `bc-proxy serve` takes a new tenant and a rotated
password without dropping an open long-poll, and refuses an invalid file keeping the old one."""

from __future__ import annotations

import asyncio
import copy
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bc_proxy import keys
from bc_proxy.backlog import refresh_gauges
from bc_proxy.config import parse
from bc_proxy.reload import TOKEN_JOBS, apply
from bc_proxy.reload import reload as reload_config
from bc_proxy.store import StatusRecord
from tests.conftest import (
    CLIENT_ID,
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    Connexus,
    GatewayFactory,
    config_dict,
    creds,
)
from tests.served import Served, free_port, write_config

BETA_USER, BETA_PASSWORD = "beta-legacy", "beta-legacy-pass"
BETA_CLIENT, BETA_SECRET = "cid_beta", "csk_beta_secret"
ROTATED = "acme-rotated-pass"


async def status_of(http: aiohttp.ClientSession, url: str, **data: str) -> int:
    async with http.post(url, data=data) as resp:
        await resp.read()
        return resp.status


async def until(check: Any, within: float = 10.0) -> None:
    """Wait until the coroutine function `check()` returns True."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _config(tmp_path: Path, connexus: Connexus, port: int) -> dict[str, Any]:
    cfg = config_dict(tmp_path, connexus.base_url, port=port, shutdown_timeout_seconds=3)
    cfg["tenants"][0]["poll_wait_seconds"] = 20
    return cfg


def _reloaded(cfg: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(cfg)
    new["tenants"][0]["legacy"]["password"] = ROTATED
    new["tenants"].append(
        {
            "name": "beta",
            "legacy": {"user_id": BETA_USER, "password": BETA_PASSWORD},
            "connexus": {"client_id": BETA_CLIENT, "client_secret": BETA_SECRET},
            "default_from": "777",
            "senders": ["777"],
        }
    )
    return new


async def test_sighup_adds_tenant_rotates_password_and_keeps_long_poll(
    tmp_path: Path, connexus: Connexus
) -> None:
    """After SIGHUP the new tenant can send, the old password gets 401, the new one works, and
    a long-poll opened before the reload still receives the record stored after it."""
    connexus.emu.clients[BETA_CLIENT] = BETA_SECRET
    port = free_port()
    cfg = _config(tmp_path, connexus, port)
    path = write_config(tmp_path / "bc-proxy.yaml", cfg)
    out = f"http://127.0.0.1:{port}/api/1/sms/out"
    with (tmp_path / "serve.log").open("w") as log:
        gw = Served(path, port, log)
        async with aiohttp.ClientSession() as http:
            await gw.start(http)
            try:
                old = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
                assert await status_of(http, out, **old, to="6421000001", body="before") == 204
                wait = aiohttp.ClientTimeout(30)
                poll = asyncio.create_task(
                    http.get(gw.base + "/api/1/sms/in", params=old, timeout=wait)
                )
                await asyncio.sleep(0.3)  # the long-poll is open and waiting
                write_config(path, _reloaded(cfg))
                gw.signal(signal.SIGHUP)

                async def old_refused() -> bool:
                    return await status_of(http, out, **old, to="6421000001", body="x") == 401

                await until(old_refused)
                rotated = {"userId": LEGACY_USER, "password": ROTATED}
                assert await status_of(http, out, **rotated, to="6421000002", body="new") == 204
                beta = {"userId": BETA_USER, "password": BETA_PASSWORD}
                assert await status_of(http, out, **beta, to="6421000003", body="beta") == 204
                assert not poll.done(), "the long-poll was dropped by the reload"
                hook = await http.post(
                    f"{gw.base}/webhooks/connexus/{WEBHOOK_SECRET}",
                    json={
                        "type": "mo",
                        "messageId": "mo-after-reload",
                        "from": "+6421000009",
                        "to": "552",
                        "body": "for the old poll",
                    },
                )
                assert hook.status == 200
                resp = await asyncio.wait_for(poll, 15)
                assert resp.status == 200
                assert "body=for+the+old+poll" in await resp.text()
            finally:
                code = await gw.stop()
    assert code == 0
    text = (tmp_path / "serve.log").read_text()
    assert "config_reloaded" in text
    assert ROTATED not in text
    assert BETA_PASSWORD not in text


async def test_sighup_with_invalid_config_keeps_the_old_one(
    tmp_path: Path, connexus: Connexus
) -> None:
    """An invalid file on SIGHUP is refused with a log line naming the problem; the process
    keeps serving with the old configuration and password."""
    port = free_port()
    cfg = _config(tmp_path, connexus, port)
    path = write_config(tmp_path / "bc-proxy.yaml", cfg)
    out = f"http://127.0.0.1:{port}/api/1/sms/out"
    with (tmp_path / "serve.log").open("w") as log:
        gw = Served(path, port, log)
        async with aiohttp.ClientSession() as http:
            await gw.start(http)
            try:
                bad = copy.deepcopy(cfg)
                bad["tenants"][0]["legacy"]["password"] = ROTATED
                bad["tenants"][0]["poll_wait_seconds"] = -5
                path.write_text(yaml.safe_dump(bad), encoding="utf-8")
                gw.signal(signal.SIGHUP)

                async def refused_logged() -> bool:
                    return "config_reload_refused" in (tmp_path / "serve.log").read_text()

                await until(refused_logged)
                old = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
                assert await status_of(http, out, **old, to="6421000001", body="still") == 204
                assert gw.proc is not None
                assert gw.proc.returncode is None
            finally:
                code = await gw.stop()
    assert code == 0
    assert "poll_wait_seconds" in (tmp_path / "serve.log").read_text()


async def test_reload_rekeys_removes_and_keeps_jobs_consistent(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory
) -> None:
    """In process: a re-keyed tenant gets a new token manager (and refresh job) that uses the
    new secret; a removed tenant loses its job and its token gauges; a bad file changes
    nothing."""
    cfg = config_dict(tmp_path, connexus.base_url)
    client = await gateway(cfg)
    app = client.app
    assert app is not None
    send = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD, "to": "6421000001", "body": "x"}
    assert (await client.post("/api/1/sms/out", data=send)).status == 204
    old_mgr = app[keys.CLIENT].tokens["acme"]

    new = _reloaded(cfg)
    new["tenants"][0]["legacy"]["password"] = LEGACY_PASSWORD
    new["tenants"][0]["connexus"]["client_secret"] = "csk_rekeyed"
    connexus.emu.clients[CLIENT_ID] = "csk_rekeyed"
    connexus.emu.clients[BETA_CLIENT] = BETA_SECRET
    connexus.emu.revoke_tokens()
    path = write_config(tmp_path / "new.yaml", new)
    assert await reload_config(app, path)
    mgr = app[keys.CLIENT].tokens["acme"]
    assert mgr is not old_mgr
    jobs = app[TOKEN_JOBS]
    assert sorted(jobs) == ["acme", "beta"]
    assert app[TOKEN_JOBS]["acme"][0] is mgr
    assert (await client.post("/api/1/sms/out", data=send)).status == 204

    only_acme = {**new, "tenants": new["tenants"][:1]}
    assert await reload_config(app, write_config(tmp_path / "back.yaml", only_acme))
    assert sorted(jobs) == ["acme"]
    metrics = app[keys.METRICS]
    assert metrics.registry.get_sample_value("bc_proxy_token_failing", {"tenant": "beta"}) is None
    for kind in ("in", "status"):  # its backlog is not frozen at its last value
        for name in ("bc_proxy_records_waiting", "bc_proxy_records_oldest_age_seconds"):
            assert metrics.registry.get_sample_value(name, {"tenant": "beta", "kind": kind}) is None
            assert metrics.registry.get_sample_value(name, {"tenant": "acme", "kind": kind}) == 0

    (tmp_path / "bad.yaml").write_text("tenants: []\n", encoding="utf-8")
    assert not await reload_config(app, tmp_path / "bad.yaml")
    assert app[keys.CLIENT].tokens["acme"] is mgr


async def test_reload_refuses_a_window_longer_than_the_running_retention(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory
) -> None:
    """A new file may lengthen store.retention_days and a tenant's idempotency window
    together, and validate; but the store section waits for a restart, so the running
    retention would purge sends inside the new window (a retry then sent again): refused."""
    cfg = config_dict(tmp_path, connexus.base_url)
    cfg.setdefault("store", {})["retention_days"] = 1
    client = await gateway(cfg)
    app = client.app
    assert app is not None
    new = copy.deepcopy(cfg)
    new["store"]["retention_days"] = 30
    new["tenants"][0]["idempotency_window_seconds"] = 7 * 86400
    assert not await reload_config(app, write_config(tmp_path / "new.yaml", new))
    assert app[keys.RUNTIME].tenants["acme"].idempotency_window_seconds == 86400
    new["tenants"][0]["idempotency_window_seconds"] = 86400  # within the running retention
    assert await reload_config(app, write_config(tmp_path / "ok.yaml", new))
    # That reload's 30 days wait for a restart too: a second reload is held to the running 1.
    new["tenants"][0]["idempotency_window_seconds"] = 7 * 86400
    assert not await reload_config(app, write_config(tmp_path / "again.yaml", new))
    assert app[keys.RUNTIME].tenants["acme"].idempotency_window_seconds == 86400


async def test_reload_that_stops_pushing_makes_the_waiting_records_pollable(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory
) -> None:
    """A tenant pushing its status records to a target that is down has records waiting for
    a retry. A reload that stops its pushes makes them pollable at once, through the legacy
    API, instead of leaving them unpushed and unpolled until the next restart."""
    cfg = config_dict(tmp_path, connexus.base_url)
    down = f"http://127.0.0.1:{free_port()}/"
    cfg["tenants"][0]["push"] = {
        "status_url": down + "sms-status",
        "retry_initial_seconds": 60,
        "retry_max_seconds": 60,
    }
    client = await gateway(cfg)
    app = client.app
    assert app is not None
    store = app[keys.STORE]
    await store.settle_send([], [StatusRecord("acme", "6421000001", "552", "m-1", "NUR", "x")])
    creds = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}

    async def queued() -> str:
        async with client.get("/api/1/sms/queue", params=creds) as resp:
            return await resp.text()

    db = tmp_path / "bc-proxy.db"

    async def tried() -> bool:  # the push worker tried once; the next try is in 60 s
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT push_attempts, lease_owner FROM records").fetchone()
        return bool(row[0]) and row[1] is None

    await until(tried)
    assert await queued() == "inCount=0&statusCount=0"  # waiting for its push, not polled
    new = copy.deepcopy(cfg)
    del new["tenants"][0]["push"]
    assert await reload_config(app, write_config(tmp_path / "new.yaml", new))
    assert app[keys.RUNTIME].place_again_at > time.monotonic()  # the upkeep job's pass to come
    assert await queued() == "inCount=0&statusCount=1"
    async with client.get("/api/1/sms/status", params={**creds, "waitSeconds": "0"}) as resp:
        assert resp.status == 200
        assert "statusCode=NUR" in await resp.text()


async def test_a_long_poll_whose_tenant_a_reload_removed_gives_its_record_back(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A long-poll authenticated before a reload that removes its tenant claims a report that
    lands afterwards: 204 (it rendered the record with the removed tenant's status map: a 500),
    and the record is given back, not left under the poll's lease: the tenant, configured
    again, gets it at once."""
    other = copy.deepcopy(cfg["tenants"][0])
    other.update(name="other", senders=["999"], default_from="999")
    other["legacy"] = {"user_id": "other-legacy", "password": "other-pass-123"}
    cfg["tenants"].append(other)
    cfg["tenants"][0]["poll_wait_seconds"] = 5
    client = await gateway(cfg)
    connexus.emu.webhook_url = str(client.make_url(f"/webhooks/connexus/{WEBHOOK_SECRET}"))
    sent = await client.post(
        "/api/1/sms/out", data=creds(to="6421000001", body="hi", messageId="L-1")
    )
    assert sent.status == 204
    poll = asyncio.ensure_future(client.get("/api/1/sms/status", params=creds()))
    await asyncio.sleep(0.3)  # the poll waits
    removed = copy.deepcopy(cfg)
    removed["tenants"] = [other]
    await apply(client.app, parse(removed))
    await connexus.emu.report(connexus.emu.sent[-1], 1)
    resp = await asyncio.wait_for(poll, 10)
    assert resp.status == 204, await resp.text()
    await apply(client.app, parse(cfg))  # the tenant back
    again = await client.get("/api/1/sms/status", params=creds(), timeout=aiohttp.ClientTimeout(3))
    assert again.status == 200
    assert "statusCode=RCV" in await again.text()


async def test_a_refused_file_with_a_broken_password_line_does_not_log_it(
    tmp_path: Path, connexus: Connexus
) -> None:
    """A rotated password with a typo (its quote left open) makes the file invalid YAML. The
    refusal names the problem and its line, not the line itself: the scrubber only knows the
    secrets of the file the process runs with, so the new password would be logged in clear."""
    port = free_port()
    cfg = _config(tmp_path, connexus, port)
    path = write_config(tmp_path / "bc-proxy.yaml", cfg)
    with (tmp_path / "serve.log").open("w") as log:
        gw = Served(path, port, log)
        async with aiohttp.ClientSession() as http:
            await gw.start(http)
            try:
                text = yaml.safe_dump(cfg).replace(
                    f"password: {LEGACY_PASSWORD}", f'password: "{ROTATED}'
                )
                assert ROTATED in text
                path.write_text(text, encoding="utf-8")
                gw.signal(signal.SIGHUP)

                async def refused_logged() -> bool:
                    return "config_reload_refused" in (tmp_path / "serve.log").read_text()

                await until(refused_logged)
            finally:
                await gw.stop()
    logged = (tmp_path / "serve.log").read_text()
    refusal = next(line for line in logged.splitlines() if "config_reload_refused" in line)
    assert "not valid YAML" in refusal
    assert "line " in refusal
    assert ROTATED not in logged


async def test_a_tenant_moved_to_password_auth_stops_reporting_its_old_token(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory
) -> None:
    """Its token manager is gone: the expiry gauge reads 0, as a password tenant's does, not
    the dead manager's token (an expiring-soon alert that would never clear)."""
    cfg = config_dict(tmp_path, connexus.base_url)
    client = await gateway(cfg)
    app = client.app
    assert app is not None
    send = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD, "to": "6421000001", "body": "x"}
    assert (await client.post("/api/1/sms/out", data=send)).status == 204
    metrics = app[keys.METRICS]
    expiry = "bc_proxy_token_expiry_timestamp_seconds"
    assert (metrics.registry.get_sample_value(expiry, {"tenant": "acme"}) or 0) > 0
    new = copy.deepcopy(cfg)
    new["tenants"][0]["connexus"] = {"user_id": "cx-user", "password": "cx-pass"}
    assert await reload_config(app, write_config(tmp_path / "new.yaml", new))
    assert "acme" not in app[keys.CLIENT].tokens
    assert metrics.registry.get_sample_value(expiry, {"tenant": "acme"}) == 0
    assert metrics.registry.get_sample_value("bc_proxy_token_failing", {"tenant": "acme"}) == 0


async def test_a_gauge_refresh_spanning_a_reload_does_not_bring_a_removed_tenant_back(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh reads the store, a reload removes tenant beta meanwhile, then the refresh
    sets the gauges: of the tenants in force after its read (beta's stay gone, acme's stay)."""
    cfg = _reloaded(config_dict(tmp_path, connexus.base_url))
    cfg["tenants"][0]["legacy"]["password"] = LEGACY_PASSWORD
    client = await gateway(cfg)
    app = client.app
    assert app is not None
    store = app[keys.STORE]
    read, gate = store.waiting, asyncio.Event()

    async def held() -> Any:  # the store read, then a pause: the reload lands here
        got = await read()
        await gate.wait()
        return got

    monkeypatch.setattr(store, "waiting", held)
    refresh = asyncio.ensure_future(refresh_gauges(app, set()))
    only_acme = {**cfg, "tenants": cfg["tenants"][:1]}
    assert await reload_config(app, write_config(tmp_path / "one.yaml", only_acme))
    gate.set()
    await asyncio.wait_for(refresh, 10)
    registry = app[keys.METRICS].registry
    for kind in ("in", "status"):
        for tenant, value in (("beta", None), ("acme", 0)):
            labels = {"tenant": tenant, "kind": kind}
            assert registry.get_sample_value("bc_proxy_records_waiting", labels) == value
