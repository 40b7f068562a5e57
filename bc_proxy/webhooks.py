"""Connexus webhook ingest: POST /webhooks/connexus/{secret}.

Owns checking the path secret in constant time, validating the `mo` / `dlr` JSON, handing the
event to the store (which deduplicates, routes and commits it) and answering 200 only after
the commit. Waking long-polls happens in the store's commit. Does not own translation to the
legacy format (that happens when a record is handed out).
"""

from __future__ import annotations

import hmac
import json
from typing import Annotated

from aiohttp import web
from pydantic import Field, TypeAdapter, ValidationError

from bc_proxy import keys
from bc_proxy.connexus.models import DlrPayload, MoPayload
from bc_proxy.edge import edge
from bc_proxy.errors import StoreError
from bc_proxy.log import get_logger
from bc_proxy.store import DlrEvent, IngestResult, MoEvent

Payload = Annotated[DlrPayload | MoPayload, Field(discriminator="type")]
_ADAPTER: TypeAdapter[DlrPayload | MoPayload] = TypeAdapter(Payload)
_OK = b'{"success":true}'
WEBHOOK_SECRET = web.AppKey("webhook_secret", bytes)
SENDER_OWNERS = web.AppKey("sender_owners", dict[str, str])

log = get_logger("bc_proxy.webhooks")


def _answer(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json"})


def _reason(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


async def connexus_webhook(request: web.Request) -> web.StreamResponse:
    """Store one Connexus event durably, then answer 200 (duplicates answer 200 too)."""
    app = request.app
    metrics = app[keys.METRICS]
    if not hmac.compare_digest(request.match_info["secret"].encode(), app[WEBHOOK_SECRET]):
        metrics.webhooks.labels("unknown", "rejected").inc()
        return _answer(401, b'{"success":false,"error":"unknown webhook"}')
    raw = await request.read()
    try:
        payload = _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        metrics.webhooks.labels("unknown", "rejected").inc()
        # json.dumps: the reason may echo client input (an unknown `type`), escape it properly.
        body = json.dumps({"success": False, "error": _reason(exc)[:200]}, separators=(",", ":"))
        return _answer(400, body.encode())
    store = app[keys.STORE]
    result: IngestResult
    try:
        if isinstance(payload, DlrPayload):
            wtype = "dlr"
            result = await store.add_dlr(
                DlrEvent(payload.message_id, payload.status_code, payload.status, payload.event_key)
            )
        else:
            wtype = "mo"
            to = payload.to.lstrip("+")
            result = await store.add_mo(
                MoEvent(
                    message_id=payload.message_id,
                    sender=payload.sender.lstrip("+"),
                    to=to,
                    body=payload.body,
                    related_id=payload.related_message_id,
                    owner=app[SENDER_OWNERS].get(to),
                ),
                fallback_tenant=app[keys.RUNTIME].fallback_tenant,
            )
    except StoreError as exc:
        log.error("webhook_store_failed", type=wtype, error=str(exc))
        return _answer(500, b'{"success":false,"error":"storage failure, retry"}')
    if not result.stored:
        outcome = "duplicate"
    elif result.tenant is None:
        outcome = "unmatched"
    else:
        outcome = "stored"
    metrics.webhooks.labels(wtype, outcome).inc()
    return _answer(200, _OK)


def setup(app: web.Application) -> None:
    """Register the webhook route and its lookup tables."""
    settings = app[keys.SETTINGS]
    app[WEBHOOK_SECRET] = settings.webhook.secret.get_secret_value().encode()
    app[SENDER_OWNERS] = {s: t.name for t in settings.tenants for s in t.senders}
    route = "/webhooks/connexus/{secret}"
    app.router.add_post(route, edge(route, connexus_webhook))
