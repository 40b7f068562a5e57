"""The edge of every route: a request id, the exception tree turned into one-line legacy
answers, one metric sample and one log line per request; wrapped around each handler at
registration (no per-request middleware chain). Also the on_response_prepare hook for ids on
streamed and unrouted answers, and the one guarded patch of aiohttp (`plain_parse_errors`)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bc_proxy import keys
from bc_proxy.access_log import access, access_request
from bc_proxy.console.recent import RECENT
from bc_proxy.errors import ClientGone, LegacyError, StoreError
from bc_proxy.log import (
    REQUEST_ID,
    get_logger,
    new_request_id,
    scrub_text,
)
from bc_proxy.metrics import LEGACY_ROUTES, NO_TENANT

log = get_logger("bc_proxy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TENANT = web.RequestKey("tenant", str)
_LEGACY = frozenset(LEGACY_ROUTES)
_QUIET = frozenset({"/metrics", "/healthz", "/readyz"})
_TEXT = "text/plain; charset=utf-8"
RID_HEADER = "X-Request-Id"


def text(status: int, reason: str) -> web.Response:
    """A one-line plain-text answer."""
    return web.Response(
        status=status, body=(reason + "\n").encode(), headers={"Content-Type": _TEXT}
    )


async def _answer(request: web.Request, route: str, handler: Handler) -> web.StreamResponse:
    """The handler's answer, or the one-line answer for what it raised."""
    try:
        return await handler(request)
    except LegacyError as exc:
        # A reason may quote Connexus (a refused token request, a configure answer): never
        # a configured secret or a bearer token in an answer, as in the logs.
        return text(exc.status, scrub_text(exc.reason, phones=False))
    except web.HTTPException as exc:
        return text(exc.status, "Request body too large" if exc.status == 413 else exc.reason)
    except StoreError as exc:
        log.error("store_error", route=route, error=str(exc))
        return text(500, "Storage failure")
    except (ClientGone, ConnectionError):
        # The client went away mid-request: nothing can be answered, nothing went wrong
        # here. Counted and logged as 499 ("client closed request"), never a 500.
        return text(ClientGone.status, "Client closed request")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled", route=route)
        return text(500, "Internal error")


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the request id on answers prepared inside a handler (streamed),
    and an id plus a log line for requests no route took (aiohttp's own 404 and 405)."""
    rid = REQUEST_ID.get()
    if rid is not None:
        if RID_HEADER not in response.headers:
            response.headers[RID_HEADER] = rid
        return
    if RID_HEADER in response.headers or request.match_info.http_exception is None:
        return
    rid = new_request_id(request.headers.get(RID_HEADER))
    response.headers[RID_HEADER] = rid
    if request.app[keys.SETTINGS].log.requests:
        # No path: an unknown path may hold a mistyped webhook secret or a password.
        access(
            {
                "request_id": rid,
                "route": "unmatched",
                "method": request.method,
                "status": response.status,
                "client": request.remote,
            }
        )


def edge(route: str, handler: Handler) -> Handler:
    """Wrap `handler` of the route template `route` with error answers, metrics and logging."""
    legacy = route in _LEGACY
    quiet = route in _QUIET

    async def at_edge(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = new_request_id(request.headers.get(RID_HEADER))
        token = REQUEST_ID.set(rid)  # every log line and upstream call of this request
        try:
            resp = await _answer(request, route, handler)
            if not resp.prepared:
                resp.headers[RID_HEADER] = rid
            tenant = request.get(TENANT, NO_TENANT)
            app = request.app
            if legacy:
                app[keys.METRICS].observe_legacy(route, tenant, resp.status, started)
            recent = app.get(RECENT)  # the console's last-requests ring, when the console is on
            if recent is not None and not quiet:
                recent.add(request, route, tenant, resp.status, started)
            if not quiet and app[keys.SETTINGS].log.requests:
                duration_ms = round((time.perf_counter() - started) * 1000, 2)
                if resp.status == 401:
                    fields = {
                        "tenant": tenant,
                        "route": route,
                        "method": request.method,
                        "status": resp.status,
                        "duration_ms": duration_ms,
                        "client": request.remote,
                    }
                    access(fields)
                else:
                    access_request(tenant, route, request.method, resp.status, duration_ms)
        finally:
            REQUEST_ID.reset(token)
        return resp

    return at_edge


_PHRASES = frozenset(s.value for s in HTTPStatus)
_HANDLE_ERROR_PARAMS = ("self", "request", "status", "exc", "message")


def plain_parse_errors() -> bool:
    """Answer requests aiohttp cannot parse with the status line's phrase only.

    aiohttp's answer to a malformed request quotes the parser's message, which quotes the
    request line, and with it a legacy password sent in the query string. aiohttp 3.14 offers
    no public hook for that answer (no middleware, handler or on_response_prepare signal runs
    for a request that never parsed), so this wraps `RequestHandler.handle_error`, once per
    process. It checks the method's signature first: if a future aiohttp changed it, nothing
    is patched and False is returned (the test suite fails on it before a release does).
    """
    original = RequestHandler.handle_error
    if getattr(original, "_bc_proxy", False):
        return True
    if tuple(inspect.signature(original).parameters) != _HANDLE_ERROR_PARAMS:
        log.error("aiohttp_handle_error_changed", signature=str(inspect.signature(original)))
        return False

    def handle_error(
        self: RequestHandler,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 500:
            known = status in _PHRASES
            message = f"{status} {HTTPStatus(status).phrase}" if known else "Bad request"
        return original(self, request, status, exc, message)

    handle_error._bc_proxy = True  # type: ignore[attr-defined]
    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]
    return True
