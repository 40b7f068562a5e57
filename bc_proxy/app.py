"""The app factory: `create_app(settings)` wires middlewares, subsystems and routes.

The one place that knows the order of things: the store comes up first and goes down last,
then the Connexus client, then background workers (token refresh, stats, missed-webhook
sweep, push), which stop first. on_shutdown flips the shutting-down flag and releases
long-polls before in-flight requests are awaited. Owns the edge middleware that turns the
exception tree into legacy answers and does per-request metrics and logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bc_proxy import health, keys, passthrough, webhooks
from bc_proxy.backlog import backlog_loop
from bc_proxy.config import Settings
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.delivery import push_worker
from bc_proxy.errors import LegacyError, StoreError
from bc_proxy.legacy import routes as legacy_routes
from bc_proxy.legacy.auth import Authenticator
from bc_proxy.log import get_logger
from bc_proxy.metrics import LEGACY_ROUTES, NO_TENANT, Metrics
from bc_proxy.recovery import recovery_loop
from bc_proxy.store import Delivery, open_store

log = get_logger("bc_proxy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_LEGACY = frozenset(LEGACY_ROUTES)
_TEXT = "text/plain; charset=utf-8"


def _text(status: int, reason: str) -> web.Response:
    return web.Response(
        status=status, body=(reason + "\n").encode(), headers={"Content-Type": _TEXT}
    )


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors -> one-line legacy answers; one metric sample and one log line per request."""
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        resp = await handler(request)
    except LegacyError as exc:
        resp = _text(exc.status, exc.reason)
    except web.HTTPException as exc:
        if exc.status == 413:
            resp = _text(413, "Request body too large")
        else:
            resp = _text(exc.status, exc.reason)
    except StoreError as exc:
        log.error("store_error", route=route, error=str(exc))
        resp = _text(500, "Storage failure")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled", route=route)
        resp = _text(500, "Internal error")
    tenant = request.get(legacy_routes.TENANT, NO_TENANT)
    app = request.config_dict
    if route in _LEGACY:
        app[keys.METRICS].observe_legacy(route, tenant, resp.status, started)
    if app[keys.SETTINGS].log.requests and route not in _QUIET:
        log.info(
            "request",
            request_id=request.headers.get("X-Request-Id") or secrets.token_hex(6),
            tenant=tenant,
            route=route,
            method=request.method,
            status=resp.status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
    return resp


_QUIET = frozenset({"/metrics", "/healthz", "/readyz"})


def _deliveries(settings: Settings) -> dict[str, Delivery]:
    out = {}
    for t in settings.tenants:
        p = t.push
        out[t.name] = (
            Delivery(
                push_in=bool(p.incoming_url),
                push_status=bool(p.status_url),
                keep_for_polling=p.keep_for_polling,
                max_age_seconds=p.max_age_hours * 3600,
            )
            if p
            else Delivery()
        )
    return out


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = open_store(settings.store.url, _deliveries(settings), fsync=settings.store.fsync)
    await store.open()
    app[keys.STORE] = store
    yield
    await store.close()


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    client = app[keys.CLIENT]
    await client.start()
    settings = app[keys.SETTINGS]
    if settings.webhook.register_on_start and settings.server.public_url:
        secret = settings.webhook.secret.get_secret_value()
        url = f"{settings.server.public_url.rstrip('/')}/webhooks/connexus/{secret}"
        for tenant in app[keys.RUNTIME].tenants:
            try:
                await client.configure_webhook(tenant, url)
            except LegacyError as exc:
                log.error("webhook_registration_failed", tenant=tenant, error=exc.reason)
    yield
    await client.close()


async def _metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serve /metrics on `server.metrics_port` too, so it need not be public."""
    settings = app[keys.SETTINGS]
    port = settings.server.metrics_port
    if port is None:
        yield
        return
    side = web.Application()
    side.router.add_get("/metrics", app[keys.METRICS].handler())
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.server.host, port).start()
    yield
    await runner.cleanup()


Job = Callable[[web.Application], Coroutine[Any, Any, None]]
BACKGROUND = web.AppKey("background", list[Job])


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(job(app)) for job in app[BACKGROUND]]
    tasks += [asyncio.create_task(m.keep_fresh()) for m in app[keys.CLIENT].tenant_tokens()]
    yield
    for task in reversed(tasks):
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _on_shutdown(app: web.Application) -> None:
    app[keys.RUNTIME].shutting_down = True
    store = app.get(keys.STORE)
    if store is not None:
        store.notifier.close()


def _plain_parse_errors() -> None:
    """Answer requests aiohttp cannot parse with the status phrase only.

    aiohttp's default 400 body quotes the parser's message, which quotes the request line,
    and with it a legacy password sent in the query string. Applied once per process.
    """
    original = RequestHandler.handle_error
    if getattr(original, "_bc_proxy", False):
        return

    def handle_error(
        self: RequestHandler,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 500:
            message = (
                f"{status} {HTTPStatus(status).phrase}" if status in _PHRASES else "Bad request"
            )
        return original(self, request, status, exc, message)

    handle_error._bc_proxy = True  # type: ignore[attr-defined]
    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


_PHRASES = frozenset(s.value for s in HTTPStatus)


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    """Build the bc-proxy application for these settings."""
    _plain_parse_errors()
    app = web.Application(
        client_max_size=settings.server.max_body_bytes, middlewares=[edge_middleware]
    )
    metrics = metrics if metrics is not None else Metrics()
    metrics.initialise(t.name for t in settings.tenants)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    app[keys.RUNTIME] = keys.Runtime(
        status_maps={t.name: settings.status_map_for(t) for t in settings.tenants},
        tenants={t.name: t for t in settings.tenants},
        fallback_tenant=settings.tenants[0].name if len(settings.tenants) == 1 else None,
    )
    app[keys.AUTH] = Authenticator(settings.tenants)
    app[keys.CLIENT] = ConnexusClient(settings, metrics)
    jobs: list[Job] = [backlog_loop, recovery_loop, push_worker]  # push worker: last up
    app[BACKGROUND] = jobs
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_client_ctx)
    app.cleanup_ctx.append(_metrics_port_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.on_shutdown.append(_on_shutdown)
    legacy_routes.setup(app)
    webhooks.setup(app)
    health.setup(app)
    passthrough.setup(app)
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", metrics.handler())
    return app
