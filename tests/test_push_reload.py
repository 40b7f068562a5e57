"""A push's timeout follows the configuration in force, reloads included.

The push worker's session took its timeout from the configuration it started with: a tenant's
`push.timeout_seconds` changed by a reload, or a tenant that only gained push by a reload, kept
the start-up value (10 s when nobody pushed then). Each attempt now takes its tenant's timeout.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from bc_proxy import keys
from bc_proxy.reload import reload as reload_config
from bc_proxy.store import StatusRecord
from tests.conftest import Connexus, GatewayFactory, config_dict
from tests.served import write_config

SLOW = 1.5  # the receiver answers after this


async def test_a_reloaded_push_timeout_applies_to_the_next_attempt(
    tmp_path: Path, connexus: Connexus, gateway: GatewayFactory, aiohttp_server: AiohttpServer
) -> None:
    """Started with a 5 s push timeout and pushing (one record delivered), reloaded to 0.3 s:
    a receiver answering the next push after 1.5 s is a failed attempt (timed out), not a
    delivery."""
    arrivals: list[float] = []

    async def slow(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        if len(arrivals) > 1:
            await asyncio.sleep(SLOW)
        return web.Response(text="OK")

    receiver = web.Application()
    receiver.router.add_post("/status", slow)
    server = await aiohttp_server(receiver, host="127.0.0.1")
    cfg = config_dict(tmp_path, connexus.base_url)
    cfg["tenants"][0]["push"] = {
        "status_url": str(server.make_url("/status")),
        "timeout_seconds": 5,
        "retry_initial_seconds": 60,
        "retry_max_seconds": 60,
    }
    app, db = await pushing(gateway, cfg, tmp_path)
    new = copy.deepcopy(cfg)
    new["tenants"][0]["push"]["timeout_seconds"] = 0.3
    assert await reload_config(app, write_config(tmp_path / "new.yaml", new))
    await store_status(app, "m-1")
    deadline = time.monotonic() + SLOW + 3
    while True:  # until the attempt ended: counted (or done), lease given back
        done, attempts, owner, error = push_state(db, "m-1")
        if (done or attempts) and owner is None:
            break
        assert time.monotonic() < deadline, (attempts, owner, error)
        await asyncio.sleep(0.05)
    assert len(arrivals) == 2
    assert (done, attempts, error) == (0, 1, "TimeoutError")


def push_state(db: Path, in_reply_to: str) -> tuple[int, int, str | None, str | None]:
    """(done, push_attempts, lease_owner, push_error) of one status record."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT push_due IS NULL, push_attempts, lease_owner, push_error "
            "FROM records WHERE in_reply_to = ?",
            (in_reply_to,),
        ).fetchone()
    return (int(row[0]), int(row[1]), row[2], row[3])


@pytest.mark.parametrize("reloaded", [True, False], ids=["by-reload", "at-start"])
async def test_a_push_timeout_beyond_the_lease_is_capped_and_logged_once(
    tmp_path: Path,
    connexus: Connexus,
    gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
    log_stream: io.StringIO,
    reloaded: bool,
) -> None:
    """An attempt must end inside its claim's lease (0.8 of it): a timeout beyond that is
    capped, and said so once, whether configured at start (before any push, not again by the
    pushes that use it) or raised by a reload."""

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    receiver = web.Application()
    receiver.router.add_post("/status", fast)
    server = await aiohttp_server(receiver, host="127.0.0.1")
    cfg = config_dict(tmp_path, connexus.base_url)
    cfg["store"]["lease_seconds"] = 2
    cfg["tenants"][0]["push"] = {
        "status_url": str(server.make_url("/status")),
        "timeout_seconds": 1 if reloaded else 5,
    }
    app, db = await pushing(gateway, cfg, tmp_path)
    if reloaded:
        assert "push_timeout_capped_by_lease" not in log_stream.getvalue()
        new = copy.deepcopy(cfg)
        new["tenants"][0]["push"]["timeout_seconds"] = 5
        assert await reload_config(app, write_config(tmp_path / "new.yaml", new))
    await store_status(app, "m-1")
    await delivered(db, "m-1")
    capped = [
        json.loads(line)
        for line in log_stream.getvalue().splitlines()
        if "push_timeout_capped_by_lease" in line
    ]
    assert [(c["timeout"], c["lease"]) for c in capped] == [(5, 2)]


async def pushing(
    gateway: GatewayFactory, cfg: dict[str, Any], tmp_path: Path
) -> tuple[web.Application, Path]:
    """The gateway for `cfg`, once it has pushed one status record (m-0): the push worker runs
    with the start-up configuration. (The app, its SQLite file.)"""
    client = await gateway(cfg)
    assert client.app is not None
    db = tmp_path / "bc-proxy.db"
    await store_status(client.app, "m-0")
    await delivered(db, "m-0")
    return client.app, db


async def store_status(app: web.Application, in_reply_to: str) -> None:
    record = StatusRecord("acme", "6421000001", "552", in_reply_to, "NUR", "x")
    await app[keys.STORE].settle_send([], [record])


async def delivered(db: Path, in_reply_to: str) -> None:
    deadline = time.monotonic() + 5
    while push_state(db, in_reply_to)[0] == 0:
        assert time.monotonic() < deadline, push_state(db, in_reply_to)
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("reloaded", [True, False], ids=["by-reload", "at-start"])
async def test_a_capped_push_timeout_is_said_before_any_push(
    tmp_path: Path,
    connexus: Connexus,
    gateway: GatewayFactory,
    log_stream: io.StringIO,
    reloaded: bool,
) -> None:
    """Nothing is pushed (no record waits): the cap is still said, once, when it is
    configured, not hours later when its tenant next pushes."""
    cfg = config_dict(tmp_path, connexus.base_url)
    cfg["store"]["lease_seconds"] = 2
    cfg["tenants"][0]["push"] = {
        "status_url": "http://127.0.0.1:9/status",  # never called: nothing to push
        "timeout_seconds": 1 if reloaded else 5,
    }
    client = await gateway(cfg)
    assert client.app is not None
    if reloaded:
        await asyncio.sleep(0.5)  # the push worker runs with the start-up timeout
        new = copy.deepcopy(cfg)
        new["tenants"][0]["push"]["timeout_seconds"] = 5
        assert await reload_config(client.app, write_config(tmp_path / "new.yaml", new))
    for _ in range(100):
        if "push_timeout_capped_by_lease" in log_stream.getvalue():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and not again
    assert log_stream.getvalue().count("push_timeout_capped_by_lease") == 1
