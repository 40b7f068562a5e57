"""`serve --workers 2` on PostgreSQL: one port, two supervised worker processes.

Both workers take requests on the one port (SO_REUSEPORT; each worker's /metrics on
metrics_port + its index counts them), a SIGKILLed worker is restarted while the port keeps
answering, SIGTERM drains all and exits 0; `check-config` refuses workers > 1 on SQLite.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Connexus, config_dict, creds
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.served import Served, free_port, free_ports, write_config
from tests.test_scaleout import gateway_config

pytestmark = pytest.mark.postgres

SHUTDOWN = 3.0
DRAIN_MARGIN = 5.0  # the supervisor's wait past shutdown_timeout_seconds


def children(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


async def legacy_requests(http: aiohttp.ClientSession, port: int) -> float:
    """The worker's legacy request count, from its own /metrics port (-1 while it is down)."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return -1
    found = re.findall(r"^bc_proxy_legacy_requests_total\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(v) for v in found)


async def queue_polls(http: aiohttp.ClientSession, base: str, n: int) -> list[int]:
    """n legacy queue requests, each on a new connection (the kernel picks the worker)."""

    async def one() -> int:
        async with http.get(f"{base}/api/1/sms/queue", params=creds()) as resp:
            await resp.read()
            return resp.status

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_two_workers_share_the_port_restart_when_killed_and_drain_on_sigterm(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
) -> None:
    """Both workers serve the one port, a killed one is restarted, SIGTERM exits 0 in time."""
    port, metrics = free_port(), free_ports(2)  # metrics and metrics + 1: one per worker
    while port in (metrics, metrics + 1):
        port = free_port()
    cfg = gateway_config(tmp_path, connexus, pg_url)
    cfg["server"].update(port=port, metrics_port=metrics, shutdown_timeout_seconds=SHUTDOWN)
    config = write_config(tmp_path / "workers.yaml", cfg)
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection per request
    async with aiohttp.ClientSession(connector=connector) as http:
        with (tmp_path / "workers.log").open("w") as log:
            served = Served(config, port, log, "--workers", "2")
            await served.start(http)
            try:
                deadline = time.monotonic() + 20
                while min([await legacy_requests(http, metrics + i) for i in (0, 1)]) < 0:
                    assert time.monotonic() < deadline, "a worker never came up"
                    await asyncio.sleep(0.1)
                first = children(served.pid)
                assert len(first) == 2
                assert set(await queue_polls(http, served.base, 200)) == {200}
                counts = [await legacy_requests(http, metrics + i) for i in (0, 1)]
                print(f"\n200 requests on one port: worker 0 took {counts[0]:.0f}, "
                      f"worker 1 {counts[1]:.0f}")  # fmt: skip
                assert min(counts) > 0, "one worker took no request"

                victim = min(first)
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.sleep(0.1)
                statuses: list[int] = []
                while children(served.pid) - (first - {victim}) == set():
                    assert time.monotonic() - killed < 10, "the worker was not restarted"
                    statuses += await queue_polls(http, served.base, 10)
                    await asyncio.sleep(0.05)
                while min([await legacy_requests(http, metrics + i) for i in (0, 1)]) < 0:
                    assert time.monotonic() - killed < 20, "the restarted worker never served"
                    statuses += await queue_polls(http, served.base, 10)
                    await asyncio.sleep(0.05)
                back = time.monotonic() - killed
                assert set(statuses) == {200}  # the port kept answering
                assert len(children(served.pid)) == 2

                workers = children(served.pid)
                stopping = time.monotonic()
                code = await served.stop(within=SHUTDOWN + DRAIN_MARGIN + 5)
                took = time.monotonic() - stopping
            finally:
                await served.stop()
    print(f"worker restarted and serving {back:.1f} s after SIGKILL ({len(statuses)} requests "
          f"meanwhile, all 200); SIGTERM: exit {code} in {took:.1f} s")  # fmt: skip
    assert code == 0
    assert took < SHUTDOWN + DRAIN_MARGIN
    assert not any(_alive(pid) for pid in workers)  # drained: no worker left behind


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_check_config_refuses_workers_with_sqlite(tmp_path: Path) -> None:
    """`check-config` fails for server.workers: 2 on a SQLite store, passes for 1."""
    cfg = config_dict(tmp_path, "http://127.0.0.1:9/api/connexus")
    for workers, ok in ((1, True), (2, False)):
        cfg["server"]["workers"] = workers
        path = write_config(tmp_path / f"w{workers}.yaml", cfg)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bc_proxy", "check-config", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert (proc.returncode == 0) is ok, (out, err)
        if not ok:
            assert b"postgresql" in err
