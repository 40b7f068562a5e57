#!/usr/bin/env python3
"""Benchmark runner for bc-proxy (the performance issue): every bar, measured side by side.

    python bench/run.py [--runs 3] [--duration 10] [--quick] [--only SCENARIO ...]

Needs the project installed plus Debian's `wrk` and `nginx`. All traffic stays on 127.0.0.1.
It starts a fixed-response Connexus stub (nginx), the gateway under test (`bc-proxy serve`)
and the reference pass-through proxy (`bench/baseline_proxy.py`, the lean one of issue 13, on
uvloop like the gateway), one process under test at a time. The process under test is pinned
to the first CPU (`taskset -c 0`); wrk, nginx and this script (which is the Python load
client) to the second. Every wait is bounded, and everything
started is stopped at the end, also on Ctrl-C or an error (each child is its own process group).

Scenarios (see bench/README.md): send32, send1, webhook, pg (PostgreSQL beside SQLite),
workers (1 vs 2 on PostgreSQL), realistic (Connexus at 150 ms, 500 connections), wakeup,
memory. Results go to bench/results/<UTC timestamp>-<hostname>.json and .md; the exit status
is 1 when a correctness check failed (a 204 without its stored send, a lost or duplicated
receipt, a crash), 3 with --require-bars when a bar failed, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import asyncpg

from bc_proxy.store.postgres import schema as pg_schema
from bc_proxy.store.sqlite import schema as sqlite_schema

BENCH = Path(__file__).resolve().parent
SCENARIOS = ("send32", "send1", "webhook", "pg", "workers", "realistic", "wakeup", "memory")
REALISTIC_DELAY = 0.15  # Connexus answering sms/out in 150 ms (issue 13 point 5)
REALISTIC_CONNECTIONS = 500
PG_DSN = os.environ.get("BC_PROXY_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TENANT = "bench"
USER = "bench"
PASSWORD = "bench-password"
SECRET = "bench-webhook-secret"
SENDER = "552"
HANDSET = "6421000000"
CREDS = {"userId": USER, "password": PASSWORD}
WARMUP_SECONDS = 2
MB = 1_000_000  # decimal megabytes: the stricter reading of the 150 MB bar
RSS_INTERVAL = 5.0

# Bars of the performance issue: (key, label, threshold text).
BARS = (
    ("send32_ratio", "send throughput at c32, gateway / lean baseline", ">= 1.0x"),
    ("send32_cpu_ratio", "CPU per request at c32, gateway / lean baseline", "<= 1.0x"),
    ("send1_added_p50_ratio", "added p50 latency at c1, gateway / lean baseline", "<= 1.2x"),
    ("send1_added_p99_ratio", "added p99 latency at c1, gateway / lean baseline", "<= 1.5x"),
    ("send32_tail", "gateway p99 / p50 at c32", "<= 3"),
    ("webhook_rate", "webhook ingest into SQLite, durably committed (/s)", ">= 5000"),
    ("webhook_pg_rate", "webhook ingest into PostgreSQL, committed (/s)", ">= 3000"),
    (
        "send32_pg_ratio",
        "send throughput at c32, PostgreSQL (server off the gateway's core) / SQLite",
        ">= 0.9x",
    ),
    ("workers_ratio", "send at c32 on PostgreSQL, 2 workers / 1 (unpinned)", ">= 1.6x"),
    ("wakeup_p99", "poll wake-up p99 (ms)", "< 5"),
    ("memory", "gateway RSS after load (MB), growth", "< 150, not growing (<= 64 kB)"),
)


TARGETS = {
    "direct": "direct to the stub",
    "baseline": "lean baseline proxy",
    "gateway": "gateway, SQLite",
    "gateway_pg": "gateway, PostgreSQL (server on every core)",
    "gateway_pg_apart": "gateway, PostgreSQL (server off the gateway's core)",
}


class CheckFailed(Exception):
    """A correctness check failed: the figures of that run cannot be trusted."""


# -- small helpers ----------------------------------------------------------------------------


def wrk_command(pin: Sequence[str], url: str, connections: int, seconds: int) -> list[str]:
    """wrk posting the PHP client's send (bench/send.lua) at `connections`, with latencies."""
    return [
        *pin,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "send.lua"),
        url,
    ]


GROWTH_TOLERANCE_KB = 64  # RSS noise between two samples, not growth


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float]) -> float | None:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of a GET (any HTTP answer counts), or None when nothing answers."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


