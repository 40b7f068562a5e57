#!/usr/bin/env python3
"""Where the event loop's thread waits at one connection (issue 13 point 4): off-CPU time by cause.

    python bench/offcpu.py [--variants lean floor gateway] [--reps 3] [--seconds 8]
                           [--connections 1] [--store-dir /dev/shm]

Each variant (bench/budget.py's: the lean proxy, the floor, the gateway as users run it) is
started on CPU 0 in front of the nginx stub, warmed up, and loaded by wrk on CPU 1 while
`perf sched record -a -g` records every context switch. `perf sched timehist` then gives, for
the process's main thread (the event loop), each stretch it ran, the time it waited before it,
the scheduling delay (woken, but another task had the CPU) and the kernel stack it left the CPU
from. Each switch-out is charged to one cause by that stack:

- `idle`: epoll, waiting for the next packet (the loop had nothing to do);
- `disk read in a write`: a buffered write whose page was not in the page cache, so the kernel
  read the block first (ext4_block_write_begin); SQLite's WAL frames straddle pages;
- `fsync / writeback`: waiting for written pages or a cache flush (file_write_and_wait_range,
  folio_wait_writeback, blkdev_issue_flush, jbd2);
- `preempted`: taken off the CPU while runnable (an interrupt or another task);
- `thread hand-off`: a futex (a helper thread's result, the GIL);
- `other`.

The report gives, per variant, wrk's latencies and, per request, the loop's run time, its
scheduling delay and its off-CPU time by cause, with how often each cause occurs per 1,000
requests. Needs `perf` with the sched tracepoints (Debian's linux-perf; run as root) besides
wrk, nginx and py-spy-free bench/run.py's tools. Loopback only, bounded.

Results: bench/results/<UTC time>-<host>-offcpu.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import budget
import run

BENCH = Path(__file__).resolve().parent
VARIANTS = ("lean", "floor", "gateway")
CAUSES = (
    "idle",
    "disk read in a write",
    "fsync / writeback",
    "preempted",
    "thread hand-off",
    "other",
)
# (cause, kernel functions): the first cause with a function in the stack wins.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("disk read in a write", ("ext4_block_write_begin", "block_write_begin")),
    (
        "fsync / writeback",
        (
            "file_write_and_wait_range",
            "folio_wait_writeback",
            "blkdev_issue_flush",
            "__sync_dirty_buffer",
            "jbd2_",
            "submit_bio_wait",
        ),
    ),
    ("idle", ("do_epoll_wait",)),
    ("preempted", ("irqentry_exit_to_user_mode", "exit_to_user_mode_loop", "__cond_resched")),
    ("thread hand-off", ("futex_",)),
)


@dataclass
class Stretch:
    """One line of `perf sched timehist`: a stretch the task ran, what came before it."""

    task: str
    wait_ms: float  # off the CPU before this stretch (sleeping or blocked)
    delay_ms: float  # woken, waiting for the CPU
    run_ms: float
    stack: str  # where the task left the CPU at the end of this stretch


def cause(stack: str) -> str:
    for name, functions in _RULES:
        if any(f in stack for f in functions):
            return name
    return "other"


def parse_timehist(text: str) -> list[Stretch]:
    """The lines of `perf sched timehist` (with call chains); headers and summaries skipped."""
    out: list[Stretch] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        try:
            float(parts[0])
            wait, delay, ran = float(parts[3]), float(parts[4]), float(parts[5])
        except ValueError:
            continue
        out.append(Stretch(parts[2], wait, delay, ran, " ".join(parts[6:])))
    return out


def loop_thread(stretches: Iterable[Stretch], pid: int) -> list[Stretch]:
    """The main thread's stretches: perf names it `comm[pid]` (other threads `comm[tid/pid]`)."""
    return [s for s in stretches if s.task.endswith(f"[{pid}]")]


def off_cpu(stretches: list[Stretch]) -> dict[str, dict[str, float]]:
    """Per cause: how many switch-outs, and the time off the CPU that followed them (the next
    stretch's wait plus its scheduling delay)."""
    by: dict[str, dict[str, float]] = {c: {"count": 0, "ms": 0.0} for c in CAUSES}
    for s, nxt in itertools.pairwise(stretches):
        c = cause(s.stack)
        by[c]["count"] += 1
        by[c]["ms"] += nxt.wait_ms + nxt.delay_ms
    return by


