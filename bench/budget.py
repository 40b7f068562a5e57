#!/usr/bin/env python3
"""Per-request CPU budget of one legacy send (issue 13 point 2), beside the lean proxy's.

    python bench/budget.py [--reps 3] [--duration 6] [--profile-seconds 8] [--connections 32]

Two measurements, both at `--connections` (32) with wrk and the nginx stub of bench/run.py
(process under test on CPU 0, load on CPU 1):

1. Removal: CPU time per request (utime + stime of every thread, from /proc, over the wrk run)
   of the lean proxy, the gateway as users run it, and the gateway with one part removed at a
   time (bench/ablate.py); medians of `--reps` interleaved repetitions. The difference to the
   full gateway is what that part costs.
2. Profile: py-spy samples (`py-spy record -f raw`, no idle samples) of the full gateway and of
   the lean proxy, each stack charged to the first part it enters from the root (server,
   parsing, auth, translation, upstream client, store, metrics, access log, response), times
   the measured CPU per request.

At `--connections 1` each repetition also measures the stub directly (variant `direct`), and
the report gives each proxy's added p50 and p99 over it and their ratios to the lean proxy's:
issue 13's bars at one connection, here with the floor beside them. `--store-dir DIR` puts the
SQLite files of the floor and the gateway under DIR (a tmpfs such as /dev/shm tells what the
disk adds to a tail).

Results: bench/results/<UTC time>-<host>-budget.{json,md}. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import run

BENCH = Path(__file__).resolve().parent
VARIANTS = (
    "lean",
    "lean-lowlevel",
    "floor",
    "gateway",
    "-access-log",
    "-gc",
    "-metrics",
    "-auth",
    "-store",
    "-upstream",
    "+structlog-log",
)

# (category, path fragments): a stack is charged to the first category met from the root.
# Glue (routes.py, edge.py's own lines, asyncio, uvloop) belongs to no category by itself.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "access log line",
        ("structlog/", "logging/", "bc_proxy/log.py", "bc_proxy/access_log.py", "secrets.py"),
    ),
    ("metrics", ("prometheus_client/", "bc_proxy/metrics.py", "bc_proxy/loop_metrics.py")),
    ("store (write-ahead + settle)", ("bc_proxy/store/", "sqlite3/")),
    ("upstream client", ("bc_proxy/connexus/", "aiohttp/client", "aiohttp/connector.py")),
    ("auth", ("bc_proxy/legacy/auth.py", "hmac.py")),
    ("form parsing", ("bc_proxy/legacy/forms.py", "(post) ", "urllib/parse.py")),
    ("translation", ("bc_proxy/translate.py",)),
    ("rate limit", ("bc_proxy/legacy/ratelimit.py",)),
    ("console ring", ("bc_proxy/console/",)),
    ("response", ("aiohttp/web_response.py", "aiohttp/http_writer.py")),
    ("HTTP server (parse, dispatch)", ("aiohttp/",)),
)


_IDLE = ("_worker (concurrent/futures/thread.py:81)", "wait (threading.py", "get (queue.py")


def frame_category(frame: str) -> str | None:
    for name, fragments in CATEGORIES:
        if any(f in frame for f in fragments):
            return name
    return None


def categorize(raw: str) -> Counter[str]:
    """Samples per category from py-spy's raw output (`frame;frame;... count`, root first)."""
    out: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(w in frames[-1] for w in _IDLE):
            continue  # a helper thread waiting for work: py-spy does not see it as idle
        if frames[0].startswith("thread") and "MainThread" not in frames[0]:
            # Helper threads: the store's checkpoint and reader threads, anything else.
            busy = "store helper threads" if "bc-store" in frames[0] else "other threads"
            out[busy] += int(count)
            continue
        cat = "handler glue, event loop, GC"
        # Charge to the first part entered below the handler (request handler frames) or
        # the first recognizable one from the root (callbacks straight from the loop).
        for frame in frames:
            c = frame_category(frame)
            if c is None:
                continue
            if c == "HTTP server (parse, dispatch)" and _below_handler(frames, frame):
                continue
            cat = c
            break
        out[cat] += int(count)
    return out


def _below_handler(frames: list[str], frame: str) -> bool:
    """aiohttp's server frames above the handler do not decide: what the handler calls does."""
    i = frames.index(frame)
    return any(
        "bc_proxy/" in f
        or "baseline_proxy.py" in f
        or "lean_durable.py" in f
        or "aiohttp/client" in f
        for f in frames[i + 1 :]
    )


# Where the floor's and the gateway's SQLite files go (`--store-dir`); None: the run's temp dir.
STORE_DIR: list[Path] = []


