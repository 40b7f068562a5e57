"""Thin handlers of the legacy surface: /api/1/sms/{out,test,in,status,queue}.

Each handler parses, authenticates, calls one translation and one upstream/store operation,
and answers in the exact legacy format. Errors are raised as LegacyError and turned into
one-line answers by `edge` (edge.py). Does not own wire parsing or translation rules.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Final

from aiohttp import web

from bc_proxy import keys
from bc_proxy.config import TenantSettings
from bc_proxy.edge import TENANT, edge
from bc_proxy.errors import GatewayError, StoreError, Unauthorized
from bc_proxy.legacy.auth import credentials
from bc_proxy.legacy.forms import read_params
from bc_proxy.legacy.handover import peer_received
from bc_proxy.legacy.ratelimit import check_send
from bc_proxy.legacy.settling import (
    EXPIRY_SAFETY_SECONDS,
    pending_expiry_seconds,
    settle,
    settle_cut_short,
)
from bc_proxy.log import get_logger
from bc_proxy.metrics import Metrics
from bc_proxy.store import (
    Kind,
    LegacyRecord,
    SendIntent,
    SendPlan,
    Store,
)
from bc_proxy.translate import (
    SendRequest,
    parse_send,
    render_queue,
    render_record,
)

FORM_CT: Final = "application/x-www-form-urlencoded"
UNRESOLVED: Final = frozenset({"unknown", "pending"})  # earlier sends a retry cannot confirm

log = get_logger("bc_proxy.legacy")


async def _authenticated(request: web.Request) -> tuple[TenantSettings, dict[str, str]]:
    """The caller's tenant (as the config now in force has it) and the merged params."""
    app = request.app  # no sub-apps: cheaper than config_dict on the hot path
    params = await read_params(request, app[keys.SETTINGS].server.max_body_bytes)
    user, password = credentials(params, request.headers.get("Authorization"))
    tenant = await app[keys.AUTH].authenticate(user, password, source=request.remote)
    settings = app[keys.RUNTIME].tenants.get(tenant)
    if settings is None:  # removed by a reload since: refused like any unknown user
        raise Unauthorized("Invalid credentials")
    request[TENANT] = tenant
    return settings, params


async def send(request: web.Request) -> web.StreamResponse:
    """POST/GET /api/1/sms/out: write ahead, forward what is new, settle, answer 204.

    Never forwards a recipient twice: `begin_send` commits `pending` rows first and names the
    repeats of an earlier call with the same messageId (not forwarded). The answer is 204 when
    anything was accepted (every other recipient then gets a status record) or no call failed;
    otherwise the first failure's legacy answer. A retry that meets an earlier send of unknown
    outcome (or one still pending) gets `upstream.unknown_retry_status`.
    """
    settings, params = await _authenticated(request)
    tenant = settings.name
    app = request.app
    store = app[keys.STORE]
    metrics = app[keys.METRICS]
    req = parse_send(params, settings.default_from)
    check_send(app, tenant)  # optional per-tenant rate (a 400 costs none): 429, nothing written
    intent = SendIntent(tenant, req.message_id, req.recipients, req.sender)
    began = time.time()
    plan = await store.begin_send(intent, began)
    _count_plan(metrics, tenant, plan)
    if plan.to_send:
        await _forward(request, store, metrics, intent, req, plan, began)
    if any(state in UNRESOLVED for _, state in plan.repeats):
        status = app[keys.SETTINGS].upstream.unknown_retry_status
        if status != 204:
            raise GatewayError("Outcome of the earlier send with this messageId is unknown")
    return web.Response(status=204)


def _count_plan(metrics: Metrics, tenant: str, plan: SendPlan) -> None:
    if plan.blocked:
        metrics.recipients_blocked.labels(tenant).inc(len(plan.blocked))
    if plan.repeats:
        for state, n in Counter(state for _, state in plan.repeats).items():
            metrics.send_repeats.labels(tenant, state).inc(n)


