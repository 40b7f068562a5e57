"""The send path's HTTP/1.1 client (bc_proxy.connexus.wire) against real loopback servers:
keep-alive reuse and expiry, the pool cap, connect and total timeouts, answer framings,
Connection: close, a server closing idle connections, and the `written` flag on each side of
the write (refused: never written; reset after the write: written, never retried)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from bc_proxy.connexus.outcomes import Exchange
from bc_proxy.connexus.wire import (
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamDisconnected,
    WirePool,
)
from tests.conftest import AiohttpServer
from tests.served import free_port

FORM = "application/x-www-form-urlencoded"
OK = {"success": True, "message_id": "cx-1"}


def pool(url: str | URL, **kw: Any) -> WirePool:
    """A WirePool with the test defaults (limit 4, timeout 2 s, connect 1 s, keep-alive 30 s)."""
    args: dict[str, Any] = dict(
        limit=4, timeout=2.0, connect_timeout=1.0, keepalive=30.0, ssl_context=None
    )
    args.update(kw)
    return WirePool(URL(str(url)), user_agent="bc-proxy/test", **args)


class Upstream:
    """An aiohttp sms/out server that counts requests, connections and concurrency."""

    def __init__(self) -> None:
        self.requests: list[tuple[CIMultiDict[str], bytes]] = []
        self.peers: set[Any] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.answer: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    def app(self) -> web.Application:
        async def sms_out(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            self.peers.add(request.transport.get_extra_info("peername"))
            self.requests.append((request.headers.copy(), await request.read()))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
                if self.answer is not None:
                    return await self.answer(request)
                return web.json_response(OK)
            finally:
                self.in_flight -= 1

        app = web.Application()
        app.router.add_post("/api/connexus/sms/out", sms_out)
        return app


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> tuple[Upstream, TestServer]:
    """An Upstream on a loopback aiohttp server."""
    up = Upstream()
    server = await aiohttp_server(up.app(), host="127.0.0.1")
    return up, server


def out_url(server: TestServer) -> URL:
    return server.make_url("/api/connexus/sms/out")


async def test_sequential_sends_reuse_one_connection(
    upstream: tuple[Upstream, TestServer],
) -> None:
    """Twenty sequential POSTs: one TCP connection, the constant headers, token and request id."""
    up, server = upstream
    p = pool(out_url(server))
    try:
        for i in range(20):
            ex = Exchange()
            answer = await p.post(FORM, b"to=1&body=x", ex, f"tok-{i % 2}", f"rid-{i}")
            assert (answer.status, json.loads(answer.body), ex.written) == (200, OK, True)
            assert answer.content_type.startswith("application/json")
        assert len(up.peers) == 1
        assert p.open_connections == 1
        headers, body = up.requests[-1]
        assert body == b"to=1&body=x"
        assert headers["Authorization"] == "Bearer tok-1"
        assert headers["X-Request-Id"] == "rid-19"
        assert headers["Content-Type"] == FORM
        assert headers["Host"] == f"127.0.0.1:{server.port}"
    finally:
        await p.close()


async def test_pool_cap_holds_under_concurrency(upstream: tuple[Upstream, TestServer]) -> None:
    """Twenty concurrent sends through a pool of three: never more than three connections or
    requests in flight, and every send answered."""
    up, server = upstream
    up.delay = 0.05
    p = pool(out_url(server), limit=3)
    try:
        answers = await asyncio.gather(*(p.post(FORM, b"x", Exchange()) for _ in range(20)))
        assert [a.status for a in answers] == [200] * 20
        assert up.max_in_flight == 3
        assert len(up.peers) == 3
        assert p.open_connections == 3
    finally:
        await p.close()


async def test_waiting_for_a_pooled_connection_times_out_unwritten(
    upstream: tuple[Upstream, TestServer],
) -> None:
    """With the one connection busy past the total timeout, the waiting send fails with
    TimeoutError and was never written."""
    up, server = upstream
    up.delay = 1.0
    p = pool(out_url(server), limit=1, timeout=0.3)
    try:
        until = asyncio.get_running_loop().time() + 5
        busy = asyncio.ensure_future(p.post(FORM, b"x", Exchange(), deadline=until))
        await asyncio.sleep(0.05)
        ex = Exchange()
        with pytest.raises(TimeoutError):
            await p.post(FORM, b"y", ex)
        assert not ex.written
        assert (await busy).status == 200
        assert len(up.requests) == 1
    finally:
        await p.close()


async def test_total_timeout_after_the_write_is_written(
    upstream: tuple[Upstream, TestServer],
) -> None:
    """An answer slower than the total timeout: TimeoutError in time, the exchange written,
    the connection dropped; the next send works on a new one."""
    up, server = upstream
    up.delay = 1.0
    p = pool(out_url(server), timeout=0.3)
    try:
        ex = Exchange()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await p.post(FORM, b"x", ex)
        assert loop.time() - started < 0.6
        assert ex.written
        up.delay = 0
        assert (await p.post(FORM, b"x", Exchange())).status == 200
        assert len(up.peers) == 2
    finally:
        await p.close()


async def test_connect_timeout_is_unwritten() -> None:
    """A TLS peer that accepts TCP and never answers the handshake: TimeoutError after the
    connect timeout (not the total), never written."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    p = pool(
        f"https://127.0.0.1:{port}/sms/out",
        timeout=5.0,
        connect_timeout=0.2,
        ssl_context=ssl.create_default_context(),
    )
    try:
        ex = Exchange()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await p.post(FORM, b"x", ex)
        assert loop.time() - started < 1.0
        assert not ex.written
        assert p.open_connections == 0
    finally:
        await p.close()
        silent.close()
        for w in held:
            w.close()
        await silent.wait_closed()


