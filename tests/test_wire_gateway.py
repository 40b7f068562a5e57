"""The send path's own client inside the real gateway: TLS to the emulator with the certificate
verified (trusted through SSL_CERT_FILE, refused when untrusted or for another host name),
proxies from the environment (sends then go through aiohttp and the proxy; NO_PROXY keeps the
direct wire), and a garbled answer giving the legacy 500 with a clear reason, state unknown."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from aiohttp import web

from bc_proxy import keys
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.metrics import Metrics
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    config_dict,
    creds,
    with_tenant,
)
from tests.sendcalls import post, quiet, sample, send_rows
from tests.served import free_port
from tests.test_tls import make_cert
from tests.test_wire import raw_peer

PASSWORD_TENANT = {"user_id": "demo@example.org", "password": "demo-password"}
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variables and no SSL_CERT_FILE/DIR from the machine running the tests."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return monkeypatch


async def tls_emulator(
    aiohttp_server: AiohttpServer, tmp_path: Path, host: str = "127.0.0.1"
) -> tuple[Connexus, Path]:
    """The emulator served over https with a certificate for 127.0.0.1 and localhost."""
    cert, key = make_cert(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET})
    server = await aiohttp_server(create_emulator_app(emu), host=host, ssl=served)
    return Connexus(emu, server), cert


def wire_connections(client: GatewayClient) -> int | None:
    """Connections the send path's own client holds (None: sends go through aiohttp)."""
    wire = client.app[keys.CLIENT].upstream.wire
    return None if wire is None else wire.open_connections


async def test_send_over_verified_tls_to_the_emulator(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
) -> None:
    """With the emulator's certificate trusted (SSL_CERT_FILE), sends go over https on the
    wire client's one kept-alive connection and are accepted."""
    connexus, cert = await tls_emulator(aiohttp_server, tmp_path)
    assert connexus.base_url.startswith("https://")
    clean_env.setenv("SSL_CERT_FILE", str(cert))
    client = await gateway(quiet(config_dict(tmp_path, connexus.base_url)))
    for i in range(3):
        params = creds(to=f"642100070{i}", body="over tls", messageId=f"tls-{i}")
        assert await post(client, params) == (204, "")
    assert [s.to for s in connexus.emu.sent] == ["6421000700", "6421000701", "6421000702"]
    assert wire_connections(client) == 1


@pytest.mark.parametrize("case", ["untrusted", "other_host"])
async def test_tls_certificate_not_accepted_is_rejected(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    case: str,
) -> None:
    """A certificate nobody vouches for, or a trusted one for another host (served on
    127.0.0.2), is refused before anything is written: legacy 500, row rejected, not sent."""
    host = "127.0.0.2" if case == "other_host" else "127.0.0.1"
    connexus, cert = await tls_emulator(aiohttp_server, tmp_path, host)
    if case == "other_host":
        clean_env.setenv("SSL_CERT_FILE", str(cert))
    metrics = Metrics(process=False)
    cfg = with_tenant(quiet(config_dict(tmp_path, connexus.base_url)), connexus=PASSWORD_TENANT)
    client = await gateway(cfg, metrics)
    status, text = await post(client, creds(to="6421000710", body="x", messageId="bad-tls"))
    assert (status, text) == (500, "Connexus unreachable (UpstreamConnectError)\n")
    assert send_rows(tmp_path / "bc-proxy.db") == [("6421000710", "bad-tls", "rejected")]
    assert connexus.emu.sent == []
    assert sample(metrics, "bc_proxy_upstream_requests_total", operation="sms_out", status="error")


class ProxyStub:
    """A forward proxy that answers as Connexus itself, recording each request target."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    def app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.targets.append(f"{request.method} {request.url}")
            if request.path.endswith("/auth/token"):
                return web.json_response({"access_token": "via-proxy", "expires_in": 3600})
            return web.json_response({"success": True, "message_id": "p-1"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


async def test_proxy_from_the_environment_carries_sends(
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
) -> None:
    """http_proxy set: sends go through aiohttp and the proxy (the upstream address itself
    refuses connections), the wire client is not used."""
    stub = ProxyStub()
    proxy = await aiohttp_server(stub.app(), host="127.0.0.1")
    clean_env.setenv("http_proxy", str(proxy.make_url("")))
    upstream = f"http://127.0.0.1:{free_port()}/api/connexus"  # nothing listens: only the proxy
    client = await gateway(quiet(config_dict(tmp_path, upstream)))
    assert await post(client, creds(to="6421000720", body="proxied")) == (204, "")
    assert wire_connections(client) is None
    assert f"POST {upstream}/sms/out" in stub.targets
    assert send_rows(tmp_path / "bc-proxy.db")[0][2] == "accepted"


async def test_no_proxy_keeps_the_direct_wire(
    aiohttp_server: AiohttpServer,
    connexus: Connexus,
    gateway: GatewayFactory,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
) -> None:
    """http_proxy set but NO_PROXY naming the upstream host: sends go directly, by the wire."""
    stub = ProxyStub()
    proxy = await aiohttp_server(stub.app(), host="127.0.0.1")
    clean_env.setenv("http_proxy", str(proxy.make_url("")))
    clean_env.setenv("no_proxy", "localhost,127.0.0.1")
    client = await gateway(quiet(config_dict(tmp_path, connexus.base_url)))
    assert await post(client, creds(to="6421000730", body="direct")) == (204, "")
    assert wire_connections(client) == 1
    assert stub.targets == []
    assert [s.to for s in connexus.emu.sent] == ["6421000730"]


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 2OO OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{"],
    ids=["bad_status_line", "oversized"],
)
async def test_garbled_answer_is_the_legacy_500_and_unknown(
    gateway: GatewayFactory, tmp_path: Path, clean_env: pytest.MonkeyPatch, garbage: bytes
) -> None:
    """A malformed or oversized answer to a written send: the legacy 500 naming the failure
    (no crash), state unknown, metric status error; the legacy retry is not sent again."""

    async def script(request: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(garbage)
        await w.drain()
        return True

    async with raw_peer(script) as (port, seen):
        metrics = Metrics(process=False)
        cfg = quiet(config_dict(tmp_path, f"http://127.0.0.1:{port}/api/connexus"))
        client = await gateway(with_tenant(cfg, connexus=PASSWORD_TENANT), metrics)
        params = creds(to="6421000740", body="garbled", messageId="g-1")
        status, text = await post(client, params)
        assert status == 500
        assert text == "Connexus unreachable (UpstreamBadAnswer); outcome unknown, not re-sent\n"
        assert send_rows(tmp_path / "bc-proxy.db") == [("6421000740", "g-1", "unknown")]
        up = "bc_proxy_upstream_requests_total"
        assert sample(metrics, up, operation="sms_out", status="error") == 1
        assert await post(client, params) == (204, "")  # unknown_retry_status: not re-sent
        assert len(seen) == 1
