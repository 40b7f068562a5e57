"""Every `web.AppKey` of bc-proxy in one place: the shared objects the app factory wires."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from bc_proxy.config import ConnexusCredentials, Settings, TenantSettings
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.legacy.auth import Authenticator
from bc_proxy.metrics import Metrics
from bc_proxy.store import Store


@dataclass(slots=True)
class Runtime:
    """Mutable process state shared by handlers."""

    shutting_down: bool = False
    stop_began: float | None = None  # the loop's time at on_shutdown: stop bounds count from it
    status_maps: dict[str, dict[int, str]] = field(default_factory=dict)
    tenants: dict[str, TenantSettings] = field(default_factory=dict)
    sends_in_flight: int = 0  # legacy sends between upstream call and record
    # A reload changed the rules: place stranded records once more from this time.monotonic()
    # on (0: nothing to do), after writes still placing records by the old rules are done.
    place_again_at: float = 0.0


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", Runtime)
STORE = web.AppKey("store", Store)
CLIENT = web.AppKey("client", ConnexusClient)
AUTH = web.AppKey("auth", Authenticator)

# Per-tenant background jobs a config reload starts and stops (reload.py reconciles them).
# tenant -> the event that retires its current pull loop; every pull loop still running (a
# retired one finishing its record included) -> its tenant.
PULL_JOBS = web.AppKey("pull_jobs", dict[str, asyncio.Event])
PULL_TASKS = web.AppKey("pull_tasks", dict[asyncio.Task[None], str])
# tenant -> (the credentials and webhook URL it registers, its registration job)
REGISTRATION_JOBS = web.AppKey(
    "registration_jobs", dict[str, tuple[ConnexusCredentials, str, asyncio.Task[None]]]
)
