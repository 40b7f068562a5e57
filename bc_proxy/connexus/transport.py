"""How requests reach Connexus: the aiohttp session for every call, the wire pool for sms/out.

Owns the TLS context both use (system roots or SSL_CERT_FILE, certificate and host name
verified), the proxy from the environment (read once at start; when one applies, sends go
through aiohttp too), timeouts, connection limits and keep-alive expiry, and which of the two
carries a request. Does not own auth, metrics or what an answer means (client.py).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping

from aiohttp import (
    BasicAuth,
    ClientSession,
    ClientTimeout,
    DummyCookieJar,
    TCPConnector,
    TraceConfig,
)
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from bc_proxy import __version__
from bc_proxy.connexus.outcomes import Exchange, headers_sent
from bc_proxy.connexus.wire import WirePool, wire_capable
from bc_proxy.log import REQUEST_ID

Proxy = tuple[URL, BasicAuth | None]


def env_proxy(url: URL) -> Proxy | None:
    """The proxy the environment sets for `url` (HTTP(S)_PROXY, NO_PROXY; aiohttp's rules and
    its trust_env lookup, done once), or None. Blocking (reads ~/.netrc): call in a thread."""
    try:
        return get_env_proxy_for_url(url)
    except LookupError:
        return None


def client_tls() -> ssl.SSLContext:
    """Verified TLS for Connexus (system roots; SSL_CERT_FILE/SSL_CERT_DIR when set)."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Upstream:
    """The two clients to one Connexus base URL: aiohttp for everything, the wire for sends.

    Each holds at most `max_connections` connections, so the process holds at most twice
    that to Connexus (sends on one pool, token/mo-query/configure/passthrough on the other).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_connections: int,
        keepalive: float,
        wire: bool = True,
    ) -> None:
        self.base = base_url
        self.timeout = timeout
        self.url_out = URL(f"{base_url}/sms/out")  # parsed once: the send path's URL object
        self._max_conn = max_connections
        self._keepalive = keepalive
        self._want_wire = wire
        self._session: ClientSession | None = None
        self._wire: WirePool | None = None
        self.proxy: Proxy | None = None

    @property
    def session(self) -> ClientSession:
        if self._session is None:
            raise RuntimeError("ConnexusClient.start() was not awaited")
        return self._session

    @property
    def wire(self) -> WirePool | None:
        """The sms/out pool, or None when sends go through aiohttp (proxy, switched off)."""
        return self._wire

    async def start(self) -> None:
        tls = await asyncio.to_thread(client_tls)
        self.proxy = await asyncio.to_thread(env_proxy, self.url_out)
        trace = TraceConfig()
        trace.on_request_headers_sent.append(headers_sent)
        connect = min(self.timeout, 5.0)
        self._session = ClientSession(
            connector=TCPConnector(
                limit=self._max_conn,
                limit_per_host=self._max_conn,
                ttl_dns_cache=300,
                keepalive_timeout=self._keepalive,
                ssl=tls,
            ),
            timeout=ClientTimeout(total=self.timeout, connect=connect),
            raise_for_status=False,
            auto_decompress=True,
            # Connexus sets no cookies we need; a real jar costs a lookup on every request.
            cookie_jar=DummyCookieJar(),
            trace_configs=[trace],
            proxy=self.proxy[0] if self.proxy else None,
            proxy_auth=self.proxy[1] if self.proxy else None,
        )
        if self._want_wire and self.proxy is None and wire_capable(self.url_out):
            self._wire = WirePool(
                self.url_out,
                limit=self._max_conn,
                timeout=self.timeout,
                connect_timeout=connect,
                keepalive=self._keepalive,
                ssl_context=tls,
                user_agent=f"bc-proxy/{__version__}",
            )

    async def close(self) -> None:
        if self._wire is not None:
            await self._wire.close()
            self._wire = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str | URL,
        data: bytes | None,
        headers: Mapping[str, str],
        token: str | None = None,
        exchange: Exchange | None = None,
    ) -> tuple[int, bytes, str]:
        """One request, the bearer `token` and this request's X-Request-Id added: (status,
        body, content type). `exchange` (sends): tracks whether it was written; redirects are
        not followed. A POST of `url_out` with an exchange goes by the wire when there is one."""
        rid = REQUEST_ID.get()  # the legacy request's id, so Connexus support can find the call
        wire = self._wire
        if exchange is not None and wire is not None and url is self.url_out and method == "POST":
            answer = await wire.post(headers["Content-Type"], data or b"", exchange, token, rid)
            return answer.status, answer.body, answer.content_type
        if token is not None or rid is not None:
            headers = dict(headers)
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            if rid is not None:
                headers["X-Request-Id"] = rid
        if exchange is None:
            async with self.session.request(method, url, data=data, headers=headers) as resp:
                return resp.status, await resp.read(), resp.headers.get("Content-Type", "")
        # A send: aiohttp never retries a POST itself (not idempotent); a redirect would be one.
        async with self.session.request(
            method,
            url,
            data=data,
            headers=headers,
            allow_redirects=False,
            trace_request_ctx=exchange,
        ) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "")
