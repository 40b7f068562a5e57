#!/usr/bin/env python3
"""Instructions per legacy send, counted by valgrind's callgrind: the lean proxy and the gateway.

    python bench/instructions.py [--requests 400] [--connections 8] [--variants lean floor gateway]
    python bench/instructions.py --variants gateway gateway_pg --path mo   # webhook ingest
    python bench/instructions.py --variants gateway --path dlr   # delivery reports, matched
    python bench/instructions.py --variants gateway --ablate store   # one part removed

Wall-clock and CPU-time figures move with whatever else the machine runs; instruction counts
do not (the same binary, input and environment give the same count within a fraction of a
percent, whatever the other core does). So this is the A/B tool for a change to the send path
on a shared machine, beside bench/run.py's throughput and latency on an idle one.

Each target runs under `valgrind --tool=callgrind --instr-atstart=no` (started without
instrumentation, so imports are not counted) against the nginx stub of bench/run.py; after a
warm-up of plain requests, instrumentation is switched on and the counters zeroed
(`callgrind_control -i on`, `-z`), `--requests` sends are made at `--connections` concurrent
connections by this script, and the counters are dumped: every thread's instructions (the
event loop, the store's threads), divided by the number of requests. The gateway runs as users
run it (bench/run.py's Gateway: request log on to a file, metrics on, a fresh SQLite store;
`gateway_pg`: a fresh PostgreSQL schema, the server's own instructions not counted).
`--path mo` posts incoming-SMS webhooks (each a new messageId) instead of legacy sends;
`--path dlr` posts delivery reports, each naming one of as many accepted sends pre-filled into
the gateway's store (bench/run.py's webhook scenario, counted). `floor` is bench/lean_durable.py
(the lean proxy plus the two commits and the log line, with the gateway's schema); it and the
lean proxy have the send path only.
`--ablate PART` runs the gateway variants through bench/ablate.py with PART removed (the CPU
budget's removals, counted in instructions instead of timed).

Loopback only, bounded counts; results printed and written to bench/results/ as JSON + .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ablate
import aiohttp
import run

BENCH = Path(__file__).resolve().parent
WARMUP = 200
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        "--dump-instr=no",
        "--trace-children=no",
    ]


def mo_webhook(w: int, i: int) -> bytes:
    """An incoming SMS to the bench tenant's number, a new messageId each."""
    return json.dumps(
        {
            "type": "mo",
            "messageId": f"ins-{os.getpid()}-{w}-{i}-{time.monotonic_ns()}",
            "from": "+6421000000",
            "to": run.SENDER,
            "body": "Hello & welcome = \u00fc",
            "timestamp": int(time.time()),
        }
    ).encode()


