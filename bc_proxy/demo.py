"""`bc-proxy demo`: the Connexus emulator and the gateway on loopback, for a first look.

Owns the demo tenant, wiring the emulator's webhooks to the gateway, a reply and a delivery
report for every demo send, and the curl commands it prints. Runs until cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

from aiohttp import web

from bc_proxy import log
from bc_proxy.app import create_app
from bc_proxy.config import parse
from bc_proxy.connexus.emulator import Emulator, create_emulator_app

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"
DEMO_SECRET = "demo-webhook-secret"


def demo_settings(port: int, emulator_port: int, db: Path) -> dict[str, object]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_seconds": 3},
        "upstream": {
            "base_url": f"http://127.0.0.1:{emulator_port}/api/connexus",
            "timeout_seconds": 5,
            "mo_query_interval_seconds": 60,
        },
        "store": {"url": f"sqlite:///{db}"},
        "webhook": {"secret": DEMO_SECRET},
        "log": {"format": "console"},
        "tenants": [
            {
                "name": "demo",
                "legacy": {"user_id": DEMO_USER, "password": DEMO_PASSWORD},
                "connexus": {"client_id": "cid_demo", "client_secret": "csk_demo"},
                "default_from": "552",
                "senders": ["552"],
                "poll_wait_seconds": 10,
            }
        ],
    }


def instructions(port: int, emulator_port: int) -> str:
    base = f"http://127.0.0.1:{port}/api/1/sms"
    cred = f"userId={DEMO_USER}&password={DEMO_PASSWORD}"
    return f"""
bc-proxy demo is running (Ctrl-C stops it).
  gateway : http://127.0.0.1:{port}   (metrics: /metrics, health: /healthz /readyz)
  emulator: http://127.0.0.1:{emulator_port}/api/connexus   (sent messages: /_emulator/sent)

Send an SMS the way a legacy client does (expect HTTP 204):
  curl -i -X POST {base}/out -d 'userId={DEMO_USER}' -d 'password={DEMO_PASSWORD}' \\
       -d 'to=6421000001' -d 'body=Hello from bc-proxy' -d 'messageId=demo-1'

The emulator then delivers it, and the handset replies. Fetch both, one record per call:
  curl -i '{base}/status?{cred}'     # statusCode=RCV&inReplyToId=demo-1 ...
  curl -i '{base}/in?{cred}'         # body=Yes%2C+got+it%3A+...&inReplyToId=demo-1
  curl -i '{base}/queue?{cred}'      # inCount=0&statusCount=0
"""


async def _reply_to_sends(emu: Emulator) -> None:
    """For every message the emulator accepted: fire a reply from the handset."""
    done = 0
    while True:
        await asyncio.sleep(0.2)
        while done < len(emu.sent):
            msg = emu.sent[done]
            done += 1
            if msg.accepted:
                await asyncio.sleep(0.3)
                await emu.fire_mo(msg.to, msg.sender, f"Yes, got it: {msg.body[:40]}")


async def run_demo(port: int, emulator_port: int, data_dir: str | None) -> None:
    """Run the emulator and the gateway until cancelled."""
    with contextlib.ExitStack() as stack:
        folder = (
            Path(data_dir) if data_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        settings = parse(demo_settings(port, emulator_port, folder / "demo.db"))
        log.setup("info", "console", [DEMO_SECRET, DEMO_PASSWORD, "csk_demo"])
        emu = Emulator(token_ttl=3600)
        emu.auto_dlr = 1
        emu.webhook_url = f"http://127.0.0.1:{port}/webhooks/connexus/{DEMO_SECRET}"
        emu_runner = web.AppRunner(create_emulator_app(emu), access_log=None)
        gw_runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=3)
        await emu_runner.setup()
        await web.TCPSite(emu_runner, "127.0.0.1", emulator_port).start()
        await gw_runner.setup()
        await web.TCPSite(gw_runner, "127.0.0.1", port).start()
        print(instructions(port, emulator_port), flush=True)
        replies = asyncio.create_task(_reply_to_sends(emu))
        try:
            await asyncio.Event().wait()
        finally:
            replies.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replies
            await gw_runner.cleanup()
            await emu_runner.cleanup()
