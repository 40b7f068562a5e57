"""Push delivery: in order per message, and nothing lost or settled for a removed tenant.

Real push receivers (aiohttp servers on 127.0.0.1) behind the real gateway and SQLite file;
delivery reports come through the webhook from the real emulator's sends.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import random
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from bc_proxy.config import PushSettings
from bc_proxy.delivery import next_delay
from bc_proxy.metrics import Metrics
from tests.conftest import (
    WEBHOOK_SECRET,
    AiohttpServer,
    Connexus,
    GatewayFactory,
    creds,
)

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
HANDSET = "6421000111"


@dataclass
class Receiver:
    """A legacy push endpoint: answers the scripted statuses first, then `default`."""

    script: list[int] = field(default_factory=list)
    default: int = 200
    hits: list[tuple[str, dict[str, str], int]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        status = self.script.pop(0) if self.script else self.default
        self.hits.append((request.path, form, status))
        return web.Response(status=status)


async def start_receiver(aiohttp_server: AiohttpServer, receiver: Receiver) -> Receiver:
    app = web.Application()
    app.router.add_post("/sms-in", receiver.handle)
    app.router.add_post("/sms-status", receiver.handle)
    receiver.url = str((await aiohttp_server(app, host="127.0.0.1")).make_url("/"))
    return receiver


def push(receiver: Receiver) -> dict[str, Any]:
    return {
        "incoming_url": receiver.url + "sms-in",
        "status_url": receiver.url + "sms-status",
        "retry_initial_seconds": 0.3,
        "retry_max_seconds": 0.3,
    }


async def eventually(cond: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_rcv_never_pushed_before_snt(
    connexus: Connexus,
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
) -> None:
    """With the first SNT push failing, the RCV of the same message waits for SNT's delivery."""
    receiver = await start_receiver(aiohttp_server, Receiver(script=[500]))
    config = copy.deepcopy(cfg)
    config["tenants"][0]["push"] = push(receiver)
    client = await gateway(config)
    async with client.post(
        "/api/1/sms/out", data=creds(to=HANDSET, body="x", messageId="order-1")
    ) as resp:
        assert resp.status == 204
    sent = connexus.emu.sent[-1]
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    await connexus.emu.report(sent, 8)  # SNT
    await connexus.emu.report(sent, 1)  # RCV, at once
    await eventually(lambda: any(h[2] == 200 and "RCV" in h[1].values() for h in receiver.hits),
                     10, "RCV delivered")  # fmt: skip
    codes = [(h[1]["statusCode"], h[2]) for h in receiver.hits]
    assert codes == [("SNT", 500), ("SNT", 200), ("RCV", 200)]
    assert {h[1]["inReplyToId"] for h in receiver.hits} == {"order-1"}


async def test_removed_tenant_records_kept_not_pushed(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    log_stream: io.StringIO,
) -> None:
    """A removed tenant's pending pushes are neither pushed nor marked done, and are counted."""
    receiver = await start_receiver(aiohttp_server, Receiver(default=500))
    config = copy.deepcopy(cfg)
    config["tenants"][0]["push"] = push(receiver)  # the push worker runs after the restart too
    config["tenants"].append(
        {
            "name": "globex",
            "legacy": {"user_id": "globex-legacy", "password": "globex-legacy-pass"},
            "connexus": {"client_id": "cid_other", "client_secret": "csk_other"},
            "senders": ["3000"],
            "poll_wait_seconds": 0,
            "push": push(receiver),
        }
    )
    client = await gateway(config)
    for i in range(3):
        payload = {"type": "mo", "messageId": f"g{i}", "from": HANDSET, "to": "3000", "body": "x"}
        async with client.post(HOOK, json=payload) as resp:
            assert resp.status == 200
    await eventually(lambda: len(receiver.hits) >= 3, 5, "first attempts")
    await client.close()

    receiver.default = 200
    hits_before = len(receiver.hits)
    metrics = Metrics(CollectorRegistry(), process=False)
    remaining = copy.deepcopy(config)
    del remaining["tenants"][1]  # globex removed
    client = await gateway(remaining, metrics)
    gauge = "bc_proxy_records_unconfigured_tenant"
    await eventually(
        lambda: metrics.registry.get_sample_value(gauge, {"tenant": "globex"}) == 3, 5, "gauge"
    )
    await asyncio.sleep(1.0)  # several push-worker cycles and retry delays
    assert len(receiver.hits) == hits_before
    path = cfg["store"]["url"][len("sqlite:///") :]
    with sqlite3.connect(path) as db:
        pending = db.execute(
            "SELECT count(*) FROM records WHERE tenant = 'globex' AND push_due IS NOT NULL"
        ).fetchone()[0]
    assert pending == 3
    lines = [json.loads(x) for x in log_stream.getvalue().splitlines() if x.startswith("{")]
    logged = [x for x in lines if x.get("event") == "records_of_unconfigured_tenant"]
    assert [(x["tenant"], x["records"]) for x in logged] == [("globex", 3)]


def test_push_backoff_doubles_from_initial_to_max_with_jitter() -> None:
    """Push retries back off exponentially (design.md section 5): the delay after n failures
    lies in [c/2, c] with c = initial * 2**(n-1), capped at retry_max_seconds."""
    push = PushSettings(
        incoming_url="http://127.0.0.1:9/in", retry_initial_seconds=5, retry_max_seconds=900
    )
    rng = random.Random(0)
    for attempts, ceiling in [(1, 5), (2, 10), (3, 20), (5, 80), (8, 640), (9, 900), (30, 900)]:
        delays = [next_delay(attempts, push, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempts, min(delays))
        assert max(delays) > ceiling * 0.9  # jitter spans the range, not a constant