def rss_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the process group `pid` leads (every child runs in its own session,
    so this is the process plus its workers, all threads), in seconds."""
    total = 0
    found = False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) != pid and int(entry.name) != pid:  # fields[2]: process group
            continue
        found = True
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK") if found else None


def pin_pg_backends(app: str, cpu: int) -> int:
    """Move the PostgreSQL backends serving connections named `app` onto `cpu` (the load
    generator's), as a database on a host of its own would be: the gateway's core then runs
    the gateway only, as it does with SQLite, whose store is the gateway. Returns how many.
    A backend forked later is not moved: call after the warm-up (the pool is full by then)."""
    pids = asyncio.run(
        _pg_fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", app)
    )
    moved = 0
    for pid in pids:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError:
            continue
        moved += 1
    return moved


def pg_cpu_seconds(app: str) -> float:
    """utime + stime of the PostgreSQL backends serving connections named `app` (the
    gateway's pool: other users of the shared server are not counted; neither are the WAL
    writer and checkpointer, shared by all), in seconds: its cost per operation."""
    pids = asyncio.run(
        _pg_fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", app)
    )
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _pg_fetch(sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(PG_DSN, timeout=10)
    try:
        return [r[0] for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


# -- processes --------------------------------------------------------------------------------


@dataclass
class Pinning:
    under_test: list[str]
    load: list[str]
    load_cpu: int | None
    description: str


def choose_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning([], [], None, f"unpinned: only {len(cpus)} CPU available")
    if shutil.which("taskset") is None:
        return Pinning([], [], None, "unpinned: taskset not found")
    a, b = cpus[0], cpus[1]
    return Pinning(
        ["taskset", "-c", str(a)],
        ["taskset", "-c", str(b)],
        b,
        f"process under test on CPU {a} (taskset -c {a}); wrk, nginx and the Python load "
        f"client on CPU {b} (taskset -c {b})",
    )


class Procs:
    """Every child this script starts, each in its own session, all stopped at the end."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
        self.commands: list[str] = []

    def start(self, name: str, cmd: list[str], out: Path) -> subprocess.Popen[bytes]:
        text = shlex.join(cmd)
        if text not in self.commands:
            self.commands.append(text)
        with out.open("ab") as fh:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.live[proc.pid] = (name, proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after `grace` s; the exit code."""
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            # Anything the child left in its group (nginx workers) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            self.live.pop(proc.pid, None)
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc in list(self.live.values()):
            with contextlib.suppress(Exception):
                self.stop(proc, grace=5.0)


def wait_until(
    proc: subprocess.Popen[bytes],
    name: str,
    logfile: Path,
    ready: Callable[[], bool],
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(
                f"{name} exited with {proc.returncode} while starting:\n  "
                + "\n  ".join(tail(logfile))
            )
        if ready():
            return
        time.sleep(0.1)
    raise CheckFailed(f"{name} not ready after {timeout:.0f} s:\n  " + "\n  ".join(tail(logfile)))


# -- wrk --------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(raw: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{pct}%\s+(\S+)", raw, re.M)
        out[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", raw, re.M)
    out["requests"] = int(m.group(1)) if m else None
    out["seconds"] = _ms(m.group(2)) / 1e3 if m else None
    m = re.search(r"^Requests/sec:\s+([\d.]+)", raw, re.M)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", raw)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", raw)
    out["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
        if m
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    if out["rps"] is None or out["p50_ms"] is None or out["requests"] is None:
        raise CheckFailed(f"could not parse wrk output:\n{raw}")
    return out


# -- the run context ----------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    procs: Procs
    pin: Pinning
    nginx_port: int
    baseline_port: int
    gateway_port: int
    gateway_exe: str
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seq: int = 0

    def path(self, stem: str) -> Path:
        self.seq += 1
        return self.tmp / f"{self.seq:03d}-{stem}"

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/api/connexus"

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"\n!!! CHECK FAILED: {msg}\n", file=sys.stderr, flush=True)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        log(f"problem: {msg}")

    def wrk(
        self,
        url: str,
        connections: int,
        seconds: int,
        *,
        pid: int | None = None,
        record: bool = True,
    ) -> dict[str, Any]:
        cmd = wrk_command(self.pin.load, url, connections, seconds)
        out = self.path(f"wrk-c{connections}.txt")
        cpu0 = cpu_seconds(pid) if pid else None
        started = time.monotonic()
        proc = self.procs.start("wrk", cmd, out)
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise CheckFailed(f"wrk did not finish: {shlex.join(cmd)}") from None
        self.procs.stop(proc)
        elapsed = time.monotonic() - started
        raw = out.read_text(errors="replace")
        if proc.returncode != 0:
            raise CheckFailed(f"wrk exited {proc.returncode}: {raw}")
        if not record:
            return {}
        result = parse_wrk(raw)
        result["raw"] = raw
        result["command"] = shlex.join(cmd)
        if pid is not None and cpu0 is not None:
            cpu1 = cpu_seconds(pid)
            if cpu1 is not None:
                result["under_test_cpu"] = round((cpu1 - cpu0) / elapsed, 3)
        return result


# -- gateway and baseline -----------------------------------------------------------------------


class Gateway:
    """One `bc-proxy serve` as users run it (request log on at info, metrics on) with a fresh
    store: a SQLite file in the temp dir, or a fresh schema in the PostgreSQL database."""

    def __init__(
        self,
        ctx: Ctx,
        name: str,
        poll_wait: float,
        *,
        backend: str = "sqlite",
        workers: int = 1,
        pinned: bool = True,
        upstream: str | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.name = name
        self.backend = backend
        self.workers = workers
        self.pinned = pinned
        d = ctx.path(f"gw-{name}")
        d.mkdir()
        self.dir = d
        self.db = d / "gw.db"
        self.log = d / "gateway.log"
        self.config = d / "gw.yaml"
        self.base = f"http://127.0.0.1:{ctx.gateway_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pg_schema = f"bench_{os.getpid()}_{ctx.seq}"
        if backend == "sqlite":
            url = f"sqlite:///{self.db}"
        else:
            sep = "&" if "?" in PG_DSN else "?"
            opts = urllib.parse.quote(f"-csearch_path={self.pg_schema}", safe="")
            url = f"{PG_DSN}{sep}options={opts}&application_name={self.pg_schema}"
            asyncio.run(_pg(f"CREATE SCHEMA {self.pg_schema}"))
        self.url = url
        settings = {
            "server": {
                "host": "127.0.0.1",
                "port": ctx.gateway_port,
                "shutdown_timeout_seconds": 3,
                "workers": workers,
            },
            "upstream": {
                "base_url": upstream or ctx.upstream,
                "timeout_seconds": 10,
                "mo_query_interval_seconds": 0,
                **({} if max_connections is None else {"max_connections": max_connections}),
            },
            "store": {"url": url},
            "webhook": {"secret": SECRET},
            # As users run it: one JSON access-log line per request (to this file).
            "log": {"level": "info", "requests": not ctx.args.no_request_log},
            "tenants": [
                {
                    "name": TENANT,
                    "legacy": {"user_id": USER, "password": PASSWORD},
                    "connexus": {"client_id": "cid_bench", "client_secret": "csk_bench"},
                    "default_from": SENDER,
                    "senders": [SENDER],
                    "poll_wait_seconds": poll_wait,
                }
            ],
        }
        # JSON is YAML: no need for a YAML writer.
        self.config.write_text(json.dumps(settings, indent=2) + "\n")

    def prefill(self, sends: int, records: int, prefix: str) -> None:
        """Create the schema with bc-proxy's own migrations; insert accepted sends (receipt
        `{prefix}{i}`, legacy id `L{i}`) and status records (half consumed, half pollable)."""
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.db, isolation_level=None)) as conn:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = OFF")
                sqlite_schema.migrate(conn)
                conn.execute("BEGIN")
                conn.executemany(_SQL_SENDS, _send_rows(sends, prefix))
                conn.executemany(_SQL_RECORDS, _record_rows(records, prefix))
                conn.execute("COMMIT")
            return

        async def fill() -> None:
            conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": self.pg_schema})
            try:
                await pg_schema.migrate(conn)
                await conn.executemany(_pg_sql(_SQL_SENDS), _send_rows(sends, prefix))
                await conn.execute("ANALYZE")
            finally:
                await conn.close()

        if records:
            raise ValueError("records are pre-filled on SQLite only (the memory scenario)")
        asyncio.run(fill())

    def start(self, ready_timeout: float = 30.0) -> int:
        cmd = [
            *(self.ctx.pin.under_test if self.pinned else []),
            self.ctx.gateway_exe,
            "serve",
            "--config",
            str(self.config),
        ]
        self.proc = self.ctx.procs.start("gateway", cmd, self.log)
        url = f"{self.base}/readyz"
        wait_until(self.proc, "gateway", self.log, lambda: http_status(url) == 200, ready_timeout)
        return self.proc.pid

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sends(self) -> int:
        return self.count("SELECT count(*) FROM sends")

    def count(self, sql: str, *params: Any) -> int:
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as conn:
                return int(conn.execute(sql, params).fetchone()[0])
        sql = _pg_sql(sql).replace("pollable=1", "pollable")
        return int(asyncio.run(_pg(sql, *params, schema=self.pg_schema)))

    def leftovers(self) -> list[str]:
        """The records still pollable or leased (for a failed drain check), as text."""
        sql = (
            "SELECT id, kind, pollable, lease_owner, lease_until, receipt_id, in_reply_to "
            "FROM records WHERE pollable{} OR lease_owner IS NOT NULL LIMIT 10"
        )
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as conn:
                return [repr(r) for r in conn.execute(sql.format(" = 1")).fetchall()]

        async def fetch() -> list[str]:
            conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": self.pg_schema})
            try:
                return [repr(tuple(r)) for r in await conn.fetch(sql.format(""))]
            finally:
                await conn.close()

        return asyncio.run(fetch())

    def stable_sends(self, timeout: float = 10.0) -> int:
        """The sends row count once it stops moving (requests wrk abandoned may still land):
        unchanged over three samples 0.3 s apart."""
        last = self.sends()
        still = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.sends()
            still = still + 1 if now == last else 0
            if still >= 3:
                return now
            last = now
        return last

    def stop(self) -> None:
        """Stop it; a crash, a bad exit or anything it logged at warning level or above is a
        reported problem. Drops the PostgreSQL schema."""
        if self.proc is None:
            return
        died = self.proc.poll()
        code = self.ctx.procs.stop(self.proc)
        if died is not None:
            self.ctx.fail(f"gateway ({self.name}) died during the run with exit code {died}")
        elif code not in (0, -signal.SIGTERM):
            self.ctx.problem(f"gateway ({self.name}) exited {code} on SIGTERM")
        lines = [ln for ln in tail(self.log, 10_000_000) if _logged_problem(ln)]
        if lines:
            self.ctx.problem(
                f"gateway ({self.name}) logged {len(lines)} line(s) at warning level or above; "
                "first: " + " | ".join(lines[:5])
            )
        self.proc = None
        if self.backend != "sqlite":
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                asyncio.run(_pg(f"DROP SCHEMA IF EXISTS {self.pg_schema} CASCADE"))


_SQL_SENDS = (
    "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, connexus_id, "
    "created_at, settled_at) VALUES (?,?,?,?,?,?,?,?,?)"
)
_SQL_RECORDS = (
    "INSERT INTO records (tenant, kind, event_key, receipt_id, msisdn_from, msisdn_to, "
    "in_reply_to, status_code, dlr_status, error, created_at, consumed, pollable) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _send_rows(n: int, prefix: str) -> Iterator[tuple[Any, ...]]:
    now = time.time()
    for i in range(n):
        recipient = f"6422{i % 10_000_000:07d}"
        yield (
            TENANT,
            f"L{i}",
            recipient,
            SENDER,
            "accepted",
            f"r{prefix}{i}",
            f"{prefix}{i}",
            now,
            now,
        )


def _record_rows(n: int, prefix: str) -> Iterator[tuple[Any, ...]]:
    now = time.time()
    for i in range(n):
        yield (
            TENANT,
            "status",
            f"bench:{prefix}{i}",
            f"{i:032x}",
            f"6422{i % 10_000_000:07d}",
            SENDER,
            f"L{i}",
            "RCV",
            1,
            "",
            now,
            bool(i % 2 == 0),
            i % 2,
        )


def _pg_sql(sql: str) -> str:
    """`?` placeholders to asyncpg's `$n`."""
    parts = sql.split("?")
    return "".join(
        f"{part}${i + 1}" if i < len(parts) - 1 else part for i, part in enumerate(parts)
    )


async def _pg(sql: str, *args: Any, schema: str | None = None) -> Any:
    """One statement on its own connection; the first value of the first row."""
    settings = {"search_path": schema} if schema else None
    conn = await asyncpg.connect(PG_DSN, timeout=10, server_settings=settings)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


_SUPERVISOR_INFO = re.compile(r"^(worker \d+ started \(pid \d+\)|all workers stopped)$")
_PROBLEM_LEVELS = frozenset({"warning", "error", "critical", "exception"})


def _logged_problem(line: str) -> bool:
    """A log line at warning or above (the request log's info lines are expected)."""
    if not line.strip():
        return False
    if _SUPERVISOR_INFO.match(line):
        return False
    try:
        event = json.loads(line)
    except ValueError:
        return True  # not one of ours: a traceback or a crash
    return not isinstance(event, dict) or event.get("level") in _PROBLEM_LEVELS


class Baseline:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.log = ctx.path("baseline.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        cmd = [
            *self.ctx.pin.under_test,
            sys.executable,
            str(BENCH / "baseline_proxy.py"),
            "--port",
            str(self.ctx.baseline_port),
            "--upstream",
            self.ctx.upstream,
        ]
        self.proc = self.ctx.procs.start("baseline", cmd, self.log)
        url = f"http://127.0.0.1:{self.ctx.baseline_port}/api/1/sms/out"
        wait_until(self.proc, "baseline", self.log, lambda: http_status(url) is not None, 30)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is not None:
                self.ctx.fail(f"baseline proxy died with exit code {self.proc.returncode}")
            self.ctx.procs.stop(self.proc)
            self.proc = None


def start_nginx(ctx: Ctx) -> subprocess.Popen[bytes]:
    d = ctx.tmp / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    template = (BENCH / "nginx.conf.template").read_text()
    conf.write_text(template.format(dir=d, port=ctx.nginx_port))
    cmd = [*ctx.pin.load, "nginx", "-c", str(conf), "-p", str(d), "-e", str(d / "startup.log")]
    out = d / "stdout.log"
    proc = ctx.procs.start("nginx", cmd, out)
    url = f"{ctx.upstream}/auth/token"
    wait_until(proc, "nginx", out, lambda: http_status(url) == 200, 15)
    return proc


# -- scenarios 1 and 2: send at c32 and c1 ------------------------------------------------------


def run_send(ctx: Ctx, conns: list[int], backends: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Direct stub, baseline and the gateway on each store (one after the other) at each
    connection count: targets `direct`, `baseline`, `gateway` (SQLite), `gateway_pg`."""
    dur = ctx.args.duration
    out: dict[int, dict[str, Any]] = {c: {} for c in conns}
    direct = f"{ctx.upstream}/sms/out"
    for c in conns:
        log(f"  direct stub  c{c}: warm-up {WARMUP_SECONDS} s, measure {dur} s")
        ctx.wrk(direct, c, WARMUP_SECONDS, record=False)
        out[c]["direct"] = ctx.wrk(direct, c, dur)

    base = Baseline(ctx)
    try:
        pid = base.start()
        url = f"http://127.0.0.1:{ctx.baseline_port}/api/1/sms/out"
        for c in conns:
            log(f"  baseline     c{c}: warm-up {WARMUP_SECONDS} s, measure {dur} s")
            ctx.wrk(url, c, WARMUP_SECONDS, record=False)
            out[c]["baseline"] = ctx.wrk(url, c, dur, pid=pid)
            check_core(ctx, "baseline", c, out[c]["baseline"])
    finally:
        base.stop()

    for backend in backends:
        target = "gateway" if backend == "sqlite" else f"gateway_{backend}"
        gw = Gateway(ctx, f"send-{backend}", poll_wait=0, backend=backend)
        try:
            pid = gw.start()
            for c in conns:
                log(f"  {target:<12} c{c}: warm-up {WARMUP_SECONDS} s, measure {dur} s")
                out[c][target] = gateway_wrk(ctx, gw, pid, c, dur)
            cpu = ctx.pin.load_cpu
            if backend == "pg" and 32 in conns and cpu is not None:
                # The same gateway again, its backends moved off its core (the bar's setting).
                ctx.wrk(f"{gw.base}/api/1/sms/out", 32, WARMUP_SECONDS, record=False)
                moved = pin_pg_backends(gw.pg_schema, cpu)
                log(f"  gateway_pg_apart c32: {moved} backends on CPU {cpu}, measure {dur} s")
                out[32]["gateway_pg_apart"] = gateway_wrk(ctx, gw, pid, 32, dur)
        finally:
            gw.stop()
    return out


def gateway_wrk(ctx: Ctx, gw: Gateway, pid: int, c: int, dur: int) -> dict[str, Any]:
    """One measured wrk run against the gateway, with the store check (a row per 204)."""
    url = f"{gw.base}/api/1/sms/out"
    ctx.wrk(url, c, WARMUP_SECONDS, record=False)
    before = gw.stable_sends()
    pg = gw.backend == "pg"
    pg0 = pg_cpu_seconds(gw.pg_schema) if pg else 0.0
    res = ctx.wrk(url, c, dur, pid=pid)
    pg1 = pg_cpu_seconds(gw.pg_schema) if pg else 0.0
    after = gw.stable_sends()
    if gw.backend == "pg" and res["requests"]:
        res["pg_cpu_us_per_request"] = (pg1 - pg0) / res["requests"] * 1e6
    res["store_check"] = check_sends(ctx, res, c, after - before)
    check_core(ctx, gw.name, c, res)
    if not gw.alive():
        ctx.fail(f"gateway {gw.name} died during the c{c} send run")
    return res


def run_workers(ctx: Ctx) -> dict[str, Any]:
    """Send at c32 on PostgreSQL, `serve` with 1 and with 2 workers, neither pinned (a second
    worker needs the second core; wrk and nginx stay on it, so this is what 2 cores allow)."""
    dur = ctx.args.duration
    out: dict[str, Any] = {}
    for n in (1, 2):
        gw = Gateway(ctx, f"workers-{n}", poll_wait=0, backend="pg", workers=n, pinned=False)
        try:
            pid = gw.start()
            log(f"  PostgreSQL, {n} worker(s), unpinned, c32: measure {dur} s")
            out[f"w{n}"] = gateway_wrk(ctx, gw, pid, 32, dur)
        finally:
            gw.stop()
    out["ratio"] = out["w2"]["rps"] / out["w1"]["rps"]
    return out


def run_realistic(ctx: Ctx) -> dict[str, Any]:
    """Connexus answering in 150 ms (bench/slow_stub.py on the load CPU), 500 legacy
    connections: gateway throughput against min(connections, max_connections) / latency, at the
    default upstream.max_connections (100) and at 500."""
    dur = ctx.args.duration
    port = free_port()
    stub_log = ctx.path("slow-stub.log")
    cmd = [
        *ctx.pin.load,
        sys.executable,
        str(BENCH / "slow_stub.py"),
        "--port",
        str(port),
        "--delay",
        str(REALISTIC_DELAY),
    ]
    stub = ctx.procs.start("slow stub", cmd, stub_log)
    upstream = f"http://127.0.0.1:{port}/api/connexus"
    out: dict[str, Any] = {"delay_s": REALISTIC_DELAY, "connections": REALISTIC_CONNECTIONS}
    try:
        wait_until(stub, "slow stub", stub_log, lambda: http_status(upstream) is not None, 15)
        for limit in (100, 500):
            gw = Gateway(
                ctx, f"realistic-{limit}", poll_wait=0, upstream=upstream, max_connections=limit
            )
            try:
                pid = gw.start()
                ideal = min(REALISTIC_CONNECTIONS, limit) / REALISTIC_DELAY
                log(f"  max_connections {limit}, c{REALISTIC_CONNECTIONS}: ideal {ideal:.0f}/s")
                res = gateway_wrk(ctx, gw, pid, REALISTIC_CONNECTIONS, dur)
                res["ideal_rps"] = ideal
                res["of_ideal"] = res["rps"] / ideal
                out[f"max{limit}"] = res
            finally:
                gw.stop()
    finally:
        ctx.procs.stop(stub)
    return out


def check_core(ctx: Ctx, name: str, conns: int, res: dict[str, Any]) -> None:
    """At c32 the process under test should use its whole core; if not, the core was busy."""
    cpu = res.get("under_test_cpu")
    quiet = name.startswith(("workers", "realistic"))  # not meant to be CPU-bound
    if conns >= 32 and cpu is not None and cpu < 0.8 and not quiet:
        ctx.problem(
            f"{name} used only {cpu:.0%} of its CPU at c{conns}: something else was running "
            "on that core (or the process is not CPU-bound), so this run is not representative"
        )


def check_sends(ctx: Ctx, res: dict[str, Any], conns: int, rows: int) -> dict[str, Any]:
    """One `sends` row per 204 wrk counted: never fewer; more only for abandoned requests."""
    ok = res["requests"] - res["non2xx"]
    sock = res["socket_errors"]
    slack = res["non2xx"] + conns + sock["read"] + sock["write"] + sock["timeout"]
    check = {
        "responses_2xx": ok,
        "rows_added": rows,
        "allowed_extra": slack,
        "passed": ok <= rows <= ok + slack,
    }
    if res["non2xx"]:
        ctx.problem(f"gateway answered {res['non2xx']} non-2xx at c{conns}")
    if any(sock.values()):
        ctx.problem(f"wrk socket errors against the gateway at c{conns}: {sock}")
    if not check["passed"]:
        ctx.fail(
            f"send c{conns}: wrk saw {ok} 2xx answers but the store gained {rows} sends rows "
            f"(allowed {ok}..{ok + slack})"
        )
    return check


def send_figures(per_c: dict[int, dict[str, Any]]) -> dict[str, float | None]:
    fig: dict[str, float | None] = {}
    for c, targets in per_c.items():
        for name, r in targets.items():
            fig[f"c{c}_{name}_rps"] = r["rps"]
            fig[f"c{c}_{name}_p50_ms"] = r["p50_ms"]
            fig[f"c{c}_{name}_p99_ms"] = r["p99_ms"]
            if "under_test_cpu" in r:
                fig[f"c{c}_{name}_cpu"] = r["under_test_cpu"]
                # CPU time per request (all threads of the process under test), microseconds.
                fig[f"c{c}_{name}_cpu_us"] = r["under_test_cpu"] / r["rps"] * 1e6
    if 32 in per_c:
        t = per_c[32]
        fig["send32_ratio"] = t["gateway"]["rps"] / t["baseline"]["rps"]
        fig["send32_tail"] = t["gateway"]["p99_ms"] / t["gateway"]["p50_ms"]
        gw_us, base_us = fig.get("c32_gateway_cpu_us"), fig.get("c32_baseline_cpu_us")
        if gw_us is not None and base_us is not None:
            fig["send32_cpu_ratio"] = gw_us / base_us
        if "gateway_pg" in t:
            # The bar's figure: the server off the gateway's core where the pinning allows it.
            apart = t.get("gateway_pg_apart", t["gateway_pg"])
            fig["send32_pg_ratio"] = apart["rps"] / t["gateway"]["rps"]
            fig["send32_pg_shared_ratio"] = t["gateway_pg"]["rps"] / t["gateway"]["rps"]
            fig["send32_pg_tail"] = t["gateway_pg"]["p99_ms"] / t["gateway_pg"]["p50_ms"]
    if 1 in per_c:
        t = per_c[1]
        for q in ("p50", "p99"):
            base_added = t["baseline"][f"{q}_ms"] - t["direct"][f"{q}_ms"]
            fig[f"c1_baseline_added_{q}_ms"] = base_added
            for target in ("gateway", "gateway_pg"):
                if target in t:
                    added = t[target][f"{q}_ms"] - t["direct"][f"{q}_ms"]
                    fig[f"c1_{target}_added_{q}_ms"] = added
                    suffix = "" if target == "gateway" else "_pg"
                    fig[f"send1_added_{q}_ratio{suffix}"] = (
                        added / base_added if base_added > 0 else math.inf
                    )
    return fig


# -- the Python load client -----------------------------------------------------------------------


def client_session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=30),
    )


def dlr(message_id: str, status: int = 1, text: str = "DELIVRD") -> bytes:
    return json.dumps(
        {
            "type": "dlr",
            "messageId": message_id,
            "status": text,
            "statusCode": status,
            "timestamp": int(time.time()),
        }
    ).encode()


JSON_CT = {"Content-Type": "application/json"}


async def post_all(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Iterator[bytes],
    workers: int,
    statuses: Counter[int],
    errors: list[str],
) -> None:
    async def worker() -> None:
        for body in bodies:  # one shared iterator: each body is posted once
            try:
                async with session.post(url, data=body, headers=JSON_CT) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[0] += 1
                if len(errors) < 20:
                    errors.append(repr(exc))

    await asyncio.gather(*(worker() for _ in range(workers)))


async def poll_until_empty(
    session: aiohttp.ClientSession,
    url: str,
    pollers: int,
    max_requests: int,
) -> tuple[list[dict[str, str]], Counter[int], list[str]]:
    """Poll with `pollers` clients until each gets 204; every record answered."""
    records: list[dict[str, str]] = []
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    budget = [max_requests]

    async def poller() -> None:
        while budget[0] > 0:
            budget[0] -= 1
            try:
                async with session.get(url, params=CREDS) as resp:
                    body = await resp.text()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[0] += 1
                if len(errors) < 20:
                    errors.append(repr(exc))
                continue
            if resp.status == 204:
                return
            if resp.status != 200:
                if len(errors) < 20:
                    errors.append(f"{resp.status}: {body[:200]}")
                continue
            parsed = urllib.parse.parse_qs(body, keep_blank_values=True)
            records.append({k: v[0] for k, v in parsed.items()})

    await asyncio.gather(*(poller() for _ in range(pollers)))
    return records, statuses, errors


# -- scenario 3: webhook ingest, then poll everything ----------------------------------------------


def run_webhook(ctx: Ctx, backend: str = "sqlite") -> dict[str, Any]:
    n = ctx.args.webhooks
    gw = Gateway(ctx, f"webhook-{backend}", poll_wait=0, backend=backend)
    gw.prefill(n, 0, "c")
    res: dict[str, Any] = {"n": n, "backend": backend}
    try:
        pid = gw.start()
        url = f"{gw.base}/webhooks/connexus/{SECRET}"

        async def ingest() -> tuple[float, Counter[int], list[str], float]:
            statuses: Counter[int] = Counter()
            errors: list[str] = []
            async with client_session(100) as session:
                bodies = (dlr(f"c{i}") for i in range(n))
                c0 = time.process_time()
                t0 = time.perf_counter()
                async with asyncio.timeout(max(60.0, n / 200)):
                    await post_all(session, url, bodies, 100, statuses, errors)
                elapsed = time.perf_counter() - t0
                return elapsed, statuses, errors, (time.process_time() - c0) / elapsed

        log(f"  posting {n} delivery reports, 100 in flight")
        gcpu0 = cpu_seconds(pid)
        pg = backend == "pg"
        pg0 = pg_cpu_seconds(gw.pg_schema) if pg else 0.0
        elapsed, statuses, errors, client_cpu = asyncio.run(ingest())
        pg1 = pg_cpu_seconds(gw.pg_schema) if pg else 0.0
        gcpu1 = cpu_seconds(pid)
        if backend == "pg":
            res["pg_cpu_us_per_webhook"] = (pg1 - pg0) / n * 1e6
        res.update(
            seconds=elapsed,
            rate=n / elapsed,
            statuses=dict(statuses),
            errors=errors,
            client_cpu=round(client_cpu, 3),
        )
        if gcpu0 is not None and gcpu1 is not None:
            res["under_test_cpu"] = round((gcpu1 - gcpu0) / elapsed, 3)
        if statuses.get(200, 0) != n:
            ctx.fail(
                f"webhook: {statuses.get(200, 0)} of {n} answered 200: {dict(statuses)} "
                f"{errors[:3]}"
            )
        stored = gw.count(
            "SELECT count(*) FROM records WHERE kind='status' AND tenant=? AND pollable=1",
            TENANT,
        )
        res["stored_pollable"] = stored
        if stored != n:
            ctx.fail(f"webhook: {n} reports acknowledged, {stored} pollable records stored")

        status_url = f"{gw.base}/api/1/sms/status"

        async def drain() -> tuple[list[dict[str, str]], Counter[int], list[str], float]:
            async with client_session(16) as session:
                t0 = time.perf_counter()
                async with asyncio.timeout(max(120.0, n / 50)):
                    recs, sts, errs = await poll_until_empty(session, status_url, 8, 2 * n + 100)
                return recs, sts, errs, time.perf_counter() - t0

        log("  polling them back with 8 pollers (poll_wait_seconds 0)")
        records, pstatuses, perrors, pelapsed = asyncio.run(drain())
        receipts = Counter(r.get("messageId", "") for r in records)
        legacy = Counter(r.get("inReplyToId", "") for r in records)
        codes = Counter(r.get("statusCode", "") for r in records)
        expected = {f"L{i}" for i in range(n)}
        dup_receipts = sum(1 for v in receipts.values() if v > 1)
        dup_legacy = sum(1 for v in legacy.values() if v > 1)
        missing = len(expected - set(legacy))
        unexpected = len(set(legacy) - expected)
        res["poll"] = {
            "records": len(records),
            "seconds": pelapsed,
            "rate": len(records) / pelapsed,
            "statuses": dict(pstatuses),
            "errors": perrors,
            "status_codes": dict(codes),
            "duplicate_receipts": dup_receipts,
            "duplicate_inReplyToId": dup_legacy,
            "missing": missing,
            "unexpected": unexpected,
        }
        if (
            len(records) != n
            or dup_receipts
            or dup_legacy
            or missing
            or unexpected
            or set(codes) != {"RCV"}
        ):
            ctx.fail(
                f"webhook poll: {len(records)} records for {n} reports, {dup_receipts} "
                f"duplicate receipts, {dup_legacy} duplicate inReplyToId, {missing} missing, "
                f"{unexpected} unexpected, statusCodes {dict(codes)}"
            )
        if perrors:
            ctx.problem(f"webhook poll errors: {perrors[:3]}")
        queue_url = f"{gw.base}/api/1/sms/queue?" + urllib.parse.urlencode(CREDS)
        # The last acks are committed just after their answers reached the client: allow 2 s.
        deadline = time.monotonic() + 2.0
        while True:
            with _NO_PROXY.open(queue_url, timeout=10) as resp:
                res["queue_after"] = resp.read().decode()
            if res["queue_after"] == "inCount=0&statusCount=0" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if res["queue_after"] != "inCount=0&statusCount=0":
            left = gw.leftovers()
            res["leftover_records"] = left
            ctx.fail(f"webhook: queue after draining is {res['queue_after']!r}; left: {left}")
        if not gw.alive():
            ctx.fail("gateway died during the webhook run")
    finally:
        gw.stop()
    return res


# -- scenario 4: poll wake-up latency -------------------------------------------------------------


def run_wakeup(ctx: Ctx, run: int) -> dict[str, Any]:
    k = ctx.args.wakeups
    gw = Gateway(ctx, "wakeup", poll_wait=10)
    res: dict[str, Any] = {"k": k}
    try:
        gw.start()
        hook = f"{gw.base}/webhooks/connexus/{SECRET}"
        poll = f"{gw.base}/api/1/sms/in"

        async def one(session: aiohttp.ClientSession, i: int) -> tuple[float, str | None]:
            """t1 - t0 of one wake-up, or an error."""

            async def long_poll() -> tuple[int, str, float]:
                async with session.get(poll, params=CREDS) as resp:
                    body = await resp.text()
                    return resp.status, body, time.perf_counter()

            body_text = f"wake {run}-{i}"
            payload = json.dumps(
                {
                    "type": "mo",
                    "messageId": f"wake-{run}-{i}",
                    "from": "+" + HANDSET,
                    "to": SENDER,
                    "body": body_text,
                    "timestamp": int(time.time()),
                }
            ).encode()
            task = asyncio.create_task(long_poll())
            try:
                await asyncio.sleep(0.02)  # the poll is now waiting in the gateway
                if task.done():
                    st, body, _ = task.result()
                    return math.nan, f"poll answered before the webhook: {st} {body[:100]!r}"
                async with session.post(hook, data=payload, headers=JSON_CT) as resp:
                    await resp.read()
                    t0 = time.perf_counter()
                    if resp.status != 200:
                        return math.nan, f"webhook answered {resp.status}"
                st, body, t1 = await asyncio.wait_for(task, 15)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return math.nan, repr(exc)
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.wait([task], timeout=5)
            got = urllib.parse.parse_qs(body, keep_blank_values=True)
            if st != 200 or got.get("body") != [body_text] or got.get("from") != [HANDSET]:
                return math.nan, f"poll answered {st} {body[:100]!r}"
            return t1 - t0, None

        async def main() -> tuple[list[float], list[str]]:
            deltas: list[float] = []
            errors: list[str] = []
            async with client_session(8) as session:
                async with asyncio.timeout(30 + k * 1.0):
                    for i in range(k):
                        d, err = await one(session, i)
                        if err is not None:
                            errors.append(err)
                        else:
                            deltas.append(d)
            return deltas, errors

        log(f"  {k} long-polls woken by an mo webhook (poll_wait_seconds 10)")
        deltas, errors = asyncio.run(main())
        negative = sum(1 for d in deltas if d < 0)
        ms = sorted(max(0.0, d) * 1e3 for d in deltas)
        res.update(
            samples=len(ms),
            errors=errors[:20],
            error_count=len(errors),
            negative=negative,
            p50_ms=percentile(ms, 50),
            p99_ms=percentile(ms, 99),
            max_ms=ms[-1] if ms else None,
            all_ms=[round(v, 4) for v in ms],
        )
        if errors:
            ctx.fail(f"wakeup: {len(errors)} of {k} iterations failed: {errors[:3]}")
        if not gw.alive():
            ctx.fail("gateway died during the wakeup run")
    finally:
        gw.stop()
    return res


# -- scenario 5: memory after a million records ---------------------------------------------------


def prefill_memory(gw: Gateway, n: int) -> float:
    t0 = time.monotonic()
    gw.prefill(n, n, "m")
    return time.monotonic() - t0


def run_memory(ctx: Ctx) -> dict[str, Any]:
    n = ctx.args.records
    seconds = ctx.args.memory_seconds
    gw = Gateway(ctx, "memory", poll_wait=0)
    log(f"  pre-filling {n:,} records ({n // 2:,} pollable) and {n:,} sends")
    res: dict[str, Any] = {
        "records": n,
        "seconds": seconds,
        "prefill_seconds": round(prefill_memory(gw, n), 1),
    }
    wrk_out = ctx.path("wrk-memory.txt")
    try:
        pid = gw.start(ready_timeout=120)
        samples: list[tuple[float, int | None]] = [(0.0, rss_kb(pid))]
        log(
            f"  {seconds} s of mixed load (wrk c8 send, webhooks, polls); "
            f"RSS every {RSS_INTERVAL:.0f} s; start {samples[0][1]} kB"
        )
        wrk_cmd = wrk_command(ctx.pin.load, f"{gw.base}/api/1/sms/out", 8, seconds)
        hook = f"{gw.base}/webhooks/connexus/{SECRET}"
        status_url = f"{gw.base}/api/1/sms/status"
        in_url = f"{gw.base}/api/1/sms/in"
        counts: Counter[str] = Counter()

        async def load(deadline: float) -> None:
            async with client_session(32) as session:

                async def hooks() -> None:
                    i = 0
                    while time.monotonic() < deadline:
                        i += 1
                        body = dlr(f"m{(i * 7919) % n}", 4, "QUEUED")
                        try:
                            async with session.post(hook, data=body, headers=JSON_CT) as r:
                                await r.read()
                                counts[f"webhook_{r.status}"] += 1
                        except (aiohttp.ClientError, TimeoutError):
                            counts["webhook_error"] += 1

                async def polls(url: str, kind: str) -> None:
                    while time.monotonic() < deadline:
                        try:
                            async with session.get(url, params=CREDS) as r:
                                await r.read()
                                counts[f"poll_{kind}_{r.status}"] += 1
                        except (aiohttp.ClientError, TimeoutError):
                            counts[f"poll_{kind}_error"] += 1

                async def sampler() -> None:
                    t0 = time.monotonic()
                    k = 1
                    while k * RSS_INTERVAL <= seconds + 0.5:
                        await asyncio.sleep(max(0.0, t0 + k * RSS_INTERVAL - time.monotonic()))
                        samples.append((round(time.monotonic() - t0, 1), rss_kb(pid)))
                        k += 1

                async with asyncio.timeout(seconds + 60):
                    await asyncio.gather(
                        *(hooks() for _ in range(8)),
                        *(polls(status_url, "status") for _ in range(2)),
                        polls(in_url, "in"),
                        sampler(),
                    )

        wrk = ctx.procs.start("wrk", wrk_cmd, wrk_out)
        try:
            asyncio.run(load(time.monotonic() + seconds))
            wrk.wait(30)
        finally:
            ctx.procs.stop(wrk)
        raw = wrk_out.read_text(errors="replace")
        res["wrk"] = {**parse_wrk(raw), "raw": raw, "command": shlex.join(wrk_cmd)}
        res["load_counts"] = dict(counts)
        res["rss_samples_kb"] = samples
        kbs = [kb for _, kb in samples if kb is not None]
        if len(kbs) < 3 or not gw.alive():
            ctx.fail(f"memory: gateway not sampled enough / died (samples {samples})")
        else:
            prev, last = kbs[-2], kbs[-1]
            res.update(
                prev_mb=prev * 1024 / MB,
                last_mb=last * 1024 / MB,
                growth_kb=last - prev,
                grew=last > prev,
            )
        bad = {k: v for k, v in counts.items() if k.endswith("_error") or k.endswith("_500")}
        if bad:
            ctx.problem(f"memory: errors under mixed load: {bad}")
        if res["wrk"]["non2xx"]:
            ctx.problem(f"memory: gateway answered {res['wrk']['non2xx']} non-2xx sends")
    finally:
        gw.stop()
    return res


# -- environment and reporting ---------------------------------------------------------------------


def measured_tree() -> tuple[Path, str, bool]:
    """The checkout whose bc_proxy the gateway runs (PYTHONPATH may name another one than this
    script's: an A/B of two commits), its commit and whether its tracked files differ from it."""
    spec = importlib.util.find_spec("bc_proxy")
    origin = spec.origin if spec is not None else None
    source = Path(origin).resolve().parent.parent if origin else BENCH.parent

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(source), *args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return p.stdout.strip()

    return source, git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "-uno"))


def versions() -> dict[str, Any]:
    def pkg(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def cmd_out(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr) else ""

    cpu = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    source, git, dirty = measured_tree()
    return {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": pkg("uvloop"),
        "sqlite": sqlite3.sqlite_version,
        "bc_proxy": pkg("bc-proxy"),
        "git_commit": git,
        "git_dirty": dirty,
        "source": str(source),
        "wrk": cmd_out(["wrk", "-v"]).split(" Copyright")[0],
        "nginx": cmd_out(["nginx", "-v"]),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "load_average_at_start": list(os.getloadavg()),
    }


def bar_verdicts(med: dict[str, Any]) -> list[dict[str, Any]]:
    checks: dict[str, Callable[[float], bool]] = {
        "send32_ratio": lambda v: v >= 1.0,
        "send32_cpu_ratio": lambda v: v <= 1.0,
        "send1_added_p50_ratio": lambda v: v <= 1.2,
        "send1_added_p99_ratio": lambda v: v <= 1.5,
        "send32_tail": lambda v: v <= 3.0,
        "webhook_rate": lambda v: v >= 5000,
        "webhook_pg_rate": lambda v: v >= 3000,
        "send32_pg_ratio": lambda v: v >= 0.9,
        "workers_ratio": lambda v: v >= 1.6,
        "wakeup_p99": lambda v: v < 5.0,
    }
    out = []
    for key, label, threshold in BARS:
        if key == "memory":
            last, growth = med.get("memory_last_mb"), med.get("memory_growth_kb")
            if last is None or growth is None:
                continue
            value = f"{last:.1f} MB, {growth:+.0f} kB between the last two samples"
            # "Not growing": within RSS measurement granularity, one 64 kB allocator chunk
            # (0.1% of the RSS); a leak shows as hundreds of kB per interval.
            ok = last < 150 and growth <= GROWTH_TOLERANCE_KB
        else:
            v = med.get(key)
            if v is None:
                continue
            value = fmt(v, 0 if key.startswith("webhook") else 2)
            ok = checks[key](v)
        out.append(
            {
                "bar": key,
                "label": label,
                "median": value,
                "threshold": threshold,
                "verdict": "PASS" if ok else "FAIL",
            }
        )
    return out


def per_run_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per scenario with its headline figure of every run, to show the spread."""
    lines = []
    for s, runs in results.items():
        vals: list[str] = []
        for r in runs:
            f = r.get("figures", {})
            if s == "send32":
                vals.append(f"{fmt(f.get('send32_ratio'))}x (tail {fmt(f.get('send32_tail'))})")
            elif s == "send1":
                vals.append(
                    f"p50 {fmt(f.get('send1_added_p50_ratio'))}x, "
                    f"p99 {fmt(f.get('send1_added_p99_ratio'))}x"
                )
            elif s == "webhook":
                vals.append(f"{fmt(r.get('rate'), 0)}/s")
            elif s == "pg":
                vals.append(
                    f"ingest {fmt(r.get('rate'), 0)}/s, send c32 PG/SQLite "
                    f"{fmt(r.get('send32_pg_ratio'))}x (server on every core: "
                    f"{fmt(r.get('send32_pg_shared_ratio'))}x)"
                )
            elif s == "realistic":
                vals.append(
                    ", ".join(
                        f"max_connections {m}: {fmt(r[f'max{m}']['rps'], 0)}/s "
                        f"({fmt(r[f'max{m}']['of_ideal'])} of ideal)"
                        for m in (100, 500)
                        if f"max{m}" in r
                    )
                )
            elif s == "workers":
                vals.append(
                    f"{fmt(r.get('ratio'))}x ({fmt(r['w1']['rps'], 0)} -> "
                    f"{fmt(r['w2']['rps'], 0)} req/s)"
                )
            elif s == "wakeup":
                vals.append(f"p99 {fmt(r.get('p99_ms'), 3)} ms")
            elif s == "memory":
                vals.append(f"{fmt(r.get('last_mb'), 1)} MB ({r.get('growth_kb', 'n/a')} kB)")
        lines.append(f"- {s}: {'; '.join(vals) if vals else 'no complete run'}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# bc-proxy benchmark {report['timestamp']} on {report['hostname']}",
        "",
        f"runs: {report['runs']}, wrk duration: {report['duration']} s, quick: {report['quick']}, "
        f"scenarios: {', '.join(report['scenarios_run'])}",
        f"CPU: {env['cpu_model']} ({env['cores']} cores); pinning: {report['pinning']}",
        f"python {env['python']}, aiohttp {env['aiohttp']}, uvloop {env['uvloop']}, "
        f"SQLite {env['sqlite']}, {env['wrk']}, {env['nginx']}; bc-proxy {env['git_commit'][:12]}"
        f"{' (dirty tree)' if env['git_dirty'] else ''}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}",
        "",
        "## Bars (median of the runs)",
        "",
        "| bar | median | threshold | verdict |",
        "|---|---|---|---|",
    ]
    for b in report["bars"]:
        lines.append(f"| {b['label']} | {b['median']} | {b['threshold']} | {b['verdict']} |")
    med = report["medians"]
    if any(k.startswith("c32_") or k.startswith("c1_") for k in med):
        lines += [
            "",
            "## Send path (median of the runs)",
            "",
            "| connections | target | req/s | p50 ms | p99 ms | CPU of process under test "
            "| CPU µs/request |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in (32, 1):
            for t in ("direct", "baseline", "gateway", "gateway_pg", "gateway_pg_apart"):
                if f"c{c}_{t}_rps" not in med:
                    continue
                cpu = med.get(f"c{c}_{t}_cpu")
                lines.append(
                    f"| {c} | {TARGETS[t]} | {fmt(med[f'c{c}_{t}_rps'], 0)} | "
                    f"{fmt(med[f'c{c}_{t}_p50_ms'], 3)} | {fmt(med[f'c{c}_{t}_p99_ms'], 3)} | "
                    f"{'-' if cpu is None else f'{cpu * 100:.0f}%'} | "
                    f"{fmt(med.get(f'c{c}_{t}_cpu_us'), 0)} |"
                )
        for t in ("gateway", "gateway_pg"):
            if f"c1_{t}_added_p50_ms" in med:
                lines.append("")
                lines.append(
                    f"Added at c1 over direct ({TARGETS[t]}): p50 "
                    f"{fmt(med[f'c1_{t}_added_p50_ms'], 3)} ms, p99 "
                    f"{fmt(med[f'c1_{t}_added_p99_ms'], 3)} ms; lean baseline p50 "
                    f"{fmt(med['c1_baseline_added_p50_ms'], 3)} ms, p99 "
                    f"{fmt(med['c1_baseline_added_p99_ms'], 3)} ms."
                )
    extra = []
    if "webhook_rate" in med:
        extra.append(
            f"- webhook ingest {fmt(med['webhook_rate'], 0)}/s "
            f"(gateway CPU {fmt(med.get('webhook_gateway_cpu'), 2)}, "
            f"client CPU {fmt(med.get('webhook_client_cpu'), 2)}); polled back at "
            f"{fmt(med.get('webhook_poll_rate'), 0)}/s"
        )
    if "webhook_pg_rate" in med:
        extra.append(
            f"- webhook ingest into PostgreSQL {fmt(med['webhook_pg_rate'], 0)}/s "
            f"(gateway CPU {fmt(med.get('webhook_pg_gateway_cpu'), 2)}); polled back at "
            f"{fmt(med.get('webhook_pg_poll_rate'), 0)}/s; PostgreSQL server CPU per webhook "
            f"{fmt(med.get('webhook_pg_server_cpu_us'), 0)} µs, per send at c32 "
            f"{fmt(med.get('send32_pg_server_cpu_us'), 0)} µs"
        )
    if "workers_ratio" in med:
        extra.append(
            f"- PostgreSQL send at c32, unpinned: 1 worker {fmt(med.get('workers_w1_rps'), 0)} "
            f"req/s (CPU {fmt(med.get('workers_w1_cpu'), 2)} cores), 2 workers "
            f"{fmt(med.get('workers_w2_rps'), 0)} req/s (CPU {fmt(med.get('workers_w2_cpu'), 2)}"
            f" cores): {fmt(med['workers_ratio'])}x"
        )
    for m in (100, 500):
        if f"realistic_max{m}_rps" in med:
            extra.append(
                f"- Connexus at 150 ms, {REALISTIC_CONNECTIONS} connections, "
                f"upstream.max_connections {m}: {fmt(med[f'realistic_max{m}_rps'], 0)} req/s = "
                f"{fmt(med[f'realistic_max{m}_of_ideal'])} of the ideal "
                f"{min(REALISTIC_CONNECTIONS, m) / REALISTIC_DELAY:.0f}/s; p50 "
                f"{fmt(med[f'realistic_max{m}_p50_ms'], 1)} ms, p99 "
                f"{fmt(med[f'realistic_max{m}_p99_ms'], 1)} ms, gateway CPU "
                f"{fmt(med.get(f'realistic_max{m}_under_test_cpu'), 2)}"
            )
    if "wakeup_p99" in med:
        extra.append(
            f"- wake-up p50 {fmt(med.get('wakeup_p50'), 3)} ms, p99 "
            f"{fmt(med['wakeup_p99'], 3)} ms, max {fmt(med.get('wakeup_max'), 3)} ms"
        )
    if "memory_last_mb" in med:
        extra.append(
            f"- memory: last two RSS samples {fmt(med.get('memory_prev_mb'), 1)} MB, "
            f"{fmt(med['memory_last_mb'], 1)} MB"
        )
    if extra:
        lines += ["", "## Other figures (median of the runs)", "", *extra]
    lines += ["", "## Per run", "", *per_run_lines(report["results"])]
    lines += ["", "## Checks", ""]
    if report["failures"]:
        lines += [f"- FAILED: {f}" for f in report["failures"]]
    else:
        lines.append("- every correctness check passed")
    lines += [f"- problem: {p}" for p in report["problems"]]
    lines += ["", "## Commands", "", "```", report["invocation"], *report["commands"], "```", ""]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="repetitions of every scenario (3)")
    p.add_argument("--duration", type=int, default=10, help="seconds of each wrk measurement")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: 2,000 webhooks, 50 wake-ups, 100,000 records for 15 s",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only these of: {', '.join(SCENARIOS)}",
    )
    p.add_argument("--webhooks", type=int, help="sends pre-created and reports posted (20000)")
    p.add_argument("--wakeups", type=int, help="wake-up iterations (300)")
    p.add_argument("--records", type=int, help="records and sends pre-filled (1000000)")
    p.add_argument("--memory-seconds", type=int, help="mixed-load seconds (60)")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, stores)")
    p.add_argument("--require-bars", action="store_true", help="exit 3 when a bar fails")
    p.add_argument(
        "--no-request-log",
        action="store_true",
        help="gateway with log.requests: false (an ablation; not how users run it)",
    )
    a = p.parse_args(argv)
    q = a.quick
    a.webhooks = a.webhooks or (2_000 if q else 20_000)
    a.wakeups = a.wakeups or (50 if q else 300)
    a.records = a.records or (100_000 if q else 1_000_000)
    a.memory_seconds = a.memory_seconds or (15 if q else 60)
    if a.runs < 1 or a.duration < 1 or a.memory_seconds < 2 * RSS_INTERVAL:
        p.error("--runs and --duration must be >= 1, --memory-seconds >= 10")
    return a


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: the `finally` blocks stop every child started (nginx, wrk, targets)."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (apt-get install {tool})", file=sys.stderr)
            return 2
    exe = Path(sys.executable).parent / "bc-proxy"
    gateway_exe = str(exe) if exe.exists() else shutil.which("bc-proxy")
    if gateway_exe is None:
        print("error: bc-proxy not installed (pip install -e .)", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    signal.signal(signal.SIGTERM, on_sigterm)

    pin = choose_pinning()
    if pin.load_cpu is None:
        log(f"WARNING: {pin.description}: figures are not comparable to pinned runs")
    else:
        os.sched_setaffinity(0, {pin.load_cpu})  # this script is the Python load client
    log(f"pinning: {pin.description}")
    scenarios = [s for s in SCENARIOS if not args.only or s in args.only]
    env = versions()
    started = datetime.datetime.now(datetime.UTC)
    tmp = Path(tempfile.mkdtemp(prefix="bc-bench-"))
    procs = Procs()
    ctx = Ctx(args, tmp, procs, pin, free_port(), free_port(), free_port(), gateway_exe)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    interrupted = False
    try:
        start_nginx(ctx)
        for run in range(args.runs):
            log(f"== run {run + 1} of {args.runs}")
            conns = [c for c, s in ((32, "send32"), (1, "send1")) if s in scenarios]
            backends = ["sqlite", "pg"] if "pg" in scenarios else ["sqlite"]
            if conns:
                log(f"send at {', '.join(f'c{c}' for c in conns)} on {', '.join(backends)}")
                per_c = run_send(ctx, conns, backends)
                figures = send_figures(per_c)
                for c, s in ((32, "send32"), (1, "send1")):
                    if c in per_c:
                        runs[s].append(
                            {
                                "targets": per_c[c],
                                "figures": {
                                    k: v
                                    for k, v in figures.items()
                                    if k.startswith(f"c{c}_") or k.startswith(s)
                                },
                            }
                        )
            if "webhook" in scenarios:
                log("webhook ingest, SQLite")
                runs["webhook"].append(run_webhook(ctx))
            if "pg" in scenarios:
                log("webhook ingest, PostgreSQL")
                pg = run_webhook(ctx, "pg")
                if conns and 32 in per_c:
                    pg["send32_pg_ratio"] = figures.get("send32_pg_ratio")
                    pg["send32_pg_shared_ratio"] = figures.get("send32_pg_shared_ratio")
                runs["pg"].append(pg)
            if "workers" in scenarios:
                log("1 vs 2 workers on PostgreSQL")
                runs["workers"].append(run_workers(ctx))
            if "realistic" in scenarios:
                log("Connexus at 150 ms, 500 legacy connections")
                runs["realistic"].append(run_realistic(ctx))
            if "wakeup" in scenarios:
                log("poll wake-up")
                runs["wakeup"].append(run_wakeup(ctx, run))
            if "memory" in scenarios:
                log("memory")
                runs["memory"].append(run_memory(ctx))
    except KeyboardInterrupt:
        interrupted = True
        ctx.fail("interrupted: results are partial")
    except CheckFailed as exc:
        ctx.fail(str(exc))
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    med: dict[str, Any] = {}
    for s in ("send32", "send1"):
        keys = {k for r in runs.get(s, []) for k in r["figures"]}
        for k in keys:
            med[k] = median([r["figures"][k] for r in runs[s] if k in r["figures"]])
    if runs.get("webhook"):
        w = runs["webhook"]
        med["webhook_rate"] = median([r["rate"] for r in w if "rate" in r])
        med["webhook_gateway_cpu"] = median(
            [r["under_test_cpu"] for r in w if "under_test_cpu" in r]
        )
        med["webhook_client_cpu"] = median([r["client_cpu"] for r in w if "client_cpu" in r])
        med["webhook_poll_rate"] = median([r["poll"]["rate"] for r in w if "poll" in r])
    if runs.get("pg"):
        w = runs["pg"]
        med["webhook_pg_rate"] = median([r["rate"] for r in w if "rate" in r])
        med["webhook_pg_gateway_cpu"] = median(
            [r["under_test_cpu"] for r in w if "under_test_cpu" in r]
        )
        med["webhook_pg_poll_rate"] = median([r["poll"]["rate"] for r in w if "poll" in r])
        med["webhook_pg_server_cpu_us"] = median(
            [r["pg_cpu_us_per_webhook"] for r in w if "pg_cpu_us_per_webhook" in r]
        )
        if runs.get("send32"):
            med["send32_pg_server_cpu_us"] = median(
                [
                    r["targets"]["gateway_pg"].get("pg_cpu_us_per_request")
                    for r in runs["send32"]
                    if "gateway_pg" in r["targets"]
                ]
            )
    if runs.get("workers"):
        w = runs["workers"]
        med["workers_ratio"] = median([r["ratio"] for r in w])
        for n in ("w1", "w2"):
            med[f"workers_{n}_rps"] = median([r[n]["rps"] for r in w])
            med[f"workers_{n}_cpu"] = median(
                [r[n]["under_test_cpu"] for r in w if "under_test_cpu" in r[n]]
            )
    if runs.get("realistic"):
        for limit in (100, 500):
            rs = [r[f"max{limit}"] for r in runs["realistic"] if f"max{limit}" in r]
            for k in ("rps", "of_ideal", "p50_ms", "p99_ms", "under_test_cpu"):
                med[f"realistic_max{limit}_{k}"] = median([r[k] for r in rs if k in r])
    if runs.get("wakeup"):
        for k in ("p50", "p99", "max"):
            med[f"wakeup_{k}"] = median(
                [r[f"{k}_ms"] for r in runs["wakeup"] if r.get(f"{k}_ms") is not None]
            )
    if runs.get("memory"):
        m = [r for r in runs["memory"] if "last_mb" in r]
        med["memory_prev_mb"] = median([r["prev_mb"] for r in m])
        med["memory_last_mb"] = median([r["last_mb"] for r in m])
        med["memory_growth_kb"] = median([r["growth_kb"] for r in m])
    med = {k: v for k, v in med.items() if v is not None}

    host = socket.gethostname()
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "timestamp": stamp,
        "hostname": host,
        "runs": args.runs,
        "duration": args.duration,
        "quick": args.quick,
        "sizes": {
            "webhooks": args.webhooks,
            "wakeups": args.wakeups,
            "records": args.records,
            "memory_seconds": args.memory_seconds,
        },
        "scenarios_run": scenarios,
        "pinning": pin.description,
        "environment": env,
        "runner_event_loop": type(asyncio.get_event_loop_policy()).__module__,
        "invocation": shlex.join([sys.executable, *sys.argv]),
        "commands": procs.commands,
        "medians": med,
        "bars": bar_verdicts(med),
        "failures": ctx.failures,
        "problems": ctx.problems,
        "interrupted": interrupted,
        "results": runs,
    }
    md = markdown(report)
    print()
    print(md)
    if interrupted:
        log("interrupted: no results written")
    else:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        base = args.results_dir / f"{stamp}-{host}"
        Path(f"{base}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        Path(f"{base}.md").write_text(md)
        log(f"wrote {base}.json and {base}.md")
    if ctx.failures:
        print(f"\n!!! {len(ctx.failures)} CHECK(S) FAILED", file=sys.stderr)
        return 130 if interrupted else 1
    if args.require_bars and any(b["verdict"] == "FAIL" for b in report["bars"]):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
