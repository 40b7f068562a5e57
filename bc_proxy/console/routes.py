"""Console routes: GET /console (the page) and POST /console/replay (dead letters back to push).

Owns gathering the page's facts from what the gateway already holds (client token state, the
store's waiting counts, dead letters and rejected webhooks, the recent-requests ring, the
upstream request counter), Connexus and error text scrubbed as in the logs
(`bc_proxy.health.scrubber`), and the request checks: Basic login on every path (401 with
WWW-Authenticate), and for the replay a CSRF token bound to the login plus a SameSite cookie.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web

from bc_proxy import keys
from bc_proxy.console.auth import REALM, ConsoleAuth
from bc_proxy.console.page import CSP, ErrorRate, TenantRow, View, WaitingRow, render
from bc_proxy.console.recent import RECENT, RecentRequests
from bc_proxy.edge import edge
from bc_proxy.health import scrubber
from bc_proxy.registration import REGISTRATION

AUTH = web.AppKey("console_auth", ConsoleAuth)
ERROR_SAMPLES = web.AppKey("console_error_samples", deque[tuple[float, int, int]])
COOKIE = "bc_console_csrf"
ERROR_WINDOW = 300.0  # seconds of the "recent" upstream error rate
DEAD_SHOWN = 100
REJECTED_SHOWN = 20
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _plain(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=text + "\n",
        content_type="text/plain",
        headers={**_HEADERS, **headers},
    )


async def _login(request: web.Request) -> bytes | None:
    return await request.config_dict[AUTH].check(
        request.headers.get("Authorization"), request.remote
    )


def _unauthorized() -> web.Response:
    return _plain(401, "Console login required", **{"WWW-Authenticate": REALM})


def _upstream_errors(app: web.Application, now: float) -> ErrorRate:
    total = errors = 0
    for family in app[keys.METRICS].upstream_requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            status = sample.labels.get("status", "")
            count = int(sample.value)
            total += count
            if status in ("timeout", "error") or status.startswith("5"):
                errors += count
    samples = app[ERROR_SAMPLES]
    samples.append((now, total, errors))
    while len(samples) > 1 and samples[0][0] < now - ERROR_WINDOW:
        samples.popleft()
    since, total0, errors0 = samples[0]
    return ErrorRate(errors, total, errors - errors0, total - total0, max(now - since, 0.0))


def _tenant_rows(app: web.Application) -> list[TenantRow]:
    client, registered = app[keys.CLIENT], app.get(REGISTRATION) or {}
    rows = []
    for name, t in app[keys.RUNTIME].tenants.items():
        mgr = client.tokens.get(name)
        if mgr is None:
            auth = "password auth (no token)"
        elif mgr.has_valid_token:
            expiry = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + mgr.seconds_left())
            )
            auth = f"token valid for {mgr.seconds_left():.0f} s (expires {expiry} UTC)"
        else:
            auth = f"no token: {mgr.last_error or 'none fetched yet'}"  # scrubbed by render
        rows.append(TenantRow(name, auth, t.inbound.mode, registered.get(name, "")))
    return rows


def _delivery(app: web.Application, tenant: str, kind: str) -> str:
    t = app[keys.RUNTIME].tenants.get(tenant)
    if t is None:
        return "tenant no longer configured"
    push = t.push
    pushes = push is not None and bool(push.incoming_url if kind == "in" else push.status_url)
    if not pushes:
        return "poll"
    return "push pending + poll" if push is not None and push.keep_for_polling else "push pending"


async def console_page(request: web.Request) -> web.StreamResponse:
    """The console page, for the console login only."""
    login = await _login(request)
    if login is None:
        return _unauthorized()
    app = request.app
    store = app[keys.STORE]
    now = time.time()
    waiting = [
        WaitingRow(
            w.tenant,
            w.kind,
            _delivery(app, w.tenant, w.kind),
            w.count,
            None if w.oldest_created_at is None else now - w.oldest_created_at,
        )
        for w in sorted(await store.waiting(), key=lambda w: (w.tenant, w.kind))
    ]
    view = View(
        tenants=_tenant_rows(app),
        waiting=waiting,
        dead=await store.dead_letters(DEAD_SHOWN),
        dead_count=await store.dead_letter_count(),
        rejected=await store.rejected_webhooks(REJECTED_SHOWN),
        recent=app[RECENT].newest_first(),
        errors=_upstream_errors(app, now),
    )
    csrf = app[AUTH].csrf_token(login)
    page = render(view, csrf, now, scrubber(app))
    resp = web.Response(text=page, content_type="text/html", headers=_HEADERS)
    resp.set_cookie(
        COOKIE, csrf, path="/console", httponly=True, samesite="Strict", secure=request.secure
    )
    return resp


async def console_replay(request: web.Request) -> web.StreamResponse:
    """Replay one dead letter (`id`) or all of them (`id=all`): CSRF-checked, then 303 back."""
    login = await _login(request)
    if login is None:
        return _unauthorized()
    auth = request.app[AUTH]
    form = await request.post()
    token = form.get("csrf")
    cookie = request.cookies.get(COOKIE)
    if not (
        isinstance(token, str)
        and auth.csrf_ok(login, token)
        and auth.csrf_ok(login, cookie)
        and request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
    ):
        return _plain(403, "Missing or invalid CSRF token")
    target = form.get("id")
    if target == "all":
        ids: list[int] | None = None
    elif isinstance(target, str) and target.isascii() and target.isdigit() and len(target) <= 18:
        ids = [int(target)]  # ASCII digits ("²" is a digit to isdigit), within a bigint
    else:
        return _plain(400, "Which dead letter? Give id=N or id=all")
    await request.app[keys.STORE].replay(ids, time.time())
    return web.Response(status=303, headers={**_HEADERS, "Location": "/console"})


async def _other(request: web.Request) -> web.StreamResponse:
    if await _login(request) is None:
        return _unauthorized()
    return _plain(404, "Not found")


def setup(app: web.Application) -> None:
    """Serve the console when `console` is configured; otherwise add nothing (404)."""
    console = app[keys.SETTINGS].console
    if console is None:
        return
    app[AUTH] = ConsoleAuth(console.user, console.password_hash.get_secret_value())
    app[RECENT] = RecentRequests()
    app[ERROR_SAMPLES] = deque(maxlen=1000)

    async def close_auth(app: web.Application) -> AsyncIterator[None]:
        yield
        app[AUTH].close()

    app.cleanup_ctx.append(close_auth)
    app.router.add_get("/console", edge("/console", console_page))
    app.router.add_post("/console/replay", edge("/console/replay", console_replay))
    app.router.add_route("*", "/console/{tail:.*}", edge("/console/{tail}", _other))