async def test_refused_connection_is_unwritten() -> None:
    """Nothing listening: UpstreamConnectError naming the address, never written, slot freed."""
    port = free_port()
    p = pool(f"http://127.0.0.1:{port}/sms/out")
    try:
        ex = Exchange()
        with pytest.raises(UpstreamConnectError, match=f"127.0.0.1:{port}"):
            await p.post(FORM, b"x", ex)
        assert not ex.written
        assert p.open_connections == 0
    finally:
        await p.close()


async def test_chunked_gzip_and_empty_answers(upstream: tuple[Upstream, TestServer]) -> None:
    """A chunked answer in several pieces, a gzip-encoded one and a bare 204 are read whole,
    all on one keep-alive connection."""
    up, server = upstream
    kinds = ["chunked", "gzip", "204"]

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = kinds.pop(0)
        if kind == "204":
            return web.Response(status=204)
        if kind == "gzip":
            body = gzip.compress(json.dumps(OK).encode())
            return web.Response(body=body, headers={"Content-Encoding": "gzip"})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for piece in (b'{"success": ', b"true, ", b'"message_id": "cx-1"}'):
            await resp.write(piece)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    up.answer = answer
    p = pool(out_url(server))
    try:
        assert json.loads((await p.post(FORM, b"x", Exchange())).body) == OK
        assert json.loads((await p.post(FORM, b"x", Exchange())).body) == OK
        assert (await p.post(FORM, b"x", Exchange())).body == b""
        assert len(up.peers) == 1
    finally:
        await p.close()


async def test_connection_close_answer_is_honoured(upstream: tuple[Upstream, TestServer]) -> None:
    """An answer with Connection: close is used, its connection is not reused, and the next
    send opens a new one without error."""
    up, server = upstream

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.json_response(OK)
        resp.force_close()
        return resp

    up.answer = answer
    p = pool(out_url(server))
    try:
        for _ in range(3):
            assert (await p.post(FORM, b"x", Exchange())).status == 200
        assert len(up.peers) == 3
        assert len(up.requests) == 3
    finally:
        await p.close()


