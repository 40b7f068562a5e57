"""Pull mode (`tenants[].inbound.mode: pull`): fetch a tenant's traffic instead of taking webhooks.

Owns the per-tenant pull job: every `pull_interval_seconds` it sweeps `mo/query` (the recovery
sweep and its marks), then drains Connexus's Bulletin-compatible `sms/in` and `sms/status` polls
(one record a call, consumed by Connexus as it answers) into the same store ingest as webhooks
(`add_mo(account=tenant)`, `add_dlr`), so dedupe and translation are the webhooks' own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from urllib.parse import parse_qsl

from aiohttp import ClientError, web

from bc_proxy import keys
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.connexus.models import MAX_ID, Unusable, parse_mo
from bc_proxy.errors import BcProxyError, GatewayError
from bc_proxy.log import get_logger
from bc_proxy.recovery import sweep_tenant
from bc_proxy.store import DlrEvent, MoEvent
from bc_proxy.translate import form_encode

log = get_logger("bc_proxy.pull")

DRAIN_LIMIT = 500  # records taken from one poll endpoint in one round (the rest: next round)
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
UNKNOWN_STATUS = 0  # a legacy code no Connexus code maps to: the record says ERR + the code


def pull_tenants(app: web.Application) -> list[str]:
    """The configured tenants in pull mode."""
    return [t.name for t in app[keys.SETTINGS].tenants if t.inbound.mode == "pull"]


def mo_from_record(record: Mapping[str, str]) -> MoEvent | None:
    """An `sms/in` record as the incoming SMS it reports; None when unusable."""
    try:
        return parse_mo(
            {
                "messageId": record.get("messageId"),
                "from": record.get("from"),
                "to": record.get("to"),
                "body": record.get("body"),
                "relatedMessageId": record.get("inReplyToId") or None,
            }
        )
    except Unusable:
        return None


def inverse_status_map(table: Mapping[int, str]) -> dict[str, int]:
    """Legacy code -> the lowest Connexus statusCode the tenant's map turns into it."""
    out: dict[str, int] = {}
    for code in sorted(table):
        out.setdefault(table[code], code)
    return out


def dlr_from_record(record: Mapping[str, str], inverse: Mapping[str, int]) -> DlrEvent | None:
    """An `sms/status` record as a delivery report about the message in `inReplyToId` (the id
    Connexus's webhook reports carry); None without one."""
    message_id = record.get("inReplyToId", "")
    legacy = record.get("statusCode", "")
    if not message_id or len(message_id) > MAX_ID or not legacy:
        return None
    code = inverse.get(legacy)
    if code is None:
        return DlrEvent(message_id, UNKNOWN_STATUS, (record.get("error") or legacy)[:40])
    return DlrEvent(message_id, code, "")


async def fetch_one(client: ConnexusClient, tenant: str, path: str) -> dict[str, str] | None:
    """One Bulletin-style poll of `path` (sms/in, sms/status): its record, None on 204."""
    op = path.replace("/", "_")
    extra = client.password_params(tenant) or {}
    started = time.perf_counter()
    metrics = client.metrics
    try:
        status, body, _ = await client.request(
            tenant, "POST", f"{client.base}/{path}", form_encode(extra.items()), _FORM
        )
    except TimeoutError:
        metrics.upstream_requests.labels(op, "timeout").inc()
        raise GatewayError(f"{path} did not answer in time") from None
    except ClientError as exc:
        metrics.upstream_requests.labels(op, "error").inc()
        raise GatewayError(f"{path} unreachable ({type(exc).__name__})") from None
    metrics.upstream_requests.labels(op, str(status)).inc()
    metrics.upstream_duration.labels(op).observe(time.perf_counter() - started)
    if status == 204:
        return None
    if status != 200:
        raise GatewayError(f"{path} answered {status}")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def drain(app: web.Application, tenant: str, kind: str) -> int:
    """Take `sms/in` (`in`) or `sms/status` (`status`) records until none is left (or the
    round's limit), each stored before the next is asked for; how many were stored."""
    client, store = app[keys.CLIENT], app[keys.STORE]
    path = "sms/in" if kind == "in" else "sms/status"
    inverse = inverse_status_map(app[keys.RUNTIME].status_maps.get(tenant, {}))
    taken = 0
    for _ in range(DRAIN_LIMIT):
        record = await fetch_one(client, tenant, path)
        if record is None:
            break
        taken += 1
        if kind == "in":
            mo = mo_from_record(record)
            if mo is not None:
                await store.add_mo(mo, account=tenant)
                continue
        else:
            dlr = dlr_from_record(record, inverse)
            if dlr is not None:
                await store.add_dlr(dlr)
                continue
        log.warning("pulled_record_unusable", tenant=tenant, source=path)
    return taken


async def pull_once(app: web.Application, tenant: str) -> dict[str, str]:
    """One round for one tenant: mo/query sweep, sms/in, sms/status; outcome per source.

    A failing source is logged and counted; the others still run."""
    metrics = app[keys.METRICS]
    outcomes: dict[str, str] = {}
    for source in ("mo_query", "sms_in", "sms_status"):
        try:
            if source == "mo_query":
                count = await sweep_tenant(app, tenant)
            else:
                count = await drain(app, tenant, "in" if source == "sms_in" else "status")
        except BcProxyError as exc:
            outcomes[source] = "error"
            metrics.pulls.labels(tenant, source, "error").inc()
            log.error("pull_failed", tenant=tenant, source=source, error=str(exc)[:200])
            continue
        outcomes[source] = "ok"
        metrics.pulls.labels(tenant, source, "ok").inc()
        if count:
            metrics.pulled_records.labels(tenant, source).inc(count)
    return outcomes


async def _tenant_loop(app: web.Application, tenant: str) -> None:
    interval = app[keys.RUNTIME].tenants[tenant].inbound.pull_interval_seconds
    while True:
        started = asyncio.get_running_loop().time()
        await pull_once(app, tenant)
        elapsed = asyncio.get_running_loop().time() - started
        await asyncio.sleep(max(interval - elapsed, 0.0))


async def pull_loop(app: web.Application) -> None:
    """Background job: one loop per pull-mode tenant, until cancelled (returns when none)."""
    tenants = pull_tenants(app)
    if not tenants:
        return
    async with asyncio.TaskGroup() as group:  # ends by cancellation, or a loop's error
        for tenant in tenants:
            group.create_task(_tenant_loop(app, tenant), name=f"bc-proxy pull {tenant}")
