"""The app factory: `create_app(settings)` wires subsystems, background jobs and routes.

The one place that knows the order of things: the store comes up first and goes down last,
then the Connexus client, then background workers (token refresh, stats, missed-webhook
sweep, push), which stop first. on_shutdown flips the shutting-down flag and releases
long-polls before in-flight requests are awaited. Every route is wrapped by `edge` (errors to
legacy answers, metrics, one log line) when it is registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from bc_proxy import __version__, health, keys, passthrough, registration, reload, webhooks, workers
from bc_proxy.backlog import backlog_loop
from bc_proxy.config import Settings
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.console import routes as console_routes
from bc_proxy.delivery import push_worker
from bc_proxy.edge import edge, on_prepare, plain_parse_errors
from bc_proxy.errors import StoreError
from bc_proxy.jobs import supervise
from bc_proxy.legacy import ratelimit, settling
from bc_proxy.legacy import routes as legacy_routes
from bc_proxy.legacy.auth import Authenticator
from bc_proxy.legacy.settling import pending_expiry_seconds
from bc_proxy.log import get_logger
from bc_proxy.metrics import Metrics
from bc_proxy.pull_jobs import pull_loop
from bc_proxy.recovery import recovery_loop
from bc_proxy.store import Delivery, Rules, Store, TenantRules, open_store

log = get_logger("bc_proxy.http")


def store_rules(settings: Settings) -> Rules:
    """What the store must know of the configured tenants (placement, routing, opt-out)."""
    out = {}
    for t in settings.tenants:
        p = t.push
        delivery = (
            Delivery(
                push_in=bool(p.incoming_url),
                push_status=bool(p.status_url),
                keep_for_polling=p.keep_for_polling,
                max_age_seconds=p.max_age_hours * 3600,
            )
            if p
            else Delivery()
        )
        out[t.name] = TenantRules(
            delivery=delivery,
            senders=t.senders,
            opt_out=t.opt_out,
            idempotency_window_seconds=t.idempotency_window_seconds,
        )
    return Rules(out)


def open_configured_store(settings: Settings) -> Store:
    """The store named by `store.url`, with these settings' rules (not opened yet)."""
    return open_store(
        settings.store.url,
        store_rules(settings),
        fsync=settings.store.fsync,
        lease_seconds=settings.store.lease_seconds,
    )


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = open_configured_store(settings)
    await store.open()
    app[keys.STORE] = store
    with contextlib.suppress(StoreError):
        expired = await store.expire_pending(_stale_before(settings))
        if expired:
            log.warning("sends_outcome_unknown_at_start", recipients=expired)
    yield
    await settling.drain(store, SETTLE_DRAIN_SECONDS)  # settles that outlived their request
    await store.close()


EXPIRE_EVERY = 30.0  # seconds between expiries of pending sends of a dead process
SETTLE_DRAIN_SECONDS = 5.0  # at shutdown, for settles still running in the background


def _stale_before(settings: Settings) -> float:
    """Pending sends created before this are of a process that died mid-call: their outcome
    is unknown, and they are never sent again by the gateway (a legacy retry gets
    upstream.unknown_retry_status); the legacy client gets an ERR status record for each."""
    return time.time() - pending_expiry_seconds(settings.upstream.timeout_seconds)


