"""The floor of issue 13's bar: the lean pass-through plus only the guarantees the bar keeps.

bench/baseline_proxy.py as it is (uvloop, `await request.post()`, `urlencode`, one shared
aiohttp ClientSession, `json.loads`, 204), plus, each written as lean as we could:
- a write-ahead `pending` row committed before the upstream call, and the settle (`accepted`,
  the Connexus id) committed before the 204: the gateway's SQLite file settings (WAL,
  synchronous NORMAL, autocheckpoint 10,000 pages, the checkpoint helper thread) and its
  schema (bc_proxy's own migrations: the same tables and indexes), one transaction per loop
  tick for every write queued in it (group commit), no savepoints;
- the upstream ref sent as `messageId`, as the gateway does (a report can name the row);
- one JSON access-log line per request, written and flushed to a file.
No auth, no idempotency lookup, no blocked list, no metrics, no strict parsing, no request id.

If this floor is slower than the lean proxy, no gateway on this stack meets a bar of 1.0x
while keeping those guarantees; what the gateway spends beyond the floor is its own code.

    python bench/lean_durable.py --port 8702 --upstream http://127.0.0.1:8700/api/connexus \
        --db /tmp/floor.db --log /tmp/floor.log
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

import baseline_proxy as lean
from aiohttp import web

from bc_proxy.store.sqlite import schema
from bc_proxy.store.sqlite.helpers import checkpoints, connect

INSERT = (
    "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, created_at) "
    "VALUES (?, ?, ?, '', 'pending', ?, ?)"
)
SETTLE = (
    "UPDATE sends SET state = 'accepted', connexus_id = ?, settled_at = ? "
    "WHERE upstream_ref = ? AND state = 'pending'"
)


class Writer:
    """Group commit: every row queued during one loop tick goes in one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.inserts: list[tuple[Any, ...]] = []
        self.settles: list[tuple[Any, ...]] = []
        self.waiting: list[asyncio.Future[None]] = []
        self.handle: asyncio.Handle | None = None

    def _queue(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append(fut)
        if self.handle is None:
            self.handle = loop.call_soon(self.flush)
        return fut

    def pending(self, row: tuple[Any, ...]) -> asyncio.Future[None]:
        self.inserts.append(row)
        return self._queue()

    def settle(self, row: tuple[Any, ...]) -> asyncio.Future[None]:
        self.settles.append(row)
        return self._queue()

    def flush(self) -> None:
        self.handle = None
        inserts, settles, waiting = self.inserts, self.settles, self.waiting
        self.inserts, self.settles, self.waiting = [], [], []
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        if inserts:
            conn.executemany(INSERT, inserts)
        if settles:
            conn.executemany(SETTLE, settles)
        conn.execute("COMMIT")
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)


class AccessLog:
    """One JSON line per request, written and flushed (what a crash may not lose)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def line(self, fields: dict[str, Any]) -> None:
        self.stream.write(json.dumps(fields) + "\n")
        self.stream.flush()


WRITER = web.AppKey("writer", Writer)
LOG = web.AppKey("log", AccessLog)


def new_ref() -> str:
    return f"bc{time.time_ns() // 1000:013x}{os.urandom(4).hex()}"


async def send(request: web.Request) -> web.Response:
    start = time.perf_counter()
    app = request.app
    form = await request.post()
    to, body = str(form["to"]), str(form["body"])
    ref = new_ref()
    writer = app[WRITER]
    await writer.pending(("bench", form.get("messageId"), to, ref, time.time()))
    data = urllib.parse.urlencode({"to": to, "body": body, "messageId": ref}).encode()
    async with app[lean.SESSION].post(app[lean.UPSTREAM], data=data, headers=lean.HEADERS) as resp:
        answer = json.loads(await resp.read())
    status = 204 if answer.get("success") else 502
    if status == 204:
        await writer.settle((str(answer.get("messageId", "")), time.time(), ref))
    app[LOG].line(
        {
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            "event": "request",
            "level": "info",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return web.Response(status=status)


def create_app(upstream: str, db: str, log: str) -> web.Application:
    """The lean proxy's app with `send` on its path, and the store and log file beside it."""
    app = lean.create_app(upstream, send)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        conn = connect(db)
        conn.execute("PRAGMA journal_mode = WAL")
        schema.migrate(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        app[WRITER] = Writer(conn)
        pool = ThreadPoolExecutor(1, thread_name_prefix="floor-ckpt")
        ckpt = asyncio.create_task(checkpoints(db, pool))
        stream = open(log, "a", encoding="utf-8")  # noqa: SIM115, ASYNC230 - at start, closed below
        app[LOG] = AccessLog(stream)
        yield
        ckpt.cancel()
        await asyncio.gather(ckpt, return_exceptions=True)
        pool.shutdown(wait=True)
        stream.close()
        conn.close()

    app.cleanup_ctx.append(resources)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8702)
    parser.add_argument("--upstream", default="http://127.0.0.1:8700/api/connexus")
    parser.add_argument("--db", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    lean.serve(create_app(args.upstream, args.db, args.log), args.port)


if __name__ == "__main__":
    main()
