"""Two `bc-proxy serve` processes on one PostgreSQL schema behave as one gateway.

Webhooks spread over both and polled through both come out exactly once; a long-poll on one
wakes when the other stores; pushes from both reach the receiver once, and a SIGKILLed
replica's pushes are delivered by the other after its lease expires (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from bc_proxy.store import Delivery, MoEvent, SendIntent, Settlement, StatusRecord, TenantRules
from bc_proxy.store.postgres import PostgresStore
from bc_proxy.store.rules import Rules
from tests import pg
from tests.conftest import WEBHOOK_SECRET, AiohttpServer, Connexus, config_dict, creds
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.served import Served, free_port, write_config

pytestmark = pytest.mark.postgres

# Unique per run: NOTIFY reaches every schema of the database.
TENANT = f"acme-{secrets.token_hex(3)}"
Start = Callable[..., Awaitable[list[Served]]]


def gateway_config(
    tmp_path: Path, connexus: Connexus, url: str, *, lease: float = 10, **tenant: Any
) -> dict[str, Any]:
    """One tenant (`TENANT`, sender 552) on the PostgreSQL store at `url`, quiet logs."""
    cfg = config_dict(tmp_path, connexus.base_url)
    cfg["store"] = {"url": url, "lease_seconds": lease}
    cfg["upstream"]["mo_query_interval_seconds"] = 0
    cfg["log"] = {"level": "warning", "format": "json", "requests": False}
    cfg["tenants"][0].update(name=TENANT, **tenant)
    return cfg


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test's own traffic (webhooks, polls, readiness)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        yield session


@pytest.fixture
async def start(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Start]:
    """Starts gateway processes, one per port, from one config; all stopped after the test."""
    started: list[Served] = []
    with contextlib.ExitStack() as files:

        async def run(cfg: dict[str, Any], count: int = 2) -> list[Served]:
            out = []
            for _ in range(count):
                port = free_port()
                path = write_config(tmp_path / f"gw{len(started)}.yaml", _on(cfg, port))
                log = files.enter_context((tmp_path / f"gw{len(started)}.log").open("w"))
                served = Served(path, port, log)
                started.append(served)
                await served.start(http)
                out.append(served)
            return out

        try:
            yield run
        finally:
            for served in started:
                await served.stop()


def _on(cfg: dict[str, Any], port: int) -> dict[str, Any]:
    return {**cfg, "server": {**cfg["server"], "port": port}}


def hook(served: Served) -> str:
    return f"{served.base}/webhooks/connexus/{WEBHOOK_SECRET}"


def mo_payload(n: int, to: str = "552") -> dict[str, Any]:
    return {
        "type": "mo",
        "messageId": f"mo-{n}",
        "from": f"+6421{n:07d}",
        "to": to,
        "body": f"reply {n}",
        "timestamp": int(time.time()),
    }


def dlr_payload(connexus_id: str) -> dict[str, Any]:
    return {"type": "dlr", "messageId": connexus_id, "status": "DELIVRD", "statusCode": 1}


async def seed_sends(url: str, rules: Rules, tenant: str, n: int) -> list[tuple[str, str]]:
    """n accepted sends (one recipient each) in the shared store: (recipient, Connexus id)."""
    store = PostgresStore(url, rules, replica="seeder")
    await store.open()
    try:
        recipients = tuple(f"6429{i:07d}" for i in range(n))
        plan = await store.begin_send(SendIntent(tenant, None, recipients, "552"), time.time())
        sent = [(p.recipient, f"cx-{i}") for i, p in enumerate(plan.to_send)]
        await store.settle_send(
            [
                Settlement(p.upstream_ref, "accepted", cx)
                for p, (_, cx) in zip(plan.to_send, sent, strict=True)
            ]
        )
        return sent
    finally:
        await store.close()


async def post(http: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> int:
    async with http.post(url, json=payload) as resp:
        await resp.read()
        return resp.status


async def poll(http: aiohttp.ClientSession, base: str, kind: str) -> dict[str, str] | None:
    """One legacy poll of `kind` (in/status): the record's fields, or None on 204."""
    async with http.get(f"{base}/api/1/sms/{kind}", params=creds()) as resp:
        text = await resp.text()
        if resp.status == 204:
            return None
        assert resp.status == 200, (resp.status, text)
        return dict(parse_qsl(text))


