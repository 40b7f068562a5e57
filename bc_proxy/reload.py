"""Configuration reload (SIGHUP): tenants added, removed or re-keyed and passwords rotated in
place, without dropping open long-polls or in-flight sends; an invalid file is refused and
logged. Owns swapping what is built from the tenants, and reconciling the per-tenant jobs with
them (token refresh, pull loops, webhook registration); sections that shape the process
(RESTART_SECTIONS, a tenant's own webhook_secret) need a restart, and are logged as such while
they differ from what the process started with."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from aiohttp import web

from bc_proxy import keys, log, pull_jobs, registration
from bc_proxy.config import Settings, load_usable
from bc_proxy.connexus.tokens import TokenManager
from bc_proxy.errors import BcProxyError, ConfigError, StoreError
from bc_proxy.jobs import supervise

logger = log.get_logger("bc_proxy.reload")
PLACE_AGAIN_AFTER = 1.0  # s: a write placing records by the old rules is done by then

# Parts of the configuration a reload cannot apply to a running process.
RESTART_SECTIONS = ("server", "upstream", "store", "webhook", "log", "console")

Job = tuple[TokenManager, "asyncio.Task[None]"]
TOKEN_JOBS = web.AppKey("token_jobs", dict[str, Job])  # tenant -> its manager and refresh job
CURRENT = web.AppKey("current_settings", list[Settings])  # one item: the settings in force


def prepare(app: web.Application) -> None:
    """Called by create_app: the mutable holders a later reload updates."""
    app[TOKEN_JOBS] = {}
    app[keys.PULL_JOBS] = {}
    app[keys.PULL_TASKS] = {}
    app[CURRENT] = [app[keys.SETTINGS]]


def start_token_jobs(app: web.Application) -> None:
    """Start keep_fresh for every token manager that has no running job yet."""
    jobs = app[TOKEN_JOBS]
    for mgr in app[keys.CLIENT].tenant_tokens():
        job = jobs.get(mgr.tenant)
        if job is not None and job[0] is mgr:
            continue
        if job is not None:
            job[1].cancel()
        task = asyncio.create_task(
            supervise("token_refresh", mgr.keep_fresh, app[keys.METRICS]),
            name=f"bc-proxy token_refresh {mgr.tenant}",
        )
        jobs[mgr.tenant] = (mgr, task)


async def stop_token_jobs(app: web.Application, names: set[str] | None = None) -> None:
    """Cancel the refresh jobs of these tenants (all when None) and wait for them."""
    jobs = app[TOKEN_JOBS]
    stopping = [jobs.pop(n)[1] for n in list(jobs) if names is None or n in names]
    for task in stopping:
        task.cancel()
    for task in stopping:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _needs_restart(running: Settings, new: Settings) -> list[str]:
    """What of `new` a reload cannot apply, compared with what the process runs: the settings
    it started with (a reload never applies these), so a later reload still names them."""
    changed = [
        s for s in RESTART_SECTIONS if s != "server" and getattr(running, s) != getattr(new, s)
    ]
    # A worker of `server.workers` runs with metrics_port + its index: not a change.
    if running.server.model_dump(exclude={"metrics_port"}) != new.server.model_dump(
        exclude={"metrics_port"}
    ):
        changed.insert(0, "server")
    # The webhook route answers the path secrets of the start (webhooks.setup).
    started = {t.name: t.webhook_secret for t in running.tenants}
    for t in new.tenants:
        if t.webhook_secret != started.get(t.name):
            changed.append(f"tenants[{t.name}].webhook_secret")
    return changed


async def apply(app: web.Application, new: Settings) -> None:
    """Use `new`'s tenants from now on (what `reload` does once the file is valid)."""
    from bc_proxy.app import store_rules  # app imports this module

    old = app[CURRENT][0]
    restart = _needs_restart(app[keys.SETTINGS], new)
    if restart:
        logger.warning("config_reload_needs_restart", sections=", ".join(restart))
    names = {t.name for t in new.tenants}
    removed = {t.name for t in old.tenants} - names
    log.add_secrets(log.secrets_of(new))
    metrics = app[keys.METRICS]
    metrics.initialise(names)
    # Everything below up to the first await is one step of the event loop: no request sees
    # the new credentials with the old tenant table, or the other way round.
    client = app[keys.CLIENT]
    before = dict(client.tokens)
    fresh = client.update_tenants(new.tenants)  # a re-keyed tenant's gauges follow its new one
    app[keys.AUTH].replace_tenants(new.tenants)
    app[keys.STORE].rules = store_rules(new)  # read by the store at each operation
    rt = app[keys.RUNTIME]
    rt.status_maps = {t.name: new.status_map_for(t) for t in new.tenants}
    rt.tenants = {t.name: t for t in new.tenants}
    app[CURRENT][0] = new
    for name in removed:
        metrics.forget_tenant(name)
    for name in set(before) - set(client.tokens) - removed:  # now on password auth
        metrics.reset_token(name)
    # In this same step: a removed tenant's pull loop asks Connexus for nothing more (the
    # record it holds is stored first, at its own pace); new or re-keyed accounts get
    # registered, removed ones' registrations are cancelled.
    pull_jobs.reconcile(app)
    stopping = registration.reconcile(app)
    start_token_jobs(app)  # new and re-keyed managers; a replaced manager's job is cancelled
    await stop_token_jobs(app, set(before) - set(client.tokens))  # removed or now password auth
    # Records placed by the old rules that the new ones would not reach are placed again (as
    # at start); once more a little later by the upkeep job, for a write that placed a record
    # by the old rules and committed after this (PostgreSQL), or if this fails (store down).
    rt.place_again_at = time.monotonic() + PLACE_AGAIN_AFTER
    try:
        await app[keys.STORE].place_stranded()
    except StoreError as exc:
        logger.error("config_reload_stranded_failed", error=str(exc))
    logger.info(
        "config_reloaded",
        tenants=", ".join(sorted(names)),
        added=", ".join(sorted(names - {t.name for t in old.tenants})),
        removed=", ".join(sorted(removed)),
        rekeyed=", ".join(sorted(m.tenant for m in fresh if m.tenant in before)),
    )
    if stopping:  # the cancelled registrations
        await asyncio.wait(stopping)