async def test_server_closing_idle_connection_then_next_send_works(
    aiohttp_server: AiohttpServer,
) -> None:
    """The server closes the idle keep-alive connection (its keep-alive timeout); the next send
    sees it closed before writing, goes out once on a new connection, never twice."""
    up = Upstream()
    server = await aiohttp_server(up.app(), host="127.0.0.1", keepalive_timeout=0.1)
    p = pool(out_url(server))
    try:
        assert (await p.post(FORM, b"one", Exchange())).status == 200
        await asyncio.sleep(0.4)
        ex = Exchange()
        assert (await p.post(FORM, b"two", ex)).status == 200
        assert [body for _, body in up.requests] == [b"one", b"two"]
        assert len(up.peers) == 2
        assert p.open_connections == 1
    finally:
        await p.close()


async def test_idle_connection_past_keepalive_is_not_reused(
    upstream: tuple[Upstream, TestServer],
) -> None:
    """A connection idle longer than the client's keep-alive is closed, not reused."""
    up, server = upstream
    p = pool(out_url(server), keepalive=0.1)
    try:
        assert (await p.post(FORM, b"x", Exchange())).status == 200
        await asyncio.sleep(0.25)
        assert (await p.post(FORM, b"x", Exchange())).status == 200
        assert len(up.peers) == 2
        assert p.open_connections == 1
    finally:
        await p.close()


# -- raw peers: resets and malformed answers ---------------------------------------------------


Script = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


@contextlib.asynccontextmanager
async def raw_peer(script: Script) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback HTTP/1.1 peer: each request (head and Content-Length body) is recorded and
    answered by `script(request, writer)`, which says whether to keep reading."""
    seen: list[bytes] = []
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                seen.append(request)
                if not await script(request, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        for w in list(writers):
            w.transport.abort()  # the handlers see EOF and end
        await asyncio.sleep(0.01)
        await server.wait_closed()


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def answer_bytes(body: bytes = b'{"success":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.mark.parametrize(("said", "reused"), [(b"timeout=1", False), (b"timeout=5, max=100", True)])
async def test_an_idle_connection_is_not_reused_near_the_servers_keep_alive(
    said: bytes, reused: bool
) -> None:
    """The server says how long it keeps an idle connection (`Keep-Alive: timeout=N`, Apache
    sends 5): past that less a margin (1 s, or half of N), the next send takes a new
    connection instead of racing the server's close (written, then reset: outcome unknown,
    never re-sent). Within it, the connection is reused as before."""
    peers: set[object] = set()

    async def script(request: bytes, writer: asyncio.StreamWriter) -> bool:
        peers.add(writer.get_extra_info("peername"))
        writer.write(answer_bytes(extra=b"Keep-Alive: " + said + b"\r\n"))
        return True

    async with raw_peer(script) as (port, seen):
        p = pool(f"http://127.0.0.1:{port}/api/connexus/sms/out")  # the client's own: 30 s
        try:
            assert (await p.post(FORM, b"one", Exchange())).status == 200
            await asyncio.sleep(0.6)  # past half of 1 s, well inside 5 s less 1 s
            ex = Exchange()
            assert (await p.post(FORM, b"two", ex)).status == 200
        finally:
            await p.close()
    assert len(seen) == 2  # each sent once
    assert len(peers) == (1 if reused else 2)


async def test_reset_after_the_write_is_written_and_not_retried() -> None:
    """The peer reads the request and resets: UpstreamDisconnected, written, one request only."""

    async def script(request: bytes, w: asyncio.StreamWriter) -> bool:
        rst(w)
        return False

    async with raw_peer(script) as (port, seen):
        p = pool(f"http://127.0.0.1:{port}/sms/out")
        try:
            ex = Exchange()
            with pytest.raises(UpstreamDisconnected):
                await p.post(FORM, b"x", ex)
            assert ex.written
            await asyncio.sleep(0.1)
            assert len(seen) == 1
            assert p.open_connections == 0
        finally:
            await p.close()


async def test_reset_mid_answer_and_answer_until_close() -> None:
    """A reset in the middle of a Content-Length body is an error; an answer with no length
    read up to the peer's close is whole."""
    mode = ["partial"]

    async def script(request: bytes, w: asyncio.StreamWriter) -> bool:
        if mode[0] == "partial":
            w.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"succ')
            await w.drain()
            await asyncio.sleep(0.05)
            rst(w)
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}")
            await w.drain()
            w.close()
        return False

    async with raw_peer(script) as (port, _):
        p = pool(f"http://127.0.0.1:{port}/sms/out")
        try:
            with pytest.raises(UpstreamDisconnected):
                await p.post(FORM, b"x", Exchange())
            mode[0] = "close"
            answer = await p.post(FORM, b"x", Exchange())
            assert (answer.status, answer.body, answer.keep_alive) == (200, b"{}", False)
        finally:
            await p.close()


