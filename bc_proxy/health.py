"""Liveness and readiness: /healthz (the process answers) and /readyz (it can do its job).

Readiness means: not shutting down, the store answers, and every tenant holds or can obtain a
Connexus token. Each answer is a small JSON body saying why. Does not own metrics.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from bc_proxy import keys
from bc_proxy.edge import edge
from bc_proxy.errors import StoreError


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


async def healthz(request: web.Request) -> web.StreamResponse:
    """The process is alive and its event loop answers."""
    return _json(200, {"status": "alive"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready to take traffic: store reachable, tokens obtainable, not shutting down."""
    app = request.config_dict
    checks: dict[str, str] = {}
    if app[keys.RUNTIME].shutting_down:
        checks["shutdown"] = "shutting down"
    try:
        await asyncio.wait_for(app[keys.STORE].ping(), 5)
        checks["store"] = "ok"
    except (StoreError, TimeoutError) as exc:
        checks["store"] = f"unreachable: {type(exc).__name__}"
    client = app[keys.CLIENT]
    names = list(app[keys.RUNTIME].tenants)
    results = await asyncio.gather(*(client.ready(n) for n in names))
    for name, problem in zip(names, results, strict=True):
        checks[f"tenant:{name}"] = "ok" if problem is None else f"no token: {problem}"
    ready = all(v == "ok" for v in checks.values())
    return _json(
        200 if ready else 503, {"status": "ready" if ready else "not ready", "checks": checks}
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", edge("/healthz", healthz))
    app.router.add_get("/readyz", edge("/readyz", readyz))
