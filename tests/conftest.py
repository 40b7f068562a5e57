"""Shared fixtures: a real Connexus emulator server, settings in the design.md shape, and the
real gateway app served on 127.0.0.1 through pytest-aiohttp."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bc_proxy import keys, log
from bc_proxy.app import create_app
from bc_proxy.config import Settings, parse
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.metrics import Metrics
from bc_proxy.store.sqlite.store import SQLiteStore

LEGACY_USER = "acme-legacy"
LEGACY_PASSWORD = "acme-legacy-pass"
WEBHOOK_SECRET = "test-webhook-secret-0123"
CLIENT_ID = "cid_demo"
CLIENT_SECRET = "csk_demo"

AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
GatewayClient = TestClient[web.Request, web.Application]


@dataclass
class Connexus:
    """A running emulator and its base URL."""

    emu: Emulator
    server: TestServer

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/api/connexus"))

    @property
    def webhook_base(self) -> str:
        return str(self.server.make_url("/"))


@pytest.fixture
async def connexus(aiohttp_server: AiohttpServer) -> Connexus:
    """The Connexus emulator on a real loopback port."""
    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET, "cid_other": "csk_other"})
    server = await aiohttp_server(create_emulator_app(emu), host="127.0.0.1")
    return Connexus(emu, server)


def config_dict(tmp_path: Path, base_url: str, **server: Any) -> dict[str, Any]:
    """A configuration in exactly the design.md section 2 shape, one tenant `acme`."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 65536, **server},
        "upstream": {"base_url": base_url, "timeout_seconds": 2, "max_connections": 100},
        "store": {"url": f"sqlite:///{tmp_path / 'bc-proxy.db'}"},
        "webhook": {"secret": WEBHOOK_SECRET, "register_on_start": False},
        "tenants": [
            {
                "name": "acme",
                "legacy": {"user_id": LEGACY_USER, "password": LEGACY_PASSWORD},
                "connexus": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
                "default_from": "552",
                "senders": ["552", "2190"],
                "poll_wait_seconds": 0,
            }
        ],
    }


def with_tenant(cfg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `cfg` whose first tenant has `changes` applied."""
    out = copy.deepcopy(cfg)
    out["tenants"][0].update(changes)
    return out


@pytest.fixture
def cfg(tmp_path: Path, connexus: Connexus) -> dict[str, Any]:
    """The default test configuration pointing at the emulator."""
    return config_dict(tmp_path, connexus.base_url)


GatewayFactory = Callable[..., Awaitable[GatewayClient]]


@pytest.fixture
def gateway(aiohttp_client: AiohttpClient) -> GatewayFactory:
    """Start the real gateway app for a configuration dict (or Settings) on 127.0.0.1."""

    async def start(
        config: dict[str, Any] | Settings,
        metrics: Metrics | None = None,
        *,
        before_start: Callable[[web.Application], None] | None = None,
    ) -> GatewayClient:
        settings = config if isinstance(config, Settings) else parse(config)
        app = create_app(settings, metrics=metrics)
        if before_start is not None:
            before_start(app)
        return await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})

    return start


def writer_conn(client: GatewayClient) -> sqlite3.Connection:
    """The gateway's SQLite writer connection (runs on the loop thread, like the test):
    `PRAGMA query_only` on it makes the store refuse writes, a temp trigger refuse some."""
    store = client.app[keys.STORE]
    assert isinstance(store, SQLiteStore)
    conn = store._engine.conn
    assert conn is not None
    return conn


def creds(**extra: str) -> dict[str, str]:
    """Legacy credentials plus any other parameters."""
    return {"userId": LEGACY_USER, "password": LEGACY_PASSWORD, **extra}


@contextlib.contextmanager
def logging_to(
    stream: io.StringIO, secrets: Iterable[str] = (), level: str = "debug"
) -> Iterator[io.StringIO]:
    """bc-proxy's JSON logs into `stream`, the scrubber told `secrets` (as `serve` tells it
    the configuration's); the previous logging config is restored afterwards."""
    root = logging.getLogger()
    saved_level, handlers = root.level, list(root.handlers)
    saved = structlog.get_config()
    log.setup(level, "json", secrets, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(saved_level)
        structlog.configure(**saved)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """bc-proxy's JSON logs (debug level) into a buffer; the previous logging config is restored.

    No secrets are handed to the scrubber: tests see what the code itself logs.
    """
    with logging_to(io.StringIO()) as stream:
        yield stream
