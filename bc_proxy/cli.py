"""Command line: serve, demo, emulator, check-config, hash-password, dead-letters and more.

Owns argument parsing, exit codes and what is printed for operators. Everything it runs
lives elsewhere: it only loads settings and calls into the app, the store or the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence

from bc_proxy import __version__
from bc_proxy.config import Settings, load, load_usable
from bc_proxy.errors import BcProxyError, ConfigError

ENV_CONFIG = "BC_PROXY_CONFIG"


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get(ENV_CONFIG)
    if not path:
        raise ConfigError(f"no configuration: pass --config FILE or set {ENV_CONFIG}")
    return path


def _settings(args: argparse.Namespace) -> Settings:
    return load(_config_path(args))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _tune_gc() -> None:
    """Fewer, cheaper collections: long-lived startup objects leave the collector's sight, and
    young collections wait for more garbage. Measured: send-path p99 at 32 connections
    42 ms -> 16 ms and throughput +20% (bench/, see docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from bc_proxy import log, reload, tls, workers
    from bc_proxy.app import create_app

    reload.hold_sighup()  # a reload asked for while starting waits for the app (the supervisor
    # installs its own forwarding below)
    settings = load_usable(_config_path(args))  # what check-config refuses, serve refuses
    count = args.workers if args.workers is not None else settings.server.workers
    if count < 1:
        raise ConfigError("--workers: must be at least 1")
    if count > 1:
        if settings.store.url.startswith("sqlite:"):
            raise ConfigError(
                "server.workers: more than one worker needs a postgresql:// store "
                "(one process owns a SQLite file)"
            )
        path = args.config or os.environ.get(ENV_CONFIG) or ""
        drain = settings.server.shutdown_timeout_seconds + 5
        return workers.Supervisor(workers.worker_argv(path), count, drain).run()
    index = workers.worker_index()
    if index is not None and settings.server.metrics_port is not None:
        # Each worker of a box serves its own /metrics: metrics_port + its index.
        server = settings.server.model_copy(
            update={"metrics_port": settings.server.metrics_port + index}
        )
        settings = settings.model_copy(update={"server": server})
    log.setup(settings.log.level, settings.log.format, log.secrets_of(settings))
    ssl_context = tls.server_context(settings.server)  # None: plain HTTP
    _install_uvloop()
    app = create_app(settings)
    reload.install_sighup(app, _config_path(args))
    workers.stop_once(app)
    _tune_gc()
    try:
        web.run_app(
            app,
            host=settings.server.host,
            port=settings.server.port,
            reuse_port=index is not None,  # the workers of one box share the port
            ssl_context=ssl_context,
            # aiohttp waits up to shutdown_timeout for in-flight handlers, then cancels them
            # and waits up to shutdown_timeout again: halve it so the whole drain fits.
            shutdown_timeout=settings.server.shutdown_timeout_seconds / 2,
            access_log=None,
            print=None,
            handle_signals=True,
        )
    except OSError as exc:
        if exc.errno not in _BIND_ERRORS:
            raise
        # A taken port (or a host this machine lacks): one line, not a 35-line traceback.
        print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def cmd_check_config(args: argparse.Namespace) -> int:
    # Everything serve would refuse: the models, unset variables, files and directories it
    # could not use (TLS pair included); every problem at once, one line each.
    settings = load_usable(_config_path(args))
    names = ", ".join(t.name for t in settings.tenants)
    print(f"configuration OK: {len(settings.tenants)} tenant(s): {names}")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from bc_proxy.legacy.auth import hash_password

    if args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from bc_proxy.connexus.emulator import Emulator, serve_emulator

    emu = Emulator(
        token_ttl=args.token_ttl,
        dlr_id=args.dlr_id,
        dlr_timestamp=not args.dlr_no_timestamp,
        dlr_details=not args.dlr_no_details,
    )
    emu.webhook_url = args.webhook_url
    emu.auto_dlr = args.auto_dlr
    print(f"Connexus emulator on http://{args.host}:{args.port}/api/connexus", flush=True)
    _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_emulator(args.host, args.port, emu))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bc_proxy.demo import run_demo

    _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(args.port, args.emulator_port, args.data_dir))
    return 0


async def _dead_letters(settings: Settings, action: str, ids: Sequence[int] | None) -> int:
    from bc_proxy.app import open_configured_store
    from bc_proxy.translate import render_record

    store = open_configured_store(settings)
    await store.open()
    try:
        if action == "list":
            rows = await store.dead_letters()
            maps = {t.name: settings.status_map_for(t) for t in settings.tenants}
            for r in rows:
                body = render_record(r, maps.get(r.tenant, {})).decode()
                print(f"{r.id}\t{r.tenant}\t{r.kind}\t{r.push_attempts}\t{r.push_error}\t{body}")
            print(f"{len(rows)} dead letter(s)", file=sys.stderr)
            return 0
        n = await store.replay(ids, time.time())
        print(f"{n} dead letter(s) queued for push again")
        return 0
    finally:
        await store.close()


