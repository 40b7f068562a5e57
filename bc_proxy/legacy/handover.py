"""Hand-over of a poll answer: did the client's TCP stack acknowledge every byte written?

A polled record is consumed only when it was received: after the answer is written, wait until
the transport's buffer is empty and the socket's unacknowledged output (Linux SIOCOUTQ) is 0,
or a short bound passes with the connection still open. Where that count cannot be read (not
Linux, a TLS transport) only the transport-closing check remains.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import sys
import termios
from typing import Final

HANDOVER_BOUND_SECONDS: Final = 2.0  # connection still open after this: count it as received
_PAUSES: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)  # between checks, growing
_TIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_INET: Final = (socket.AF_INET, socket.AF_INET6)
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
_TCP_CLOSE: Final = 7  # tcpi_state after a reset (include/net/tcp_states.h)


def unacked_bytes(sock: socket.socket) -> int | None:
    """Bytes written to this TCP socket that the peer has not acknowledged (Linux SIOCOUTQ:
    write_seq - snd_una; unsent bytes included); None when the count cannot be read.

    Some kernels zero it after a reset (dropping the unacknowledged queue): ask `reset` too.
    """
    if _TIOCOUTQ is None or not sys.platform.startswith("linux"):
        return None
    try:
        fd = sock.fileno()
        if fd < 0:
            return None
        raw = fcntl.ioctl(fd, _TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    count: int = struct.unpack("i", raw)[0]
    return count


def reset(sock: socket.socket) -> bool:
    """Whether the kernel already closed this TCP connection (a reset arrived), even if the
    event loop has not read the error yet (Linux TCP_INFO tcpi_state).

    A reset that follows an acknowledgement at once also counts: the record is then handed out
    again (at-least-once), which is what a client that aborts right after an answer wants.
    """
    if _TCP_INFO is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)
    except OSError:
        return False
    return bool(info) and info[0] == _TCP_CLOSE


def raw_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """The plain TCP socket under `transport`, or None (TLS, Unix socket, no socket)."""
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _INET or sock.type != socket.SOCK_STREAM:
        return None
    return sock  # type: ignore[no-any-return]


class _EofWatch(asyncio.Protocol):
    """Stands in for a connection's protocol while an answer is handed over, passing every
    event on. When the peer's FIN arrives it notes whether the peer had acknowledged every
    byte by then: the kernel takes the FIN's acknowledgement before the loop reads the end of
    the stream, and the descriptor is still this connection's. A client that reads an answer
    and closes before its delayed ACK went out (up to 40 ms on Linux) then counts as having
    received it, instead of being handed the record again."""

    def __init__(
        self, inner: asyncio.BaseProtocol, transport: asyncio.Transport, sock: socket.socket
    ) -> None:
        self.inner = inner
        self.transport = transport
        self.sock = sock
        self.acked_at_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        # All of it: nothing left in the transport's own buffer (the kernel's count does not
        # see those bytes), none unacknowledged, then no reset (read last: one landing between
        # the two reads is seen).
        self.acked_at_eof = (
            self.transport.get_write_buffer_size() == 0
            and unacked_bytes(self.sock) == 0
            and not reset(self.sock)
        )
        return self.inner.eof_received()  # type: ignore[attr-defined,no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def peer_received(
    transport: asyncio.Transport | None, bound: float = HANDOVER_BOUND_SECONDS
) -> bool:
    """True once the peer acknowledged everything written (also when it did so with its FIN),
    or `bound` seconds passed with the connection open; False when the connection closed or
    was reset first.

    Checked at once, then at growing short pauses. The transport's closing flag is read before
    the socket each time: a closed transport's descriptor may already belong to another socket.
    """
    if transport is None:
        return False
    sock = raw_socket(transport)
    watch: _EofWatch | None = None
    if sock is not None and isinstance(transport.get_protocol(), asyncio.Protocol):
        watch = _EofWatch(transport.get_protocol(), transport, sock)
        transport.set_protocol(watch)
    try:
        return await _received(transport, sock, watch, bound)
    finally:
        if watch is not None and transport.get_protocol() is watch:
            transport.set_protocol(watch.inner)


async def _received(
    transport: asyncio.Transport, sock: socket.socket | None, watch: _EofWatch | None, bound: float
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    checks = 0
    while True:
        if transport.is_closing():
            return watch is not None and watch.acked_at_eof
        if transport.get_write_buffer_size() == 0:
            if sock is None:
                await asyncio.sleep(0)  # let a reset already read by the loop close it
                return not transport.is_closing()
            unacked = unacked_bytes(sock)
            # The reset after the count: one landing between the two reads is seen (some
            # kernels also zero the count on a reset, with nothing acknowledged).
            if reset(sock):
                return False
            if unacked == 0:
                return True
            if unacked is None:
                sock = None
                continue
        if loop.time() >= deadline:
            return True
        await asyncio.sleep(_PAUSES[min(checks, len(_PAUSES) - 1)])
        checks += 1
