"""Connexus webhook ingest: POST /webhooks/connexus/{secret}, answered 200 only once stored.

Checks in order: optional source allowlist (403, before the body is read), path secret in
constant time (401), optional HMAC-SHA256 of the raw body (401), fields (400, payload kept);
503 when the store fails (Connexus retries), 400 with the payload kept when it refuses the
event's data. Routing and dedupe are the store's rules.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass, field

from aiohttp import web

from bc_proxy import keys
from bc_proxy.connexus.models import Unusable, parse_webhook
from bc_proxy.edge import edge
from bc_proxy.errors import StoreError, StoreRefused
from bc_proxy.log import get_logger
from bc_proxy.store import DlrEvent, IngestResult

_OK = b'{"success":true}'
# (secret, account): account None for the global secret (routing rules decide the tenant).
WEBHOOK_SECRETS = web.AppKey("webhook_secrets", tuple[tuple[bytes, str | None], ...])

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Guard:
    """The optional checks on top of the path secret: empty `sources` and no `key` = off."""

    sources: tuple[Network, ...]
    key: bytes | None
    header: str
    # The keyed HMAC state, copied per webhook: hmac.new sets the key up again every time
    # (29k instructions a signature, against 22k for a copy; callgrind, OpenSSL 3).
    _mac: hmac.HMAC | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.key is not None:
            object.__setattr__(self, "_mac", hmac.new(self.key, digestmod=hashlib.sha256))

    def source_allowed(self, remote: str | None) -> bool:
        """Whether the peer address is in the allowlist (always, when there is none)."""
        if not self.sources:
            return True
        if remote is None:
            return False
        try:
            addr = ipaddress.ip_address(remote)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.sources)

    def signed(self, raw: bytes, given: str | None) -> bool:
        """Whether `given` is the hex HMAC-SHA256 of `raw` (always, when no key is set);
        compared in constant time, case-insensitively."""
        if self._mac is None:
            return True
        if given is None:
            return False
        mac = self._mac.copy()
        mac.update(raw)
        expected = mac.hexdigest()
        # Header bytes that are not UTF-8 arrive as surrogates: an unsigned request, not a 500.
        theirs = given.strip().lower().encode("utf-8", "surrogateescape")
        return hmac.compare_digest(theirs, expected.encode())


WEBHOOK_GUARD = web.AppKey("webhook_guard", Guard)

log = get_logger("bc_proxy.webhooks")


def _answer(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json"})


def _account(
    secrets: tuple[tuple[bytes, str | None], ...], given: bytes
) -> tuple[bool, str | None]:
    """(matched, account) for a path secret: account None for the global secret.

    Compared against every secret, each in constant time, whatever matched first."""
    matched, found = False, None
    for secret, account in secrets:
        if hmac.compare_digest(given, secret) and not matched:
            matched, found = True, account
    return matched, found


async def connexus_webhook(request: web.Request) -> web.StreamResponse:
    """Store one Connexus event durably, then answer 200 (duplicates answer 200 too)."""
    app = request.app
    metrics = app[keys.METRICS]
    guard = app[WEBHOOK_GUARD]
    if not guard.source_allowed(request.remote):  # before the body is read
        metrics.webhooks_refused.labels("source").inc()
        log.warning("webhook_source_refused", client=request.remote)
        return _answer(403, b'{"success":false,"error":"source not allowed"}')
    matched, account = _account(app[WEBHOOK_SECRETS], request.match_info["secret"].encode())
    if not matched:
        metrics.observe_webhook("unknown", "rejected")
        return _answer(401, b'{"success":false,"error":"unknown webhook"}')
    raw = await request.read()
    if not guard.signed(raw, request.headers.get(guard.header)):
        metrics.webhooks_refused.labels("signature").inc()
        log.warning("webhook_signature_refused", client=request.remote, bytes=len(raw))
        return _answer(401, b'{"success":false,"error":"bad signature"}')
    store = app[keys.STORE]
    try:
        event = parse_webhook(raw)
    except Unusable as exc:
        metrics.observe_webhook(exc.wtype, "rejected")
        metrics.rejected_webhooks.labels(exc.reason).inc()
        try:
            await store.reject_webhook(raw, exc.reason)
        except StoreError as err:
            log.error("rejected_webhook_not_kept", reason=exc.reason, error=str(err))
        log.warning("webhook_rejected", reason=exc.reason, bytes=len(raw))
        body = json.dumps({"success": False, "error": f"{exc.reason}: {exc}"})
        return _answer(400, body.encode())
    result: IngestResult
    wtype = "dlr" if isinstance(event, DlrEvent) else "mo"
    try:
        if isinstance(event, DlrEvent):
            result = await store.add_dlr(event)
        else:
            result = await store.add_mo(event, account=account)
    except StoreRefused as exc:
        # The store is up and refuses this event's data (PostgreSQL holds no NUL in text):
        # Connexus's retries would be refused the same way, and then dropped. Kept verbatim
        # with the rejected webhooks instead, and refused as bad input.
        log.error("webhook_store_refused", type=wtype, error=str(exc)[:200])
        try:
            await store.reject_webhook(raw, "store_refused")
        except StoreError as err:  # the store is down after all: let Connexus retry it
            log.error("rejected_webhook_not_kept", reason="store_refused", error=str(err))
            return _answer(503, b'{"success":false,"error":"storage failure, retry"}')
        metrics.observe_webhook(wtype, "rejected")  # counted once it is kept
        metrics.rejected_webhooks.labels("store_refused").inc()
        return _answer(400, b'{"success":false,"error":"store_refused: the store cannot hold it"}')
    except StoreError as exc:
        log.error("webhook_store_failed", type=wtype, error=str(exc))
        return _answer(503, b'{"success":false,"error":"storage failure, retry"}')
    metrics.observe_webhook(wtype, result.outcome)
    return _answer(200, _OK)


def setup(app: web.Application) -> None:
    """Register the webhook route and the secrets it answers to."""
    settings = app[keys.SETTINGS]
    secrets: list[tuple[bytes, str | None]] = [
        (settings.webhook.secret.get_secret_value().encode(), None)
    ]
    for t in settings.tenants:
        if t.webhook_secret is not None:
            secrets.append((t.webhook_secret.get_secret_value().encode(), t.name))
    app[WEBHOOK_SECRETS] = tuple(secrets)
    hook = settings.webhook
    app[WEBHOOK_GUARD] = Guard(
        sources=tuple(ipaddress.ip_network(n, strict=False) for n in hook.allowed_sources),
        key=hook.hmac_secret.get_secret_value().encode() if hook.hmac_secret else None,
        header=hook.hmac_header,
    )
    for reason in ("source", "signature"):
        app[keys.METRICS].webhooks_refused.labels(reason)
    route = "/webhooks/connexus/{secret}"
    app.router.add_post(route, edge(route, connexus_webhook))