def measure(ctx: run.Ctx, variant: str, seconds: int, conns: int) -> dict[str, Any]:
    proc, url, target = budget.start_target(ctx, variant)
    data = ctx.path(f"perf-{variant}.data")
    try:
        ctx.wrk(url, conns, run.WARMUP_SECONDS, record=False)
        out = ctx.path(f"wrk-{variant}.txt")
        cmd = [
            *ctx.pin.load,
            "perf",
            "sched",
            "record",
            "-a",
            "-g",
            "-o",
            str(data),
            "--",
            *run.wrk_command(ctx.pin.load, url, conns, seconds),
        ]
        with out.open("wb") as fh:
            subprocess.run(
                cmd, stdout=fh, stderr=subprocess.DEVNULL, timeout=seconds + 60, check=True
            )
        wrk = run.parse_wrk(out.read_text(errors="replace"))
    finally:
        target.stop()
    hist = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(data), "-p", str(proc.pid)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    data.unlink(missing_ok=True)  # tens of MB each
    loop = loop_thread(parse_timehist(hist), proc.pid)
    requests = wrk["rps"] * seconds
    per = 1000.0 / requests  # µs per request from ms totals
    causes = off_cpu(loop)
    return {
        "rps": wrk["rps"],
        "p50_ms": wrk["p50_ms"],
        "p99_ms": wrk["p99_ms"],
        "loop_run_us": sum(s.run_ms for s in loop) * per,
        "loop_delay_us": sum(s.delay_ms for s in loop) * per,
        "loop_delay_p99_ms": _p99([s.delay_ms for s in loop]),
        "causes": {
            c: {"per_1000": v["count"] * 1000 / requests, "us": v["ms"] * per}
            for c, v in causes.items()
        },
    }


def _p99(values: list[float]) -> float | None:
    return run.percentile(sorted(values), 99) if values else None


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Off-CPU time of the event loop {report['timestamp']} on {report['hostname']}",
        "",
        f"load average at start {report['load_average_at_start']}; {report['pinning']}; "
        f"{report['reps']} reps of {report['seconds']} s at {report['connections']} "
        f"connection(s), medians; SQLite files in {report['store_dir']}; code "
        f"{report['git_commit'][:7]}",
        "",
        "Per request: the loop thread's run time and scheduling delay; then off-CPU time by "
        "cause (µs per request, and switch-outs per 1,000 requests).",
        "",
        "| variant | req/s | p50 ms | p99 ms | run µs | sched delay µs | "
        + " | ".join(CAUSES)
        + " |",
        "|---" * (6 + len(CAUSES)) + "|",
    ]
    for v, m in report["medians"].items():
        cells = [
            v,
            f"{m['rps']:,.0f}",
            run.fmt(m["p50_ms"], 3),
            run.fmt(m["p99_ms"], 3),
            f"{m['loop_run_us']:.0f}",
            f"{m['loop_delay_us']:.0f}",
            *(f"{m['causes'][c]['us']:.1f} ({m['causes'][c]['per_1000']:.0f})" for c in CAUSES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per repetition (p99 ms; disk read in a write, fsync / writeback: µs/request):"]
    for v, rs in report["results"].items():
        parts = [
            f"{r['p99_ms']:.2f} ({r['causes']['disk read in a write']['us']:.1f}, "
            f"{r['causes']['fsync / writeback']['us']:.1f})"
            for r in rs
        ]
        lines.append(f"- {v}: " + ", ".join(parts))
    lines += ["", f"Invocation: `{report['invocation']}`", ""]
    return "\n".join(lines)


def medians(rs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in rs))

    return {
        **{k: med(k) for k in ("rps", "p50_ms", "p99_ms", "loop_run_us", "loop_delay_us")},
        "causes": {
            c: {k: statistics.median(r["causes"][c][k] for r in rs) for k in ("per_1000", "us")}
            for c in CAUSES
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--store-dir", type=Path, help="SQLite files here (a tmpfs: /dev/shm)")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    a = p.parse_args(argv)
    for tool in ("wrk", "nginx", "perf"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    probe = subprocess.run(
        ["perf", "list", "sched:sched_switch"], capture_output=True, text=True, check=False
    )
    if "sched:sched_switch" not in probe.stdout:
        print("error: perf cannot see the sched tracepoints (run as root)", file=sys.stderr)
        return 2
    bench = budget.Bench.start("bc-offcpu-", a.seconds, a.store_dir)
    ctx = bench.ctx
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
    try:
        run.start_nginx(ctx)
        for rep in range(a.reps):
            for v in a.variants:
                run.log(f"rep {rep + 1}/{a.reps}: {v}")
                results[v].append(measure(ctx, v, a.seconds, a.connections))
    finally:
        bench.stop()
    report: dict[str, Any] = {
        **bench.header(),
        "reps": a.reps,
        "seconds": a.seconds,
        "connections": a.connections,
        "store_dir": str(a.store_dir) if a.store_dir else "the run's temp dir",
        "results": results,
        "medians": {v: medians(rs) for v, rs in results.items() if rs},
        "invocation": " ".join([sys.executable, *sys.argv]),
    }
    bench.write(a.results_dir, "offcpu", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
