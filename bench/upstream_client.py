"""CPU per upstream sms/out call: the send path's clients side by side, on uvloop, loopback only.

Starts a fixed-answer aiohttp Connexus stub in its own process (pinned to CPU 1 with taskset
when there is one; this process takes CPU 0), then makes N sequential and N concurrency-32
calls through (a) ConnexusClient.send over aiohttp (the path before the wire client), (b)
ConnexusClient.send over the wire client, (c) a bare aiohttp ClientSession.post as
bench/baseline_proxy.py does, and prints process CPU microseconds per call (time.process_time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from bc_proxy.config import parse
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.log import REQUEST_ID
from bc_proxy.metrics import Metrics
from bc_proxy.store import PlannedRecipient
from bc_proxy.translate import SendRequest

ANSWER = json.dumps({"success": True, "status": "accepted", "message_id": "cx-1"}).encode()
TOKEN = json.dumps({"access_token": "wst_bench", "expires_in": 86400}).encode()
FORM = {"Authorization": "Bearer wst_bench", "Content-Type": "application/x-www-form-urlencoded"}


def stub(port: int) -> None:
    """The Connexus stub: sms/out and auth/token with fixed JSON answers."""

    async def sms_out(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def token(request: web.Request) -> web.Response:
        return web.Response(body=TOKEN, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/connexus/sms/out", sms_out)
    app.router.add_post("/api/connexus/auth/token", token)
    web.run_app(
        app, host="127.0.0.1", port=port, print=None, access_log=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Call = Callable[[int], Awaitable[None]]


async def measure(call: Call, n: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs per call, wall µs per call) for n calls, `concurrency` at a time."""
    per = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per):
            await call(w * per + i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    done = per * concurrency
    return (
        (time.process_time() - cpu) / done * 1e6,
        (time.perf_counter() - wall) / done * 1e6,
    )


def gateway_client(base: str, wire: bool) -> ConnexusClient:
    settings = parse(
        {
            "upstream": {"base_url": base, "timeout_seconds": 10, "max_connections": 100},
            "webhook": {"secret": "bench-webhook-secret"},
            "tenants": [
                {
                    "name": "bench",
                    "legacy": {"user_id": "bench", "password": "bench-password"},
                    "connexus": {"client_id": "cid", "client_secret": "csk"},
                }
            ],
        }
    )
    return ConnexusClient(settings, Metrics(process=False), wire=wire)


async def run(base: str, n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    req = SendRequest(("6421000001",), "bench message", "m-1", (("from", "552"),))
    results: dict[str, list[tuple[float, float]]] = {}
    clients = {"a_aiohttp": gateway_client(base, False), "b_wire": gateway_client(base, True)}
    for c in clients.values():
        await c.start()
    session = ClientSession(connector=TCPConnector(limit=100), timeout=ClientTimeout(total=10))
    url = f"{base}/sms/out"
    data = b"to=6421000001&body=bench+message"

    def through(client: ConnexusClient) -> Call:
        async def call(i: int) -> None:
            REQUEST_ID.set(f"rid-{i}")  # the gateway sends each request's id upstream
            planned = [PlannedRecipient("6421000001", f"bc{i:021x}")]
            out = await client.send("bench", req, planned)
            assert out.failure is None, out.failure

        return call

    async def bare(i: int) -> None:
        async with session.post(url, data=data, headers=FORM) as resp:
            answer = json.loads(await resp.read())
        assert answer["success"]

    calls = {"a_aiohttp": through(clients["a_aiohttp"]), "b_wire": through(clients["b_wire"])}
    calls["c_bare_aiohttp"] = bare
    try:
        for call in calls.values():  # warm-up: token, connections, code paths
            await measure(call, 640, 32)
        for _ in range(rounds):  # interleaved, so drift in machine load hits every path alike
            for name, call in calls.items():
                for conc in (1, 32):
                    results.setdefault(f"{name} c{conc}", []).append(await measure(call, n, conc))
    finally:
        for c in clients.values():
            await c.close()
        await session.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000, help="calls per measurement (default 5000)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per path (default 3)")
    ap.add_argument("--stub", type=int, help=argparse.SUPPRESS)  # internal: run the stub
    args = ap.parse_args()
    if args.stub:
        stub(args.stub)
        return
    port = free_port()
    cmd = [sys.executable, __file__, "--stub", str(port)]
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pinned:
        cmd = ["taskset", "-c", "1", *cmd]
        os.sched_setaffinity(0, {0})
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the stub did not start") from None
                time.sleep(0.05)
        base = f"http://127.0.0.1:{port}/api/connexus"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run(base, args.n, args.rounds))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"load average {os.getloadavg()[0]:.2f}; pinned {pinned}; n={args.n} x {args.rounds}")
    print(f"{'path':<22}{'CPU us/call (median)':>22}{'all rounds':>28}{'wall us/call':>14}")
    for name, values in results.items():
        cpus = [c for c, _ in values]
        walls = [w for _, w in values]
        rounds = " ".join(f"{c:.0f}" for c in cpus)
        print(
            f"{name:<22}{statistics.median(cpus):>22.0f}{rounds:>28}{statistics.median(walls):>14.0f}"
        )


if __name__ == "__main__":
    main()
