"""Backlog housekeeping and push-worker bounds: unconfigured tenants' gauge, purge under its
lock, and push attempts that end inside their claim's lease. Real app, real SQLite file."""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from bc_proxy import keys
from bc_proxy.backlog import purge_once, refresh_gauges
from bc_proxy.delivery import PushWorker
from bc_proxy.metrics import Metrics
from tests.conftest import WEBHOOK_SECRET, GatewayFactory

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
GAUGE = "bc_proxy_records_unconfigured_tenant"


def globex(cfg: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    out["tenants"].append(
        {
            "name": "globex",
            "legacy": {"user_id": "globex-legacy", "password": "globex-legacy-pass"},
            "connexus": {"client_id": "cid_other", "client_secret": "csk_other"},
            "senders": ["3000"],
            "poll_wait_seconds": 0,
        }
    )
    return out


async def test_unconfigured_gauge_follows_the_records(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A removed tenant's waiting records show in the gauge, and it returns to 0 once gone."""
    client = await gateway(globex(cfg))
    mo = {"type": "mo", "messageId": "g1", "from": "6421", "to": "3000", "body": "x"}
    async with client.post(HOOK, data=json.dumps(mo)) as resp:
        assert resp.status == 200
    await client.close()
    metrics = Metrics(CollectorRegistry(), process=False)
    client = await gateway(cfg, metrics)
    app: web.Application = client.app
    shown: set[str] = set()
    assert await refresh_gauges(app, shown) == {"globex": 1}
    assert metrics.registry.get_sample_value(GAUGE, {"tenant": "globex"}) == 1
    path = cfg["store"]["url"][len("sqlite:///") :]
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("UPDATE records SET pollable = 0, push_due = NULL WHERE tenant = 'globex'")
    assert await refresh_gauges(app, shown) == {}
    assert metrics.registry.get_sample_value(GAUGE, {"tenant": "globex"}) == 0


async def test_purge_only_with_the_lock(gateway: GatewayFactory, cfg: dict[str, Any]) -> None:
    """purge_once purges when this replica holds the purge lock and skips when another does."""
    client = await gateway(cfg)
    store = client.app[keys.STORE]
    assert isinstance(await purge_once(client.app), int)
    names: list[str] = []

    @asynccontextmanager
    async def taken(name: str) -> AsyncIterator[bool]:
        names.append(name)
        yield False

    store.exclusive = taken  # type: ignore[method-assign]
    assert await purge_once(client.app) is None
    assert names == ["purge"]


async def test_push_attempt_ends_inside_the_lease(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A push timeout longer than 80% of the lease is cut to it; a shorter one is kept."""
    config = copy.deepcopy(cfg)
    config["store"]["lease_seconds"] = 10
    config["tenants"][0]["push"] = {"incoming_url": "http://127.0.0.1:9/in", "timeout_seconds": 30}
    client = await gateway(config)
    assert PushWorker(client.app).attempt_timeout() == 8.0
    await client.close()
    config["tenants"][0]["push"]["timeout_seconds"] = 3
    client = await gateway(config)
    assert PushWorker(client.app).attempt_timeout() == 3.0
