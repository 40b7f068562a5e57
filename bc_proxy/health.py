"""Liveness and readiness: /healthz (the process answers) and /readyz (it can do its own work).

Readiness means this replica can take webhooks, polls and sends: not shutting down and the store
answers, decided within one second. Connexus token health is never a reason to stop intake (a
token outage must not stop webhooks and polls, which need no token): it is a metric and a line
of `/readyz?verbose`. Also owns making upstream and error text fit to show there and on the
console (`scrubber`: the logs' rules, the secrets of the tenants in force included). Does not
own metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web
from aiohttp.helpers import ChainMapProxy

from bc_proxy import keys, log
from bc_proxy.edge import edge
from bc_proxy.errors import StoreError
from bc_proxy.registration import REGISTRATION

STORE_CHECK_SECONDS = 0.8  # the whole answer stays under the 1 s a probe is given


def scrubber(app: web.Application | ChainMapProxy) -> Callable[[str], str]:
    """`log.scrub_text` with every secret of the configuration in force (the started one and
    the tenants of the last reload): for Connexus and error text shown outside the logs, also
    when logging was never set up with the secrets (an embedded or test app)."""
    settings = app[keys.SETTINGS]
    tenants = (*settings.tenants, *app[keys.RUNTIME].tenants.values())
    secrets = log.secrets_of(settings.model_copy(update={"tenants": tenants}))
    return log.text_scrubber(secrets)


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


async def healthz(request: web.Request) -> web.StreamResponse:
    """The process is alive and its event loop answers."""
    return _json(200, {"status": "alive"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready to take traffic: store reachable and not shutting down (`?verbose`: tenants too)."""
    app = request.config_dict
    checks: dict[str, str] = {}
    if app[keys.RUNTIME].shutting_down:
        checks["shutdown"] = "shutting down"
    try:
        await asyncio.wait_for(app[keys.STORE].ping(), STORE_CHECK_SECONDS)
        checks["store"] = "ok"
    except TimeoutError:
        checks["store"] = "unreachable: no answer within 0.8 s"
    except StoreError as exc:
        checks["store"] = f"unreachable: {scrubber(app)(str(exc))}"[:200]
    ready = all(v == "ok" for v in checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
    if "verbose" in request.query:
        scrub = scrubber(app)
        body["tenants"] = _tenant_health(request, scrub)
        registered = app.get(REGISTRATION) or {}
        body["webhook_registration"] = {name: scrub(line) for name, line in registered.items()}
    return _json(200 if ready else 503, body)


def _tenant_health(request: web.Request, scrub: Callable[[str], str]) -> dict[str, str]:
    """Per-tenant Connexus token state, from what the client already knows (no upstream call)."""
    client = request.config_dict[keys.CLIENT]
    out: dict[str, str] = {}
    for name in request.config_dict[keys.RUNTIME].tenants:
        mgr = client.tokens.get(name)
        if mgr is None:
            out[name] = "ok: password auth"
        elif mgr.has_valid_token:
            out[name] = f"ok: token valid for {int(mgr.seconds_left())} s"
        else:
            problem = scrub(mgr.last_error) if mgr.last_error else "no token yet"
            out[name] = f"no token: {problem}"[:200]
    return out


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", edge("/healthz", healthz))
    app.router.add_get("/readyz", edge("/readyz", readyz))
