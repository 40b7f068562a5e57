"""Verified webhook registration (`webhook.register_on_start`): configure, read back, report.

Owns setting each webhook-mode account's webhook to `{public_url}/webhooks/connexus/{secret}`
(a tenant's own `webhook_secret` when it has one) through Connexus `configure`, reading it back
with `GET configure`, and reporting the outcome in a log line, a metric and `/readyz?verbose`.
A failure or mismatch is retried in the background with backoff; never fatal, never blocking.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

from aiohttp import ClientError, web

from bc_proxy import keys
from bc_proxy.config import Settings, TenantSettings
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.errors import LegacyError
from bc_proxy.log import get_logger

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
        return "error", f"error: {exc.reason}"[:200]
    if got == url:
        return "verified", f"verified: {_shown(url)}"
    return "mismatch", f"mismatch: Connexus has {_shown(got)}"


async def _register_until_verified(app: web.Application, tenant: TenantSettings) -> None:
    settings, client, metrics = app[keys.SETTINGS], app[keys.CLIENT], app[keys.METRICS]
    state = app[REGISTRATION]
    url = webhook_url(settings, tenant)
    delay = BACKOFF_INITIAL
    while True:
        outcome, line = await register(client, tenant.name, url)
        metrics.webhook_registrations.labels(tenant.name, outcome).inc()
        if outcome == "verified":
            state[tenant.name] = line
            log.info("webhook_registration", tenant=tenant.name, outcome=outcome)
            return
        state[tenant.name] = f"{line}; retrying in {delay:.0f} s"
        log.warning(
            "webhook_registration", tenant=tenant.name, outcome=outcome, detail=line, retry_s=delay
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


async def registration_job(app: web.Application) -> None:
    """Background job: register every webhook-mode tenant's webhook until verified."""
    settings = app[keys.SETTINGS]
    state = app[REGISTRATION]
    if not settings.webhook.register_on_start or not settings.server.public_url:
        return
    tenants = [t for t in settings.tenants if t.inbound.mode == "webhook"]
    for t in settings.tenants:
        state[t.name] = "pending" if t.inbound.mode == "webhook" else "pull mode: no webhook"
    async with asyncio.TaskGroup() as group:
        for tenant in tenants:
            group.create_task(_register_until_verified(app, tenant))


def setup(app: web.Application) -> None:
    """Give the app its registration state (shown by /readyz?verbose)."""
    app[REGISTRATION] = {}