@pytest.mark.parametrize(
    ("wire_answer", "message"),
    [
        (b"HTTP/1.1 abc OK\r\n\r\n", "status line"),
        (b"SMTP ready\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "larger than"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}", "header line"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\n{}", "header line"),
        (b"HTTP/1.1 200 OK\r\nServer: x\r\n: empty\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "gzip"),
    ],
)
async def test_malformed_answers_are_clear_errors(wire_answer: bytes, message: str) -> None:
    """Each malformed or oversized answer fails with UpstreamBadAnswer saying what was wrong;
    the request was written, the connection is dropped."""

    async def script(request: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(wire_answer)
        await w.drain()
        return True

    async with raw_peer(script) as (port, _):
        p = pool(f"http://127.0.0.1:{port}/sms/out")
        try:
            ex = Exchange()
            with pytest.raises(UpstreamBadAnswer, match=message):
                await p.post(FORM, b"x", ex)
            assert ex.written
            assert p.open_connections == 0
        finally:
            await p.close()


async def test_chunk_extensions_trailers_and_interim_answers() -> None:
    """A 100 Continue before the answer, chunk extensions and trailers are read per RFC 9112."""
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b'5;ext=1\r\n{"a":\r\n2\r\n1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )

    async def script(request: bytes, w: asyncio.StreamWriter) -> bool:
        for i in range(0, len(chunked), 7):  # in small pieces
            w.write(chunked[i : i + 7])
            await w.drain()
        return True

    async with raw_peer(script) as (port, seen):
        p = pool(f"http://127.0.0.1:{port}/sms/out")
        try:
            for _ in range(2):
                answer = await p.post(FORM, b"x", Exchange())
                assert (answer.status, answer.body) == (200, b'{"a":1}')
            assert p.open_connections == 1
            assert seen[0].startswith(b"POST /sms/out HTTP/1.1\r\n")
        finally:
            await p.close()


def test_on_uvloop() -> None:
    """On uvloop (what `bc-proxy serve` runs): reuse, a reset after the write, and a refusal."""

    async def main() -> None:
        async def script(request: bytes, w: asyncio.StreamWriter) -> bool:
            if b"reset" in request:
                rst(w)
                return False
            w.write(answer_bytes())
            await w.drain()
            return True

        async with raw_peer(script) as (port, seen):
            p = pool(f"http://127.0.0.1:{port}/sms/out")
            try:
                for _ in range(5):
                    assert (await p.post(FORM, b"ok", Exchange())).status == 200
                assert p.open_connections == 1
                ex = Exchange()
                with pytest.raises(UpstreamDisconnected):
                    await p.post(FORM, b"reset", ex)
                assert ex.written
                assert len(seen) == 6
            finally:
                await p.close()
        refused = pool(f"http://127.0.0.1:{free_port()}/sms/out")
        ex = Exchange()
        with pytest.raises(UpstreamConnectError):
            await refused.post(FORM, b"x", ex)
        assert not ex.written
        await refused.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
