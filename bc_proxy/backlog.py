"""Backlog gauges and housekeeping: records waiting, oldest age, dead letters, old-row purge.

Owns a periodic read of the store's waiting counts into the gauges (so every replica reports
the shared truth) and the daily purge of consumed rows past the retention period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from bc_proxy import keys
from bc_proxy.errors import StoreError
from bc_proxy.store import KINDS

REFRESH_SECONDS = 5.0
PURGE_EVERY = 3600.0


async def refresh_gauges(app: web.Application) -> None:
    """Read waiting counts and dead letters from the store into the gauges once."""
    store, metrics = app[keys.STORE], app[keys.METRICS]
    now = time.time()
    stats = {(s.tenant, s.kind): s for s in await store.waiting()}
    for tenant in app[keys.RUNTIME].tenants:
        for kind in KINDS:
            s = stats.get((tenant, kind))
            metrics.records_waiting.labels(tenant, kind).set(s.count if s else 0)
            oldest = s.oldest_created_at if s else None
            metrics.records_oldest_age.labels(tenant, kind).set(
                max(0.0, now - oldest) if oldest else 0.0
            )
    metrics.dead_letters.set(await store.dead_letter_count())


async def backlog_loop(app: web.Application) -> None:
    """Background job: refresh the gauges every few seconds; purge old rows hourly."""
    store = app[keys.STORE]
    retention = app[keys.SETTINGS].store.retention_days * 86400
    last_purge = 0.0
    while True:
        with contextlib.suppress(StoreError):
            await refresh_gauges(app)
            if time.monotonic() - last_purge > PURGE_EVERY:
                last_purge = time.monotonic()
                await store.purge(time.time() - retention)
        await asyncio.sleep(REFRESH_SECONDS)