async def reload(app: web.Application, path: str | Path) -> bool:
    """Read `path` again and apply it; an invalid file is refused (logged), nothing changes."""
    try:
        new = load_usable(path)
        _within_running_retention(app[keys.SETTINGS], new)
    except BcProxyError as exc:
        logger.error("config_reload_refused", path=str(path), error=str(exc))
        return False
    await apply(app, new)
    return True


def _within_running_retention(running: Settings, new: Settings) -> None:
    """The store section waits for a restart, so the retention the process started with still
    purges sends (a reload's own store section is not in force): a tenant's new idempotency
    window must fit in it (the file's own retention was checked)."""
    kept = running.store.retention_days * 86400
    for t in new.tenants:
        if t.idempotency_window_seconds > kept:
            raise ConfigError(
                f"tenants[{t.name}].idempotency_window_seconds: "
                f"{t.idempotency_window_seconds:g} s is longer than the running "
                f"store.retention_days ({running.store.retention_days:g} days; a new one needs a "
                "restart): a retry after its send was purged would be sent again"
            )


_HELD: list[int] = []  # SIGHUPs received while serve was starting (hold_sighup)


def hold_sighup() -> None:
    """From the start of `serve` until its app takes SIGHUP over (`install_sighup`, once the
    store and the background jobs are up): a SIGHUP is noted and answered by one reload then,
    instead of killing the process by its default action. Also unblocks SIGHUP, which the
    workers' supervisor blocks in a child it starts, so that one sent before this point waits
    (the signal mask survives exec) instead of killing the child while Python starts."""
    signal.signal(signal.SIGHUP, _note_sighup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def _note_sighup(signum: int, frame: object) -> None:
    _HELD.append(signum)


def install_sighup(app: web.Application, path: str | Path) -> None:
    """Reload `path` on SIGHUP while the app runs (one reload at a time, in order)."""
    lock = asyncio.Lock()
    pending: set[asyncio.Task[bool]] = set()

    async def one() -> bool:
        async with lock:
            return await reload(app, path)

    def on_hup() -> None:
        logger.info("config_reload_requested", path=str(path))
        task = asyncio.create_task(one(), name="bc-proxy reload")
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def on_startup(app: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
        if _HELD:  # asked for while starting: the file may have changed after it was read
            _HELD.clear()
            on_hup()

    def while_stopping() -> None:
        logger.info("config_reload_ignored", path=str(path), reason="stopping")

    async def on_shutdown(app: web.Application) -> None:
        # Not removed: asyncio would put back SIGHUP's default action, and a reload asked for
        # during the drain (`systemctl reload`, the supervisor) would kill the process there.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, while_stopping)
        for task in list(pending):
            task.cancel()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