async def expire_pending_loop(app: web.Application) -> None:
    """Background job: every EXPIRE_EVERY seconds, on one replica at a time, expire the
    pending sends another (crashed) replica left behind, as a restart does at start; match
    delivery reports a failed look left unmatched although their send is known; and, after a
    reload, place stranded records once more (`Runtime.place_again_at`)."""
    store = app[keys.STORE]
    rt = app[keys.RUNTIME]
    while True:
        await asyncio.sleep(EXPIRE_EVERY)
        if rt.place_again_at and time.monotonic() >= rt.place_again_at:
            rt.place_again_at = 0.0  # (a reload meanwhile sets it again, for its own rules)
            try:
                await store.place_stranded()
            except StoreError as exc:
                rt.place_again_at = rt.place_again_at or time.monotonic()  # the next tick
                log.error("place_stranded_failed", error=str(exc))
        with contextlib.suppress(StoreError):
            async with store.exclusive("expire pending") as got:
                if got:
                    expired = await store.expire_pending(_stale_before(app[keys.SETTINGS]))
                    if expired:
                        log.warning("sends_outcome_unknown", recipients=expired)
        try:
            async with store.exclusive("match reports") as got:
                if got:
                    matched = await store.match_waiting_reports()
                    if matched:
                        log.warning("reports_matched_late", reports=matched)
        except StoreError as exc:
            log.error("match_waiting_reports_failed", error=str(exc)[:200])


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    client = app[keys.CLIENT]
    await client.start()  # webhook registration: a background job (bc_proxy.registration)
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
    metrics = app[keys.METRICS]

    def start(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        return asyncio.create_task(supervise(name, run, metrics), name=f"bc-proxy {name}")

    tasks = [start(job.__name__, functools.partial(job, app)) for job in app[BACKGROUND]]
    reload.start_token_jobs(app)  # per tenant, restarted by a config reload
    yield
    # The push worker takes the cancel as its stop (it began at on_shutdown already, beside
    # the server's drain): pushes in flight still end within shutdown_timeout_seconds of it.
    for task in reversed(tasks):
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await reload.stop_token_jobs(app)


def _store_label(url: str) -> str:
    """The store's backend and location, never its credentials."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return f"sqlite {url.removeprefix('sqlite:///')}"
    where = parts.hostname or "localhost"
    return f"postgresql {where}:{parts.port or 5432}{parts.path}"


def _listening(settings: Settings) -> list[str]:
    server = settings.server
    scheme = "https" if server.tls_cert_file else "http"
    out = [f"{scheme}://{server.host}:{server.port}"]
    if server.metrics_port is not None:
        out.append(f"http://{server.host}:{server.metrics_port}/metrics")
    return out


async def _log_started(app: web.Application) -> None:
    settings = app[keys.SETTINGS]
    log.info(
        "started",
        version=__version__,
        listen=_listening(settings),
        tenants=[t.name for t in settings.tenants],
        store=_store_label(settings.store.url),
        durability="fsync" if settings.store.fsync else "no-fsync",
        workers=settings.server.workers,
        worker=workers.worker_index(),
    )


async def _log_stopped(app: web.Application) -> None:
    log.info("stopped", version=__version__)


async def _on_shutdown(app: web.Application) -> None:
    log.info("stopping", in_flight_sends=app[keys.RUNTIME].sends_in_flight)
    app[keys.RUNTIME].shutting_down = True
    app[keys.RUNTIME].stop_began = asyncio.get_running_loop().time()
    store = app.get(keys.STORE)
    if store is not None:
        store.waker.close()


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    """Build the bc-proxy application for these settings."""
    plain_parse_errors()
    # No app middlewares: each route is wrapped by `edge` at registration, which saves the
    # per-request middleware chain (a measurable share of the send path).
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # aiohttp's keep-alive timer runs from the moment a connection opens until a whole
        # request (line and headers) has arrived, and between requests: so it is also the
        # header read timeout. Header sizes are bounded by the parser's own limits.
        handler_args={
            "keepalive_timeout": settings.server.read_timeout_seconds,
            "max_line_size": 8190,
            "max_field_size": 8190,
            "max_headers": 64,
        },
    )
    metrics = metrics if metrics is not None else Metrics()
    metrics.initialise(t.name for t in settings.tenants)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics
    app[keys.RUNTIME] = keys.Runtime(
        status_maps={t.name: settings.status_map_for(t) for t in settings.tenants},
        tenants={t.name: t for t in settings.tenants},
    )
    app[keys.AUTH] = Authenticator(
        settings.tenants, on_refusal=lambda outcome: metrics.auth_refusals.labels(outcome).inc()
    )
    app[keys.CLIENT] = ConnexusClient(settings, metrics)
    jobs: list[Job] = [backlog_loop, recovery_loop, registration.registration_job, pull_loop]
    jobs.append(expire_pending_loop)
    jobs.append(push_worker)  # push worker: last up
    app[BACKGROUND] = jobs
    reload.prepare(app)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_client_ctx)
    app.cleanup_ctx.append(_metrics_port_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.on_startup.append(_log_started)
    app.on_cleanup.append(_log_stopped)  # after every cleanup context: the last line
    app.on_response_prepare.append(on_prepare)
    ratelimit.setup(app)
    legacy_routes.setup(app)
    webhooks.setup(app)
    health.setup(app)
    passthrough.setup(app)
    registration.setup(app)
    console_routes.setup(app)
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", edge("/metrics", metrics.handler()))
    return app
