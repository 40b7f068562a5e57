"""Per-tenant Connexus access tokens: cached, refreshed ahead of expiry, single-flight.

Owns when a token is fetched and which token a request uses. One refresh is in flight per
tenant however many requests wait; a request inside the refresh window keeps using the still
valid token while the refresh runs; an expired token is never handed out, and a failed
refresh leaves either a still-valid token or none. After a failed fetch, requests that need a
token fail at once with the same reason until a shared, growing backoff has passed (so N
waiting sends cause one fetch sequence, not N). Does not own the HTTP call (`fetch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bc_proxy.errors import GatewayError
from bc_proxy.log import get_logger
from bc_proxy.metrics import Metrics

log = get_logger("bc_proxy.connexus")

Fetch = Callable[[], Awaitable[tuple[str, float]]]

REFRESH_AT = 0.75  # refresh once this share of the lifetime has passed
RETRY_AFTER_FAILURE = 5.0  # seconds between background refreshes while they fail
BACKOFF_INITIAL = 1.0  # after a failed fetch, no new fetch for this long ...
BACKOFF_MAX = 30.0  # ... doubling per consecutive failure up to this


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    refresh_at: float  # monotonic
    expires_at: float  # monotonic, with a safety margin already taken off
    wall_expires_at: float  # time.time(), for the expiry gauge


class TokenManager:
    """The token of one tenant."""

    def __init__(
        self,
        tenant: str,
        fetch: Fetch,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tenant = tenant
        self._fetch = fetch
        self._metrics = metrics
        self._clock = clock
        self._token: Token | None = None
        self._inflight: asyncio.Task[str] | None = None
        self.last_error: str | None = None
        self._failed_at = float("-inf")
        self._backoff = 0.0  # current pause after a failure (0: none failed yet)
        metrics.token_expiry.labels(tenant).set_function(self.expires_at)
        metrics.token_failing.labels(tenant).set_function(
            lambda: 1.0 if self.last_error is not None else 0.0
        )

    def expires_at(self) -> float:
        """Unix time the current token expires (0 when none is held)."""
        tok = self._token
        return tok.wall_expires_at if tok else 0.0

    def seconds_left(self) -> float:
        tok = self._token
        return max(0.0, tok.wall_expires_at - time.time()) if tok else 0.0

    @property
    def has_valid_token(self) -> bool:
        tok = self._token
        return tok is not None and self._clock() < tok.expires_at

    def current(self) -> str | None:
        """The valid token without waiting, or None when one must be fetched first."""
        tok = self._token
        if tok is None:
            return None
        now = self._clock()
        if now < tok.refresh_at:
            return tok.value
        if now < tok.expires_at:
            # Refresh in the background (this request still has a valid token), but not again
            # and again at the request rate while the token endpoint keeps failing.
            if now - self._failed_at > RETRY_AFTER_FAILURE:
                self._refresh()
            return tok.value
        self._token = None
        return None

    async def get(self) -> str:
        """A valid token, fetching one if there is none (callers share one fetch); while the
        failure backoff runs, the last failure again without a fetch."""
        value = self.current()
        if value is not None:
            return value
        if self._inflight is None and self._clock() - self._failed_at < self._backoff:
            raise GatewayError(f"Connexus token unavailable: {self.last_error}")
        return await asyncio.shield(self._refresh())

    def invalidate(self, value: str) -> None:
        """Connexus refused `value`: never use it again (a newer token is kept)."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def refresh(self) -> str:
        """Fetch a new token now (joins a fetch already in flight)."""
        return await asyncio.shield(self._refresh())

    def _refresh(self) -> asyncio.Task[str]:
        if self._inflight is None:
            task = asyncio.get_running_loop().create_task(self._do_refresh())
            task.add_done_callback(_retrieve)
            self._inflight = task
        return self._inflight

    async def _do_refresh(self) -> str:
        started = self._clock()
        try:
            value, expires_in = await self._fetch()
        except Exception as exc:
            self._failed_at = self._clock()
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_INITIAL, self._backoff * 2))
            self._metrics.token_refreshes.labels(self.tenant, "failure").inc()
            self.last_error = str(exc) if isinstance(exc, GatewayError) else type(exc).__name__
            if self._token is not None and self._clock() >= self._token.expires_at:
                self._token = None
            log.warning(
                "token_refresh_failed",
                tenant=self.tenant,
                cause=self.last_error,
                token_held=self._token is not None,
                retry_after_seconds=self._backoff,
            )
            raise
        finally:
            self._inflight = None
        lifetime = max(expires_in, 1.0)
        margin = min(30.0, lifetime * 0.05)
        self._token = Token(
            value=value,
            refresh_at=started + lifetime * REFRESH_AT,
            expires_at=started + lifetime - margin,
            wall_expires_at=time.time() + lifetime,
        )
        self.last_error = None
        self._backoff = 0.0
        self._metrics.token_refreshes.labels(self.tenant, "success").inc()
        return value

    async def keep_fresh(self) -> None:
        """Background loop: once a token exists, refresh it ahead of expiry, forever."""
        while True:
            tok = self._token
            if tok is None:
                await asyncio.sleep(1.0)
                continue
            delay = tok.refresh_at - self._clock()
            if delay > 0:
                await asyncio.sleep(min(delay, 60.0))
                continue
            with contextlib.suppress(Exception):
                await self.refresh()
            if self._token is tok or self._token is None:
                await asyncio.sleep(min(5.0, max(0.5, tok.expires_at - self._clock())))


def _retrieve(task: asyncio.Task[str]) -> None:
    """Mark a background refresh's exception as seen (waiters get it through their await)."""
    if not task.cancelled():
        task.exception()
