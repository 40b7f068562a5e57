"""The edge of every route: the exception tree turned into one-line legacy answers, one
metric sample and one log line per request.

Applied as a wrapper when a route is registered (`edge(path, handler)`) rather than as an app
middleware: same behaviour, without aiohttp building a middleware chain for every request.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from bc_proxy import keys
from bc_proxy.console.recent import RECENT
from bc_proxy.errors import ClientGone, LegacyError, StoreError
from bc_proxy.log import get_logger
from bc_proxy.metrics import LEGACY_ROUTES, NO_TENANT

log = get_logger("bc_proxy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TENANT = web.RequestKey("tenant", str)
_LEGACY = frozenset(LEGACY_ROUTES)
_QUIET = frozenset({"/metrics", "/healthz", "/readyz"})
_TEXT = "text/plain; charset=utf-8"


def text(status: int, reason: str) -> web.Response:
    """A one-line plain-text answer."""
    return web.Response(
        status=status, body=(reason + "\n").encode(), headers={"Content-Type": _TEXT}
    )


def edge(route: str, handler: Handler) -> Handler:
    """Wrap `handler` of the route template `route` with error answers, metrics and logging."""
    legacy = route in _LEGACY
    quiet = route in _QUIET

    async def at_edge(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            resp = await handler(request)
        except LegacyError as exc:
            resp = text(exc.status, exc.reason)
        except web.HTTPException as exc:
            resp = text(exc.status, "Request body too large" if exc.status == 413 else exc.reason)
        except StoreError as exc:
            log.error("store_error", route=route, error=str(exc))
            resp = text(500, "Storage failure")
        except (ClientGone, ConnectionError):
            # The client went away mid-request: nothing can be answered, nothing went wrong
            # here. Counted and logged as 499 ("client closed request"), never a 500.
            resp = text(ClientGone.status, "Client closed request")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled", route=route)
            resp = text(500, "Internal error")
        tenant = request.get(TENANT, NO_TENANT)
        app = request.app
        if legacy:
            app[keys.METRICS].observe_legacy(route, tenant, resp.status, started)
        recent = app.get(RECENT)  # the console's last-requests ring, when the console is on
        if recent is not None and not quiet:
            recent.add(request, route, tenant, resp.status, started)
        if not quiet and app[keys.SETTINGS].log.requests:
            extra = {"client": request.remote} if resp.status == 401 else {}
            log.info(
                "request",
                request_id=request.headers.get("X-Request-Id") or secrets.token_hex(6),
                tenant=tenant,
                route=route,
                method=request.method,
                status=resp.status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                **extra,
            )
        return resp

    return at_edge