async def test_webhooks_over_two_replicas_are_polled_through_both_exactly_once(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
    start: Start,
    http: aiohttp.ClientSession,
) -> None:
    """5,000 webhooks (mo and dlr) spread over two processes, polled through both: each once."""
    cfg = gateway_config(tmp_path, connexus, pg_url, poll_wait_seconds=1)
    a, b = await start(cfg)
    sent = await seed_sends(pg_url, Rules({TENANT: TenantRules(senders=("552",))}), TENANT, 2500)
    payloads = [p for i, (_, cx) in enumerate(sent) for p in (mo_payload(i), dlr_payload(cx))]
    queue = asyncio.Queue[tuple[int, dict[str, Any]]]()
    for n, p in enumerate(payloads):
        queue.put_nowait((n, p))
    statuses: Counter[int] = Counter()

    async def sender() -> None:
        while not queue.empty():
            n, payload = queue.get_nowait()
            statuses[await post(http, hook((a, b)[n % 2]), payload)] += 1

    got: dict[str, list[dict[str, str]]] = {"in": [], "status": []}
    sending_done = asyncio.Event()

    async def poller(served: Served, kind: str) -> None:
        while True:
            record = await poll(http, served.base, kind)
            if record is not None:
                got[kind].append(record)
            elif sending_done.is_set():
                return

    started = time.monotonic()
    pollers = [
        asyncio.create_task(poller(s, kind))
        for s in (a, b)
        for kind in ("in", "status")
        for _ in range(3)
    ]
    await asyncio.gather(*(sender() for _ in range(32)))
    ingest = time.monotonic() - started
    sending_done.set()
    await asyncio.wait_for(asyncio.gather(*pollers), 40)
    took = time.monotonic() - started
    ids = [r["messageId"] for kind in got for r in got[kind]]
    print(f"\n5,000 webhooks: ingest {ingest:.1f} s, all polled in {took:.1f} s; {statuses}")
    assert statuses == Counter({200: 5000})
    assert len(ids) == len(set(ids)) == 5000  # by legacy messageId: no duplicate, none missing
    assert sorted(r["body"] for r in got["in"]) == sorted(f"reply {i}" for i in range(2500))
    assert sorted(r["from"] for r in got["status"]) == sorted(r for r, _ in sent)


async def test_long_poll_on_one_replica_wakes_within_50ms_of_a_webhook_on_the_other(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
    start: Start,
    http: aiohttp.ClientSession,
) -> None:
    """A long-poll waiting on B answers within 50 ms (median) of a webhook's 200 on A."""
    a, b = await start(gateway_config(tmp_path, connexus, pg_url, poll_wait_seconds=5))
    latencies, from_post = [], []
    for n in range(15):
        waiting = asyncio.create_task(poll(http, b.base, "in"))
        await asyncio.sleep(0.3)  # the poll is parked on B
        posted = time.perf_counter()
        assert await post(http, hook(a), mo_payload(n)) == 200
        committed = time.perf_counter()
        record = await waiting
        answered = time.perf_counter()
        latencies.append(answered - committed)  # 0 when B answered before A's 200 arrived
        from_post.append(answered - posted)
        assert record is not None
        assert record["body"] == f"reply {n}"
    ms = sorted(round(x * 1000, 1) for x in latencies)
    print(
        f"\nwake across replicas after the 200: median {statistics.median(ms)} ms, max {ms[-1]} ms"
    )
    print(f"from the webhook's start: max {max(from_post) * 1000:.1f} ms")
    assert statistics.median(latencies) < 0.05


async def _receiver(
    aiohttp_server: AiohttpServer,
) -> tuple[str, dict[str, Counter[str]], asyncio.Event]:
    """A legacy push receiver: counts per path and messageId; the event fires on each push."""
    got: dict[str, Counter[str]] = {"in": Counter(), "status": Counter()}
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        got[request.match_info["kind"]][dict(parse_qsl(await request.text()))["messageId"]] += 1
        arrived.set()
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/{kind}", receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("/")), got, arrived


