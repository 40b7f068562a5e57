"""The Connexus HTTP client: per-tenant auth, send/query calls, their metrics and logs.

Owns bearer-token injection (a 401 discards the token, refreshes once and retries once),
password-auth parameters, single vs bulk sms/out, and classifying each send: accepted,
rejected (refused, or never written) or unknown (written, no usable answer). Never re-sends
a written sms/out by itself. Connections, TLS and timeouts are transport.py's; validation of
legacy input and what is stored are not this module's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import stamina
from aiohttp import ClientError, ClientSession
from yarl import URL

from bc_proxy.config import Settings, TenantSettings
from bc_proxy.connexus.outcomes import (
    Exchange,
    SendOutcome,
    all_failed,
    error_for,
    send_failure_state,
)
from bc_proxy.connexus.tokens import TokenManager
from bc_proxy.connexus.transport import Upstream
from bc_proxy.errors import GatewayError, LegacyError
from bc_proxy.log import get_logger, loggable
from bc_proxy.metrics import Metrics
from bc_proxy.store import PlannedRecipient, SendState
from bc_proxy.translate import (
    RecipientOutcome,
    SendRequest,
    bulk_bodies,
    bulk_outcomes,
    form_encode,
    single_form,
    single_outcome,
    upstream_reason,
)

_JSON = {"Content-Type": "application/json"}
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


log = get_logger("bc_proxy.connexus")


class _Retryable(Exception):
    """A token fetch failed in a way worth one more try (5xx, connection error)."""


class ConnexusClient:
    """Calls Connexus on behalf of tenants."""

    def __init__(self, settings: Settings, metrics: Metrics, *, wire: bool = True) -> None:
        """`wire=False`: sends go through aiohttp like every other call (for comparison)."""
        up = settings.upstream
        self.base = up.base_url
        self.timeout = up.timeout_seconds
        self.metrics = metrics
        self.upstream = Upstream(
            self.base,
            timeout=self.timeout,
            max_connections=up.max_connections,
            keepalive=up.keepalive_seconds,
            wire=wire,
        )
        self.tenants: dict[str, TenantSettings] = {}
        self.tokens: dict[str, TokenManager] = {}
        self._password: dict[str, dict[str, str]] = {}
        self.update_tenants(settings.tenants)
        self._url_out = self.upstream.url_out  # the URL object the wire pool recognises

    def update_tenants(self, tenants: Sequence[TenantSettings]) -> list[TokenManager]:
        """Use these tenants' Connexus credentials from now on (start, config reload); the
        token managers that are new (new or re-keyed tenants), whose keep_fresh must run.
        A tenant whose credentials did not change keeps its manager and token; a request in
        flight keeps the manager it started with."""
        tokens: dict[str, TokenManager] = {}
        password: dict[str, dict[str, str]] = {}
        fresh: list[TokenManager] = []
        for t in tenants:
            c = t.connexus
            if c.token_auth:
                old = self.tokens.get(t.name)
                before = self.tenants.get(t.name)
                if old is not None and before is not None and before.connexus == c:
                    tokens[t.name] = old
                    continue
                mgr = TokenManager(t.name, self._token_fetcher(t), self.metrics)
                tokens[t.name] = mgr
                fresh.append(mgr)
            else:
                assert c.user_id is not None
                assert c.password is not None
                password[t.name] = {"userId": c.user_id, "password": c.password.get_secret_value()}
        self.tenants = {t.name: t for t in tenants}
        self.tokens, self._password = tokens, password
        return fresh

    @property
    def session(self) -> ClientSession:
        """The aiohttp session (every call but sends without a proxy; passthrough)."""
        return self.upstream.session

    async def start(self) -> None:
        await self.upstream.start()

    async def close(self) -> None:
        await self.upstream.close()

    # -- metrics helpers ---------------------------------------------------------------------

    def _count(self, op: str, status: str, started: float) -> None:
        self.metrics.upstream_requests.labels(op, status).inc()
        self.metrics.upstream_duration.labels(op).observe(time.perf_counter() - started)

    # -- auth --------------------------------------------------------------------------------

    def _token_fetcher(self, tenant: TenantSettings) -> Any:
        creds = tenant.connexus

        async def fetch() -> tuple[str, float]:
            assert creds.client_id is not None
            assert creds.client_secret is not None
            form = {
                "client_id": creds.client_id,
                "client_secret": creds.client_secret.get_secret_value(),
            }
            # Backoff scaled to the upstream timeout: a waiting request that joins this
            # refresh must still see the next attempt within its own timeout.
            pause = min(1.0, self.timeout / 4)
            try:
                async for attempt in stamina.retry_context(
                    on=_Retryable,
                    attempts=3,
                    timeout=self.timeout,
                    wait_initial=min(0.05, pause),
                    wait_max=pause,
                    wait_jitter=pause,
                ):
                    with attempt:
                        return await self._fetch_token_once(form)
            except _Retryable as exc:  # retries used up: a legacy 500, not an unhandled error
                raise GatewayError(f"Connexus token endpoint unavailable ({exc})") from None
            raise GatewayError("Connexus token endpoint unavailable")  # pragma: no cover

        return fetch

    async def _fetch_token_once(self, form: Mapping[str, str]) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            async with self.session.post(f"{self.base}/auth/token", data=form) as resp:
                status = resp.status
                body = await resp.read()
        except (ClientError, TimeoutError) as exc:
            self._count("token", "timeout" if isinstance(exc, TimeoutError) else "error", started)
            raise _Retryable(type(exc).__name__) from exc
        self._count("token", str(status), started)
        if status >= 500:
            raise _Retryable(f"token endpoint answered {status}")
        answer = _json(body)
        if status != 200:
            reason = upstream_reason(answer, f"HTTP {status}")
            raise GatewayError(f"Connexus refused the token request: {reason}")
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise GatewayError("Connexus token answer had no access_token")
        expires_in = answer.get("expires_in", 86400)
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = 86400
        return answer["access_token"], float(expires_in)

    # -- calls -------------------------------------------------------------------------------

    async def _call(
        self,
        op: str,
        tenant: str,
        path_or_url: str | URL,
        *,
        form: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        method: str = "POST",
        exchange: Exchange | None = None,
    ) -> tuple[int, Any]:
        """One upstream request with the tenant's auth; (status, parsed JSON or None)."""
        url = path_or_url if isinstance(path_or_url, URL) else URL(f"{self.base}/{path_or_url}")
        extra = self._password.get(tenant)
        if body is not None:
            payload = {**body, **extra} if extra else body
            data = json.dumps(payload, separators=(",", ":")).encode()
            headers = _JSON
        else:
            # Encoded here rather than by aiohttp's FormData: same bytes, a fraction of the work.
            data = form_encode({**(form or {}), **(extra or {})}.items())
            headers = _FORM
        started = time.perf_counter()
        try:
            status, raw, _ = await self.request(
                tenant, method, url, data, headers, exchange=exchange
            )
        except GatewayError as exc:
            self._count(op, "error", started)
            log.warning("upstream_failed", operation=op, tenant=tenant, cause=exc.reason)
            raise
        except TimeoutError:
            self._count(op, "timeout", started)
            log.warning(
                "upstream_timeout", operation=op, tenant=tenant, timeout_seconds=self.timeout
            )
            raise GatewayError("Connexus did not answer in time") from None
        except ClientError as exc:
            self._count(op, "error", started)
            log.warning("upstream_failed", operation=op, tenant=tenant, cause=loggable(exc))
            raise GatewayError(f"Connexus unreachable ({type(exc).__name__})") from None
        self._count(op, str(status), started)
        answer = _json(raw)
        if status >= 500 or status == 401:
            log.warning(
                "upstream_error",
                operation=op,
                tenant=tenant,
                status=status,
                cause=upstream_reason(answer, f"HTTP {status}"),
            )
        return status, answer

    async def request(
        self,
        tenant: str,
        method: str,
        url: str | URL,
        data: bytes | None,
        headers: Mapping[str, str],
        *,
        exchange: Exchange | None = None,
    ) -> tuple[int, bytes, str]:
        """One request with the tenant's token: (status, body, content type).

        A 401 discards the token, fetches one (shared with every other waiter of the tenant)
        and retries once: the only repeat of a request, and only after Connexus definitively
        refused the first. The whole exchange stays within `upstream.timeout_seconds`: one
        request is bounded by the session's total timeout; a token fetch or the retry by what
        is left of it. Password-auth tenants' parameters are already in `data`. `exchange`
        (sends): tracks whether the last attempt was written; redirects are not followed.
        A tenant not configured (any more: a reload removed it) is a GatewayError before
        anything is sent: no call goes upstream without its tenant's credentials.
        """
        up = self.upstream
        mgr = self.tokens.get(tenant)
        if mgr is None:
            if tenant not in self._password:
                raise GatewayError("tenant not configured: no Connexus credentials to call with")
            return await up.request(method, url, data, headers, None, exchange)
        started = time.monotonic()
        token = mgr.current()
        if token is not None:
            answer = await up.request(method, url, data, headers, token, exchange)
            if answer[0] != 401:
                return answer
            mgr.invalidate(token)
            if exchange is not None:
                exchange.written = False  # refused: that attempt sent nothing
        left = self.timeout - (time.monotonic() - started)
        async with asyncio.timeout(max(left, 0.001)):
            token = await mgr.get()
            return await up.request(method, url, data, headers, token, exchange)

    async def send(
        self, tenant: str, req: SendRequest, planned: Sequence[PlannedRecipient]
    ) -> SendOutcome:
        """Send to the planned recipients: one outcome each, never an exception for the call.

        One recipient: a form request carrying its upstream ref as `messageId`. Several: JSON
        bulk requests of at most 200, concurrently, without `messageId`. A chunk that fails
        gives its recipients the chunk's failure class; the others stand.
        """
        if len(planned) == 1:
            p = planned[0]
            form = single_form(req, p.recipient, p.upstream_ref)
            outcomes, failure = await self._send_chunk("sms_out", tenant, [p.recipient], form=form)
            return SendOutcome(outcomes, failure)
        bodies = bulk_bodies(req, [p.recipient for p in planned])
        results = await asyncio.gather(
            *(self._send_chunk("sms_out_bulk", tenant, b["to"], body=b) for b in bodies)
        )
        outcomes = [o for chunk, _ in results for o in chunk]
        failure = next((f for _, f in results if f is not None), None)
        return SendOutcome(outcomes, failure)

    async def _send_chunk(
        self,
        op: str,
        tenant: str,
        recipients: list[str],
        *,
        form: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[list[RecipientOutcome], LegacyError | None]:
        exchange = Exchange()
        try:
            status, answer = await self._call(
                op, tenant, self._url_out, form=form, body=body, exchange=exchange
            )
        except Exception as exc:
            error = exc if isinstance(exc, LegacyError) else GatewayError(type(exc).__name__)
            if not isinstance(exc, LegacyError):
                log.error("send_call_failed", tenant=tenant, error=loggable(exc))
            if exchange.written:  # a timeout or reset after the request went out
                error = GatewayError(f"{error.reason}; outcome unknown, not re-sent")
            state: SendState = "unknown" if exchange.written else "rejected"
            return all_failed(recipients, state, error.reason), error
        failed = send_failure_state(status)
        if failed is not None:
            error = error_for(status, answer, failed)
            if status < 500 and status != 401:  # 5xx and 401 were logged by _call
                log.info(
                    "send_refused_upstream",
                    operation=op,
                    tenant=tenant,
                    status=status,
                    cause=error.reason,
                )
            return all_failed(recipients, failed, error.reason), error
        if form is not None:
            return [single_outcome(answer, recipients[0])], None
        return bulk_outcomes(answer, recipients), None

    async def mo_query(self, tenant: str, params: Mapping[str, str]) -> Any:
        status, answer = await self._call("mo_query", tenant, "mo/query", form=params)
        if status != 200:
            raise GatewayError(f"mo/query answered {status}")
        return answer

    async def configure_webhook(self, tenant: str, url: str) -> None:
        status, answer = await self._call(
            "configure", tenant, "configure", body={"webhook_url": url}
        )
        if status >= 300:
            raise GatewayError(f"configure answered {status}: {upstream_reason(answer, '')}")

    async def ready(self, tenant: str) -> str | None:
        """None when the tenant holds or can obtain a token, else why not."""
        mgr = self.tokens.get(tenant)
        if mgr is None or mgr.has_valid_token:
            return None
        try:
            await mgr.get()
        except Exception as exc:
            return _short(exc)
        return None

    def password_params(self, tenant: str) -> Mapping[str, str] | None:
        return self._password.get(tenant)

    def tenant_tokens(self) -> Sequence[TokenManager]:
        return list(self.tokens.values())


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else type(exc).__name__
