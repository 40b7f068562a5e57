"""Backlog gauges and housekeeping: records waiting, oldest age, dead letters, old-row purge.

Owns a periodic read of the store's waiting counts into the gauges (so every replica reports
the shared truth), the count of records kept for tenants no longer configured (logged once at
start, then a gauge), and the hourly purge of consumed rows, run by one replica at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from bc_proxy import keys
from bc_proxy.errors import StoreError
from bc_proxy.log import get_logger
from bc_proxy.store import KINDS

REFRESH_SECONDS = 5.0
PURGE_EVERY = 3600.0

log = get_logger("bc_proxy.backlog")


async def refresh_gauges(app: web.Application, shown: set[str] | None = None) -> dict[str, int]:
    """Read waiting counts and dead letters from the store into the gauges once.

    Returns the records kept for tenants no longer in the configuration, by tenant. `shown`:
    the unconfigured tenants the gauge has shown so far (updated; a vanished one goes to 0)."""
    store, metrics = app[keys.STORE], app[keys.METRICS]
    waiting = await store.waiting()
    # Read after the await: a reload meanwhile dropped a removed tenant's gauges, which this
    # must not bring back.
    configured = app[keys.RUNTIME].tenants
    now = time.time()
    stats = {(s.tenant, s.kind): s for s in waiting}
    for tenant in configured:
        for kind in KINDS:
            s = stats.get((tenant, kind))
            metrics.records_waiting.labels(tenant, kind).set(s.count if s else 0)
            oldest = s.oldest_created_at if s else None
            metrics.records_oldest_age.labels(tenant, kind).set(
                max(0.0, now - oldest) if oldest else 0.0
            )
    unconfigured: dict[str, int] = {}
    for s in waiting:
        if s.tenant not in configured:
            unconfigured[s.tenant] = unconfigured.get(s.tenant, 0) + s.count
    gauge = metrics.records_unconfigured
    shown = set() if shown is None else shown
    for tenant in shown - set(unconfigured):  # its records are gone
        gauge.labels(tenant).set(0)
    for tenant, count in unconfigured.items():
        gauge.labels(tenant).set(count)
    shown |= set(unconfigured)
    metrics.dead_letters.set(await store.dead_letter_count())
    return unconfigured


async def purge_once(app: web.Application) -> int | None:
    """Purge rows past the retention period if this replica holds the purge lock."""
    store = app[keys.STORE]
    retention = app[keys.SETTINGS].store.retention_days * 86400
    async with store.exclusive("purge") as got:
        if not got:
            return None
        return await store.purge(time.time() - retention)


async def backlog_loop(app: web.Application) -> None:
    """Background job: refresh the gauges every few seconds; purge old rows hourly."""
    last_purge = 0.0
    first = True
    shown: set[str] = set()
    while True:
        with contextlib.suppress(StoreError):
            unconfigured = await refresh_gauges(app, shown)
            if first:
                first = False
                for tenant, count in sorted(unconfigured.items()):
                    log.warning("records_of_unconfigured_tenant", tenant=tenant, records=count)
            if time.monotonic() - last_purge > PURGE_EVERY:
                last_purge = time.monotonic()
                await purge_once(app)
        await asyncio.sleep(REFRESH_SECONDS)
