"""The two real legacy clients' exact send shapes reach Connexus as one bearer-auth sms/out."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from tests.conftest import (
    CLIENT_SECRET,
    LEGACY_PASSWORD,
    LEGACY_USER,
    Connexus,
    GatewayFactory,
)


def _assert_upstream(connexus: Connexus, to: str, body: str) -> None:
    reqs = connexus.emu.sms_out_requests()
    assert len(reqs) == 1
    req = reqs[0]
    assert req.headers["Authorization"].startswith("Bearer wst_")
    form = parse_qs(req.body.decode(), keep_blank_values=True)
    assert form["to"] == [to]
    assert form["body"] == [body]
    raw = req.body.decode() + str(req.headers)
    for secret in (LEGACY_USER, LEGACY_PASSWORD, CLIENT_SECRET):
        assert secret not in raw
    assert "userId" not in form
    assert "password" not in form


async def test_php_library_form_post(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """spronkey/bulletinlibs: a form POST with to, body, messageId, userId, password -> 204."""
    client = await gateway(cfg)
    body = (
        "to=6421000000&body=Hello+%26+welcome+%3D+%C3%BC&messageId=abc-123"
        f"&userId={LEGACY_USER}&password={LEGACY_PASSWORD}"
    )
    resp = await client.post(
        "/api/1/sms/out",
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "*/*; q=0.5, text/plain; q=0.8, text/html;level=3;q=0.9, "
            "application/x-www-form-urlencoded",
            "User-Agent": "Httpful/0.1.7 (cURL/7.88 PHP/8.2)",
        },
    )
    assert resp.status == 204
    assert await resp.read() == b""
    _assert_upstream(connexus, "6421000000", "Hello & welcome = ü")


async def test_groovy_service_query_only_post(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """REANNZ SMSDeliveryService: POST, everything in the query, empty body, no Content-Type."""
    client = await gateway(cfg)
    query = (
        f"userId={LEGACY_USER}&password={LEGACY_PASSWORD}&to=64211234567"
        "&body=Your+VHR+%27SMS+Code%27+to+reset+your+lost+password+is%3A+123456"
    )
    resp = await client.post(
        f"/api/1/sms/out?{query}",
        headers={"Accept": "*/*", "Content-Length": "0"},
        skip_auto_headers=["Content-Type"],
    )
    assert resp.status == 204
    assert await resp.read() == b""
    _assert_upstream(
        connexus, "64211234567", "Your VHR 'SMS Code' to reset your lost password is: 123456"
    )
