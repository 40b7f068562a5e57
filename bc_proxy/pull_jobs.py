"""The pull-mode tenants' jobs: one `Puller` loop per tenant in pull mode, started at start,
reconciled with the tenants by each config reload (a loop for a tenant that newly pulls; the
loop of one that no longer does retired, ending once its record in hand is stored), and
stopped at shutdown, each within its grace. Owns the registries `keys.PULL_JOBS` and
`keys.PULL_TASKS`; what one loop does is pull.py's.
"""

from __future__ import annotations

import asyncio
import functools

from aiohttp import web

from bc_proxy import keys
from bc_proxy.jobs import supervise
from bc_proxy.pull import Puller


def pull_tenants(app: web.Application) -> list[str]:
    """The tenants in pull mode, by the configuration in force (a reload changes it)."""
    return [t.name for t in app[keys.RUNTIME].tenants.values() if t.inbound.mode == "pull"]


async def pull_loop(app: web.Application) -> None:
    """Background job: one loop per pull-mode tenant (`keys.PULL_JOBS`, reconciled by a config
    reload), until cancelled (shutdown), which stops every loop."""
    try:
        reconcile(app)
        await asyncio.Event().wait()
    finally:
        await stop(app)


def reconcile(app: web.Application) -> None:
    """Start a loop for each tenant that pulls now and has none (after any of its loops still
    finishing: never two at once); retire the loop of each tenant that no longer pulls
    (removed, or back to webhooks): it asks for nothing more and ends once the record it
    holds is stored."""
    jobs, live = app[keys.PULL_JOBS], app[keys.PULL_TASKS]
    wanted = set() if app[keys.RUNTIME].shutting_down else set(pull_tenants(app))
    for name in [n for n in jobs if n not in wanted]:
        jobs.pop(name).set()
    for name in sorted(wanted - set(jobs)):
        before = [t for t, n in live.items() if n == name]
        retired = asyncio.Event()
        task = asyncio.create_task(
            _pull_after(app, name, retired, before), name=f"bc-proxy pull {name}"
        )
        live[task] = name
        task.add_done_callback(functools.partial(_forget, live))
        jobs[name] = retired


def _forget(live: dict[asyncio.Task[None], str], task: asyncio.Task[None]) -> None:
    live.pop(task, None)


async def _pull_after(
    app: web.Application, tenant: str, retired: asyncio.Event, before: list[asyncio.Task[None]]
) -> None:
    if before:  # a cancel here ends this one only: `stop` waits for those itself
        await asyncio.wait(before)
    if not retired.is_set():
        run = Puller(app, tenant, retired=retired).run
        await supervise("pull_loop", run, app[keys.METRICS])


async def stop(app: web.Application) -> None:
    """Cancel every pull loop, retired ones included, and wait until each has ended the
    record it held (each within its grace)."""
    app[keys.PULL_JOBS].clear()
    live = app[keys.PULL_TASKS]
    tasks = list(live)
    for task in tasks:
        if not task.cancelling():
            task.cancel()
    if tasks:
        await asyncio.wait(tasks)
