"""Verified webhook registration (`webhook.register_on_start`): configure, read back, report.

Owns setting each webhook-mode account's webhook to `{public_url}/webhooks/connexus/{secret}`
(a tenant's own `webhook_secret` when it has one) through Connexus `configure`, reading it back
with `GET configure`, and reporting the outcome in a log line, a metric and `/readyz?verbose`.
A failure or mismatch is retried in the background with backoff; never fatal, never blocking.
One job per tenant (`keys.REGISTRATION_JOBS`), reconciled by a config reload: a tenant added,
re-keyed or back from pull mode is registered as at start; a removed one's job is cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

from aiohttp import ClientError, web

from bc_proxy import keys
from bc_proxy.config import ConnexusCredentials, Settings, TenantSettings
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.errors import LegacyError
from bc_proxy.log import get_logger, scrub_text

log = get_logger("bc_proxy.registration")

BACKOFF_INITIAL = 2.0
BACKOFF_MAX = 300.0
# tenant -> one line: "verified", "mismatch: ...", "error: ...", "pending"
REGISTRATION = web.AppKey("webhook_registration", dict[str, str])


def webhook_url(settings: Settings, tenant: TenantSettings) -> str:
    """The webhook URL this tenant's account should point at (its own secret if it has one)."""
    secret = (tenant.webhook_secret or settings.webhook.secret).get_secret_value()
    return f"{(settings.server.public_url or '').rstrip('/')}/webhooks/connexus/{secret}"


def _shown(url: str | None) -> str:
    """A webhook URL fit for logs and /readyz: the secret path segment hidden."""
    if not url:
        return "none"
    head, sep, _ = url.rpartition("/webhooks/connexus/")
    return f"{head}{sep}***" if sep else "another URL"


async def read_back(client: ConnexusClient, tenant: str) -> str | None:
    """The webhook URL Connexus has for the tenant's account (`GET configure`)."""
    headers: dict[str, str] = {}
    extra = client.password_params(tenant)
    if extra:
        pair = f"{extra['userId']}:{extra['password']}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    metrics = client.metrics
    started = time.perf_counter()
    try:
        status, body, _ = await client.request(
            tenant, "GET", f"{client.base}/configure", None, headers
        )
    except (TimeoutError, ClientError) as exc:
        metrics.upstream_requests.labels("configure", "error").inc()
        raise LegacyError(f"configure read-back failed ({type(exc).__name__})") from None
    metrics.upstream_requests.labels("configure", str(status)).inc()
    metrics.upstream_duration.labels("configure").observe(time.perf_counter() - started)
    if status != 200:
        raise LegacyError(f"configure read-back answered {status}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise LegacyError("configure read-back was not JSON") from None
    url = answer.get("webhook_url") if isinstance(answer, dict) else None
    return url if isinstance(url, str) else None


async def register(client: ConnexusClient, tenant: str, url: str) -> tuple[str, str]:
    """Set and verify one account's webhook: (outcome, line) with outcome verified, mismatch
    or error."""
    try:
        await client.configure_webhook(tenant, url)
        got = await read_back(client, tenant)
    except LegacyError as exc:
        # Scrubbed before the cut (a secret Connexus quoted must not be cut in half, where no
        # later scrubbing could find it), as everything shown on /readyz and the console.
        return "error", scrub_text(f"error: {exc.reason}")[:200]
    if got == url:
        return "verified", f"verified: {_shown(url)}"
    return "mismatch", f"mismatch: Connexus has {_shown(got)}"


async def _register_until_verified(app: web.Application, tenant: str, url: str) -> None:
    client, metrics = app[keys.CLIENT], app[keys.METRICS]
    state = app[REGISTRATION]
    delay = BACKOFF_INITIAL
    while True:
        outcome, line = await register(client, tenant, url)
        metrics.webhook_registrations.labels(tenant, outcome).inc()
        if outcome == "verified":
            state[tenant] = line
            log.info("webhook_registration", tenant=tenant, outcome=outcome)
            return
        state[tenant] = f"{line}; retrying in {delay:.0f} s"
        log.warning(
            "webhook_registration", tenant=tenant, outcome=outcome, detail=line, retry_s=delay
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def running_url(settings: Settings, tenant: TenantSettings) -> str | None:
    """The webhook URL the running process answers for `tenant` (a tenant of a reloaded file):
    the path secret it had at start (its own or the global one: the webhook route's secrets
    are not reloaded); None for a tenant added with its own webhook_secret, whose path only a
    restart serves."""
    started = next((t for t in settings.tenants if t.name == tenant.name), None)
    if started is not None:
        return webhook_url(settings, started)
    if tenant.webhook_secret is not None:
        return None
    return webhook_url(settings, tenant)


def reconcile(app: web.Application) -> list[asyncio.Task[None]]:
    """Registration jobs for the tenants in force (start; after a config reload): one is
    started for each webhook-mode tenant without one for its current Connexus credentials
    (new, re-keyed, or back from pull mode), with the backoff of the start; the job of a
    tenant removed, re-keyed or gone to pull mode is cancelled. The cancelled jobs, to await."""
    settings = app[keys.SETTINGS]  # the running webhook and server sections
    state, jobs = app[REGISTRATION], app[keys.REGISTRATION_JOBS]
    rt = app[keys.RUNTIME]
    tenants = rt.tenants if active(app) and not rt.shutting_down else {}
    wanted: dict[str, tuple[ConnexusCredentials, str]] = {}
    for t in tenants.values():
        url = running_url(settings, t) if t.inbound.mode == "webhook" else None
        if url is not None:
            wanted[t.name] = (t.connexus, url)
    cancelled = []
    for name, (creds, url, task) in list(jobs.items()):
        if wanted.get(name) != (creds, url):
            del jobs[name]
            task.cancel()
            cancelled.append(task)
    for name, (creds, url) in wanted.items():
        if name not in jobs:
            state[name] = "pending"
            task = asyncio.create_task(
                _register_until_verified(app, name, url), name=f"bc-proxy registration {name}"
            )
            jobs[name] = (creds, url, task)
    for name in list(state):
        if name not in tenants:
            del state[name]
    for t in tenants.values():
        if t.inbound.mode == "pull":
            state[t.name] = "pull mode: no webhook"
        elif t.name not in wanted:
            state[t.name] = "not registered: its own webhook_secret needs a restart"
    return cancelled


async def registration_job(app: web.Application) -> None:
    """Background job: register every webhook-mode tenant's webhook until verified; a config
    reload reconciles the jobs (`reconcile`). Cancelled (shutdown): every job is stopped."""
    if not active(app):
        return
    try:
        reconcile(app)
        await asyncio.Event().wait()
    finally:
        await stop(app)


def active(app: web.Application) -> bool:
    """Whether registration runs in this process (`webhook.register_on_start`, a public_url)."""
    settings = app[keys.SETTINGS]
    return settings.webhook.register_on_start and bool(settings.server.public_url)


async def stop(app: web.Application) -> None:
    """Cancel every registration job and wait for them."""
    jobs = app[keys.REGISTRATION_JOBS]
    tasks = [task for _, _, task in jobs.values()]
    jobs.clear()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def setup(app: web.Application) -> None:
    """Give the app its registration state (shown by /readyz?verbose) and its jobs' registry."""
    app[REGISTRATION] = {}
    app[keys.REGISTRATION_JOBS] = {}