def store_file(default_dir: Path, stem: str) -> Path:
    """A new SQLite file name: under `--store-dir` when given, else in `default_dir`."""
    base = STORE_DIR[0] if STORE_DIR else default_dir
    return base / f"{stem}-{time.time_ns()}.db"


def start_target(ctx: run.Ctx, variant: str) -> tuple[subprocess.Popen[bytes], str, Any]:
    """Start the lean proxy or a gateway variant; (process, URL, gateway or None)."""
    if variant == "lean":
        base = run.Baseline(ctx)
        base.start()
        assert base.proc is not None
        return base.proc, f"http://127.0.0.1:{ctx.baseline_port}/api/1/sms/out", base
    if variant == "floor":
        return start_floor(ctx)
    if variant == "lean-lowlevel":
        return start_script(ctx, "lean_lowlevel.py", [])
    gw = run.Gateway(ctx, variant.strip("-+"), poll_wait=0)
    if STORE_DIR:  # the same config with its SQLite file elsewhere (a tmpfs, say)
        settings = json.loads(gw.config.read_text())
        gw.db = store_file(gw.dir, "gw")
        settings["store"]["url"] = f"sqlite:///{gw.db}"
        gw.config.write_text(json.dumps(settings, indent=2) + "\n")
    part = "none" if variant == "gateway" else variant[1:]  # "-x": x removed, "+x": x added
    cmd = [
        *ctx.pin.under_test,
        sys.executable,
        str(BENCH / "ablate.py"),
        part,
        "--config",
        str(gw.config),
    ]
    gw.proc = ctx.procs.start("gateway", cmd, gw.log)
    url = f"{gw.base}/readyz"
    run.wait_until(gw.proc, "gateway", gw.log, lambda: run.http_status(url) == 200, 30)
    return gw.proc, f"{gw.base}/api/1/sms/out", gw


class _Script:
    def __init__(self, ctx: run.Ctx, proc: subprocess.Popen[bytes]) -> None:
        self.ctx, self.proc = ctx, proc

    def stop(self) -> None:
        self.ctx.procs.stop(self.proc)


def start_floor(ctx: run.Ctx) -> tuple[subprocess.Popen[bytes], str, Any]:
    """The lean proxy plus the write-ahead row, its settle and the log line (lean_durable.py)."""
    d = ctx.path("floor")
    d.mkdir(exist_ok=True)
    db = store_file(d, "floor")
    return start_script(ctx, "lean_durable.py", ["--db", str(db), "--log", str(d / "access.log")])


def start_script(
    ctx: run.Ctx, script: str, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str, Any]:
    """One of bench/'s own proxies on a free port, in front of the stub."""
    port = run.free_port()
    name = script.removesuffix(".py")
    cmd = [
        *ctx.pin.under_test,
        sys.executable,
        str(BENCH / script),
        "--port",
        str(port),
        "--upstream",
        ctx.upstream,
        *extra,
    ]
    out = ctx.path(f"{name}.log")
    proc = ctx.procs.start(name, cmd, out)
    url = f"http://127.0.0.1:{port}/api/1/sms/out"
    run.wait_until(proc, name, out, lambda: run.http_status(url) is not None, 30)
    return proc, url, _Script(ctx, proc)


@dataclass
class Bench:
    """One measuring session of budget.py or offcpu.py: pinned to the load CPU, the SIGTERM
    handler, bench/run.py's context (its temp dir, the processes started), the start."""

    ctx: run.Ctx  # its procs and tmp dir are the session's
    started: datetime.datetime
    load0: tuple[float, float, float]

    @classmethod
    def start(cls, prefix: str, duration: int, store_dir: Path | None) -> Bench:
        signal.signal(signal.SIGTERM, run.on_sigterm)  # stops what it started, as run.py does
        args = run.parse_args(["--duration", str(duration)])
        pin = run.choose_pinning()
        if pin.load_cpu is not None:
            os.sched_setaffinity(0, {pin.load_cpu})
        started = datetime.datetime.now(datetime.UTC)
        load0 = os.getloadavg()
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        if store_dir is not None:
            STORE_DIR.append(Path(tempfile.mkdtemp(prefix=prefix, dir=store_dir)))
        procs = run.Procs()
        exe = shutil.which("bc-proxy") or "bc-proxy"
        ports = (run.free_port(), run.free_port(), run.free_port())
        return cls(run.Ctx(args, tmp, procs, pin, *ports, exe), started, load0)

    @property
    def stamp(self) -> str:
        return self.started.strftime("%Y%m%dT%H%M%SZ")

    def header(self) -> dict[str, Any]:
        """The fields every report of a session opens with."""
        return {
            "timestamp": self.stamp,
            "hostname": socket.gethostname(),
            "load_average_at_start": [round(x, 2) for x in self.load0],
            "pinning": self.ctx.pin.description,
            **git_state(),
        }

    def write(self, results_dir: Path, kind: str, report: dict[str, Any], md: str) -> Path:
        """Print the report and write it as `<stamp>-<host>-<kind>.{json,md}`; the base path."""
        print(md)
        results_dir.mkdir(parents=True, exist_ok=True)
        base = results_dir / f"{self.stamp}-{socket.gethostname()}-{kind}"
        Path(f"{base}.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{base}.md").write_text(md)
        run.log(f"wrote {base}.json and .md")
        return base

    def stop(self) -> None:
        self.ctx.procs.stop_all()
        shutil.rmtree(self.ctx.tmp, ignore_errors=True)
        for d in STORE_DIR:
            shutil.rmtree(d, ignore_errors=True)


