"""Graceful shutdown of `bc-proxy serve` on SIGTERM: long-polls released, in-flight sends
finished (or, cut off, never re-sent), exit 0 within the shutdown timeout, and waiting records
kept for the next start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import WEBHOOK_SECRET, Connexus, config_dict, creds

SHUTDOWN_TIMEOUT = 3.0
LATENCY = 2.0  # sends outlive half the shutdown timeout (where aiohttp cancels request bodies)
HANDSET = "64277770123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_argv(config: Path) -> list[str]:
    """`bc-proxy serve --config F`, through the installed script when it is on PATH."""
    script = shutil.which("bc-proxy")
    head = [script] if script else [sys.executable, "-m", "bc_proxy"]
    return [*head, "serve", "--config", str(config)]


@dataclass
class Served:
    """A running `bc-proxy serve` subprocess and what it wrote to stderr."""

    proc: asyncio.subprocess.Process
    base: str
    stderr: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.stderr)


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for line in stream:
        into.append(line.decode(errors="replace"))


@contextlib.asynccontextmanager
async def serve(config: Path, port: int) -> AsyncIterator[Served]:
    """Start the gateway process, wait for /healthz, and make sure it is gone afterwards."""
    proc = await asyncio.create_subprocess_exec(
        *serve_argv(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    served = Served(proc, f"http://127.0.0.1:{port}")
    drain = asyncio.create_task(_drain(proc.stderr, served.stderr))
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None, f"bc-proxy exited early:\n{served.log}"
                assert time.monotonic() < deadline, f"bc-proxy did not start:\n{served.log}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(served.base + "/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await drain


def write_config(
    tmp_path: Path, connexus: Connexus, port: int, shutdown_timeout: float = SHUTDOWN_TIMEOUT
) -> Path:
    cfg: dict[str, Any] = config_dict(tmp_path, connexus.base_url)
    cfg["server"].update(port=port, shutdown_timeout_seconds=shutdown_timeout)
    cfg["upstream"].update(timeout_seconds=5, mo_query_interval_seconds=0)
    cfg["tenants"][0]["poll_wait_seconds"] = 20
    cfg["log"] = {"level": "info", "format": "json"}
    path = tmp_path / "bc-proxy.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


async def timed(coro: Any) -> tuple[int, str, float]:
    """(status, body, monotonic time it completed) of one request coroutine."""
    resp: aiohttp.ClientResponse = await coro
    async with resp:
        return resp.status, await resp.text(), time.monotonic()


async def test_sigterm_drains_and_keeps_waiting_records(tmp_path: Path, connexus: Connexus) -> None:
    """SIGTERM: the long-poll gets 204 at once, sends finish 204, exit 0, stored records survive."""
    port = free_port()
    config = write_config(tmp_path, connexus, port)
    emu = connexus.emu
    async with (
        serve(config, port) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        # Warm the token, then store an incoming message that nobody polls before SIGTERM.
        warm = creds(to="6421000999", body="warm")
        status, _, _ = await timed(http.post(gw.base + "/api/1/sms/out", data=warm))
        assert status == 204
        emu.webhook_url = f"{gw.base}/webhooks/connexus/{WEBHOOK_SECRET}"
        await emu.fire_mo(f"+{HANDSET}", "552", "kept across restart")
        assert emu.webhook_deliveries[-1][1] == 200

        emu.latency = LATENCY
        poll = asyncio.create_task(timed(http.get(gw.base + "/api/1/sms/status", params=creds())))
        sends = [
            asyncio.create_task(
                timed(
                    http.post(
                        gw.base + "/api/1/sms/out",
                        data=creds(to=f"64210000{i}", body=f"in flight {i}"),
                    )
                )
            )
            for i in range(3)
        ]
        deadline = time.monotonic() + 5
        while len(emu.sms_out_requests()) < 4:  # all three are now waiting on Connexus
            assert time.monotonic() < deadline, "sends never reached the emulator"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert not poll.done()

        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        poll_status, poll_body, poll_done = await asyncio.wait_for(poll, 3)
        assert poll_status == 204
        assert poll_body == ""
        assert poll_done - signalled < 0.8, "the long-poll was not released promptly"
        results = await asyncio.wait_for(asyncio.gather(*sends), SHUTDOWN_TIMEOUT + 2)
        assert [r[0] for r in results] == [204, 204, 204]
        assert all(r[2] > signalled + SHUTDOWN_TIMEOUT / 2 for r in results)
        rc = await asyncio.wait_for(gw.proc.wait(), SHUTDOWN_TIMEOUT + 3)
        exited = time.monotonic() - signalled
        assert rc == 0, gw.log
        assert exited < SHUTDOWN_TIMEOUT + 1.5
        assert len([s for s in emu.sent if s.body.startswith("in flight")]) == 3
        assert "Traceback" not in gw.log
        assert '"level": "error"' not in gw.log

    emu.latency = 0
    async with (
        serve(config, port) as gw2,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        status, body, _ = await timed(http.get(gw2.base + "/api/1/sms/in", params=creds()))
        assert status == 200
        assert f"from={HANDSET}" in body
        assert "body=kept+across+restart" in body
        deadline = time.monotonic() + 3
        while True:  # the ack is committed just after the answer went out
            _, body, _ = await timed(http.get(gw2.base + "/api/1/sms/queue", params=creds()))
            if body == "inCount=0&statusCount=0" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert body == "inCount=0&statusCount=0"
        gw2.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gw2.proc.wait(), SHUTDOWN_TIMEOUT + 3) == 0


async def test_sigterm_exits_in_time_when_upstream_hangs(
    tmp_path: Path, connexus: Connexus
) -> None:
    """A send stuck on a slow Connexus does not hold the process past the shutdown timeout."""
    port = free_port()
    timeout = 2.0
    config = write_config(tmp_path, connexus, port, shutdown_timeout=timeout)
    emu = connexus.emu
    async with serve(config, port) as gw, aiohttp.ClientSession() as http:
        warm = creds(to="6421000999", body="warm")
        assert (await timed(http.post(gw.base + "/api/1/sms/out", data=warm)))[0] == 204
        emu.latency = 4.5  # far past the shutdown timeout, inside upstream.timeout_seconds (5)
        stuck = asyncio.create_task(
            timed(http.post(gw.base + "/api/1/sms/out", data=creds(to="64210001", body="slow")))
        )
        deadline = time.monotonic() + 5
        while len(emu.sms_out_requests()) < 2:
            assert time.monotonic() < deadline, "the send never reached the emulator"
            await asyncio.sleep(0.01)
        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(gw.proc.wait(), 3 * timeout)
        exited = time.monotonic() - signalled
        with contextlib.suppress(aiohttp.ClientError):
            await stuck  # cut off: no answer is fine, a hang is not
        assert rc == 0, gw.log
        assert exited < timeout + 1.5, f"exit took {exited:.2f}s for a {timeout}s timeout"
    with sqlite3.connect(tmp_path / "bc-proxy.db") as db:
        states = dict(db.execute("SELECT recipient, state FROM sends").fetchall())
    # Cut off mid-call: settled unknown as the handler is cancelled (or still pending if the
    # store closed first, unknown at a later start); either way a retry is never re-sent.
    assert states["64210001"] in ("unknown", "pending")
