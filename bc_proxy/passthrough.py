"""Modern passthrough: /api/connexus/{path} forwarded with the tenant's Connexus auth injected.

Owns letting a tenant's newer code call Connexus directly through the gateway with its legacy
credentials (HTTP Basic, or userId/password in the query string): those credentials are
checked and removed, the request is forwarded unchanged otherwise, and the Connexus answer is
returned as it came. Does not interpret the Connexus API.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

from aiohttp import ClientError, web

from bc_proxy import keys
from bc_proxy.edge import TENANT, edge
from bc_proxy.errors import BadRequest, GatewayError
from bc_proxy.legacy.auth import credentials
from bc_proxy.legacy.forms import parse_qs_strict, raw_query

_HOP = frozenset(
    {"authorization", "host", "content-length", "connection", "transfer-encoding", "keep-alive"}
)
_CREDENTIALS = ("userId", "password")


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Forward one request to Connexus as the authenticated tenant."""
    app = request.config_dict
    query: dict[str, str] = {}
    parse_qs_strict(raw_query(request), query)
    user, password = credentials(query, request.headers.get("Authorization"))
    tenant = await app[keys.AUTH].authenticate(user, password)
    request[TENANT] = tenant
    client = app[keys.CLIENT]
    path = request.match_info["path"]
    if ".." in path.split("/"):
        raise BadRequest("Invalid path")
    for key in _CREDENTIALS:
        query.pop(key, None)
    extra = client.password_params(tenant)
    if extra:
        query.update(extra)
    url = f"{client.base}/{path}"
    if query:
        url += "?" + urlencode(query)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    body = await request.read()
    metrics = app[keys.METRICS]
    started = time.perf_counter()
    try:
        status, payload, ctype = await client.request(
            tenant, request.method, url, body or None, headers
        )
    except TimeoutError:
        metrics.upstream_requests.labels("passthrough", "timeout").inc()
        raise GatewayError("Connexus did not answer in time") from None
    except ClientError as exc:
        metrics.upstream_requests.labels("passthrough", "error").inc()
        raise GatewayError(f"Connexus unreachable ({type(exc).__name__})") from None
    metrics.upstream_requests.labels("passthrough", str(status)).inc()
    metrics.upstream_duration.labels("passthrough").observe(time.perf_counter() - started)
    ctype = ctype or "application/octet-stream"
    return web.Response(status=status, body=payload, headers={"Content-Type": ctype})


def setup(app: web.Application) -> None:
    route = "/api/connexus/{path}"
    app.router.add_route("*", "/api/connexus/{path:.+}", edge(route, passthrough))
