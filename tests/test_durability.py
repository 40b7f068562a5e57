"""SIGKILL in the middle of a webhook storm loses no acknowledged webhook.

The gateway runs as a real `bc-proxy serve` subprocess on a SQLite file; the Connexus emulator
runs in-process. Webhooks are posted with 100 in flight, the gateway is killed with SIGKILL
once about 2,000 have been answered, restarted on the same file, and drained by polling.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from tests.conftest import (
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    Connexus,
    config_dict,
    creds,
)
from tests.served import Served, free_port

RECIPIENTS = 2500  # one legacy send; two delivery reports each -> 5,000 webhooks
KILL_AFTER = 2000  # webhooks answered 200 before the SIGKILL
IN_FLIGHT = 100
LEGACY_ID = "storm-1700000000.1234"
STATUS_OF = {4: "SNT", 1: "RCV"}

@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession(
        connector=TCPConnector(limit=IN_FLIGHT), timeout=ClientTimeout(total=10)
    ) as s:
        yield s


def write_config(tmp_path: Path, connexus: Connexus, port: int) -> Path:
    config = config_dict(tmp_path, connexus.base_url, port=port, shutdown_timeout_seconds=2)
    config["upstream"]["mo_query_interval_seconds"] = 0
    config["upstream"]["timeout_seconds"] = 10
    config["log"] = {"level": "warning", "requests": False}
    path = tmp_path / "bc-proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def drain(session: ClientSession, base: str) -> list[dict[str, str]]:
    """Poll /sms/status until 204, one request at a time like a legacy client."""
    records: list[dict[str, str]] = []
    params = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
    async with asyncio.timeout(30):
        while True:
            async with session.get(base + "/api/1/sms/status", params=params) as resp:
                body = await resp.read()
                if resp.status == 204:
                    assert body == b""
                    return records
                assert resp.status == 200, body
            parsed = parse_qs(body.decode(), keep_blank_values=True)
            records.append({k: v[0] for k, v in parsed.items()})


async def test_sigkill_mid_storm_loses_no_acknowledged_webhook(
    connexus: Connexus, session: ClientSession, tmp_path: Path
) -> None:
    """Every webhook answered 200 before a SIGKILL is pollable after restart, each once."""
    started = time.monotonic()
    port = free_port()
    config_file = write_config(tmp_path, connexus, port)
    with (tmp_path / "gateway.log").open("w") as log:
        gw = Served(config_file, port, log)
        try:
            await run_storm(connexus, session, gw)
        finally:
            if gw.proc is not None and gw.proc.returncode is None:
                gw.proc.kill()
                await gw.proc.wait()
    assert time.monotonic() - started < 60


async def run_storm(connexus: Connexus, session: ClientSession, gw: Served) -> None:
    await gw.start(session)
    handsets = [f"6421{i:07d}" for i in range(RECIPIENTS)]
    form = creds(to=",".join(handsets), body="storm", messageId=LEGACY_ID)
    async with session.post(gw.base + "/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    by_id = {m.message_id: m.to for m in connexus.emu.sent if m.accepted}
    assert sorted(by_id.values()) == handsets

    events = [(mid, code) for code in STATUS_OF for mid in by_id]  # 4 for all, then 1
    todo = iter(events)
    acked: set[tuple[str, int]] = set()
    failed: set[tuple[str, int]] = set()
    killed_at: float | None = None
    hook = f"{gw.base}/webhooks/connexus/{WEBHOOK_SECRET}"

    async def worker() -> None:
        nonlocal killed_at
        for mid, code in todo:
            if killed_at is not None:
                return
            payload = {"type": "dlr", "messageId": mid, "statusCode": code, "status": "X"}
            try:
                async with session.post(hook, json=payload) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (ClientError, TimeoutError):
                ok = False
            if not ok:
                failed.add((mid, code))
                continue
            acked.add((mid, code))
            if len(acked) >= KILL_AFTER and killed_at is None:
                killed_at = time.monotonic()
                gw.signal(signal.SIGKILL)

    storm_started = time.monotonic()
    async with asyncio.timeout(30):
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    assert gw.proc is not None
    assert await asyncio.wait_for(gw.proc.wait(), 10) == -signal.SIGKILL
    assert killed_at is not None
    rate = len(acked) / (killed_at - storm_started)
    print(f"\ndurability: {len(acked)} acknowledged at {rate:.0f}/s, {len(failed)} in flight lost")
    assert KILL_AFTER <= len(acked) < len(events)

    await gw.start(session)
    records = await drain(session, gw.base)
    keys: list[tuple[str, int]] = []
    code_of = {v: k for k, v in STATUS_OF.items()}
    mid_of = {to: mid for mid, to in by_id.items()}
    for rec in records:
        assert set(rec) == {"messageId", "from", "to", "statusCode", "inReplyToId", "error"}
        assert rec["inReplyToId"] == LEGACY_ID
        assert rec["to"] == "552"
        keys.append((mid_of[rec["from"]], code_of[rec["statusCode"]]))
    polled = set(keys)
    lost = acked - polled
    assert not lost, f"{len(lost)} acknowledged webhooks lost, e.g. {sorted(lost)[:3]}"
    assert polled <= set(events)
    receipts = [r["messageId"] for r in records]
    dup_receipts = len(receipts) - len(set(receipts))
    print(f"durability: {len(records)} polled after restart, {dup_receipts} receipts repeated")
    # Each webhook is one record: a key never shows up under two different receipt ids.
    receipts_per_key: dict[tuple[str, int], set[str]] = {}
    for key, receipt in zip(keys, receipts, strict=True):
        receipts_per_key.setdefault(key, set()).add(receipt)
    assert all(len(r) == 1 for r in receipts_per_key.values())
    assert dup_receipts == 0, f"{dup_receipts} receipts handed out twice"

    # Connexus retries the ones it saw fail; acknowledged ones are not stored again.
    params = {"userId": LEGACY_USER, "password": LEGACY_PASSWORD}
    for mid, code in sorted(acked)[:50]:
        payload = {"type": "dlr", "messageId": mid, "statusCode": code, "status": "X"}
        async with session.post(hook, json=payload) as resp:
            assert resp.status == 200
    async with session.get(gw.base + "/api/1/sms/queue", params=params) as resp:
        assert await resp.read() == b"inCount=0&statusCount=0"
    assert await gw.stop() == 0
