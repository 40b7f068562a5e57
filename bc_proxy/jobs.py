"""Supervision of background jobs (token refresh, backlog gauges and purge, sweep, push).

Owns keeping each job alive: an unexpected error is logged with its traceback, counted in
`bc_proxy_background_errors_total{job}`, and the job is started again after a backoff that
doubles up to a minute (and resets once a run lasted a minute). A job that returns on its own
is finished; cancellation (shutdown) stops it. Does not own what the jobs do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bc_proxy.log import get_logger
from bc_proxy.metrics import Metrics

log = get_logger("bc_proxy.jobs")

RESTART_INITIAL = 1.0
RESTART_MAX = 60.0
HEALTHY_RUN = 60.0


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    metrics: Metrics,
    *,
    initial: float = RESTART_INITIAL,
) -> None:
    """Run `run()` until it returns or is cancelled, restarting it after unexpected errors."""
    delay = initial
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.background_errors.labels(name).inc()
            if time.monotonic() - started > HEALTHY_RUN:
                delay = initial
            log.exception("background_job_failed", job=name, restart_in_s=round(delay, 1))
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX)
