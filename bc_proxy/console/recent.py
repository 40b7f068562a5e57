"""The last requests the gateway answered, for the console: a bounded ring, phone numbers masked.

Fed by `bc_proxy.edge` (one `add` per answered request while the console is on). Keeps the route
template, never the raw path or query (they may hold secrets), plus masked recipients; of a
passthrough request only the path an authenticated tenant may call (its allowlist, as the
passthrough's metric label), else `other`. Phone numbers are masked by the logs' rule
(`bc_proxy.log.mask_number`: the last three digits kept).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from aiohttp import web

from bc_proxy import keys
from bc_proxy.log import mask_number
from bc_proxy.metrics import NO_TENANT

SIZE = 100
PASSTHROUGH_ROUTE = "/api/connexus/{path}"
OTHER_PATH = "other"  # a passthrough path off the tenant's allowlist, or of no tenant


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """One answered request as the console shows it."""

    at: float
    method: str
    route: str
    tenant: str
    status: int
    duration_ms: float
    detail: str  # masked recipients or allowlisted passthrough path, "" when none


def passthrough_path(request: web.Request, tenant: str, status: int) -> str:
    """The passthrough path as the console may show it: an allowlisted path of the tenant that
    authenticated, else `other` (an unauthenticated path is whatever the caller typed,
    a password in an encoded query included)."""
    if tenant == NO_TENANT or status == 401:
        return OTHER_PATH
    settings = request.config_dict[keys.RUNTIME].tenants.get(tenant)
    path = request.match_info.get("path", "").strip("/")
    return path if settings is not None and path in settings.passthrough else OTHER_PATH


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
        detail = passthrough_path(request, tenant, status) if route == PASSTHROUGH_ROUTE else ""
        to = request.query.get("to") if request.query_string else None
        if to:
            detail = f"to={mask_number(to[:120])}"
        self._ring.append(
            RecentRequest(
                at=time.time(),
                method=request.method,
                route=route,
                tenant=tenant,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                detail=detail,
            )
        )

    def newest_first(self) -> list[RecentRequest]:
        return list(reversed(self._ring))


RECENT = web.AppKey("console_recent_requests", RecentRequests)
