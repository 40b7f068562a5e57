"""Store microbenchmark: begin_send + settle_send pairs and delivery-report ingest, per backend.

    python bench/pg_store.py                         # both backends, concurrency 32 and 1
    python bench/pg_store.py --sends 4000 --dlrs 4000 --concurrency 32 --backends postgres

Not a test and not part of bench/run.py: it calls the store directly (no HTTP, no upstream),
in this process, so it measures the store's own cost per send. Each backend gets a fresh store
(a temp SQLite file, or a fresh PostgreSQL schema at BC_PROXY_BENCH_PG_DSN, dropped after).
For PostgreSQL it also counts the statements the pools sent per operation (asyncpg query
loggers: BEGIN, COMMIT and the pool's reset on release included). Every count is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import asyncpg

from bc_proxy.store import DlrEvent, Rules, SendIntent, Settlement, Store, TenantRules, open_store

DSN = os.environ.get("BC_PROXY_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TENANT = "bench"
RULES = Rules({TENANT: TenantRules(senders=("552",))})
MAX_COUNT = 100_000
STATEMENTS: Counter[str] = Counter()


def _count(record: Any) -> None:
    STATEMENTS[" ".join(record.query.split())[:90]] += 1


_real_create_pool = asyncpg.create_pool


def _counting_pool(*args: Any, **kwargs: Any) -> Any:
    """asyncpg.create_pool with a query logger on every connection it makes."""
    init = kwargs.pop("init", None)

    async def with_logger(conn: Any) -> None:
        conn.add_query_logger(_count)
        if init is not None:
            await init(conn)

    return _real_create_pool(*args, init=with_logger, **kwargs)


asyncpg.create_pool = _counting_pool


async def _sends(store: Store, n: int, concurrency: int, tag: str) -> float:
    """n begin_send + settle_send pairs from `concurrency` tasks; sends per second."""
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            handset = f"64{i % 100_000_000:08d}"
            intent = SendIntent(TENANT, f"{tag}-{i}", (handset,), "552")
            plan = await store.begin_send(intent, time.time())
            (p,) = plan.to_send
            await store.settle_send([Settlement(p.upstream_ref, "accepted", f"cx-{tag}-{i}")])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def _dlrs(store: Store, n: int, concurrency: int, tag: str) -> tuple[float, float]:
    """n delivery reports naming the sends of `tag`: (reports per second, CPU ms per report)."""
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            await store.add_dlr(DlrEvent(f"cx-{tag}-{i}", 1, "DELIVRD"))

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return n / wall, cpu / n * 1000


async def _backend(name: str, args: argparse.Namespace) -> None:
    schema = None
    tmp = None
    if name == "sqlite":
        tmp = tempfile.TemporaryDirectory(prefix="bc-bench-")
        url = f"sqlite:///{tmp.name}/bench.db"
    else:
        schema = f"bench_{secrets.token_hex(5)}"
        conn = await asyncpg.connect(DSN)
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.close()
        sep = "&" if "?" in DSN else "?"
        url = f"{DSN}{sep}options={quote(f'-csearch_path={schema}', safe='')}"
    store = open_store(url, RULES)
    await store.open()
    try:
        await _sends(store, min(200, args.sends), 8, "warm")  # pools, caches, prepared plans
        for c in args.concurrency:
            STATEMENTS.clear()
            n = min(args.sends, MAX_COUNT) if c > 1 else min(args.sends // 4, MAX_COUNT)
            rate = await _sends(store, n, c, f"c{c}")
            per = sum(STATEMENTS.values()) / n
            extra = f", {per:.2f} statements per send" if name == "postgres" else ""
            print(f"{name:8} sends c={c:<3} {rate:8.0f} sends/s ({n} pairs){extra}", flush=True)
            if name == "postgres" and args.verbose:
                for q, k in STATEMENTS.most_common(20):
                    print(f"    {k / n:6.2f}  {q}")
        c = max(args.concurrency)
        n = min(args.dlrs, min(args.sends, MAX_COUNT))
        STATEMENTS.clear()
        rate, cpu_ms = await _dlrs(store, n, c, f"c{c}")
        per = sum(STATEMENTS.values()) / n
        extra = f", {per:.2f} statements per report" if name == "postgres" else ""
        print(
            f"{name:8} dlrs  c={c:<3} {rate:8.0f} reports/s, {cpu_ms:.3f} ms CPU each "
            f"({n} reports){extra}",
            flush=True,
        )
        if name == "postgres" and args.verbose:
            for q, k in STATEMENTS.most_common(20):
                print(f"    {k / n:6.2f}  {q}")
    finally:
        await store.close()
        if tmp is not None:
            tmp.cleanup()
        if schema is not None:
            conn = await asyncpg.connect(DSN)
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sends", type=int, default=4000)
    ap.add_argument("--dlrs", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    ap.add_argument("-v", "--verbose", action="store_true", help="statements by text")
    args = ap.parse_args()
    for name in args.backends:
        await _backend(name, args)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
