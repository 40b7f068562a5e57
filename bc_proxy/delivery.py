"""Push worker: claim due records -> POST the legacy callback -> ack / reschedule / dead-letter.

Owns pushing records to a tenant's `push.incoming_url` / `push.status_url` as a form POST with
the same keys as polling. Any 2xx counts as delivered; anything else is retried with
exponential backoff and full jitter until the record's deadline (48 h by default), then it
becomes a dead letter. Claims are store leases taken in order per send (the store holds back a
record while an earlier one of its send awaits its push); this worker claims no more than it
can start at once, keeps no claim state of its own and never settles a record it cannot push.

At shutdown it claims nothing more and lets the attempts in flight finish, beside the server's
drain, for up to `server.shutdown_timeout_seconds` from the stop (the background jobs' cancel
never reaches them); one still running then is abandoned unsettled, its lease kept, so its
record comes back only once the lease expires, as after a crash (at-least-once).
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

CONCURRENCY = 20
IDLE_NAP = 0.5
LEASE_SHARE = 0.8  # an attempt ends before its lease does, so no other claim overlaps it
UNWIND = 0.5  # at most this much of the stop's bound goes to unwinding abandoned attempts
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
        self._inflight: dict[asyncio.Task[None], LegacyRecord] = {}
        self._freed = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stop_at: float | None = None  # loop time the stop's bound ends (once stopping)
        self._unpushable: set[str] = set()  # tenants already logged as having no push URL
        self._timeouts: dict[float, ClientTimeout] = {}  # _timeout_of, by configured seconds

    @property
    def pushes(self) -> dict[str, PushSettings]:
        """Push settings by tenant, read from the runtime each time (a reload may change them)."""
        return {t.name: t.push for t in self.rt.tenants.values() if t.push is not None}

    def attempt_timeout(self) -> float:
        """Per-attempt timeout: the largest configured, but inside the claim's lease (a cap
        `_timeout_of` logs, once per configured value)."""
        lease = self.app[keys.SETTINGS].store.lease_seconds
        wanted = max((p.timeout_seconds for p in self.pushes.values()), default=10.0)
        return min(wanted, lease * LEASE_SHARE)

    def _timeout_of(self, push: PushSettings) -> ClientTimeout:
        """One attempt's timeout: its tenant's as configured now (a reload may change it), but
        inside the claim's lease. Cached per value: one object per setting, not per push."""
        lease = self.app[keys.SETTINGS].store.lease_seconds
        total = min(push.timeout_seconds, lease * LEASE_SHARE)
        timeout = self._timeouts.get(push.timeout_seconds)
        if timeout is None:
            if total < push.timeout_seconds:  # once per value, a reload's included
                log.warning(
                    "push_timeout_capped_by_lease", timeout=push.timeout_seconds, lease=lease
                )
            timeout = self._timeouts[push.timeout_seconds] = ClientTimeout(total=total)
        return timeout

    def _say_caps(self) -> None:
        """Log each push timeout capped by the lease once, when it is configured (at start or
        by a reload), not when its tenant next pushes (`_timeout_of` caches each value)."""
        for push in self.pushes.values():
            self._timeout_of(push)

    async def run(self) -> None:
        """Push until the shutdown. A cancel (the app stopping its jobs) is taken as the stop:
        it never reaches a claim or an attempt in flight, which get the stop's bound to end."""
        work = asyncio.create_task(self._work(), name="bc-proxy push loop")
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            self._stop()
            await asyncio.wait({work}, timeout=self._left() + UNWIND)
            if not work.done():  # stuck in a store call past the bound: cut off
                for task in (work, *self._inflight):
                    task.cancel()
            elif not work.cancelled():
                work.exception()  # stopping either way: an error of the loop is not news
            raise

    async def _work(self) -> None:
        store = self.app[keys.STORE]
        self._say_caps()
        async with ClientSession(
            connector=TCPConnector(limit=CONCURRENCY),
            timeout=ClientTimeout(total=self.attempt_timeout()),
        ) as session:
            try:
                while not self._stopping():
                    self._say_caps()  # a reload's, before its tenant's next push
                    if not self._inflight and not self.pushes:
                        # Nobody pushes (a reload may change it).
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stopped.wait(), IDLE_NAP * 4)
                        continue
                    free = CONCURRENCY - len(self._inflight)
                    self._freed.clear()
                    batch: list[LegacyRecord] = []
                    if free > 0:
                        try:
                            batch = await store.claim_pushes(time.time(), free)
                        except StoreError as exc:
                            log.error("push_claim_failed", error=str(exc))
                    for record in batch:  # claimed: pushed, even if the stop began meanwhile
                        task = asyncio.create_task(self._deliver(session, store, record))
                        self._inflight[task] = record
                        task.add_done_callback(self._done)
                    if not batch:
                        await self._idle(store)
            finally:
                await self._finish()

    def _stopping(self) -> bool:
        """Whether the stop began (the shutdown's flag, seen here first, begins it too)."""
        if self.rt.shutting_down:
            self._stop()
        return self._stop_at is not None

    def _stop(self) -> None:
        """Begin the stop (once): no further claims; attempts in flight get the bound, counted
        from the shutdown's start (on_shutdown), not from when this loop noticed it: a loop
        held in a slow claim through the server's drain would otherwise add a second bound."""
        if self._stop_at is None:
            bound = self.app[keys.SETTINGS].server.shutdown_timeout_seconds
            began = self.rt.stop_began
            self._stop_at = (asyncio.get_running_loop().time() if began is None else began) + bound
            self._stopped.set()

    def _left(self) -> float:
        """Seconds left of the stop's bound (0 when not stopping or past it)."""
        if self._stop_at is None:
            return 0.0
        return max(self._stop_at - asyncio.get_running_loop().time(), 0.0)

    async def _finish(self) -> None:
        """The loop ended (the stop, or an error): let the attempts in flight end within the
        stop's bound; abandon the rest unsettled, their leases kept: each record comes back
        once its lease expires (given back at once, it would be pushed again right away, maybe
        to a receiver that already has it)."""
        if not self._inflight:
            return
        if self._stop_at is None and not self.rt.shutting_down:
            # The loop failed, nothing is stopping: the attempts end by their own timeouts.
            await asyncio.wait(set(self._inflight), timeout=self.attempt_timeout() + UNWIND)
            return
        self._stop()
        unwind = min(UNWIND, self.app[keys.SETTINGS].server.shutdown_timeout_seconds / 4)
        _, late = await asyncio.wait(set(self._inflight), timeout=max(self._left() - unwind, 0))
        if not late:
            return
        for task in late:
            record = self._inflight.get(task)
            if record is not None:
                log.warning(
                    "push_abandoned",
                    tenant=record.tenant,
                    kind=record.kind,
                    record_id=record.id,
                    lease_seconds=self.app[keys.SETTINGS].store.lease_seconds,
                )
            task.cancel()
        await asyncio.wait(late, timeout=unwind)

    async def _idle(self, store: Store) -> None:
        """Wait for a new record, a finished push (the next of its send may be due), the stop,
        or a nap."""
        waits = [
            asyncio.ensure_future(self._freed.wait()),
            asyncio.ensure_future(self._stopped.wait()),
            asyncio.ensure_future(store.waker.wait_any(IDLE_NAP)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._freed.set()

    async def _deliver(self, session: ClientSession, store: Store, record: LegacyRecord) -> None:
        push = self.pushes.get(record.tenant)
        url = None
        if push is not None:
            url = push.incoming_url if record.kind == "in" else push.status_url
        if push is None or url is None:
            # Not pushable under this configuration (the store claims only tenants that push
            # this kind, so a configuration change raced us): keep the record untouched, its
            # lease runs out. Never marked done: records of a removed tenant are kept.
            if record.tenant not in self._unpushable:
                self._unpushable.add(record.tenant)
                log.warning("push_without_url_left", tenant=record.tenant, kind=record.kind)
            return
        body = render_record(record, self.rt.status_maps.get(record.tenant, {}))
        error = ""
        try:
            # A redirect is a failed attempt: following it would turn the POST into a
            # body-less GET (counted as delivered) and could point anywhere, inside networks too.
            async with session.post(
                url,
                data=body,
                headers=_FORM,
                allow_redirects=False,
                timeout=self._timeout_of(push),
            ) as resp:
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
        try:
            await store.push_failed(record, next_at=next_at, error=error)
        except StoreError as exc:
            log.error("push_reschedule_failed", tenant=record.tenant, error=str(exc))
        # Counted once recorded, so the metric never runs ahead of the store.
        outcome = "dead" if next_at is None else "failure"
        self.metrics.push_attempts.labels(record.tenant, record.kind, outcome).inc()
        if next_at is None:
            log.error(
                "push_dead_letter",
                tenant=record.tenant,
                kind=record.kind,
                record_id=record.id,
                attempts=record.push_attempts + 1,
                cause=error,
            )
        else:
            log.warning(
                "push_failed",
                tenant=record.tenant,
                kind=record.kind,
                record_id=record.id,
                attempt=record.push_attempts + 1,
                cause=error,
                retry_in_seconds=round(next_at - now, 1),
            )


async def push_worker(app: web.Application) -> None:
    """Background job: run the push worker until the shutdown (or cancelled: see `run`)."""
    await PushWorker(app).run()
