"""A scriptable WebSMS Connexus emulator served as a real aiohttp app (tests, demo, benchmarks).

Owns the emulated HTTP surface: auth/token, sms/out (single and bulk, one message_id per
recipient), balance, mo/query (pagination and date filters as connexus-api.txt documents),
configure (per account, read back by GET), the Bulletin-compatible sms/in and sms/status polls,
wired with the /_emulator/ control paths (`emulator_control`). State and outgoing webhooks
live in `emulator_state`; nothing here belongs to the proxy itself.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from bc_proxy.connexus.emulator_control import EMULATOR_KEY, add_control_routes, scalar_text
from bc_proxy.connexus.emulator_polls import poll_answer
from bc_proxy.connexus.emulator_state import (
    DLR_STATUS_NAMES,
    TIME_FORMAT,
    Emulator,
    RecordedRequest,
    SentMessage,
)

__all__ = [
    "DLR_STATUS_NAMES",
    "EMULATOR_KEY",
    "Emulator",
    "RecordedRequest",
    "SentMessage",
    "create_emulator_app",
    "serve_emulator",
]

API_PREFIX = "/api/connexus/"
DEFAULT_SENDER = "552"
MAX_BULK = 200
MAX_MESSAGE_ID_LEN = 36

Params = dict[str, Any]
_ACCOUNT = web.RequestKey("emulator_account", str)  # the authenticated account of a request


_Handler = Callable[[Emulator, web.Request, Params], Awaitable[web.Response]]


def _error(status: int, error: str) -> web.Response:
    return web.json_response({"success": False, "error": error}, status=status)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _parse_body(request: web.Request, body: bytes) -> Params | None:
    """Form or JSON parameters of a request (query string as fallback); None if JSON is bad."""
    params: Params = dict(request.query) if request.query_string else {}
    if not body:
        return params
    ctype = request.content_type
    if ctype == "application/json" or (
        ctype != "application/x-www-form-urlencoded" and body.lstrip()[:1] == b"{"
    ):
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        params.update(data)
    else:
        params.update(parse_qsl(body.decode(request.charset or "utf-8", "replace")))
    return params


def _caller(emu: Emulator, request: web.Request, params: Params) -> str | None:
    """The authenticated account (client_id or user), or None when the credentials fail."""
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        account = emu.token_account(credentials.strip())
        if account is not None:
            return account
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            decoded = ""
        login, sep, secret = decoded.partition(":")
        if sep and _user_ok(emu, login, secret):
            return login
    user, password = scalar_text(params.get("userId")), scalar_text(params.get("password"))
    if user is not None and password is not None and _user_ok(emu, user, password):
        return user
    return None


def _user_ok(emu: Emulator, user: str, password: str) -> bool:
    expected = emu.users.get(user)
    return expected is not None and hmac.compare_digest(expected.encode(), password.encode())


async def _token(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    client_id, secret = (
        scalar_text(params.get("client_id")),
        scalar_text(params.get("client_secret")),
    )
    if not client_id or not secret:
        return web.json_response(
            {"error": "invalid_request", "error_description": "Missing client_id or client_secret"},
            status=400,
        )
    expected = emu.clients.get(client_id)
    if expected is None or not hmac.compare_digest(expected.encode(), secret.encode()):
        return web.json_response(
            {"error": "invalid_client", "error_description": "Invalid client credentials"},
            status=401,
        )
    return web.json_response(
        {
            "access_token": emu.issue_token(client_id),
            "token_type": "Bearer",
            "expires_in": emu.token_ttl,
        }
    )


def _send_one(
    emu: Emulator, to: str, body: str, sender: str, upstream_id: str | None, account: str
) -> dict[str, Any]:
    reason = emu.reject.get(to)
    if reason is not None:
        emu.sent.append(SentMessage("", to, body, sender, upstream_id, False, reason, account))
        return {"success": False, "status": "rejected", "to": to, "error": reason}
    message_id = emu.next_message_id()
    sent = SentMessage(message_id, to, body, sender, upstream_id, True, "", account)
    emu.sent.append(sent)
    if emu.auto_dlr is not None:
        emu.spawn_report(sent, emu.auto_dlr)
    return {
        "success": True,
        "status": "accepted",
        "message_id": message_id,
        "to": to,
        "from": sender,
        "parts": 1,
    }


async def _sms_out(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    raw_to = params.get("to")
    recipients: list[str | None]
    if isinstance(raw_to, list):
        if len(raw_to) > MAX_BULK:
            return _error(400, f"Maximum {MAX_BULK} recipients per bulk request")
        recipients = [scalar_text(r) for r in raw_to]
    else:
        recipients = [scalar_text(raw_to)]
    body = scalar_text(params.get("body"))
    if not body or not recipients or not all(recipients):
        return _error(400, "Missing parameters")
    upstream_id = scalar_text(params.get("messageId"))
    if upstream_id is not None and len(upstream_id) > MAX_MESSAGE_ID_LEN:
        return _error(400, f"messageId exceeds {MAX_MESSAGE_ID_LEN} characters")
    if emu.insufficient_funds:
        return _error(403, "Insufficient funds")
    sender = scalar_text(params.get("from")) or DEFAULT_SENDER
    account = request[_ACCOUNT]
    results = [_send_one(emu, str(to), body, sender, upstream_id, account) for to in recipients]
    if emu.send_response_delay > 0:
        await asyncio.sleep(emu.send_response_delay)
    if not isinstance(raw_to, list):
        return web.json_response(results[0])
    sent = sum(1 for r in results if r["success"])
    return web.json_response(
        {
            "success": sent == len(results),
            "messages": results,
            "summary": {"total": len(results), "sent": sent, "failed": len(results) - sent},
        }
    )


async def _balance(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    balance = emu.balances.get(request[_ACCOUNT], "125.50")
    return web.json_response({"balance": balance, "currency": "NZD"})


def _date_filter(value: Any, *, end: bool) -> str | None:
    """A Y-m-d or Y-m-d H:i:s filter as Y-m-d H:i:s (whole day for a bare date); ValueError."""
    text = scalar_text(value)
    if not text:
        return None
    try:
        return datetime.strptime(text, TIME_FORMAT).strftime(TIME_FORMAT)
    except ValueError:
        day = datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d")
        return f"{day} 23:59:59" if end else f"{day} 00:00:00"


async def _mo_query(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    sender = scalar_text(params.get("from")) or None
    to = scalar_text(params.get("to")) or None
    callback_status = scalar_text(params.get("callback_status")) or None
    try:
        start = _date_filter(params.get("start_date"), end=False)
        end = _date_filter(params.get("end_date"), end=True)
    except ValueError:
        return _error(400, "Invalid date format, use Y-m-d or Y-m-d H:i:s")
    limit = min(max(_int(params.get("limit"), 100), 1), 200)
    page = max(_int(params.get("page"), 1), 1)
    matched = emu.mo_window(start, end, request[_ACCOUNT])  # oldest first; dates by bisect
    if sender is not None or to is not None or callback_status is not None:
        matched = [
            m
            for m in matched
            if (sender is None or m["from"] == sender)
            and (to is None or m["to"] == to)
            and (callback_status is None or m.get("callbackStatus") == callback_status)
        ]
    total = len(matched)
    pages = math.ceil(total / limit)
    return web.json_response(
        {
            "status": "success",
            "messages": matched[(page - 1) * limit : page * limit],
            "pagination": {
                "page": page,
                "limit": limit,
                "totalRecords": total,
                "totalPages": pages,
                "hasNextPage": page < pages,
                "hasPreviousPage": page > 1,
            },
            "filters": {
                "from": sender,
                "to": to,
                "callback_status": callback_status,
                "start_date": start,
                "end_date": end,
            },
        }
    )


async def _configure(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    if request.method == "POST":
        url = params.get("webhook_url")
        if url is not None and not isinstance(url, str):
            return _error(400, "Invalid webhook_url")
        emu.configure(request[_ACCOUNT], url or None)
        return web.json_response({"success": True, "webhook_url": url or None})
    return web.json_response({"webhook_url": emu.webhook_url_of(request[_ACCOUNT])})


async def _sms_in(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    return poll_answer(emu, "in", request[_ACCOUNT])


async def _sms_status(emu: Emulator, request: web.Request, params: Params) -> web.Response:
    return poll_answer(emu, "status", request[_ACCOUNT])


_ROUTES: dict[str, tuple[frozenset[str], _Handler]] = {
    "sms/out": (frozenset({"POST"}), _sms_out),
    "sms/balance": (frozenset({"GET", "POST"}), _balance),
    "mo/query": (frozenset({"GET", "POST"}), _mo_query),
    "configure": (frozenset({"GET", "POST"}), _configure),
    "sms/in": (frozenset({"GET", "POST"}), _sms_in),
    "sms/status": (frozenset({"GET", "POST"}), _sms_status),
}


async def _api(request: web.Request) -> web.Response:
    """Every /api/connexus/ request: record, sleep latency, scripted failure, auth, dispatch."""
    emu = request.config_dict[EMULATOR_KEY]
    if request.content_type == "multipart/form-data":
        body, form = b"", await request.post()
        params: Params | None = {k: v for k, v in form.items() if isinstance(v, str)}
    else:
        body = await request.read()
        params = None
    record = RecordedRequest(request.method, request.path, dict(request.headers), body, 0)
    emu.requests.append(record)
    response = await _answer(emu, request, body, params)
    record.status = response.status
    return response


async def _answer(
    emu: Emulator, request: web.Request, body: bytes, params: Params | None
) -> web.Response:
    name = request.match_info["tail"].strip("/")
    is_token = name == "auth/token"
    if is_token and request.method == "POST":
        emu.token_requests += 1
    if emu.latency > 0:
        await asyncio.sleep(emu.latency)
    failures = emu.fail_token_next if is_token else emu.fail_next
    if failures:
        status = failures.pop(0)
        if status in (204, 304):
            return web.Response(status=status)
        return _error(status, "Server error")
    if params is None:
        params = _parse_body(request, body)
    if is_token:
        if request.method != "POST":
            return web.json_response(
                {"error": "method_not_allowed", "error_description": "Only POST is accepted"},
                status=405,
            )
        return await _token(emu, request, params or {})
    route = _ROUTES.get(name)
    if route is None:
        return _error(404, "Not found")
    methods, handler = route
    if request.method not in methods:
        return _error(405, "Method not allowed")
    account = _caller(emu, request, params or {})
    if account is None:
        return _error(401, "Unauthorized")
    if params is None:
        return _error(400, "Invalid JSON")
    request[_ACCOUNT] = account  # whose mo/query this is
    return await handler(emu, request, params)


def create_emulator_app(emulator: Emulator) -> web.Application:
    """The emulator app: the Connexus API under /api/connexus/, controls under /_emulator/."""
    app = web.Application()
    app[EMULATOR_KEY] = emulator

    async def close_emulator(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[EMULATOR_KEY].close()

    app.cleanup_ctx.append(close_emulator)
    app.router.add_route("*", API_PREFIX + "{tail:.*}", _api)
    add_control_routes(app)
    return app


async def serve_emulator(host: str, port: int, emulator: Emulator | None = None) -> None:
    """Serve the emulator on host:port until cancelled."""
    app = create_emulator_app(Emulator() if emulator is None else emulator)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
