"""Helpers for the send-path tests: legacy calls, status records, send rows and metrics.

Shared by test_idempotency.py and test_send_failures.py (gateway and emulator on loopback).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from bc_proxy.metrics import Metrics
from tests.conftest import GatewayClient, creds

OUT = "/api/1/sms/out"
STATUS = "/api/1/sms/status"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def quiet(cfg: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    """`cfg` with the missed-webhook sweep off and these upstream settings."""
    cfg["upstream"].update({"mo_query_interval_seconds": 0, **upstream})
    return cfg


async def post(client: GatewayClient, params: dict[str, str]) -> tuple[int, str]:
    """A legacy send as a form POST: (status, body)."""
    async with client.post(OUT, data=urlencode(params), headers=FORM) as resp:
        return resp.status, await resp.text()


async def status_records(client: GatewayClient) -> list[dict[str, str]]:
    """Every status record waiting (poll_wait_seconds must be 0)."""
    out: list[dict[str, str]] = []
    while True:
        async with client.get(STATUS, params=creds()) as resp:
            if resp.status == 204:
                return out
            parsed = parse_qs(await resp.text(), keep_blank_values=True)
        out.append({k: v[0] for k, v in parsed.items()})


def send_rows(db: Path) -> list[tuple[str, str | None, str]]:
    """(recipient, legacy_id, state) of every sends row, oldest first."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT recipient, legacy_id, state FROM sends ORDER BY id").fetchall()
    return [(str(r[0]), r[1], str(r[2])) for r in rows]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A metric sample's value (0 when absent)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