def git_state() -> dict[str, Any]:
    """The commit measured, and whether (and how) the tree differed from it."""

    source, commit, _ = run.measured_tree()  # (PYTHONPATH may name another checkout)

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(source), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout

    diff = git("diff", "HEAD", "--", "bc_proxy", "bench")
    return {
        "git_commit": commit,
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def measure(ctx: run.Ctx, variant: str, seconds: int, conns: int) -> dict[str, Any]:
    if variant == "direct":  # the stub itself: the reference the added latency is taken over
        url = f"{ctx.upstream}/sms/out"
        ctx.wrk(url, conns, run.WARMUP_SECONDS, record=False)
        res = ctx.wrk(url, conns, seconds)
    else:
        proc, url, target = start_target(ctx, variant)
        try:
            ctx.wrk(url, conns, run.WARMUP_SECONDS, record=False)
            res = ctx.wrk(url, conns, seconds, pid=proc.pid)
        finally:
            target.stop()
    cpu = res.get("under_test_cpu")
    return {
        "rps": res["rps"],
        "cpu": cpu,
        "cpu_us": None if cpu is None else cpu / res["rps"] * 1e6,
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "non2xx": res["non2xx"],
    }


def profile(ctx: run.Ctx, variant: str, seconds: int, conns: int) -> dict[str, Any]:
    proc, url, target = start_target(ctx, variant)
    out = ctx.path(f"pyspy-{variant}.txt")
    try:
        ctx.wrk(url, conns, run.WARMUP_SECONDS, record=False)
        wrk_cmd = run.wrk_command(ctx.pin.load, url, conns, seconds + 2)
        wrk = ctx.procs.start("wrk", wrk_cmd, ctx.path("wrk-profile.txt"))
        spy = [
            *ctx.pin.load,
            "py-spy",
            "record",
            "--pid",
            str(proc.pid),
            "--rate",
            "250",
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--threads",
            "--output",
            str(out),
        ]
        done = subprocess.run(spy, capture_output=True, timeout=seconds + 60, check=False)
        wrk.wait(seconds + 30)
        ctx.procs.stop(wrk)
    finally:
        target.stop()
    if done.returncode != 0:
        raise run.CheckFailed(f"py-spy failed: {done.stderr.decode(errors='replace')[-500:]}")
    raw = out.read_text(errors="replace")
    cats = categorize(raw)
    total = sum(cats.values())
    return {"samples": total, "shares": {k: v / total for k, v in cats.most_common()}, "raw": raw}


def added_latency(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per proxy: median over repetitions of its p50 and p99 minus the same repetition's direct
    figure, and that over the lean proxy's (issue 13's one-connection bars)."""
    direct = results.get("direct") or []
    out: dict[str, dict[str, float]] = {}
    for v, rs in results.items():
        if v == "direct" or len(rs) != len(direct):
            continue
        fig: dict[str, float] = {}
        for q in ("p50", "p99"):
            fig[f"added_{q}_ms"] = statistics.median(
                r[f"{q}_ms"] - d[f"{q}_ms"] for r, d in zip(rs, direct, strict=True)
            )
        out[v] = fig
    lean = out.get("lean")
    if lean is not None:
        for fig in out.values():
            for q in ("p50", "p99"):
                base = lean[f"added_{q}_ms"]
                fig[f"added_{q}_ratio"] = fig[f"added_{q}_ms"] / base if base > 0 else math.inf
    return out


def markdown(report: dict[str, Any]) -> str:
    med = report["medians"]
    full = med["gateway"]["cpu_us"] if "gateway" in med else None
    lines = [
        f"# CPU budget {report['timestamp']} on {report['hostname']}",
        "",
        f"load average at start {report['load_average_at_start']}, at end "
        f"{report['load_average_at_end']}; {report['pinning']}; {report['reps']} reps of "
        f"{report['duration']} s at {report['connections']} connections, medians; SQLite files "
        f"in {report.get('store_dir', 'the temp dir')}",
        "",
        "## Removing one part at a time (CPU µs per request)",
        "",
        "| variant | req/s | CPU µs/request | p50 ms | p99 ms | saved vs the full gateway (µs) |",
        "|---|---|---|---|---|---|",
    ]
    for v in ("direct", *VARIANTS):
        m = med.get(v)
        if m is None:
            continue
        cost = (
            "-"
            if v in ("direct", "lean", "lean-lowlevel", "floor", "gateway") or full is None
            else f"{full - m['cpu_us']:.0f}"
        )
        cpu = "-" if m.get("cpu_us") is None else f"{m['cpu_us']:.0f}"
        lines.append(
            f"| {v} | {m['rps']:,.0f} | {cpu} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {cost} |"
        )
    added = report.get("added_latency") or {}
    if added:
        lines += [
            "",
            "## Added latency over direct calls (medians of per-repetition differences)",
            "",
            "| variant | added p50 ms | / lean | added p99 ms | / lean |",
            "|---|---|---|---|---|",
        ]
        for v, f in added.items():
            r50, r99 = (
                "-" if (r := f.get(f"added_{q}_ratio")) is None else f"{r:.2f}x"
                for q in ("p50", "p99")
            )
            lines.append(
                f"| {v} | {f['added_p50_ms']:.3f} | {r50} | {f['added_p99_ms']:.3f} | {r99} |"
            )
    for v, prof in report.get("profiles", {}).items():
        us = med[v]["cpu_us"]
        lines += [
            "",
            f"## py-spy profile: {v} ({prof['samples']} samples; {us:.0f} µs/request)",
            "",
            "| part | share of samples | µs per request |",
            "|---|---|---|",
        ]
        for k, share in prof["shares"].items():
            lines.append(f"| {k} | {share * 100:.1f}% | {share * us:.0f} |")
    lines += ["", "## Commands", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def removals_as_values(argv: list[str]) -> list[str]:
    """argparse takes `-store` for an option: after --variants, pass each removal as
    `--variants=-store` (the option extends its list)."""
    out: list[str] = []
    listing = False
    for tok in argv:
        if listing and tok.startswith("-") and tok in VARIANTS:
            out.append(f"--variants={tok}")
            continue
        listing = tok == "--variants" or (listing and tok in VARIANTS)
        out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=int, default=6)
    p.add_argument("--profile-seconds", type=int, default=8)
    p.add_argument(
        "--variants",
        nargs="+",
        action="extend",
        choices=VARIANTS,
        help="default: all; a removal (-x) may follow others: --variants gateway -store",
    )
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument(
        "--store-dir",
        type=Path,
        help="put the floor's and the gateway's SQLite files in a new folder here (a tmpfs such "
        "as /dev/shm, to tell the disk's share of a tail); default: the run's temp dir",
    )
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    a = p.parse_args(removals_as_values(sys.argv[1:] if argv is None else argv))
    a.variants = a.variants or list(VARIANTS)
    for tool in ("wrk", "nginx", "py-spy"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    bench = Bench.start("bc-budget-", a.duration, a.store_dir)
    ctx = bench.ctx
    variants = ["direct", *a.variants] if a.connections == 1 else list(a.variants)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    profiles: dict[str, Any] = {}
    try:
        run.start_nginx(ctx)
        for rep in range(a.reps):
            for v in variants:
                run.log(f"rep {rep + 1}/{a.reps}: {v}")
                results[v].append(measure(ctx, v, a.duration, a.connections))
        if not a.no_profile:
            for v in [v for v in ("gateway", "lean", "floor") if v in a.variants]:
                run.log(f"py-spy: {v}")
                profiles[v] = profile(ctx, v, a.profile_seconds, a.connections)
    finally:
        bench.stop()
    medians = {
        v: {
            k: statistics.median(vals) if (vals := [r[k] for r in rs if r[k] is not None]) else None
            for k in ("rps", "cpu_us", "p50_ms", "p99_ms")
        }
        for v, rs in results.items()
        if rs
    }
    report: dict[str, Any] = {
        **bench.header(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "reps": a.reps,
        "duration": a.duration,
        "connections": a.connections,
        "store_dir": str(a.store_dir) if a.store_dir else "the run's temp dir",
        "results": results,
        "medians": medians,
        "added_latency": added_latency(results) if "direct" in results else {},
        "profiles": {
            k: {kk: vv for kk, vv in v.items() if kk != "raw"} for k, v in profiles.items()
        },
        "commands": ctx.procs.commands,
        "invocation": shlex.join([sys.executable, *sys.argv]),
    }
    base = bench.write(a.results_dir, "budget", report, markdown(report))
    for v, prof in profiles.items():
        Path(f"{base}-{v}.pyspy.txt").write_text(prof["raw"])
    return 0


if __name__ == "__main__":
    time.tzset()
    sys.exit(main())
