"""`bc-proxy migrate-store`: a single-node SQLite install moved into PostgreSQL, counts verified.

The source is written through the SQLite store (sends in every state, a held poll lease, a dead
letter, a STOP, a rejected webhook, a sweep mark) plus 100,000 bulk records; the moved store then
serves a gateway: the leased record is polled, the dead letter is replayed and pushed.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import pytest
from aiohttp import web

from bc_proxy import keys
from bc_proxy.config import load_usable
from bc_proxy.errors import ConfigError, StoreError
from bc_proxy.store import (
    Delivery,
    MoEvent,
    Rules,
    SendIntent,
    Settlement,
    StatusRecord,
    SweepMark,
    TenantRules,
    open_store,
    transfer,
)
from bc_proxy.store.postgres import schema as pg_schema
from bc_proxy.store.sqlite.helpers import moved_to
from tests import pg
from tests.conftest import AiohttpServer, Connexus, GatewayFactory, config_dict, creds
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.served import write_config

pytestmark = pytest.mark.postgres

BULK = 100_000
COUNT = re.compile(r"^(\w[\w ]*?) +(\d+) -> +(\d+)  (?:ok|MISMATCH)$", re.M)
RULES = Rules(
    {
        "acme": TenantRules(senders=("552",)),
        "pusher": TenantRules(delivery=Delivery(push_status=True), senders=("553",)),
    }
)


async def _single_node_install(url: str) -> tuple[str, str]:
    """Write one of everything through the SQLite store; (leased receipt id, dead receipt id)."""
    store = open_store(url, RULES, replica="old-node")
    await store.open()
    try:
        mo = MoEvent("mo-first", "6421000001", "552", "the oldest record")
        assert (await store.add_mo(mo, account=None)).outcome == "stored"
        leased = await store.claim("acme", "in")  # held when the node stopped
        assert leased is not None
        stop = MoEvent("mo-stop", "6421000002", "552", "STOP")
        assert (await store.add_mo(stop, account=None)).outcome == "stored"
        plan = await store.begin_send(
            SendIntent("acme", "L1", ("6421000003", "6421000004", "6421000005"), "552"),
            time.time(),
        )
        refs = [p.upstream_ref for p in plan.to_send]
        await store.settle_send(
            [Settlement(refs[0], "accepted", "cx-1"), Settlement(refs[1], "rejected")],
            [StatusRecord("acme", "6421000004", "552", "L1", "NUR", "rejected", refs[1])],
        )  # refs[2] stays pending
        await store.settle_send([], [StatusRecord("pusher", "6421000006", "553", "L2", "NUR", "x")])
        (pushed,) = await store.claim_pushes(time.time(), 10)
        await store.push_failed(pushed, next_at=None, error="gave up")
        await store.reject_webhook(b'{"type": "nonsense"}', "unknown type")
        await store.set_sweep_mark(SweepMark("acme", "2026-11-29 10:00:00", "mo-first", 1.0))
        return leased.receipt_id, pushed.receipt_id
    finally:
        await store.close()


def _bulk(path: str, n: int) -> None:
    """n pollable records of both kinds, as the SQLite store writes them."""
    import sqlite3

    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO records (tenant, kind, event_key, ref, receipt_id, msisdn_from, "
            "msisdn_to, body, dlr_status, created_at, pollable) "
            "VALUES ('acme', ?, ?, ?, ?, '6421999999', '552', ?, ?, ?, 1)",
            (
                (
                    "in" if i % 2 else "status",
                    f"mo:bulk{i}" if i % 2 else f"dlr:bulk{i}:1",
                    None,
                    f"r{i:032d}",
                    f"bulk {i}" if i % 2 else "",
                    None if i % 2 else 1,
                    now,
                )
                for i in range(n)
            ),
        )


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bc_proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_migrate_store_moves_100k_records_with_every_count_equal(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    connexus: Connexus,
    gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
) -> None:
    """100,000 records and one of everything move with every count equal; the moved store serves."""
    db = tmp_path / "bc-proxy.db"
    source = f"sqlite:///{db}"
    leased_id, dead_id = await _single_node_install(source)
    await asyncio.to_thread(_bulk, str(db), BULK)

    started = time.monotonic()
    code, out, err = await _cli("migrate-store", "--from", source, "--to", pg_url)
    took = time.monotonic() - started
    print(f"\nmigrate-store, {BULK + 4} records: {took:.1f} s (process included)\n{out}{err}")
    assert code == 0, err
    counts = {m[1]: (int(m[2]), int(m[3])) for m in COUNT.finditer(out)}
    assert all(line.endswith(" ok") for line in out.splitlines() if " -> " in line[30:]), out
    assert counts["records"] == (BULK + 4, BULK + 4)
    assert counts["records dead letters"] == (1, 1)
    assert counts["records pollable"] == (BULK + 3, BULK + 3)  # the leased one included
    assert counts["records leases held"] == (0, 0)
    for table in ("sends", "sweep_marks", "blocked", "rejected_webhooks"):
        assert counts[table][0] == counts[table][1] >= 1, table
    assert (counts["sends pending"], counts["sends accepted"]) == ((1, 1), (1, 1))

    code, _, err = await _cli("migrate-store", "--from", source, "--to", pg_url)
    assert code != 0  # a second run refuses the moved file
    assert "was moved" in err
    os.remove(f"{db}.moved")
    code, _, err = await _cli("migrate-store", "--from", source, "--to", pg_url)
    assert code != 0  # and, unmarked, the filled target
    assert "not empty" in err

    pushed: list[dict[str, str]] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        pushed.append(dict(parse_qsl(await request.text())))
        arrived.set()
        return web.Response(text="OK")

    receiver_app = web.Application()
    receiver_app.router.add_post("/status", receive)
    receiver = await aiohttp_server(receiver_app, host="127.0.0.1")
    cfg: dict[str, Any] = config_dict(tmp_path, connexus.base_url)
    cfg["store"]["url"] = pg_url
    cfg["upstream"]["mo_query_interval_seconds"] = 0
    cfg["tenants"].append(
        {
            **cfg["tenants"][0],
            "name": "pusher",
            "legacy": {"user_id": "pusher-legacy", "password": "pusher-legacy-pass"},
            "senders": ["553"],
            "push": {"status_url": str(receiver.make_url("/status"))},
        }
    )
    client = await gateway(cfg)
    async with client.get("/api/1/sms/in", params=creds()) as resp:
        assert resp.status == 200  # its SQLite lease was released in the move
        assert dict(parse_qsl(await resp.text()))["messageId"] == leased_id
    store = client.app[keys.STORE]
    (dead,) = await store.dead_letters()
    assert dead.receipt_id == dead_id
    assert await store.replay([dead.id], time.time()) == 1
    await asyncio.wait_for(arrived.wait(), 10)
    assert [p["messageId"] for p in pushed] == [dead_id]
    assert await store.blocked("acme") == ["6421000002"]


async def test_migrate_store_commits_nothing_when_a_count_differs(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy that loses one row fails the count check and leaves the target empty."""
    source = f"sqlite:///{tmp_path / 'bc-proxy.db'}"
    await _single_node_install(source)
    batches = transfer._batches

    def lossy(conn: Any, table: transfer.Table, *rest: Any) -> Any:
        for rows in batches(conn, table, *rest):
            yield rows[1:] if table.name == "records" else rows

    monkeypatch.setattr(transfer, "_batches", lossy)
    lines: list[str] = []
    with pytest.raises(StoreError, match="counts differ"):
        await transfer.transfer(source, pg_url, out=lines.append)
    assert any(line.startswith("records ") and "MISMATCH" in line for line in lines), lines
    assert await pg.execute(pg_url, "SELECT count(*) FROM records") == 0
    assert moved_to(str(tmp_path / "bc-proxy.db")) is None  # not moved: not marked


