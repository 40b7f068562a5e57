"""The periodic expiry of pending sends a dead process left behind (app.expire_pending_loop).

A replica that crashed mid-call leaves `pending` rows; every replica's background job expires
them (one replica at a time, under exclusive()) with the start-up cut-off, so the legacy client
gets its ERR status record without waiting for a restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from bc_proxy import app as app_module
from bc_proxy import keys
from bc_proxy.store import (
    Delivery,
    Rules,
    SendIntent,
    StatusRecord,
    Store,
    TenantRules,
    open_store,
)
from bc_proxy.store.sqlite import SQLiteStore
from bc_proxy.translate import UNKNOWN_OUTCOME
from tests import pg
from tests.pg import pg_url  # noqa: F401  (fixture)

RULES = Rules({"acme": TenantRules(senders=("552",))})


def _app(store: Store) -> web.Application:
    app = web.Application()
    app[keys.STORE] = store
    settings: Any = SimpleNamespace(upstream=SimpleNamespace(timeout_seconds=1.0))
    app[keys.SETTINGS] = settings
    app[keys.RUNTIME] = keys.Runtime()
    return app


async def _run_loops(apps: list[web.Application], seconds: float) -> None:
    tasks = [asyncio.create_task(app_module.expire_pending_loop(a)) for a in apps]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stale_and_fresh(store: Store) -> None:
    old = time.time() - 60  # past the cut-off (timeout * 2 + 5 s)
    await store.begin_send(SendIntent("acme", "old", ("6421000001", "6421000002"), "552"), old)
    await store.begin_send(SendIntent("acme", "new", ("6421000003",), "552"), time.time())


async def _statuses(store: Store) -> list[tuple[str, str, str]]:
    out = []
    while (r := await store.claim("acme", "status")) is not None:
        assert await store.ack(r)
        out.append((r.msisdn_from, r.status_code, r.error))
    return sorted(out)


EXPECTED = [("6421000001", "ERR", UNKNOWN_OUTCOME), ("6421000002", "ERR", UNKNOWN_OUTCOME)]


async def test_job_expires_stale_pending_sends_periodically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale pending sends become unknown with one ERR record each; a fresh one stays."""
    monkeypatch.setattr(app_module, "EXPIRE_EVERY", 0.05)
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", RULES)
    await store.open()
    try:
        await _stale_and_fresh(store)
        await _run_loops([_app(store)], 0.4)
        assert await _statuses(store) == EXPECTED
        again = await store.begin_send(SendIntent("acme", "new", ("6421000003",), "552"), 0)
        assert again.repeats == (("6421000003", "pending"),)
    finally:
        await store.close()


async def test_job_places_stranded_records_again_after_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reload (`place_again_at`), the job places the records the new rules would not
    reach once more: here a status record waiting for a push that the rules no longer make
    (the reload's own placing did not happen) is polled; the flag is cleared."""
    monkeypatch.setattr(app_module, "EXPIRE_EVERY", 0.05)
    pushing = Rules({"acme": TenantRules(senders=("552",), delivery=Delivery(push_status=True))})
    store = open_store(f"sqlite:///{tmp_path / 's.db'}", pushing)
    await store.open()
    try:
        await store.settle_send([], [StatusRecord("acme", "6421000001", "552", "m", "NUR", "x")])
        assert await store.claim("acme", "status") is None  # waiting for its push
        store.rules = RULES  # reloaded: acme polls
        app = _app(store)
        app[keys.RUNTIME].place_again_at = time.monotonic()
        await _run_loops([app], 0.3)
        assert app[keys.RUNTIME].place_again_at == 0.0
        assert await _statuses(store) == [("6421000001", "NUR", "x")]
    finally:
        await store.close()


async def test_a_reload_during_the_jobs_placing_keeps_its_own_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that lands while the job places records (by the rules before it) asks for a
    pass of its own: the job's success does not clear that request, and the next tick runs
    it."""
    monkeypatch.setattr(app_module, "EXPIRE_EVERY", 0.05)
    store = _ReloadedWhilePlacing(f"{tmp_path / 's.db'}", RULES)
    await store.open()
    try:
        app = _app(store)
        store.runtime = app[keys.RUNTIME]
        store.runtime.place_again_at = time.monotonic()
        await _run_loops([app], 0.3)
        assert store.passes == 2
        assert store.runtime.place_again_at == 0.0
    finally:
        await store.close()


class _ReloadedWhilePlacing(SQLiteStore):
    """Its first place_stranded (after open's) sees a reload land while it runs."""

    runtime: keys.Runtime | None = None
    passes = 0

    async def place_stranded(self) -> None:
        await super().place_stranded()
        if self.runtime is None:
            return  # open's
        self.passes += 1
        if self.passes == 1:
            self.runtime.place_again_at = time.monotonic()


@pytest.mark.postgres
async def test_two_replicas_running_the_job_write_one_record_per_send(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two replicas' jobs on one database: each stale send is expired, and recorded, once."""
    monkeypatch.setattr(app_module, "EXPIRE_EVERY", 0.02)
    stores = [open_store(pg_url, RULES, replica=name) for name in ("A", "B")]
    for s in stores:
        await s.open()
    try:
        await _stale_and_fresh(stores[0])
        await _run_loops([_app(s) for s in stores], 0.5)
        assert await _statuses(stores[1]) == EXPECTED
        unknown = await pg.execute(pg_url, "SELECT count(*) FROM sends WHERE state = 'unknown'")
        assert unknown == 2
    finally:
        for s in stores:
            await s.close()
