"""Missed-webhook recovery: page through Connexus `mo/query` and store unseen incoming SMS.

Owns the periodic sweep (every `upstream.mo_query_interval_seconds`, 0 = off) of every
tenant's Connexus account, from a persisted per-tenant high-water mark minus an overlap to the
last page, with no cap. Messages go through the store's one ingest (`add_mo`, account = the
tenant): a message a webhook already stored is a duplicate, or is assigned when it was unmatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aiohttp import web

from bc_proxy import keys
from bc_proxy.connexus.models import Unusable, parse_mo, webhook_body
from bc_proxy.errors import BcProxyError, GatewayError, StoreRefused
from bc_proxy.log import get_logger
from bc_proxy.store import IngestResult, MoEvent, Store, SweepMark

log = get_logger("bc_proxy.recovery")

PAGE_LIMIT = 200
OVERLAP = timedelta(minutes=10)  # re-read before the mark: same-second and late-indexed messages
FIRST_LOOKBACK = timedelta(days=1)  # no mark yet: the last 24 hours
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class MoQuery(Protocol):
    """What the sweep needs of the Connexus client."""

    async def mo_query(self, tenant: str, params: Mapping[str, str]) -> Any: ...


@dataclass(slots=True)
class SweepResult:
    """What one sweep of one account did."""

    pages: int = 0
    seen: int = 0
    recovered: int = 0  # new records (no webhook had brought them)
    assigned: int = 0  # unmatched records a webhook had stored, now given to this tenant


def _received(msg: dict[str, Any]) -> str | None:
    """The message's Connexus receive time as Y-m-d H:i:s (receivedTime, else timestamp)."""
    text = msg.get("receivedTime")
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            return datetime.strptime(text, TIME_FORMAT).strftime(TIME_FORMAT)
    stamp = msg.get("timestamp")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        with contextlib.suppress(ValueError, OverflowError, OSError):
            return datetime.fromtimestamp(stamp, UTC).strftime(TIME_FORMAT)
    return None


def _event(msg: object) -> MoEvent | None:
    if not isinstance(msg, dict):
        return None
    try:
        event = parse_mo(msg)
    except Unusable:
        return None
    received = _received(msg)
    if received is None:
        return event
    return replace(event, received_at=received)


def start_of_window(mark: SweepMark | None, now: datetime) -> str:
    """Where a sweep starts reading: the mark minus the overlap, or the last 24 hours.

    The mark is Connexus's own receive time of a message, so the window is in Connexus's
    clock and zone whatever they are; only the first run uses ours (UTC)."""
    if mark is not None:
        with contextlib.suppress(ValueError):
            last = datetime.strptime(mark.last_time, TIME_FORMAT)
            return (last - OVERLAP).strftime(TIME_FORMAT)
    return (now.astimezone(UTC) - FIRST_LOOKBACK).strftime(TIME_FORMAT)


def _ascending(events: Sequence[MoEvent], after: str) -> bool:
    """Whether this page continues an oldest-first order (then the mark may advance now)."""
    times = [e.received_at for e in events]
    return all(times) and (not times or times[0] >= after) and times == sorted(times)


def _rises(events: Sequence[MoEvent], after: str) -> bool:
    """Whether the receive times read so far, with this page's, go up somewhere: proof that an
    ascending answer is oldest first. Equal times alone (a burst in one second filling the
    first page) are as much newest first, and a mark moved past them would skip the older
    pages of a newest-first answer that is then cut short."""
    times = [e.received_at for e in events]
    return any(a < b for a, b in itertools.pairwise([after, *times] if after else times))


# Messages of a store's sweeps kept aside already, by tenant and messageId: each sweep reads
# again the 10 minutes before its mark, and would keep another copy every time (the kept
# table holds the newest 10,000, so copies would push other kept records out).
_KEPT: weakref.WeakKeyDictionary[Store, set[str]] = weakref.WeakKeyDictionary()
_KEPT_MAX = 10_000


async def _keep_aside(store: Store, tenant: str, key: str, body: bytes, reason: str) -> None:
    """Keep a swept message the store cannot take with the rejected webhooks, once."""
    kept = _KEPT.setdefault(store, set())
    if f"{tenant}:{key}" in kept:
        return
    await store.reject_webhook(body, reason)
    if len(kept) >= _KEPT_MAX:
        kept.clear()
    kept.add(f"{tenant}:{key}")
    log.error("swept_message_kept_aside", tenant=tenant, message_id=key, reason=reason)