async def test_migrate_store_refuses_a_file_a_store_has_open(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """While a gateway (any store) has the SQLite file open, migrate-store copies nothing: what
    it stored or handed out meanwhile would be left behind or handed out twice. And while
    migrate-store copies, a gateway does not start on the file."""
    source = f"sqlite:///{tmp_path / 'bc-proxy.db'}"
    await _single_node_install(source)
    running = open_store(source, RULES)
    await running.open()
    try:
        with pytest.raises(StoreError, match="has this store open"):
            await transfer.transfer(source, pg_url, out=lambda line: None)
    finally:
        await running.close()
    lock = transfer.lock_source(source)  # what migrate-store holds while it copies
    try:
        late = open_store(source, RULES)
        with pytest.raises(StoreError, match="migrate-store is copying"):
            await late.open()
        with pytest.raises(StoreError, match="migrate-store is copying"):
            await late.migrate()  # `bc-proxy migrate` neither
        await late.close()
    finally:
        assert lock is not None
        os.close(lock)
    report = await transfer.transfer(source, pg_url, out=lambda line: None)  # no --force:
    assert report.ok  # the refused copies wrote nothing


async def test_migrate_store_refuses_the_open_file_by_another_name(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """The gateway's config names a symlink to the database file (kept on a mounted volume, say)
    and the operator names the file itself, or the other way round: still the open file, still
    refused. (A symlinked folder or `..` name the same lock file already.)"""
    volume = tmp_path / "volume"
    volume.mkdir()
    real, link = volume / "bc-proxy.db", tmp_path / "bc-proxy.db"
    await _single_node_install(f"sqlite:///{real}")
    link.symlink_to(real)
    for opened, named in ((link, real), (real, link)):
        running = open_store(f"sqlite:///{opened}", RULES)
        await running.open()
        try:
            with pytest.raises(StoreError, match="has this store open"):
                await transfer.transfer(f"sqlite:///{named}", pg_url, out=lambda line: None)
        finally:
            await running.close()
    assert sorted(os.listdir(tmp_path)) == ["bc-proxy.db", "volume"]  # no lock by the link
    assert "bc-proxy.db.lock" in os.listdir(volume)  # beside the file, as its -wal is


async def test_migrate_store_of_a_missing_file_leaves_no_lock_file(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """A mistyped --from fails on the missing file and leaves nothing beside it."""
    with pytest.raises(StoreError):
        await transfer.transfer(f"sqlite:///{tmp_path / 'typo.db'}", pg_url, out=lambda _: None)
    assert os.listdir(tmp_path) == []


async def test_migrate_store_moves_what_postgresql_cannot_hold_as_is(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """A NUL character in a stored SMS body (SQLite keeps it, PostgreSQL's text cannot) no
    longer stops the whole move: it becomes U+FFFD and the row is named. A path holding `#`
    opens the file it names, and a send marked as answered to a retry stays marked."""
    folder = tmp_path / "bc#proxy"
    folder.mkdir()
    source = f"sqlite:///{folder / 'bc-proxy.db'}"
    await _single_node_install(source)
    store = open_store(source, RULES, replica="old-node")
    await store.open()
    try:
        nul = MoEvent("mo-nul", "6421000009", "552", "before\x00after")
        assert (await store.add_mo(nul, account=None)).outcome == "stored"
        first = await store.begin_send(SendIntent("acme", "L9", ("6421000010",), "552"), 1.0e9)
        again = await store.begin_send(SendIntent("acme", "L9", ("6421000010",), "552"), 1.0e9)
        assert again.repeats == (("6421000010", "pending"),)  # marks the first's row
    finally:
        await store.close()
    lines: list[str] = []
    await transfer.transfer(source, pg_url, out=lines.append)
    assert any("1 rows held NUL characters" in line for line in lines), lines
    body = await pg.execute(pg_url, "SELECT body FROM records WHERE event_key LIKE '%mo-nul%'")
    assert body == "before\ufffdafter"
    ref = first.to_send[0].upstream_ref
    seen = await pg.execute(pg_url, f"SELECT repeat_seen FROM sends WHERE upstream_ref = '{ref}'")
    assert seen is True


async def test_a_moved_file_is_refused_by_a_gateway_started_on_it_again(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """After the move, the SQLite file says where it went: a gateway started on it again (an
    old unit left enabled, a reboot) refuses it, and check-config says so, instead of both
    stores delivering the moved records; a second move of it is refused too. Deleting the
    marker makes the file usable again."""
    db = tmp_path / "bc-proxy.db"
    source = f"sqlite:///{db}"
    await _single_node_install(source)
    lines: list[str] = []
    await transfer.transfer(source, pg_url, out=lines.append)
    assert any("marked as moved" in line for line in lines), lines
    store = open_store(source, RULES, replica="old-node")
    with pytest.raises(StoreError, match=r"was moved to postgresql://127\.0\.0\.1:5432/"):
        await store.open()
    cfg = config_dict(tmp_path, "http://127.0.0.1:9/api/connexus")
    cfg["store"]["url"] = source
    with pytest.raises(ConfigError, match=r"store\.url: .* was moved to postgresql"):
        load_usable(write_config(tmp_path / "old.yaml", cfg))
    with pytest.raises(StoreError, match="was moved"):
        await transfer.transfer(source, pg_url, force=True, out=lines.append)
    os.remove(f"{db}.moved")
    store = open_store(source, RULES, replica="old-node")
    await store.open()
    await store.close()


async def test_a_filled_target_is_refused_before_its_schema_is_touched(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """A target that holds rows, at an older schema version (a live store), is refused with
    its schema as it was: upgrading it takes exclusive locks under a running gateway."""
    source = f"sqlite:///{tmp_path / 'bc-proxy.db'}"
    await _single_node_install(source)
    conn = await asyncpg.connect(pg_url, timeout=3)
    try:
        await conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at float8 NOT NULL)"
        )
        for version, sql in enumerate(pg_schema.MIGRATIONS[:2], 1):
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", version)
        await conn.execute(
            "INSERT INTO sends (tenant, legacy_id, recipient, state, upstream_ref, created_at) "
            "VALUES ('acme', 'L0', '6421000001', 'accepted', 'live-1', 1)"
        )
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="not empty"):
        await transfer.transfer(source, pg_url, out=lambda line: None)
    assert await pg.execute(pg_url, "SELECT max(version) FROM schema_version") == 2
