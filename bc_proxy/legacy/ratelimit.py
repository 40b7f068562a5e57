"""Optional per-tenant send rate limit: a token bucket per tenant (`send_rate_per_second`,
`send_burst`, read from the runtime's tenants so a SIGHUP reload applies), checked after
authentication and before anything is written or sent. Over the limit: 429, one legacy line,
counted in `bc_proxy_sends_rate_limited_total{tenant}`; tenants without a rate are never limited.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
    """The buckets of the tenants that have a send rate, made again when the rate changes."""

    def __init__(self) -> None:
        self.buckets: dict[str, TokenBucket] = {}

    def bucket(self, tenant: TenantSettings) -> TokenBucket | None:
        """The tenant's bucket under its current settings (None: not limited)."""
        rate = tenant.send_rate_per_second
        if rate is None:
            return None
        bucket = self.buckets.get(tenant.name)
        if bucket is None or bucket.rate != rate or bucket.burst != tenant.send_burst:
            bucket = self.buckets[tenant.name] = TokenBucket(rate, tenant.send_burst)
        return bucket


SEND_LIMITS = web.AppKey("send_limits", SendLimits)


def setup(app: web.Application) -> None:
    """Create the (empty) bucket table and the metric series of limited tenants."""
    app[SEND_LIMITS] = SendLimits()
    for t in app[keys.SETTINGS].tenants:
        if t.send_rate_per_second is not None:
            app[keys.METRICS].sends_rate_limited.labels(t.name)


def check_send(app: web.Application, tenant: str) -> None:
    """Raise TooManyRequests (429) when `tenant` is over its send rate; count it."""
    settings = app[keys.RUNTIME].tenants.get(tenant)
    bucket = app[SEND_LIMITS].bucket(settings) if settings is not None else None
    if bucket is not None and not bucket.take():
        app[keys.METRICS].sends_rate_limited.labels(tenant).inc()
        raise TooManyRequests("Send rate limit exceeded, retry later")