async def load(url: str, n: int, connections: int, path: str = "send", first: int = 0) -> int:
    """`n` requests at `connections` concurrent connections; how many got a 2xx (`dlr`: the
    reports of the pre-filled sends `first` to `first + n - 1`)."""
    ok = 0
    left = n
    lock = asyncio.Lock()
    conn = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

        async def worker(w: int) -> None:
            nonlocal ok, left
            i = 0
            while True:
                async with lock:
                    if left <= 0:
                        return
                    k = first + n - left
                    left -= 1
                i += 1
                # The request of bench/send.lua (wrk's): the PHP client's form POST.
                data = {
                    "to": "6421000000",
                    "body": "Hello & welcome = \u00fc",
                    "messageId": f"ins-{os.getpid()}-{w}-{i}-{time.monotonic_ns()}",
                    "userId": run.USER,
                    "password": run.PASSWORD,
                }
                if path == "mo":
                    post = s.post(url, data=mo_webhook(w, i), headers=run.JSON_CT)
                elif path == "dlr":
                    post = s.post(url, data=run.dlr(f"c{k}"), headers=run.JSON_CT)
                else:
                    post = s.post(url, data=data)
                async with post as resp:
                    await resp.read()
                    ok += resp.status in (200, 204)

        await asyncio.gather(*(worker(w) for w in range(connections)))
    return ok


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measure(
    ctx: run.Ctx,
    variant: str,
    requests: int,
    connections: int,
    path: str = "send",
    part: str = "none",
) -> dict[str, Any]:
    out = ctx.tmp / f"callgrind-{variant}.out"
    if variant in ("lean", "floor"):
        script = "baseline_proxy.py" if variant == "lean" else "lean_durable.py"
        cmd = [
            *callgrind(out),
            sys.executable,
            str(BENCH / script),
            "--port",
            str(ctx.baseline_port),
            "--upstream",
            ctx.upstream,
        ]
        if variant == "floor":
            cmd += ["--db", str(ctx.path("floor.db")), "--log", str(ctx.path("floor-access.log"))]
        url = f"http://127.0.0.1:{ctx.baseline_port}/api/1/sms/out"
        log = ctx.path(f"{variant}.log")
        proc = ctx.procs.start(variant, cmd, log)
        ready = url
    else:
        backend = "pg" if variant.endswith("_pg") else "sqlite"
        gw = run.Gateway(ctx, variant, poll_wait=0, backend=backend)
        cmd = [*callgrind(out), ctx.gateway_exe, "serve", "--config", str(gw.config)]
        if part != "none":
            cmd = [*callgrind(out), sys.executable, str(BENCH / "ablate.py"), part]
            cmd += ["--config", str(gw.config)]
        url = f"{gw.base}/api/1/sms/out"
        if path in ("mo", "dlr"):
            url = f"{gw.base}/webhooks/connexus/{run.SECRET}"
        if path == "dlr":
            gw.prefill(WARMUP + requests, 0, "c")
        log = gw.log
        proc = ctx.procs.start("gateway", cmd, log)
        ready = f"{gw.base}/readyz"
    try:
        run.wait_until(proc, variant, log, lambda: run.http_status(ready) is not None, 300)
        warm = asyncio.run(load(url, WARMUP, connections, path))
        if warm != WARMUP:
            raise run.CheckFailed(f"{variant}: {warm}/{WARMUP} warm-up requests answered 2xx")
        control(proc.pid, "-i", "on")
        control(proc.pid, "-z")
        started = time.monotonic()
        ok = asyncio.run(load(url, requests, connections, path, first=WARMUP))
        elapsed = time.monotonic() - started
        control(proc.pid, "-d")
        control(proc.pid, "-i", "off")
        if ok != requests:
            raise run.CheckFailed(f"{variant}: {ok}/{requests} requests answered 2xx")
        if path == "dlr":  # every report matched its send: the path measured is the matched one
            matched = gw.count(
                "SELECT count(*) FROM records WHERE kind='status' AND tenant=? "
                "AND send_id IS NOT NULL",
                run.TENANT,
            )
            if matched != WARMUP + requests:
                raise run.CheckFailed(
                    f"{variant}: {matched} of {WARMUP + requests} reports matched"
                )
    finally:
        ctx.procs.stop(proc, grace=60)
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        text = dump.read_text(errors="replace")
        found = _TOTALS.findall(text)
        if found and "-i on" not in text[:0]:
            total += int(found[-1])
    return {
        "instructions_per_request": total / requests,
        "requests": requests,
        "connections": connections,
        "elapsed_s": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["lean", "gateway"],
        choices=["lean", "floor", "gateway", "gateway_pg"],
    )
    p.add_argument("--path", choices=["send", "mo", "dlr"], default="send")
    p.add_argument("--ablate", choices=ablate.PARTS, default="none", help="gateway: part removed")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    p.add_argument("--keep-profiles", type=Path, help="copy callgrind's output files here")
    a = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    if not 1 <= a.requests <= 20_000 or not 1 <= a.connections <= 64:
        print("error: --requests 1..20000, --connections 1..64", file=sys.stderr)
        return 2
    args = run.parse_args([])
    pin = run.Pinning([], [], None, "unpinned: instruction counts do not depend on it")
    tmp = Path(tempfile.mkdtemp(prefix="bc-instr-"))
    procs = run.Procs()
    exe = shutil.which("bc-proxy") or str(Path(sys.executable).parent / "bc-proxy")
    ctx = run.Ctx(args, tmp, procs, pin, run.free_port(), run.free_port(), run.free_port(), exe)
    started = datetime.datetime.now(datetime.UTC)
    source, commit, dirty = run.measured_tree()
    commit = commit[:7]
    results: dict[str, Any] = {}
    try:
        run.start_nginx(ctx)
        for v in a.variants:
            run.log(f"callgrind: {v}")
            if v in ("lean", "floor") and a.path != "send":
                continue  # the lean proxy and the floor have only the send path
            results[v] = measure(ctx, v, a.requests, a.connections, a.path, a.ablate)
            run.log(f"{v}: {results[v]['instructions_per_request']:,.0f} instructions/request")
    finally:
        procs.stop_all()
        if a.keep_profiles is not None:
            a.keep_profiles.mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("callgrind-*"):
                shutil.copy(f, a.keep_profiles / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    lines = [
        f"# Instructions per {a.path} request {stamp} "
        f"(commit {commit}{', dirty tree' if dirty else ''})"
        + ("" if a.ablate == "none" else f", gateway without {a.ablate}"),
        "",
        f"{a.requests} requests at {a.connections} connections after {WARMUP} warm-up; "
        "callgrind, every thread of the process under test",
        "",
        "| target | instructions per request | ratio to lean |",
        "|---|---|---|",
    ]
    lean = results.get("lean", {}).get("instructions_per_request")
    for v, r in results.items():
        ipr = r["instructions_per_request"]
        ratio = f"{ipr / lean:.2f}x" if lean else "-"
        lines.append(f"| {v} | {ipr:,.0f} | {ratio} |")
    md = "\n".join(lines) + "\n"
    print(md)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    base = a.results_dir / f"{stamp}-{socket.gethostname()}-instructions"
    report = {
        "timestamp": stamp,
        "commit": commit,
        "dirty": dirty,
        "source": str(source),
        "path": a.path,
        "ablate": a.ablate,
        "results": results,
    }
    Path(f"{base}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{base}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