async def _seed_pushes(url: str, n: int) -> None:
    """n/2 incoming SMS and n/2 status records for the push tenant, in the shared store."""
    rules = Rules({TENANT: TenantRules(delivery=Delivery(True, True), senders=("552",))})
    store = PostgresStore(url, rules, replica="seeder")
    await store.open()
    try:
        half = n // 2
        await asyncio.gather(
            *(
                store.add_mo(MoEvent(f"mo-{i}", f"6421{i:07d}", "552", "hi"), account=None)
                for i in range(half)
            )
        )
        for lo in range(0, half, 250):
            await store.settle_send(
                [],
                [
                    StatusRecord(TENANT, f"6422{i:07d}", "552", f"L{i}", "NUR", "x")
                    for i in range(lo, min(half, lo + 250))
                ],
            )
    finally:
        await store.close()


async def _pushed(http: aiohttp.ClientSession, served: Served) -> float:
    async with http.get(f"{served.base}/metrics") as resp:
        text = await resp.text()
    pattern = r'^bc_proxy_push_attempts_total\{[^}]*outcome="success"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


async def _until(check: Callable[[], bool], event: asyncio.Event, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 0.5)


async def test_two_replicas_push_each_record_once(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
    start: Start,
    http: aiohttp.ClientSession,
    aiohttp_server: AiohttpServer,
) -> None:
    """2,000 pushes with both replicas delivering: each receiver gets each record once."""
    url, got, arrived = await _receiver(aiohttp_server)
    push = {"incoming_url": url + "in", "status_url": url + "status"}
    a, b = await start(gateway_config(tmp_path, connexus, pg_url, push=push))
    started = time.monotonic()
    await _seed_pushes(pg_url, 2000)
    await _until(lambda: sum(len(c) for c in got.values()) >= 2000, arrived, 40)
    await asyncio.sleep(0.5)  # a late duplicate would show now
    took = time.monotonic() - started
    by_a, by_b = await _pushed(http, a), await _pushed(http, b)
    print(f"\n2,000 pushes in {took:.1f} s: replica A {by_a:.0f}, B {by_b:.0f}")
    for kind in ("in", "status"):
        assert len(got[kind]) == 1000
        assert set(got[kind].values()) == {1}, kind
    assert by_a > 0
    assert by_b > 0
    assert by_a + by_b == 2000


async def test_pushes_of_a_killed_replica_are_delivered_after_its_lease_expires(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
    start: Start,
    http: aiohttp.ClientSession,
    aiohttp_server: AiohttpServer,
) -> None:
    """One of two pushing replicas SIGKILLed mid-run: none lost, repeats only of its claims."""
    url, got, arrived = await _receiver(aiohttp_server)
    push = {"incoming_url": url + "in", "status_url": url + "status"}
    a, _ = await start(gateway_config(tmp_path, connexus, pg_url, lease=2, push=push))
    await _seed_pushes(pg_url, 2000)
    await _until(lambda: sum(len(c) for c in got.values()) >= 500, arrived, 30)
    a.signal(signal.SIGKILL)
    killed, at_kill = time.monotonic(), sum(len(c) for c in got.values())
    held = await _claims_of(pg_url, a.pid)
    await _until(lambda: sum(len(c) for c in got.values()) >= 2000, arrived, 40)
    await asyncio.sleep(2.5)  # one more lease period: a late duplicate would show now
    repeats = {k: n for c in got.values() for k, n in c.items() if n > 1}
    print(
        f"\nkill after {at_kill} delivered: A held {len(held)} "
        f"claims; all 2,000 delivered {time.monotonic() - killed:.1f} s after the kill; "
        f"{len(repeats)} delivered twice"
    )
    assert sum(len(c) for c in got.values()) == 2000  # none lost
    assert set(repeats) <= held  # only records in flight at the kill came twice
    assert max(repeats.values(), default=1) <= 2


async def _claims_of(url: str, pid: int) -> set[str]:
    """Receipt ids of push claims still held by the replica of process `pid`."""
    rows = await pg.execute(
        url,
        "SELECT coalesce(array_agg(receipt_id), '{}') FROM records "
        "WHERE push_due IS NOT NULL AND push_owner LIKE $1",
        f"%:{pid}:%",
    )
    return set(rows)
