"""Missed-webhook recovery: page through Connexus `mo/query` and store unseen incoming SMS.

Owns the periodic sweep (every `upstream.mo_query_interval_seconds`, 0 = off) over the last
day of incoming messages of every tenant's Connexus account. Messages already stored (by a
webhook or an earlier sweep) are skipped by id; new ones go through the same store ingest as
webhooks, so a message that arrives both ways is one legacy record.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from bc_proxy import keys
from bc_proxy.errors import BcProxyError
from bc_proxy.log import get_logger
from bc_proxy.store import MoEvent
from bc_proxy.webhooks import SENDER_OWNERS

log = get_logger("bc_proxy.recovery")

PAGE_LIMIT = 200
MAX_PAGES = 25
LOOKBACK = timedelta(days=1)


def _event(msg: dict[str, Any], owners: dict[str, str]) -> MoEvent | None:
    mid, sender, to = msg.get("messageId"), msg.get("from"), msg.get("to")
    if mid in (None, "") or not sender or not to:
        return None
    to_s = str(to).lstrip("+")
    related = msg.get("relatedMessageId")
    return MoEvent(
        message_id=str(mid),
        sender=str(sender).lstrip("+"),
        to=to_s,
        body=str(msg.get("body") or ""),
        related_id=str(related) if related not in (None, "") else None,
        owner=owners.get(to_s),
    )


async def sweep_tenant(app: web.Application, tenant: str, now: datetime | None = None) -> int:
    """Store incoming messages of one tenant's account that no webhook delivered; how many."""
    client, store, metrics = app[keys.CLIENT], app[keys.STORE], app[keys.METRICS]
    owners = app[SENDER_OWNERS]
    start = ((now or datetime.now(UTC)) - LOOKBACK).strftime("%Y-%m-%d %H:%M:%S")
    recovered = 0
    for page in range(1, MAX_PAGES + 1):
        answer = await client.mo_query(
            tenant, {"start_date": start, "limit": str(PAGE_LIMIT), "page": str(page)}
        )
        messages = answer.get("messages") if isinstance(answer, dict) else None
        if not isinstance(messages, list):
            break
        events = [e for m in messages if isinstance(m, dict) and (e := _event(m, owners))]
        known = await store.has_mo([e.message_id for e in events])
        for event in events:
            if event.message_id in known:
                continue
            result = await store.add_mo(event, fallback_tenant=tenant)
            if result.stored:
                recovered += 1
                metrics.recovered.inc()
        pagination = answer.get("pagination") if isinstance(answer, dict) else None
        if not isinstance(pagination, dict) or not pagination.get("hasNextPage"):
            break
    if recovered:
        log.warning("recovered_missed_webhooks", tenant=tenant, count=recovered)
    return recovered


async def recovery_loop(app: web.Application) -> None:
    """Background job: sweep every tenant on the configured interval, until cancelled."""
    interval = app[keys.SETTINGS].upstream.mo_query_interval_seconds
    if interval <= 0:
        return
    tenants = list(app[keys.RUNTIME].tenants)
    while True:
        await asyncio.sleep(interval)
        for tenant in tenants:
            with contextlib.suppress(BcProxyError):
                await sweep_tenant(app, tenant)
