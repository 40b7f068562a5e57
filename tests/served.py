"""Test helper: `bc-proxy serve` as a real subprocess on loopback, with its config file.

Used by tests that need what only a real process shows: resident memory, signals, socket-level
behaviour of the server, several processes on one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout

Proc = asyncio.subprocess.Process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of `n` consecutive TCP ports free on 127.0.0.1 right now (workers take
    `server.metrics_port + i`): a port picked alone may have a neighbour in use, by any
    process's outgoing connection among others."""
    for _ in range(100):
        first = free_port()
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first
    raise RuntimeError(f"no {n} consecutive free ports found")


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class Served:
    """`bc-proxy serve --config F [extra args]` as a subprocess; started, signalled, stopped."""

    def __init__(self, config_file: Path, port: int, log: TextIO, *args: str) -> None:
        self.config_file = config_file
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.args = args
        self.proc: Proc | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, session: ClientSession, *, ready_within: float = 20) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bc_proxy",
            "serve",
            "--config",
            str(self.config_file),
            *self.args,
            stdout=self.log,
            stderr=self.log,
        )
        await self.wait_ready(session, ready_within)

    async def wait_ready(self, session: ClientSession, within: float = 20) -> None:
        deadline = time.monotonic() + within
        while True:
            assert self.proc is not None
            assert self.proc.returncode is None, "the gateway exited during start-up"
            assert time.monotonic() < deadline, "the gateway did not become ready"
            with contextlib.suppress(ClientError, TimeoutError):
                async with session.get(self.base + "/readyz", timeout=ClientTimeout(1)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, within: float = 15) -> int:
        """SIGTERM and wait (SIGKILL past `within`); the exit status."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `bc-proxy ARGS` in a subprocess; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bc_proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rss_peak_kib(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")
