"""Settling a send's pending rows after its upstream call, including settles that outlive the
request: the settle of a call cut short (cancelled mid-call: every recipient `unknown`) and the
settle retried in the background after the store failed to commit it.

A send's outcome is known once Connexus has answered, whether or not the store can record it
at that moment. When the commit of a settle fails (database unreachable, read-only, full), the
legacy client is answered by the outcome (204 for an accepted SMS, a partial bulk send
included), and the settle is retried here until it commits or its pending rows near their
expiry (`pending_expiry_seconds` old: expiry says `unknown`, with an ERR record; the retries
stop `EXPIRY_SAFETY_SECONDS` before). A settle is idempotent: the store changes only rows still
`pending`, and stores a status record (a refusal, an unknown outcome) only with the change of
its row, so a retry after a commit whose answer was lost, or one that lands after expiry
anyway, changes and stores nothing. Until it commits, a retry of the legacy call meets the
pending row and is answered `upstream.unknown_retry_status`, never re-sent. When the gateway
stops, `drain` has each deferred settle try once more before the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from bc_proxy.errors import StoreError
from bc_proxy.log import get_logger, loggable
from bc_proxy.metrics import Metrics
from bc_proxy.store import SendIntent, Settlement, StatusRecord, Store
from bc_proxy.translate import UNKNOWN_OUTCOME, RecipientOutcome, rejection_code

log = get_logger("bc_proxy.legacy")

FIRST_RETRY_SECONDS = 0.2
MAX_RETRY_SECONDS = 2.0
EXPIRY_SAFETY_SECONDS = 2.0


def pending_expiry_seconds(upstream_timeout: float) -> float:
    """The age at which a `pending` row is taken for a dead process's and expired (`unknown`):
    past any call's bound (the upstream timeout, a token fetch and one retry after a 401)."""
    return upstream_timeout * 2 + 5


@dataclass
class _Settle:
    """One call's settle, built once: what it commits and what it counts once committed."""

    store: Store
    metrics: Metrics
    tenant: str
    answered: bool
    settlements: list[Settlement] = field(default_factory=list)
    statuses: list[StatusRecord] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"accepted": 0, "rejected": 0, "unknown": 0}
    )

    async def commit(self) -> None:
        await self.store.settle_send(self.settlements, self.statuses)
        if self.counts["unknown"]:
            self.metrics.recipients_unknown.labels(self.tenant).inc(self.counts["unknown"])
        if self.answered:
            accepted = self.counts["accepted"]
            failed = self.counts["rejected"] + self.counts["unknown"]
            self.metrics.observe_send(self.tenant, accepted, failed)


@dataclass
class _Background:
    """A store's settles running in the background (strong references until they finish),
    and the event that makes its deferred ones try a last time now (the store is closing)."""

    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    closing: asyncio.Event = field(default_factory=asyncio.Event)


_BACKGROUND: weakref.WeakKeyDictionary[Store, _Background] = weakref.WeakKeyDictionary()


async def settle(
    store: Store,
    metrics: Metrics,
    intent: SendIntent,
    refs: dict[str, str],
    outcomes: Sequence[RecipientOutcome],
    *,
    answered: bool,
    defer_until: float | None = None,
) -> None:
    """Settle the pending rows; status records for every recipient not accepted when the call
    is answered 204, else for the unknown ones only (a retry never re-sends those; the store
    settles one a delivery report names already `accepted`, without its ERR record). With
    `defer_until` (a time.time()), a failed commit is retried in the background until then
    instead of raising (see the module docstring)."""
    tenant, sender = intent.tenant, intent.sender
    one = _Settle(store, metrics, tenant, answered)
    for o in outcomes:
        ref = refs.get(o.recipient)
        if ref is None:
            continue
        one.counts[o.state] += 1
        one.settlements.append(
            Settlement(ref, o.state, o.connexus_id or None, "" if sender else o.sender)
        )
        if o.accepted or (o.state == "rejected" and not answered):
            continue
        if o.state == "unknown":
            code, error = "ERR", UNKNOWN_OUTCOME
        else:
            code, error = rejection_code(o.error), o.error
        who = sender or o.sender
        one.statuses.append(
            StatusRecord(tenant, o.recipient, who, intent.legacy_id, code, error, ref)
        )
    try:
        await one.commit()
    except StoreError as exc:
        if defer_until is None:
            raise
        log.warning("settle_deferred", tenant=tenant, recipients=len(refs), error=str(exc))
        metrics.settles_deferred.labels(tenant, "deferred").inc()
        _keep(store, _retry(one, defer_until))


def settle_cut_short(
    store: Store, metrics: Metrics, intent: SendIntent, refs: dict[str, str], defer_until: float
) -> None:
    """The call was cancelled (shutdown) or failed mid-call: the request may be out, so every
    recipient is settled `unknown` (never re-sent), in a task of its own."""
    lost = [RecipientOutcome(r, "unknown", error=UNKNOWN_OUTCOME) for r in refs]
    work = settle(store, metrics, intent, refs, lost, answered=False, defer_until=defer_until)
    _keep(store, work)


async def _retry(one: _Settle, until: float) -> None:
    closing = _BACKGROUND.setdefault(one.store, _Background()).closing
    delay = FIRST_RETRY_SECONDS
    attempts = 0
    error = ""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), max(0.0, min(delay, until - time.time())))
        last = closing.is_set()  # the store is closing: one attempt more, then expiry's
        if time.time() >= until:
            break
        attempts += 1
        try:
            await one.commit()
        except StoreError as exc:
            error = str(exc)
            delay = min(delay * 2, MAX_RETRY_SECONDS)
            if last or time.time() + delay >= until:
                break
        else:
            log.warning(
                "settle_recovered",
                tenant=one.tenant,
                recipients=len(one.settlements),
                attempts=attempts,
            )
            one.metrics.settles_deferred.labels(one.tenant, "recovered").inc()
            return
    # Expiry takes the rows from here: `unknown`, with an ERR status record each (or
    # `accepted` without one, where a delivery report names the row already).
    one.metrics.settles_deferred.labels(one.tenant, "abandoned").inc()
    log.error(
        "settle_abandoned",
        tenant=one.tenant,
        recipients=len(one.settlements),
        attempts=attempts,
        error=error,
    )


async def drain(store: Store, within: float) -> None:
    """Before `store` closes: its deferred settles make their last attempt now, and every
    settle running in the background for it is waited for, `within` seconds at most."""
    background = _BACKGROUND.setdefault(store, _Background())
    background.closing.set()  # settles deferred while this waits see it set too
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    # Again while tasks remain: a settle that fails now starts its retry (a new task) here.
    while background.tasks and (left := deadline - loop.time()) > 0:
        await asyncio.wait(set(background.tasks), timeout=left)
    _BACKGROUND.pop(store, None)


def _keep(store: Store, work: Coroutine[Any, Any, None]) -> None:
    tasks = _BACKGROUND.setdefault(store, _Background()).tasks
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(functools.partial(_done, tasks))


def _done(tasks: set[asyncio.Future[None]], task: asyncio.Future[None]) -> None:
    tasks.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("settle_failed", error=loggable(exc))
