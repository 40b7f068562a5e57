"""The modern passthrough forwards an allowlist of a tenant's own Connexus calls with the
gateway's auth: credentials checked and stripped, the answer streamed back unchanged."""

from __future__ import annotations

import base64
import copy
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest

from bc_proxy.metrics import Metrics
from bc_proxy.passthrough import metric_path, strip_credentials
from tests.conftest import LEGACY_PASSWORD, LEGACY_USER, Connexus, GatewayFactory

OTHER_USER = "globex-legacy"
OTHER_PASSWORD = "globex-legacy-pass"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


BASIC = {"Authorization": _basic(LEGACY_USER, LEGACY_PASSWORD)}


def two_tenants(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` plus tenant `globex` on its own Connexus account (cid_other)."""
    out = copy.deepcopy(cfg)
    other = copy.deepcopy(out["tenants"][0])
    other.update(
        name="globex",
        legacy={"user_id": OTHER_USER, "password": OTHER_PASSWORD},
        connexus={"client_id": "cid_other", "client_secret": "csk_other"},
        senders=["3000"],
    )
    out["tenants"].append(other)
    return out


@pytest.mark.parametrize("path", ["configure", "auth/token", "sms/out", "configure/"])
async def test_off_allowlist_is_404_without_upstream(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], path: str
) -> None:
    """configure, auth/token and any other path off the allowlist are 404, never forwarded."""
    client = await gateway(cfg)
    for method in ("GET", "POST"):
        resp = await client.request(
            method, f"/api/connexus/{path}", headers=BASIC, json={"webhook_url": "https://evil"}
        )
        assert resp.status == 404
    assert connexus.emu.requests == []
    assert connexus.emu.webhook_url is None


async def test_balance_is_the_tenants_own_with_bearer_and_no_legacy_credentials(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """sms/balance answers each tenant's own balance; upstream sees a bearer, no legacy creds."""
    connexus.emu.balances = {"cid_demo": "11.00", "cid_other": "22.00"}
    client = await gateway(two_tenants(cfg))
    resp = await client.post("/api/connexus/sms/balance", headers=BASIC)
    assert resp.status == 200
    assert (await resp.json())["balance"] == "11.00"
    resp = await client.post(
        "/api/connexus/sms/balance", headers={"Authorization": _basic(OTHER_USER, OTHER_PASSWORD)}
    )
    assert (await resp.json())["balance"] == "22.00"
    balances = [r for r in connexus.emu.requests if r.path.endswith("/sms/balance")]
    assert len(balances) == 2
    for upstream, account in zip(balances, ("cid_demo", "cid_other"), strict=True):
        scheme, _, token = upstream.headers["Authorization"].partition(" ")
        assert scheme == "Bearer"
        assert connexus.emu.token_account(token) == account  # the tenant's own token
        raw = str(upstream.headers) + upstream.body.decode()
        for secret in (LEGACY_USER, LEGACY_PASSWORD, OTHER_USER, OTHER_PASSWORD):
            assert secret not in raw


async def test_query_and_form_credentials_are_stripped(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Credentials in the query string or the form body authenticate and never go upstream."""
    client = await gateway(cfg)
    resp = await client.post(
        f"/api/connexus/mo/query?userId={LEGACY_USER}&password={LEGACY_PASSWORD}&limit=5"
    )
    assert resp.status == 200
    assert (await resp.json())["pagination"]["limit"] == 5
    resp = await client.post(
        "/api/connexus/mo/query",
        data={"userId": LEGACY_USER, "password": LEGACY_PASSWORD, "limit": "7", "to": "552"},
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["pagination"]["limit"] == 7
    assert body["filters"]["to"] == "552"
    for upstream in connexus.emu.requests:
        assert "userId" not in upstream.path
        form = parse_qs(upstream.body.decode())
        assert "userId" not in form
        assert "password" not in form
        assert LEGACY_PASSWORD not in str(upstream.headers) + upstream.body.decode()


async def test_answer_streams_back_unchanged(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """An upstream error answer comes back with its own status, content type and body."""
    cfg["tenants"][0]["passthrough"] = ["sms/balance", "number/lookup"]
    client = await gateway(cfg)
    resp = await client.post("/api/connexus/number/lookup", headers=BASIC, data={"number": "1"})
    assert resp.status == 404  # the emulator has no number/lookup: its own 404 comes back
    assert resp.content_type == "application/json"
    assert await resp.json() == {"success": False, "error": "Not found"}
    assert connexus.emu.requests[-1].path == "/api/connexus/number/lookup"


async def test_allowlist_is_per_tenant(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A path one tenant allows is 404 for a tenant whose allowlist leaves it out."""
    config = two_tenants(cfg)
    config["tenants"][1]["passthrough"] = ["mo/query"]
    client = await gateway(config)
    other = {"Authorization": _basic(OTHER_USER, OTHER_PASSWORD)}
    assert (await client.post("/api/connexus/sms/balance", headers=other)).status == 404
    assert (await client.post("/api/connexus/sms/balance", headers=BASIC)).status == 200
    assert len(connexus.emu.requests) == 2  # the token fetch and acme's balance only


async def test_metric_per_path_and_status(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Requests are counted by allowlisted path (else `other`) and status."""
    metrics = Metrics(process=False)
    client = await gateway(cfg, metrics)
    await client.post("/api/connexus/sms/balance", headers=BASIC)
    await client.post("/api/connexus/auth/token", headers=BASIC)
    await client.post("/api/connexus/x/1234567890", headers=BASIC)

    def count(path: str, status: str) -> float:
        value = metrics.registry.get_sample_value(
            "bc_proxy_passthrough_requests_total", {"path": path, "status": status}
        )
        return value or 0.0

    assert count("sms/balance", "200") == 1
    assert count("other", "404") == 2


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


def test_strip_credentials_keeps_the_rest_byte_for_byte() -> None:
    """Only userId and password pairs (however encoded) leave; other pairs keep their bytes."""
    raw = "a=%41+b&userId=u&%70assword=p&to=%2B64&password&x="
    assert strip_credentials(raw) == "a=%41+b&to=%2B64&x="


def test_metric_path_is_bounded() -> None:
    """Paths off every allowlist share one label."""
    assert metric_path("sms/balance", ["sms/balance"]) == "sms/balance"
    assert metric_path("6421234567/x", ["sms/balance"]) == "other"


async def test_json_credentials_are_stripped_and_multipart_refused(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Legacy credentials inside a JSON body never go upstream; multipart bodies are refused."""
    client = await gateway(cfg)
    resp = await client.post(
        "/api/connexus/mo/query",
        headers=BASIC,
        json={"userId": LEGACY_USER, "password": LEGACY_PASSWORD, "limit": 3},
    )
    assert resp.status == 200
    assert (await resp.json())["pagination"]["limit"] == 3
    upstream = connexus.emu.requests[-1]
    assert LEGACY_PASSWORD not in upstream.body.decode()
    form = aiohttp.FormData({"password": LEGACY_PASSWORD, "limit": "3"})
    form.add_field("file", b"x", filename="x.txt")
    count = len(connexus.emu.requests)
    resp = await client.post("/api/connexus/mo/query", headers=BASIC, data=form)
    assert resp.status == 400
    assert len(connexus.emu.requests) == count
