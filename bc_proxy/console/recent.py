"""The last requests the gateway answered, for the console: a bounded ring, phone numbers masked.

Fed by `bc_proxy.edge` (one `add` per answered request while the console is on). Keeps the route
template, never the raw path or query (they may hold secrets), plus masked recipients.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass

from aiohttp import web

SIZE = 100
_DIGITS = re.compile(r"\+?\d{5,}")


def mask(text: str) -> str:
    """Every run of 5+ digits (a phone number) with all but its first 3 and last 2 hidden."""

    def hide(m: re.Match[str]) -> str:
        s = m.group(0)
        return s[:3] + "*" * (len(s) - 5) + s[-2:]

    return _DIGITS.sub(hide, text)


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """One answered request as the console shows it."""

    at: float
    method: str
    route: str
    tenant: str
    status: int
    duration_ms: float
    detail: str  # masked recipients or passthrough path, "" when none


class RecentRequests:
    """A ring of the last `SIZE` requests (console pages themselves left out)."""

    def __init__(self, size: int = SIZE) -> None:
        self._ring: deque[RecentRequest] = deque(maxlen=size)

    def add(
        self, request: web.Request, route: str, tenant: str, status: int, started: float
    ) -> None:
        """Record one answered request (`started`: its perf_counter start)."""
        if route.startswith("/console"):
            return
        detail = request.match_info.get("path", "") if route == "/api/connexus/{path}" else ""
        to = request.query.get("to") if request.query_string else None
        if to:
            detail = f"to={to}"
        self._ring.append(
            RecentRequest(
                at=time.time(),
                method=request.method,
                route=route,
                tenant=tenant,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                detail=mask(detail[:120]),
            )
        )

    def newest_first(self) -> list[RecentRequest]:
        return list(reversed(self._ring))


RECENT = web.AppKey("console_recent_requests", RecentRequests)