def cmd_dead_letters(args: argparse.Namespace) -> int:
    settings = _settings(args)
    ids = None if args.action == "list" or args.all or not args.ids else args.ids
    if args.action == "replay" and not args.all and not args.ids:
        print("error: replay needs --all or one or more ids", file=sys.stderr)
        return 2
    return asyncio.run(_dead_letters(settings, args.action, ids))


async def _rejected_webhooks(settings: Settings, limit: int) -> int:
    from datetime import UTC, datetime

    from bc_proxy.app import open_configured_store

    store = open_configured_store(settings)
    await store.open()
    try:
        rows = await store.rejected_webhooks(limit)
    finally:
        await store.close()
    for r in rows:
        when = datetime.fromtimestamp(r.received_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # The body verbatim as one JSON string (undecodable bytes as \\xNN escapes).
        text = json.dumps(r.body.decode("utf-8", "backslashreplace"), ensure_ascii=False)
        print(f"{r.id}\t{when}\t{r.reason}\t{text}")
    print(f"{len(rows)} rejected webhook(s)", file=sys.stderr)
    return 0


def cmd_rejected_webhooks(args: argparse.Namespace) -> int:
    return asyncio.run(_rejected_webhooks(_settings(args), args.limit))


async def _migrate(settings: Settings) -> int:
    from bc_proxy.app import open_configured_store

    store = open_configured_store(settings)
    try:
        # Both backends have it; the app's Store seam does not need it.
        before, after = await store.migrate()
    finally:
        await store.close()
    state = "up to date" if before == after else "migrated"
    print(f"store schema version {before} -> {after} ({state})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(_settings(args)))


def cmd_migrate_store(args: argparse.Namespace) -> int:
    from bc_proxy.store.transfer import summary, transfer

    report = asyncio.run(transfer(args.source, args.target, force=args.force))
    print("\n".join(summary(report)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bc-proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bc-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help=f"YAML configuration (default: ${ENV_CONFIG})")

    p = sub.add_parser("serve", help="run the gateway")
    with_config(p)
    p.add_argument(
        "--workers", type=int, default=None, help="processes on one port (default: server.workers)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a configuration file")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("hash-password", help="print an argon2 hash for legacy.password_hash")
    p.add_argument("password", nargs="?", help="read from the terminal or stdin when omitted")
    p.set_defaults(func=cmd_hash_password)

    p = sub.add_parser("emulator", help="run the built-in Connexus emulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9080)
    p.add_argument("--token-ttl", type=int, default=86400)
    p.add_argument("--webhook-url", default=None)
    p.add_argument("--auto-dlr", type=int, default=None, help="fire this dlr statusCode per send")
    p.add_argument(
        "--dlr-id",
        choices=["connexus", "client"],
        default="connexus",
        help="id a delivery report carries: its own message_id, or the client's messageId",
    )
    p.add_argument("--dlr-no-timestamp", action="store_true", help="reports without timestamp")
    p.add_argument("--dlr-no-details", action="store_true", help="reports without details")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("demo", help="gateway + emulator on loopback, with curl examples")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--emulator-port", type=int, default=9080)
    p.add_argument("--data-dir", default=None, help="where the demo store lives (temp dir)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dead-letters", help="list or replay records whose push gave up")
    with_config(p)
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("ids", nargs="*", type=int, help="record ids to replay")
    p.add_argument("--all", action="store_true", help="replay every dead letter")
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("rejected-webhooks", help="list webhook payloads that could not be used")
    with_config(p)
    p.add_argument("action", choices=["list"])
    p.add_argument("--limit", type=int, default=100, help="newest first, at most this many")
    p.set_defaults(func=cmd_rejected_webhooks)

    p = sub.add_parser("migrate", help="bring the store's schema to this version's (then exit)")
    with_config(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "migrate-store", help="move a stopped SQLite install into PostgreSQL, counts verified"
    )
    p.add_argument("--from", dest="source", required=True, help="sqlite:///path/to/bc-proxy.db")
    p.add_argument("--to", dest="target", required=True, help="postgresql://... (migrated first)")
    p.add_argument("--force", action="store_true", help="empty a non-empty target first")
    p.set_defaults(func=cmd_migrate_store)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BcProxyError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
