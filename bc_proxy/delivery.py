"""Push worker: claim due records -> POST the legacy callback -> ack / reschedule / dead-letter.

Owns pushing records to a tenant's `push.incoming_url` / `push.status_url` as a form POST with
the same keys as polling. Any 2xx counts as delivered; anything else is retried with
exponential backoff and full jitter until the record's deadline (48 h by default), then it
becomes a dead letter. Pending pushes are rows in the store, so they survive restarts; this
worker keeps no state of its own beyond the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from bc_proxy import keys
from bc_proxy.config import PushSettings
from bc_proxy.errors import StoreError
from bc_proxy.log import get_logger
from bc_proxy.store import LegacyRecord, Store
from bc_proxy.translate import render_record

log = get_logger("bc_proxy.delivery")

BATCH = 50
IDLE_NAP = 0.5
_RNG = random.Random()
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def next_delay(attempts: int, push: PushSettings, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after `attempts` failures: capped doubling, full jitter."""
    ceiling = min(push.retry_max_seconds, push.retry_initial_seconds * 2.0 ** max(attempts - 1, 0))
    return ceiling * (rng or _RNG).uniform(0.5, 1.0)


class PushWorker:
    """Delivers pushable records of every tenant with a push configuration."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.rt = app[keys.RUNTIME]
        self.metrics = app[keys.METRICS]
        self.pushes = {t.name: t.push for t in self.rt.tenants.values() if t.push is not None}
        self._inflight: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(20)

    async def run(self) -> None:
        if not self.pushes:
            return
        store = self.app[keys.STORE]
        timeout = max(p.timeout_seconds for p in self.pushes.values())
        async with ClientSession(
            connector=TCPConnector(limit=20), timeout=ClientTimeout(total=timeout)
        ) as session:
            try:
                while not self.rt.shutting_down:
                    try:
                        batch = await store.claim_pushes(time.time(), BATCH)
                    except StoreError as exc:
                        log.error("push_claim_failed", error=str(exc))
                        batch = []
                    for record in batch:
                        await self._limit.acquire()
                        task = asyncio.create_task(self._deliver(session, store, record))
                        self._inflight.add(task)
                        task.add_done_callback(self._done)
                    if len(batch) < BATCH:
                        await store.notifier.wait_any(IDLE_NAP)
            finally:
                if self._inflight:
                    await asyncio.gather(*self._inflight, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._limit.release()

    async def _deliver(self, session: ClientSession, store: Store, record: LegacyRecord) -> None:
        push = self.pushes.get(record.tenant)
        url = None
        if push is not None:
            url = push.incoming_url if record.kind == "in" else push.status_url
        if push is None or url is None:
            # The record's tenant is no longer configured (a changed push setting of a configured
            # tenant is turned into polling when the store opens): nobody can take it; stop.
            with contextlib.suppress(StoreError):
                await store.push_done(record)
            return
        body = render_record(record, self.rt.status_maps.get(record.tenant, {}))
        error = ""
        try:
            async with session.post(url, data=body, headers=_FORM) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    await store.push_done(record)
                    self.metrics.push_attempts.labels(record.tenant, record.kind, "success").inc()
                    return
                error = f"HTTP {resp.status}"
        except (ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        except StoreError as exc:
            log.error("push_ack_failed", tenant=record.tenant, error=str(exc))
            return
        await self._failed(store, record, push, error)

    async def _failed(
        self, store: Store, record: LegacyRecord, push: PushSettings, error: str
    ) -> None:
        now = time.time()
        next_at: float | None = now + next_delay(record.push_attempts + 1, push)
        deadline = record.push_deadline or (record.created_at + push.max_age_hours * 3600)
        if next_at is not None and next_at > deadline:
            next_at = None
        outcome = "dead" if next_at is None else "failure"
        self.metrics.push_attempts.labels(record.tenant, record.kind, outcome).inc()
        if next_at is None:
            log.warning("push_dead_letter", tenant=record.tenant, kind=record.kind, error=error)
        try:
            await store.push_failed(record, next_at=next_at, error=error)
        except StoreError as exc:
            log.error("push_reschedule_failed", tenant=record.tenant, error=str(exc))


async def push_worker(app: web.Application) -> None:
    """Background job: run the push worker until cancelled."""
    await PushWorker(app).run()
