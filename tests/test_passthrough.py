"""The modern passthrough forwards a tenant's own Connexus calls with the gateway's auth."""

from __future__ import annotations

import base64
from typing import Any

from tests.conftest import LEGACY_PASSWORD, LEGACY_USER, Connexus, GatewayFactory


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_balance_through_passthrough(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A Basic-authenticated call reaches Connexus with a bearer token and no legacy creds."""
    client = await gateway(cfg)
    resp = await client.post(
        "/api/connexus/sms/balance", headers={"Authorization": _basic(LEGACY_USER, LEGACY_PASSWORD)}
    )
    assert resp.status == 200
    assert (await resp.json())["currency"] == "NZD"
    upstream = connexus.emu.requests[-1]
    assert upstream.path.endswith("/sms/balance")
    assert upstream.headers["Authorization"].startswith("Bearer wst_")
    assert LEGACY_PASSWORD not in str(upstream.headers)


async def test_passthrough_rejects_wrong_credentials(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Wrong legacy credentials get 401 and nothing is forwarded."""
    client = await gateway(cfg)
    resp = await client.post(
        "/api/connexus/sms/balance", headers={"Authorization": _basic(LEGACY_USER, "nope")}
    )
    assert resp.status == 401
    assert connexus.emu.requests == []
