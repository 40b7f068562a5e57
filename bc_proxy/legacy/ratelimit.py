"""Optional per-tenant send rate limit: a token bucket per tenant (`send_rate_per_second`,
`send_burst`), checked after authentication and before anything is written or sent.

A send over the limit is answered 429 with the one-line legacy error shape and counted in
`bc_proxy_sends_rate_limited_total{tenant}`; tenants without a rate are never limited.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from aiohttp import web

from bc_proxy import keys
from bc_proxy.config import TenantSettings
from bc_proxy.errors import TooManyRequests


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second; one token per send."""

    __slots__ = ("_at", "_clock", "_tokens", "burst", "rate")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> bool:
        """Take one token if there is one (True), else leave the bucket as it is (False)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class SendLimits:
    """The buckets of the tenants that have a send rate."""

    def __init__(self, tenants: Iterable[TenantSettings]) -> None:
        self.buckets = {
            t.name: TokenBucket(t.send_rate_per_second, t.send_burst)
            for t in tenants
            if t.send_rate_per_second is not None
        }


SEND_LIMITS = web.AppKey("send_limits", SendLimits)


def setup(app: web.Application) -> None:
    """Build the buckets of the configured tenants (before the app starts)."""
    app[SEND_LIMITS] = SendLimits(app[keys.SETTINGS].tenants)
    for name in app[SEND_LIMITS].buckets:
        app[keys.METRICS].sends_rate_limited.labels(name)


def check_send(app: web.Application, tenant: str) -> None:
    """Raise TooManyRequests (429) when `tenant` is over its send rate; count it."""
    bucket = app[SEND_LIMITS].buckets.get(tenant)
    if bucket is not None and not bucket.take():
        app[keys.METRICS].sends_rate_limited.labels(tenant).inc()
        raise TooManyRequests("Send rate limit exceeded, retry later")
