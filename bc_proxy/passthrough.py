"""Modern passthrough: /api/connexus/{path} forwarded with the tenant's Connexus auth injected.

Owns letting a tenant's newer code call an allowlist of Connexus paths (`tenants[].passthrough`)
through the gateway with its legacy credentials (HTTP Basic, query string or form body): they
are checked and always stripped, anything off the allowlist is 404 without an upstream call,
and the Connexus answer is streamed back unchanged. Does not interpret the Connexus API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from urllib.parse import unquote_plus, urlencode

from aiohttp import ClientError, ClientResponse, web

from bc_proxy import keys
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.edge import TENANT, edge, text
from bc_proxy.errors import BadRequest, GatewayError, Unauthorized
from bc_proxy.legacy.auth import credentials
from bc_proxy.legacy.forms import parse_qs_strict, raw_query

_HOP = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "connection",
        "transfer-encoding",
        "keep-alive",
        "cookie",
    }
)
_CREDENTIALS = frozenset({"userId", "password"})
_FORM = "application/x-www-form-urlencoded"
_CHUNK = 64 * 1024
OTHER_PATH = "other"  # metric label of every path off the allowlists


def strip_credentials(encoded: str) -> str:
    """`a=1&userId=u&password=p` without the credential pairs; the rest byte-for-byte."""
    kept = []
    for part in encoded.split("&"):
        key = part.partition("=")[0]
        try:
            name = unquote_plus(key, errors="strict")
        except UnicodeDecodeError:
            name = key
        if part and name not in _CREDENTIALS:
            kept.append(part)
    return "&".join(kept)


def metric_path(path: str, allowed: Iterable[str]) -> str:
    """The path as a bounded metric label: an allowlisted path, else `other`."""
    return path if path in set(allowed) else OTHER_PATH


def _media_type(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").partition(";")[0].strip().lower()


def strip_json_credentials(body: bytes) -> bytes:
    """A JSON object body without top-level userId/password (unchanged when it has neither)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or not _CREDENTIALS & data.keys():
        return body
    return json.dumps({k: v for k, v in data.items() if k not in _CREDENTIALS}).encode()


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Forward one allowlisted request to Connexus as the authenticated tenant."""
    app = request.config_dict
    settings = app[keys.SETTINGS]
    query_text = raw_query(request)
    params: dict[str, str] = {}
    parse_qs_strict(query_text, params)
    body = await request.read()
    form_text = ""
    media = _media_type(request)
    if body and media == "multipart/form-data":
        raise BadRequest("Send a form-encoded or JSON body")
    if body and media == _FORM:
        try:
            form_text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("Body is not valid UTF-8 form data") from None
        parse_qs_strict(form_text.strip("\r\n"), params)  # query first, then the body
    user, password = credentials(params, request.headers.get("Authorization"))
    tenant = await app[keys.AUTH].authenticate(user, password, request.remote)
    tenant_settings = app[keys.RUNTIME].tenants.get(tenant)
    if tenant_settings is None:  # removed by a reload since: refused like any unknown user
        raise Unauthorized("Invalid credentials")
    request[TENANT] = tenant
    path = request.match_info["path"].strip("/")
    allowed = tenant_settings.passthrough
    metrics = app[keys.METRICS]
    label = metric_path(path, {p for t in settings.tenants for p in t.passthrough})
    if path not in allowed:
        metrics.passthrough_requests.labels(label, "404").inc()
        return text(404, "Not found")
    client = app[keys.CLIENT]
    query = strip_credentials(query_text)
    extra = client.password_params(tenant)
    if extra:
        query = "&".join(q for q in (query, urlencode(extra)) if q)
    if form_text:
        body = strip_credentials(form_text.strip("\r\n")).encode()
    elif body and media.endswith("json"):
        body = strip_json_credentials(body)
    url = f"{client.base}/{path}" + (f"?{query}" if query else "")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    started = time.perf_counter()
    try:
        resp = await _open(client, tenant, request.method, url, body or None, headers)
    except TimeoutError:
        metrics.upstream_requests.labels("passthrough", "timeout").inc()
        metrics.passthrough_requests.labels(label, "timeout").inc()
        raise GatewayError("Connexus did not answer in time") from None
    except ClientError as exc:
        metrics.upstream_requests.labels("passthrough", "error").inc()
        metrics.passthrough_requests.labels(label, "error").inc()
        raise GatewayError(f"Connexus unreachable ({type(exc).__name__})") from None
    status = str(resp.status)
    metrics.upstream_requests.labels("passthrough", status).inc()
    metrics.passthrough_requests.labels(label, status).inc()
    try:
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        out.content_type = resp.content_type or "application/octet-stream"
        if resp.charset:
            out.charset = resp.charset
        await out.prepare(request)
        async for chunk in resp.content.iter_chunked(_CHUNK):
            await out.write(chunk)
        await out.write_eof()
    finally:
        resp.release()
        metrics.upstream_duration.labels("passthrough").observe(time.perf_counter() - started)
    return out


async def _open(
    client: ConnexusClient,
    tenant: str,
    method: str,
    url: str,
    data: bytes | None,
    headers: dict[str, str],
) -> ClientResponse:
    """Send the request with the tenant's bearer (a 401 refreshes once); the open response."""
    mgr = client.tokens.get(tenant)
    session = client.session
    if mgr is None:
        return await session.request(method, url, data=data, headers=headers)
    token = mgr.current() or await mgr.get()
    resp = await session.request(
        method, url, data=data, headers={**headers, "Authorization": f"Bearer {token}"}
    )
    if resp.status != 401:
        return resp
    resp.release()
    mgr.invalidate(token)
    token = await mgr.get()
    return await session.request(
        method, url, data=data, headers={**headers, "Authorization": f"Bearer {token}"}
    )


def setup(app: web.Application) -> None:
    route = "/api/connexus/{path}"
    app.router.add_route("*", "/api/connexus/{path:.+}", edge(route, passthrough))
