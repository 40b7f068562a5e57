"""Signals during a graceful stop: the drain is not cut short by what arrives meanwhile.

A repeated SIGTERM (the supervisor forwards one to workers that already got the group's, under
systemd, Ctrl-C or dumb-init) and a SIGHUP (a reload asked for while draining) used to end the
drain: the send in flight, answered by Connexus well inside shutdown_timeout_seconds, got no
204 and its row stayed `pending`. Real `bc-proxy serve` processes, the real emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import Connexus, creds
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.served import free_port as free_port_of
from tests.served import write_config as write_file
from tests.test_scaleout import gateway_config
from tests.test_shutdown import free_port, serve, serve_argv, timed, write_config

LATENCY = 1.5  # Connexus answers the send in flight 1.5 s after the stop began
DRAIN = 8.0  # shutdown_timeout_seconds: the answer is far inside it


async def wait_for_calls(connexus: Connexus, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(connexus.emu.sms_out_requests()) < n:
        assert time.monotonic() < deadline, "the send never reached Connexus"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("then", "logged"),
    [
        (signal.SIGTERM, "stop_signal_ignored"),
        (signal.SIGINT, "stop_signal_ignored"),
        (signal.SIGHUP, "config_reload_ignored"),
    ],
)
async def test_a_signal_during_the_drain_does_not_cut_it_short(
    tmp_path: Path, connexus: Connexus, then: signal.Signals, logged: str
) -> None:
    """SIGTERM, then 0.3 s later another stop signal or a reload: the send in flight is still
    answered 204 and settled `accepted`, and the process exits 0 after its drain."""
    port = free_port()
    config = write_config(tmp_path, connexus, port, shutdown_timeout=DRAIN)
    emu = connexus.emu
    async with serve(config, port) as gw, aiohttp.ClientSession() as http:
        warm = creds(to="6421000999", body="warm")  # the token is fetched before the stop
        assert (await timed(http.post(gw.base + "/api/1/sms/out", data=warm)))[0] == 204
        emu.latency = LATENCY
        data = creds(to="64210001", body="in flight", messageId="drain-1")
        send = asyncio.ensure_future(timed(http.post(gw.base + "/api/1/sms/out", data=data)))
        await wait_for_calls(connexus, 2)
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        gw.proc.send_signal(then)
        status = (await asyncio.wait_for(send, 10))[0]
        code = await asyncio.wait_for(gw.proc.wait(), DRAIN + 5)
    emu.latency = 0
    with sqlite3.connect(tmp_path / "bc-proxy.db") as db:
        (state,) = db.execute("SELECT state FROM sends WHERE legacy_id = 'drain-1'").fetchone()
    assert (status, state, code) == (204, "accepted", 0), gw.log[-2000:]
    assert logged in gw.log


async def test_a_third_stop_signal_cuts_the_drain_short(tmp_path: Path, connexus: Connexus) -> None:
    """An operator insisting (a third SIGTERM or Ctrl-C; a group stop sends two) ends the drain
    at once, as a hung store would otherwise leave only SIGKILL: the process is gone long
    before the send in flight would have been answered."""
    port = free_port()
    config = write_config(tmp_path, connexus, port, shutdown_timeout=DRAIN)
    emu = connexus.emu
    async with serve(config, port) as gw, aiohttp.ClientSession() as http:
        warm = creds(to="6421000999", body="warm")
        assert (await timed(http.post(gw.base + "/api/1/sms/out", data=warm)))[0] == 204
        emu.latency = 5.0  # inside the drain's bound, far past the test's wait
        data = creds(to="64210001", body="in flight", messageId="forced-1")
        send = asyncio.ensure_future(timed(http.post(gw.base + "/api/1/sms/out", data=data)))
        await wait_for_calls(connexus, 2)
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            gw.proc.send_signal(sig)
            await asyncio.sleep(0.2)
        forced = time.monotonic()
        await asyncio.wait_for(gw.proc.wait(), 3)
        took = time.monotonic() - forced
        with contextlib.suppress(aiohttp.ClientError):
            await asyncio.wait_for(send, 5)
    emu.latency = 0
    assert took < 2.0, gw.log[-2000:]
    assert "stop_signal_ignored" in gw.log
    assert "stop_forced" in gw.log


@pytest.mark.postgres
async def test_workers_stopped_through_their_process_group_drain(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
) -> None:
    """`serve --workers 2` stopped as systemd (KillMode=control-group), a terminal's Ctrl-C or
    dumb-init stop it: every process of the group gets SIGTERM, and each worker gets it again
    from the supervisor. The send in flight is answered 204 and settled `accepted`."""
    port = free_port_of()
    cfg = gateway_config(tmp_path, connexus, pg_url)
    cfg["server"].update(port=port, shutdown_timeout_seconds=DRAIN)
    cfg["upstream"]["timeout_seconds"] = 5
    config = write_file(tmp_path / "workers.yaml", cfg)
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "workers.log").open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bc_proxy", "serve", "--config", str(config)),
            *("--workers", "2"),
            stdout=log,
            stderr=log,
            start_new_session=True,  # a process group of its own, as a systemd unit has
        )
        connector = aiohttp.TCPConnector(force_close=True)  # the kernel picks a worker each time
        try:
            async with aiohttp.ClientSession(connector=connector) as http:
                deadline, ready = time.monotonic() + 20, 0
                while ready < 10:  # both workers up: ten readiness answers in a row
                    assert time.monotonic() < deadline, "the workers did not come up"
                    try:
                        async with http.get(base + "/readyz") as r:
                            ready = ready + 1 if r.status == 200 else 0
                    except aiohttp.ClientError:
                        ready = 0
                    await asyncio.sleep(0.05)
                for i in range(6):  # each worker fetches its token before the stop
                    warm = creds(to=f"642100099{i}", body="warm")
                    assert (await timed(http.post(base + "/api/1/sms/out", data=warm)))[0] == 204
                connexus.emu.latency = LATENCY
                data = creds(to="6421000555", body="in flight", messageId="group-1")
                send = asyncio.ensure_future(timed(http.post(base + "/api/1/sms/out", data=data)))
                await wait_for_calls(connexus, 7)
                os.killpg(proc.pid, signal.SIGTERM)
                status = (await asyncio.wait_for(send, 15))[0]
                code = await asyncio.wait_for(proc.wait(), DRAIN + 10)
        finally:
            connexus.emu.latency = 0
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    conn = await asyncpg.connect(pg_url)
    try:
        state = await conn.fetchval("SELECT state FROM sends WHERE legacy_id = 'group-1'")
    finally:
        await conn.close()
    assert (status, state, code) == (204, "accepted", 0), (tmp_path / "workers.log").read_text()


async def test_a_reload_asked_for_while_starting_runs_once_started(
    tmp_path: Path, connexus: Connexus
) -> None:
    """A SIGHUP that reaches `serve` before its app took the signal over (a supervisor
    forwarding a reload to a child it just started, `systemctl reload` during a start) used to
    kill it by SIGHUP's default action. The child is started as the supervisor starts one, with
    SIGHUP blocked, and signalled at once: it comes up and applies one reload."""
    port = free_port()
    config = write_config(tmp_path, connexus, port)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        proc = await asyncio.create_subprocess_exec(
            *serve_argv(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    proc.send_signal(signal.SIGHUP)  # while Python starts
    assert proc.stderr is not None
    lines: list[str] = []
    reader = asyncio.ensure_future(read_lines(proc.stderr, lines))
    try:
        deadline = time.monotonic() + 20
        while not any("config_reloaded" in line for line in lines):
            assert proc.returncode is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http, http.get(f"{gw_base(port)}/readyz") as r:
            assert r.status == 200
        assert sum("config_reload_requested" in line for line in lines) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await reader


async def read_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for line in stream:
        into.append(line.decode(errors="replace"))


def gw_base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@pytest.mark.postgres
async def test_a_reload_forwarded_to_a_restarting_worker_does_not_kill_it(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
) -> None:
    """`serve --workers 2`: a worker is killed and restarted by the supervisor while reloads
    keep arriving (every 20 ms). The supervisor starts the new worker with SIGHUP blocked, so
    no reload forwarded while its Python starts kills it (exit -1, restarted again)."""
    port = free_port_of()
    cfg = gateway_config(tmp_path, connexus, pg_url)
    cfg["server"]["port"] = port
    config = write_file(tmp_path / "workers.yaml", cfg)
    log_path = tmp_path / "workers.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bc_proxy", "serve", "--config", str(config)),
            *("--workers", "2"),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 20
            while log_path.read_text().count("worker ") < 2 or not await ready(port):
                assert proc.returncode is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.05)
            first = int(log_path.read_text().split("(pid ")[1].split(")")[0])
            os.kill(first, signal.SIGKILL)
            until = time.monotonic() + 3  # the restart comes after 0.5 s, Python starts in ~1 s
            while time.monotonic() < until:
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.02)
            text = log_path.read_text()
            assert text.count("restarting") == 1, text  # the killed one, and no other
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()


async def ready(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{gw_base(port)}/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False
