"""Worker processes on one box: `server.workers: N` runs N gateway processes on one port.

Owns the supervisor: it starts N `bc-proxy serve` children that each bind the port with
SO_REUSEPORT (the kernel spreads connections), restarts a child that dies with a capped
backoff, and on SIGTERM/SIGINT forwards SIGTERM to every child, waits for their drain
(`server.shutdown_timeout_seconds` plus a margin) and kills what is left. Each child is an
ordinary replica of a shared PostgreSQL store; the supervisor itself serves nothing. Also owns
how a serving process takes its stop signals (`stop_once`): the first starts the drain, the
second (which the supervisor's forwarding adds wherever the whole process group is signalled:
systemd, Ctrl-C, dumb-init) does not cut it short, a third does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from bc_proxy.log import get_logger

ENV_INDEX = "BC_PROXY_WORKER_INDEX"  # set in each child: 0..N-1
RESTART_INITIAL = 0.5
RESTART_MAX = 30.0
HEALTHY_AFTER = 30.0  # a child that ran this long resets its backoff
TICK = 0.2
log = get_logger("bc_proxy.workers")


@dataclass
class Child:
    """One supervised worker slot."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = RESTART_INITIAL
    restart_at: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    """Runs `argv` N times, each with its index in the environment, until told to stop."""

    argv: Sequence[str]
    count: int
    drain_seconds: float
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, ENV_INDEX: str(child.index)}
        # Started with SIGHUP blocked (the mask survives exec): a reload forwarded while the
        # child's Python starts waits until serve takes it (reload.hold_sighup), instead of
        # killing the child by SIGHUP's default action.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            child.proc = subprocess.Popen(list(self.argv), env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.started = time.monotonic()
        self.log(f"worker {child.index} started (pid {child.proc.pid})")

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT, then drain every child; the exit status."""
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        # SIGHUP goes to every worker (each reloads its configuration), not to the supervisor.
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._forward_hup)
        try:
            self.children = [Child(i) for i in range(self.count)]
            for child in self.children:
                self._spawn(child)
            while not self.stopping:
                self._watch()
                time.sleep(TICK)
            return self._drain()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _forward_hup(self, signum: int, frame: object) -> None:
        if self.stopping:  # draining: a reload now would only disturb the drain
            return
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGHUP)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None:
                code = proc.poll()
                if code is None:
                    if now - child.started > HEALTHY_AFTER:
                        child.delay = RESTART_INITIAL
                    continue
                self.log(f"worker {child.index} (pid {proc.pid}) exited with {code}; restarting")
                child.proc = None
                child.restart_at = now + child.delay
                child.delay = min(child.delay * 2, RESTART_MAX)
            if child.proc is None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def _drain(self) -> int:
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_seconds
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"worker pid {proc.pid} did not stop in time; killing it")
                proc.kill()
                proc.wait()
        self.log("all workers stopped")
        return 0


FORCE_AFTER = 3  # the stop signal that cuts a drain short: one more than a group stop sends


def stop_once(app: web.Application) -> None:
    """SIGTERM and SIGINT stop `serve` once: the first starts aiohttp's graceful exit (drain
    within `shutdown_timeout_seconds`); the second is logged and ignored (a process group
    stopped as a whole, by systemd, Ctrl-C or dumb-init, gets it from the supervisor too).
    aiohttp's own handler raised again on it, out of the drain, cancelling every handler and
    the store's close. A third cuts the drain short, as an operator insisting means it (a hung
    store would otherwise leave only SIGKILL). Installed before the store opens (first startup
    hook), replacing aiohttp's handler for the rest of the run."""

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        received = 0

        def on_signal(name: str) -> None:
            nonlocal received
            received += 1
            if received >= FORCE_AFTER:
                log.warning("stop_forced", signal=name, received=received)
                raise web.GracefulExit
            if received > 1:
                log.info("stop_signal_ignored", signal=name, reason="already draining")
                return
            raise web.GracefulExit

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)

    app.on_startup.insert(0, install)


def worker_argv(config_path: str) -> list[str]:
    """The command line of one child: this interpreter, `serve` as a single worker."""
    return [sys.executable, "-m", "bc_proxy", "serve", "--config", config_path, "--workers", "1"]


def worker_index() -> int | None:
    """This process's worker index when it runs under a supervisor, else None."""
    value = os.environ.get(ENV_INDEX)
    return int(value) if value is not None and value.isdigit() else None
