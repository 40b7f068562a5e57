"""Thin handlers of the legacy surface: /api/1/sms/{out,test,in,status,queue}.

Each handler parses, authenticates, calls one translation and one upstream/store operation,
and answers in the exact legacy format. Errors are raised as LegacyError and turned into
one-line answers by `edge` (edge.py). Does not own wire parsing or translation rules.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from bc_proxy import keys
from bc_proxy.edge import TENANT, edge
from bc_proxy.errors import StoreError
from bc_proxy.legacy.auth import credentials
from bc_proxy.legacy.forms import read_params
from bc_proxy.log import get_logger
from bc_proxy.store import Kind, SendRecord, StatusRecord
from bc_proxy.translate import parse_send, rejection_code, render_queue, render_record

FORM_CT: Final = "application/x-www-form-urlencoded"

log = get_logger("bc_proxy.legacy")


async def _authenticated(request: web.Request) -> tuple[str, dict[str, str]]:
    app = request.app  # no sub-apps: cheaper than config_dict on the hot path
    params = await read_params(request, app[keys.SETTINGS].server.max_body_bytes)
    user, password = credentials(params, request.headers.get("Authorization"))
    tenant = await app[keys.AUTH].authenticate(user, password)
    request[TENANT] = tenant
    return tenant, params


async def send(request: web.Request) -> web.StreamResponse:
    """POST/GET /api/1/sms/out: forward to Connexus, record durably, answer 204."""
    tenant, params = await _authenticated(request)
    app = request.app
    rt = app[keys.RUNTIME]
    req = parse_send(params, rt.tenants[tenant].default_from)
    ref = app[keys.STORE].upstream_ref()
    # Bounded by upstream.timeout_seconds, token fetch and the one retry after a 401 included.
    rt.sends_in_flight += 1
    try:
        outcomes = await app[keys.CLIENT].send(tenant, req, ref)
    except BaseException:
        rt.sends_in_flight -= 1
        raise
    sender = req.sender
    sends = [
        SendRecord(tenant, req.message_id, o.recipient, sender or o.sender, o.connexus_id, ref)
        for o in outcomes
    ]
    statuses = [
        StatusRecord(
            tenant,
            o.recipient,
            sender or o.sender,
            req.message_id,
            rejection_code(o.error),
            o.error,
        )
        for o in outcomes
        if o.connexus_id is None
    ]
    rt.sends_in_flight -= 1
    await app[keys.STORE].record_sends(sends, statuses, solo=rt.sends_in_flight == 0)
    app[keys.METRICS].observe_send(tenant, len(outcomes) - len(statuses), len(statuses))
    return web.Response(status=204)


async def test_send(request: web.Request) -> web.StreamResponse:
    """POST/GET /api/1/sms/test: validate exactly like `out`, never forward."""
    tenant, params = await _authenticated(request)
    parse_send(params, request.config_dict[keys.RUNTIME].tenants[tenant].default_from)
    return web.Response(status=204)


async def _poll(request: web.Request, kind: Kind) -> web.StreamResponse:
    tenant, _ = await _authenticated(request)
    app = request.app
    rt = app[keys.RUNTIME]
    store = app[keys.STORE]
    notifier = store.notifier
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rt.tenants[tenant].poll_wait_seconds
    while True:
        seen = notifier.generation(tenant, kind)
        record = await store.claim(tenant, kind)
        if record is not None:
            break
        remaining = deadline - loop.time()
        if remaining <= 0 or rt.shutting_down:
            return web.Response(status=204)
        woke = await notifier.wait(tenant, kind, seen, remaining)
        if not woke or rt.shutting_down or _gone(request):
            return web.Response(status=204)
    if _gone(request):
        store.release(record)
        return web.Response(status=204)
    resp = web.Response(
        body=render_record(record, rt.status_maps[tenant]),
        headers={"Content-Type": FORM_CT},
    )
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except BaseException:
        store.release(record)  # not handed over: the next poll gets it
        raise
    try:
        await store.ack(record)
    except StoreError as exc:
        log.error("ack_failed", tenant=tenant, kind=kind, error=str(exc))
    return resp


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
    tenant, _ = await _authenticated(request)
    in_count, status_count = await request.config_dict[keys.STORE].queue_depth(tenant)
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
