"""PostgreSQL unreachable for 10 s under a webhook load, through a TCP proxy that resets.

During the cut webhooks answer 503 (the sender retries like Connexus), sends answer 500 before
anything goes upstream and /readyz names the store; no acknowledged webhook is lost, and after
the restore the same process serves again: ready, sending, and woken by LISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from bc_proxy.store import StatusRecord, TenantRules
from bc_proxy.store.postgres import PostgresStore
from bc_proxy.store.rules import Rules
from tests import pg
from tests.conftest import Connexus, creds
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.served import Served, free_port, write_config
from tests.tcpproxy import TcpProxy
from tests.test_scaleout import TENANT, dlr_payload, gateway_config, hook, mo_payload, poll

pytestmark = pytest.mark.postgres

CUT_SECONDS = 10.0
RETRIES = 3  # as Connexus: up to 3 more attempts after a non-200


def via(url: str, port: int) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(
        parts._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}")
    )


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A resetting TCP proxy in front of the test PostgreSQL server."""
    target = urlsplit(pg.DSN)
    tcp = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await tcp.start()
    try:
        yield tcp
    finally:
        await tcp.close()


async def _post_like_connexus(
    http: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> int:
    """POST until 200, retrying a non-200 3 times with backoff; the last status (0: no answer)."""
    status = 0
    for attempt in range(RETRIES + 1):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.post(url, json=payload, timeout=aiohttp.ClientTimeout(5)) as resp:
                await resp.read()
                status = resp.status
        if status == 200:
            break
        await asyncio.sleep(0.25 * 2**attempt)
    return status


async def _send(http: aiohttp.ClientSession, base: str, n: int) -> int:
    params = creds(to=f"6421555{n:04d}", body=f"send {n}", messageId=f"S{n}")
    async with http.post(f"{base}/api/1/sms/out", data=params) as resp:
        await resp.read()
        return resp.status


async def _readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(3)) as resp:
        return resp.status, await resp.json()


async def test_pg_cut_for_10s_under_load_loses_no_acknowledged_webhook_and_recovers(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
    proxy: TcpProxy,
) -> None:
    """A 10 s cut under load: 503s and 500s, /readyz says store, nothing acked lost, recovery."""
    # Leases of 10 s: a missed NOTIFY would leave a long-poll waiting a full lease period.
    cfg = gateway_config(tmp_path, connexus, via(pg_url, proxy.port), poll_wait_seconds=5)
    port = free_port()
    cfg["server"]["port"] = port
    config = write_config(tmp_path / "gw.yaml", cfg)
    outcomes: dict[int, int] = {}
    during: Counter[int] = Counter()
    async with aiohttp.ClientSession() as http:
        with (tmp_path / "gw.log").open("w") as log:
            served = Served(config, port, log)
            await served.start(http)
            stop = asyncio.Event()
            senders: list[asyncio.Task[None]] = []
            try:

                async def sender(first: int) -> None:
                    n = first
                    while not stop.is_set():
                        outcomes[n] = await _post_like_connexus(http, hook(served), mo_payload(n))
                        n += 8
                        await asyncio.sleep(0.05)

                senders += [asyncio.create_task(sender(i)) for i in range(8)]
                await asyncio.sleep(2)
                assert await _send(http, served.base, 0) == 204  # sends work before the cut
                proxy.cut()
                cut_at = time.monotonic()
                upstream_before = len(connexus.emu.sms_out_requests())
                await asyncio.sleep(1)
                status, body = await _readyz(http, served.base)
                assert status == 503
                assert body["checks"]["store"].startswith("unreachable"), body
                for n in range(1, 6):
                    during[await _send(http, served.base, n)] += 1
                assert len(connexus.emu.sms_out_requests()) == upstream_before  # nothing went up
                await asyncio.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
                proxy.restore()
                restored = time.monotonic()
                while (await _readyz(http, served.base))[0] != 200:
                    assert time.monotonic() - restored < 15, "no recovery without a restart"
                    await asyncio.sleep(0.2)
                ready_after = time.monotonic() - restored
                await asyncio.sleep(3)
                stop.set()
                await asyncio.gather(*senders)
                assert await _send(http, served.base, 100) == 204  # sends work again
                assert b"64215550100" in connexus.emu.sms_out_requests()[-1].body
                wakes = await _listen_wakes(pg_url, http, served, restored)
            finally:
                stop.set()
                for task in senders:
                    task.cancel()
                code = await served.stop()
    acked = sorted(n for n, s in outcomes.items() if s == 200)
    failed = Counter(s for s in outcomes.values() if s != 200)
    stored = await pg.execute(
        pg_url, "SELECT count(*) FROM records WHERE event_key = ANY($1::text[])",
        [f"mo:mo-{n}" for n in acked],
    )  # fmt: skip
    half_written = await pg.execute(
        pg_url, "SELECT count(*) FROM sends WHERE legacy_id = ANY($1::text[])",
        [f"S{n}" for n in range(1, 6)],
    )  # fmt: skip
    print(
        f"\noutage: {len(outcomes)} webhooks, {len(acked)} acked (all stored: {stored}), "
        f"given up after retries: {dict(failed)}; sends during the cut: {dict(during)}; "
        f"ready {ready_after:.1f} s after the restore; LISTEN wakes {wakes} ms"
    )
    assert code == 0
    assert during == Counter({500: 5})
    assert half_written == 0  # the refused sends left no row behind
    assert stored == len(acked)  # no acknowledged webhook lost
    assert failed, "the load never hit the cut"
    assert set(failed) == {503}  # answered, never hung: Connexus gave up on 503s only