async def _store_page(store: Store, tenant: str, events: Sequence[MoEvent]) -> list[IngestResult]:
    """Store a page's messages. One whose data the store refuses for good (PostgreSQL holds no
    NUL in text) is kept with the rejected webhooks, so it does not fail every later sweep at
    the same page; any other store error fails the page (the mark stays put)."""
    # Concurrent adds share the store's commit groups: one page costs a commit or two.
    done = await asyncio.gather(
        *(store.add_mo(e, account=tenant) for e in events), return_exceptions=True
    )
    out: list[IngestResult] = []
    for event, result in zip(events, done, strict=True):
        if isinstance(result, StoreRefused):
            body = json.dumps(webhook_body(event)).encode()
            await _keep_aside(store, tenant, event.message_id, body, "store_refused")
        elif isinstance(result, BaseException):
            raise result
        else:
            out.append(result)
    return out


async def sweep_account(
    store: Store, client: MoQuery, tenant: str, now: datetime | None = None
) -> SweepResult:
    """Read one account's `mo/query` from its mark to the last page; store what is new.

    The mark advances after each page's messages are committed when Connexus answers oldest
    first (as documented nowhere, but as the emulator does) and the times read have risen
    somewhere (equal times prove no order); otherwise only once a page says
    `hasNextPage: false`. A page that is not JSON with a `messages` list raises GatewayError."""
    mark = await store.sweep_mark(tenant)
    start = start_of_window(mark, now or datetime.now(UTC))
    result = SweepResult()
    newest: tuple[str, str] | None = (mark.last_time, mark.last_id) if mark else None
    ordered = True
    rose = False  # an ascending order is proven by a rise, not by equal times
    last_seen = ""  # receive time of the last message read, in Connexus's page order
    page = 1
    while True:
        answer = await client.mo_query(
            tenant, {"start_date": start, "limit": str(PAGE_LIMIT), "page": str(page)}
        )
        messages = answer.get("messages") if isinstance(answer, dict) else None
        if not isinstance(messages, list):
            # Not the last page but a page we could not read: ending here would let a
            # newest-first sweep move its mark past the older pages it never read.
            raise GatewayError(f"mo/query page {page} answered 200 without a messages list")
        events = []
        for m in messages:
            if (e := _event(m)) is not None:
                events.append(e)
            else:  # kept as the webhooks keep what they cannot use, not passed over silently
                key = str(m.get("messageId")) if isinstance(m, dict) else repr(m)[:60]
                raw = json.dumps(m, default=repr).encode()
                await _keep_aside(store, tenant, key, raw, "mo_query_unusable")
        outcomes = await _store_page(store, tenant, events)
        result.pages += 1
        result.seen += len(events)
        result.recovered += sum(1 for r in outcomes if r.outcome in ("stored", "unmatched"))
        result.assigned += sum(1 for r in outcomes if r.outcome == "assigned")
        ordered = ordered and _ascending(events, last_seen)
        rose = ordered and (rose or _rises(events, last_seen))
        if events:
            last_seen = events[-1].received_at
        for e in events:
            if e.received_at and (newest is None or e.received_at >= newest[0]):
                newest = (e.received_at, e.message_id)
        if rose and newest is not None:
            await store.set_sweep_mark(SweepMark(tenant, newest[0], newest[1], time.time()))
        pagination = answer.get("pagination")
        has_next = pagination.get("hasNextPage") if isinstance(pagination, dict) else None
        if messages and has_next:
            page += 1
            continue
        # Pages read in any other order prove nothing about the ones not read until the
        # answer itself says there are none left; a page that does not say leaves the mark.
        if not rose and has_next is not False:
            log.warning("sweep_end_unconfirmed", tenant=tenant, page=page)
        elif not rose and newest is not None:
            await store.set_sweep_mark(SweepMark(tenant, newest[0], newest[1], time.time()))
        return result


async def sweep_tenant(app: web.Application, tenant: str, now: datetime | None = None) -> int:
    """Sweep one tenant's account (metrics and a log line); how many messages were new."""
    metrics = app[keys.METRICS]
    result = await sweep_account(app[keys.STORE], app[keys.CLIENT], tenant, now)
    if result.recovered:
        metrics.recovered.inc(result.recovered)
        log.warning("recovered_missed_webhooks", tenant=tenant, count=result.recovered)
    if result.assigned:
        log.warning("unmatched_messages_assigned", tenant=tenant, count=result.assigned)
    return result.recovered


async def sweep_all(app: web.Application) -> bool:
    """One sweep of every tenant, if this replica holds the sweep lock; whether it ran."""
    store = app[keys.STORE]
    async with store.exclusive("sweep") as got:
        if not got:
            return False
        for tenant in list(app[keys.RUNTIME].tenants):
            try:
                await sweep_tenant(app, tenant)
            except BcProxyError as exc:  # StoreError, upstream trouble: the mark stays put
                log.error("sweep_failed", tenant=tenant, error=str(exc))
    return True


async def recovery_loop(app: web.Application) -> None:
    """Background job: sweep every tenant on the configured interval, until cancelled."""
    interval = app[keys.SETTINGS].upstream.mo_query_interval_seconds
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(BcProxyError):
            await sweep_all(app)