async def _forward(
    request: web.Request,
    store: Store,
    metrics: Metrics,
    intent: SendIntent,
    req: SendRequest,
    plan: SendPlan,
    began: float,
) -> None:
    """Send `plan.to_send` upstream and settle every row in one commit; raise the legacy error
    when nothing was accepted and a call failed."""
    app = request.app
    rt = app[keys.RUNTIME]
    refs = {p.recipient: p.upstream_ref for p in plan.to_send}
    # A settle whose commit fails is retried in the background until its rows near expiry.
    expiry = pending_expiry_seconds(app[keys.SETTINGS].upstream.timeout_seconds)
    until = began + expiry - EXPIRY_SAFETY_SECONDS
    # Bounded by upstream.timeout_seconds, token fetch and the one retry after a 401 included.
    rt.sends_in_flight += 1
    try:
        result = await app[keys.CLIENT].send(intent.tenant, req, plan.to_send)
    except BaseException:
        # Cancelled (shutdown) or a bug mid-call: the request may be out, so never re-send.
        settle_cut_short(store, metrics, intent, refs, until)
        raise
    finally:
        rt.sends_in_flight -= 1
    outcomes = result.outcomes
    accepted = any(o.accepted for o in outcomes)
    answered = accepted or result.failure is None
    # The SMS may be out, so a cancellation here (a shutdown's deadline) must not roll back the
    # record of its outcome and its Connexus ids: settle_send commits once called, whether or
    # not its caller is still waiting (Store contract, tests/test_store_cancel.py). A failed
    # commit is retried in the background (settling.py) and the client answered by the
    # outcome: Connexus has it, whatever the store says now.
    await settle(store, metrics, intent, refs, outcomes, answered=answered, defer_until=until)
    if not answered:
        assert result.failure is not None
        raise result.failure


async def test_send(request: web.Request) -> web.StreamResponse:
    """POST/GET /api/1/sms/test: validate exactly like `out`, never forward."""
    settings, params = await _authenticated(request)
    parse_send(params, settings.default_from)
    return web.Response(status=204)


async def _poll(request: web.Request, kind: Kind) -> web.StreamResponse:
    settings, _ = await _authenticated(request)
    tenant = settings.name
    app = request.app
    rt = app[keys.RUNTIME]
    store = app[keys.STORE]
    waker = store.waker
    # A lease of a replica that died frees itself after lease_seconds and wakes nobody: look
    # again at least that often.
    recheck = app[keys.SETTINGS].store.lease_seconds
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.poll_wait_seconds
    while True:
        seen = waker.generation(tenant, kind)
        record = await store.claim(tenant, kind)
        if record is not None:
            break
        remaining = deadline - loop.time()
        if remaining <= 0 or rt.shutting_down or _gone(request):
            return web.Response(status=204)
        await waker.wait(tenant, kind, seen, min(remaining, recheck))
        if rt.shutting_down or waker.closed or _gone(request):
            return web.Response(status=204)
    status_map = rt.status_maps.get(tenant)  # (a reload replaces the maps, not the Runtime)
    if _gone(request) or status_map is None:  # gone, or its tenant removed by a reload meanwhile
        await _release(store, record)
        return web.Response(status=204)
    resp = web.Response(
        body=render_record(record, status_map),
        headers={"Content-Type": FORM_CT},
    )
    try:
        await resp.prepare(request)
        await resp.write_eof()
        received = await peer_received(request.transport)
    except BaseException:
        await asyncio.shield(_release(store, record))  # not handed over: the next poll gets it
        raise
    if not received:  # closed or reset before the client's TCP stack acknowledged the answer
        log.info("poll_not_received", tenant=tenant, kind=kind)
        await _release(store, record)
        return resp
    try:
        await store.ack(record)
    except StoreError as exc:
        log.error("ack_failed", tenant=tenant, kind=kind, error=str(exc))
    return resp


async def _release(store: Store, record: LegacyRecord) -> None:
    try:
        await store.release(record)
    except StoreError as exc:  # the lease runs out by itself
        log.error("release_failed", tenant=record.tenant, kind=record.kind, error=str(exc))


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def poll_in(request: web.Request) -> web.StreamResponse:
    """GET/POST /api/1/sms/in: one incoming message, or 204 after the long-poll wait."""
    return await _poll(request, "in")


async def poll_status(request: web.Request) -> web.StreamResponse:
    """GET/POST /api/1/sms/status: one status update, or 204 after the long-poll wait."""
    return await _poll(request, "status")


async def queue(request: web.Request) -> web.StreamResponse:
    """GET/POST /api/1/sms/queue: exactly `inCount=N&statusCount=M`."""
    settings, _ = await _authenticated(request)
    in_count, status_count = await request.config_dict[keys.STORE].queue_depth(settings.name)
    return web.Response(
        body=render_queue(in_count, status_count), headers={"Content-Type": FORM_CT}
    )


def setup(app: web.Application) -> None:
    """Register the legacy routes for GET and POST."""
    for path, handler in (
        ("/api/1/sms/out", send),
        ("/api/1/sms/test", test_send),
        ("/api/1/sms/in", poll_in),
        ("/api/1/sms/status", poll_status),
        ("/api/1/sms/queue", queue),
    ):
        resource = app.router.add_resource(path)
        wrapped = edge(path, handler)
        resource.add_route("GET", wrapped)
        resource.add_route("POST", wrapped)