async def _listen_wakes(
    url: str, http: aiohttp.ClientSession, served: Served, restored: float
) -> list[float]:
    """Three long-polls woken by records another replica stores (their NOTIFY reaches the
    gateway only through its re-established LISTEN connection); latencies in ms."""
    await asyncio.sleep(max(0.0, restored + 6 - time.monotonic()))  # listener backoff <= 5 s
    store = PostgresStore(url, Rules({TENANT: TenantRules(senders=("552",))}), replica="other")
    await store.open()
    out = []
    try:
        for n in range(3):  # status records: the load left only incoming ones queued
            waiting = asyncio.create_task(poll(http, served.base, "status"))
            await asyncio.sleep(0.3)
            status = StatusRecord(TENANT, f"642100{n:04d}", "552", f"other{n}", "NUR", "x")
            stored_at = time.perf_counter()
            await store.settle_send([], [status])
            record = await waiting
            out.append(round((time.perf_counter() - stored_at) * 1000, 1))
            assert record is not None
            assert record["inReplyToId"] == f"other{n}"
    finally:
        await store.close()
    assert max(out) < 1000  # not the 10 s lease re-check: LISTEN woke it
    return out


async def test_pg_cut_while_connexus_accepts_a_send_settles_it_after_the_restore(
    tmp_path: Path,
    connexus: Connexus,
    pg_url: str,  # noqa: F811
    proxy: TcpProxy,
) -> None:
    """PostgreSQL cut while Connexus is accepting a send (its pending row committed): the SMS
    is out, so the client gets 204; the settle is retried and commits after the restore (the
    row `accepted` with its Connexus id), so the delivery report naming that id reaches the
    legacy client, and a retry of the call is answered 204 without a second send."""
    cfg = gateway_config(tmp_path, connexus, via(pg_url, proxy.port), poll_wait_seconds=0)
    cfg["upstream"]["timeout_seconds"] = 5  # pending rows expire at 15 s: the retry window
    port = free_port()
    cfg["server"]["port"] = port
    config = write_config(tmp_path / "gw.yaml", cfg)
    async with aiohttp.ClientSession() as http:
        with (tmp_path / "gw.log").open("w") as log:
            served = Served(config, port, log)
            await served.start(http)
            try:
                connexus.emu.send_response_delay = 1.0
                sending = asyncio.create_task(_send(http, served.base, 7))
                for _ in range(200):  # until Connexus holds the call
                    if connexus.emu.sms_out_requests():
                        break
                    await asyncio.sleep(0.01)
                proxy.cut()
                assert await sending == 204
                connexus.emu.send_response_delay = 0.0
                rows = await pg.execute(pg_url, "SELECT state FROM sends WHERE legacy_id = 'S7'")
                assert rows == "pending"
                await asyncio.sleep(2)
                proxy.restore()
                restored = time.monotonic()
                while (
                    state := await pg.execute(
                        pg_url, "SELECT state FROM sends WHERE legacy_id = 'S7'"
                    )
                ) != "accepted":
                    assert time.monotonic() - restored < 8, state
                    await asyncio.sleep(0.1)
                settled_after = time.monotonic() - restored
                cid = await pg.execute(
                    pg_url, "SELECT connexus_id FROM sends WHERE legacy_id = 'S7'"
                )
                assert cid
                assert await _post_like_connexus(http, hook(served), dlr_payload(cid)) == 200
                record = await poll(http, served.base, "status")
                assert record is not None
                assert record["inReplyToId"] == "S7"
                assert await poll(http, served.base, "status") is None  # no ERR record
                assert await _send(http, served.base, 7) == 204
                assert len(connexus.emu.sms_out_requests()) == 1
            finally:
                code = await served.stop()
    print(f"\nsettle committed {settled_after:.1f} s after the restore")
    assert code == 0
    logged = (tmp_path / "gw.log").read_text()
    assert "settle_deferred" in logged
    assert "settle_recovered" in logged
