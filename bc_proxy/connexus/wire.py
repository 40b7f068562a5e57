"""The send path's own HTTP/1.1 client: POSTs to one origin over a pool of keep-alive connections.

Owns connecting (TCP or verified TLS, connect timeout), the pool (at most `limit` connections,
idle ones expire after `keepalive` seconds or before the server's own `Keep-Alive: timeout`,
one found closed before anything was written is replaced), writing a request from pre-built
header bytes, marking its `Exchange` written when the bytes go to the transport, and the total
timeout. Parsing answers is `wire_answer.py`'s. Never repeats a written request. Does not own
auth, metrics or what an answer means.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from typing import cast

from yarl import URL

from bc_proxy.connexus.outcomes import Exchange
from bc_proxy.connexus.wire_answer import (
    Answer,
    AnswerParser,
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamDisconnected,
)

__all__ = [
    "Answer",
    "UpstreamBadAnswer",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "WirePool",
    "wire_capable",
]

# Seconds before the server's own keep-alive timeout that an idle connection stops being
# reused (half the timeout where that is shorter): its FIN may be on the way.
IDLE_MARGIN = 1.0


def wire_capable(url: URL) -> bool:
    """Whether `url` is one WirePool can POST to: http(s), a host, no credentials or query."""
    return (
        url.scheme in ("http", "https")
        and bool(url.raw_host)
        and url.user is None
        and url.password is None
        and not url.raw_query_string
        and not url.raw_fragment
    )


class _Conn(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight, its answer parsed as it comes."""

    def __init__(self, pool: WirePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = AnswerParser()
        self.waiter: asyncio.Future[Answer] | None = None
        self.idle_since = 0.0
        # How long it may sit idle and still be reused: the server's own keep-alive timeout
        # (Keep-Alive: timeout=N) less a margin, once it said one. A request written just as
        # the server closes an idle connection is reset after the write: its outcome unknown,
        # never re-sent. A server that closes at 5 s (Apache's default) under a client that
        # sends every 5 s would meet that race again and again.
        self.idle_limit = math.inf
        self.broken = False  # closed, EOF seen, or bytes nobody asked for: never reuse
        self.counted = False  # holds one of the pool's slots

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None:  # an idle connection has nothing to say (an early 408, garbage)
            self.retire(graceful=False)
            return
        try:
            answer = self.parser.feed(data)
        except UpstreamBadAnswer as exc:
            self._fail(exc)
            return
        if answer is not None:
            self._answered(answer)

    def eof_received(self) -> bool:
        self.broken = True
        if self.waiter is not None:
            try:
                answer = self.parser.feed_eof()
            except UpstreamBadAnswer as exc:
                self._fail(exc)
                return False
            self._answered(answer)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        if self.waiter is not None:
            reason = f"connection lost before a whole answer ({exc or 'closed by Connexus'})"
            self._fail(UpstreamDisconnected(reason))
        self.pool._lost(self)

    # -- used by the pool --------------------------------------------------------------------

    def usable(self) -> bool:
        t = self.transport
        return not self.broken and t is not None and not t.is_closing()

    def retire(self, *, graceful: bool) -> None:
        """Never use this connection again: close it (FIN, TLS close_notify) or reset it; its
        pool slot is free at once, whatever the close takes."""
        self.broken = True
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()
        self.pool._lost(self)

    def _answered(self, answer: Answer) -> None:
        waiter, self.waiter = self.waiter, None
        if not answer.keep_alive or self.parser.leftover():
            self.broken = True
        elif answer.idle_timeout is not None:
            t = answer.idle_timeout
            self.idle_limit = t - min(IDLE_MARGIN, t / 2)
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.retire(graceful=False)

    def expire(self) -> None:
        """The total timeout passed with the answer not complete: fail it, drop the connection."""
        self._fail(TimeoutError())


def _expire_wait(waiter: asyncio.Future[_Conn | None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class WirePool:
    """POSTs to one origin's path: at most `limit` connections, reused while they stay open."""

    def __init__(
        self,
        url: URL,
        *,
        limit: int,
        timeout: float,
        connect_timeout: float,
        keepalive: float,
        ssl_context: ssl.SSLContext | None,
        user_agent: str,
    ) -> None:
        if not wire_capable(url):
            raise ValueError(f"not a URL the wire client can POST to: {url}")
        self._host = url.raw_host or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl_context if url.scheme == "https" else None
        if url.scheme == "https" and ssl_context is None:
            raise ValueError("an https URL needs an ssl context")
        self._limit = limit
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        host = f"[{self._host}]" if ":" in self._host else self._host
        if not url.is_default_port():
            host = f"{host}:{self._port}"
        self._start = (
            f"POST {url.raw_path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\n"
            "Accept: application/json\r\nConnection: keep-alive\r\n"
        )
        self._heads: dict[str, bytes] = {}  # per content type: every constant header
        self._lines: dict[str, bytes] = {}  # "Authorization: Bearer ..." lines of recent tokens
        self._idle: list[_Conn] = []  # most recently used last
        self._conns: set[_Conn] = set()
        self._open = 0  # connections open or being opened (each a slot of `limit`)
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # its connections' loop

    @property
    def open_connections(self) -> int:
        return self._open

    async def post(
        self,
        content_type: str,
        body: bytes,
        exchange: Exchange,
        token: str | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
    ) -> Answer:
        """POST `body`: the answer, or TimeoutError or an Upstream* error; never retried.

        `exchange.written` becomes True as the request is handed to the transport; a failure
        before that (pool wait, connect, closed) left Connexus without the request. The total
        timeout (or `deadline`, in loop time) bounds pool wait, connect, write and answer.
        """
        head = self._heads.get(content_type) or self._head(content_type)
        parts = [head, b"%d\r\n" % len(body)]
        if token is not None:
            parts.append(self._lines.get(token) or self._auth_line(token))
        if request_id is not None:
            parts.append(b"X-Request-Id: %s\r\n" % _header_value(request_id))
        parts += (b"\r\n", body)
        loop = self._loop
        if loop is None:  # bound at first use (asyncio.get_running_loop is a getpid call)
            loop = self._loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._timeout
        conn = await self._acquire(loop, deadline)
        waiter: asyncio.Future[Answer] = loop.create_future()
        conn.waiter = waiter
        conn.parser.reset()
        timer = loop.call_at(deadline, conn.expire)
        try:
            assert conn.transport is not None
            exchange.written = True
            conn.transport.write(b"".join(parts))
            answer = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(conn, loop.time())  # answered just as the caller was cancelled
            else:  # timed out, failed or cancelled mid-exchange: the connection is unusable
                conn.waiter = None
                conn.retire(graceful=False)
            raise
        finally:
            timer.cancel()
        self._release(conn, loop.time())
        return answer

    def _head(self, content_type: str) -> bytes:
        head = f"{self._start}Content-Type: {content_type}\r\nContent-Length: "
        self._heads[content_type] = value = head.encode("latin-1")
        return value

    def _auth_line(self, token: str) -> bytes:
        if len(self._lines) >= 64:  # a few tenants' current tokens; old ones age out at once
            self._lines.clear()
        line = self._lines[token] = b"Authorization: Bearer %s\r\n" % _header_value(token)
        return line

    # -- the pool ----------------------------------------------------------------------------

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Conn:
        if self._closed:
            raise UpstreamConnectError("the upstream client is closed")
        idle = self._idle
        now = loop.time()
        while idle and now - idle[0].idle_since > self._keepalive:
            idle.pop(0).retire(
                graceful=True
            )  # idle past the keep-alive: the server may be closing it
        while idle:
            conn = idle.pop()
            if not conn.usable():  # closed while idle: found before writing, so replaced
                conn.retire(graceful=False)
            elif now - conn.idle_since >= conn.idle_limit:  # the server is about to close it
                conn.retire(graceful=True)
            else:
                return conn
        if self._open < self._limit:
            self._open += 1
            return await self._connect(loop, deadline)
        waiter: asyncio.Future[_Conn | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _expire_wait, waiter)
        try:
            got = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed over just as we gave up: pass it on
                if handed is None:
                    self._open -= 1
                    self._wake()
                else:
                    self._release(handed, loop.time())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        finally:
            timer.cancel()
        if got is None:  # a slot freed up for us (already counted)
            return await self._connect(loop, deadline)
        if got.usable():
            return got
        got.retire(graceful=False)
        return await self._acquire(loop, deadline)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Conn:
        """A new connection in the slot already counted for it (given back on failure)."""
        try:
            until = min(deadline, loop.time() + self._connect_timeout)
            try:
                async with asyncio.timeout_at(until):
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None,
                    )
            except TimeoutError:
                raise  # an OSError too, but the connect timeout: not "cannot connect"
            except ssl.SSLCertVerificationError as exc:
                reason = exc.verify_message or str(exc)
                raise UpstreamConnectError(f"TLS certificate not accepted: {reason}") from exc
            except OSError as exc:
                where = f"{self._host}:{self._port}"
                raise UpstreamConnectError(f"cannot connect to {where}: {exc}") from exc
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        conn.counted = True
        if self._closed or not conn.usable():
            conn.retire(
                graceful=False
            )  # closed at once, or the pool closed meanwhile: nothing was written
            raise UpstreamDisconnected("connection closed by Connexus before the request")
        self._conns.add(conn)  # TCP_NODELAY: asyncio and uvloop set it on every TCP transport
        return conn

    def _release(self, conn: _Conn, now: float) -> None:
        """An exchange on `conn` ended with a whole answer: reuse it, or close it."""
        if self._closed or not conn.usable():
            conn.retire(graceful=True)  # Connection: close, or shutting down
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = now
        self._idle.append(conn)

    def _lost(self, conn: _Conn) -> None:
        """`conn` is gone (closed, reset, aborted): free its slot for a waiter."""
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self._open < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)

    async def close(self) -> None:
        """Close every connection; waiting requests fail as never written."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("the upstream client is closed"))
        for conn in list(self._conns):
            if conn.waiter is None:
                conn.retire(graceful=True)
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports report connection_lost


def _header_value(value: str) -> bytes:
    """A header value as bytes; a CR, LF or NUL in it would split the request: refused."""
    raw = value.encode("latin-1")
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ValueError("newline or NUL in a header value")
    return raw
