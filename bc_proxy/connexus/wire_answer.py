"""Reading an HTTP/1.1 answer off the wire, incrementally: the send path client's parser.

Owns the answer's framing (Content-Length, chunked, or read to close; 1xx skipped), the
headers the gateway needs (Content-Type, Connection, Content-Encoding gzip/deflate), size
limits, refusing malformed answers, and the client's error classes (aiohttp ClientErrors, so
callers map them as they map aiohttp's). Does not own connections or what an answer means.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from aiohttp import ClientConnectionError, ClientError

MAX_HEAD = 65536  # status line and headers
MAX_BODY = 4 << 20  # a 200-recipient bulk answer is ~20 KB; anything near this is not Connexus

_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?:[ \t][^\r\n]*)?")
# Header lines after the status line: each a token, a colon and a value up to CRLF (a bare CR
# or LF inside a value is kept as part of it). One match checks them all.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_VALUE = rb"[^\r]*(?:\r(?!\n)[^\r]*)*"
_FIELDS = re.compile(rb"%s:%s(?:\r\n%s:%s)*" % (_TOKEN, _VALUE, _TOKEN, _VALUE))
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_DIGITS = re.compile(rb"[0-9]{1,15}")

_READ = frozenset(  # the header fields _head acts on (lower case)
    (
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"content-type",
        b"content-encoding",
    )
)

# parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _TO_CLOSE = range(7)


class UpstreamConnectError(ClientConnectionError):
    """No connection to Connexus (refused, DNS, TLS handshake or certificate): never written."""


class UpstreamDisconnected(ClientConnectionError):
    """The connection closed or reset before a whole answer came back."""


class UpstreamBadAnswer(ClientError):
    """Connexus's answer is not readable HTTP/1.1, or too large."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: status, body (decoded), Content-Type, and whether the connection stays."""

    status: int
    body: bytes
    content_type: str
    keep_alive: bool
    # The server's `Keep-Alive: timeout=N` (seconds it keeps the connection idle), if it said.
    idle_timeout: float | None = None


class AnswerParser:
    """Feed it bytes as they arrive; it returns the Answer once whole (one per request)."""

    __slots__ = (
        "_body",
        "_buf",
        "_ctype",
        "_encoding",
        "_idle",
        "_keep",
        "_left",
        "_size",
        "_state",
        "_status",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self.reset()

    def reset(self) -> None:
        """Ready for the next answer (leftover bytes are kept: leftover() tells)."""
        self._state = _HEAD
        self._status = 0
        self._ctype = ""
        self._keep = True
        self._idle: float | None = None
        self._encoding = b""
        self._left = 0
        self._body: list[bytes] = []
        self._size = 0

    def leftover(self) -> bool:
        """Bytes after the answer (nothing was asked for them): the connection is not reusable."""
        return bool(self._buf)

    def feed(self, data: bytes) -> Answer | None:
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamBadAnswer("answer headers too large")
                    return None
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._head(head)
                # an interim 1xx answer leaves the state at _HEAD: the real one follows
            elif state == _LENGTH:
                if len(buf) < self._left:
                    return None
                self._take(self._left)
                return self._done()
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise UpstreamBadAnswer("chunk size line too long")
                    return None
                size = bytes(buf[:end]).split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise UpstreamBadAnswer("bad chunk size")
                del buf[: end + 2]
                self._left = int(size, 16)
                self._grow(self._left)
                self._state = _CHUNK_DATA if self._left else _TRAILER
            elif state == _CHUNK_DATA:
                if not buf:
                    return None
                self._left -= self._take(min(self._left, len(buf)))
                if self._left == 0:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise UpstreamBadAnswer("chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamBadAnswer("answer trailers too large")
                    return None
                del buf[: end + 2]
                if end == 0:
                    return self._done()
            else:  # _TO_CLOSE: the body is everything until the server closes
                self._grow(len(buf))
                self._take(len(buf))
                return None

    def feed_eof(self) -> Answer:
        """The server closed its side: the answer, if that is how it ends, else an error."""
        if self._state == _TO_CLOSE:
            return self._done()
        if self._state == _HEAD and not self._buf:
            raise UpstreamDisconnected("connection closed by Connexus without an answer")
        raise UpstreamDisconnected("connection closed by Connexus in the middle of its answer")

    def _take(self, n: int) -> int:
        buf = self._buf
        self._body.append(bytes(buf[:n]))
        del buf[:n]
        return n

    def _grow(self, n: int) -> None:
        self._size += n
        if self._size > MAX_BODY:
            raise UpstreamBadAnswer(f"answer larger than {MAX_BODY} bytes")

    def _head(self, head: bytes) -> None:
        status_line, crlf, fields = head.partition(b"\r\n")
        m = _STATUS.fullmatch(status_line)
        if m is None:
            raise UpstreamBadAnswer("not an HTTP/1.x status line")
        if crlf and not _FIELDS.fullmatch(fields):
            raise UpstreamBadAnswer("malformed header line")
        status = int(m.group(2))
        keep = m.group(1) == b"1"  # HTTP/1.0 closes unless it says keep-alive
        length: bytes | None = None
        chunked = False
        for line in fields.split(b"\r\n") if crlf else ():
            name, _, value = line.partition(b":")
            name = name.lower()
            if name not in _READ:
                continue
            value = value.strip(b" \t")
            if name == b"content-length":
                if not _DIGITS.fullmatch(value) or (length is not None and length != value):
                    raise UpstreamBadAnswer("bad Content-Length")
                length = value
            elif name == b"transfer-encoding":
                if value.lower() != b"chunked" or chunked:
                    raise UpstreamBadAnswer("unsupported Transfer-Encoding")
                chunked = True
            elif name == b"connection":
                tokens = {t.strip(b" \t") for t in value.lower().split(b",")}
                if b"close" in tokens:
                    keep = False
                elif b"keep-alive" in tokens:
                    keep = True
            elif name == b"keep-alive":
                self._idle = _idle_timeout(value)
            elif name == b"content-type":
                self._ctype = value.decode("latin-1")
            elif name == b"content-encoding":
                self._encoding = value.lower()
                if self._encoding not in (b"gzip", b"x-gzip", b"deflate", b"identity"):
                    raise UpstreamBadAnswer("unsupported Content-Encoding")
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamBadAnswer("unexpected protocol switch")
            self.reset()
            return
        self._status, self._keep = status, keep
        if chunked and length is not None:
            raise UpstreamBadAnswer("both Content-Length and chunked")
        if status in (204, 304):
            self._state, self._left = _LENGTH, 0
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._left = int(length)
            self._grow(self._left)
            self._state = _LENGTH
        else:
            self._keep = False
            self._state = _TO_CLOSE

    def _done(self) -> Answer:
        body = b"".join(self._body)
        if self._encoding not in (b"", b"identity") and body:
            body = _decode(body, self._encoding)
        answer = Answer(self._status, body, self._ctype, self._keep, self._idle)
        self.reset()
        return answer


def _idle_timeout(value: bytes) -> float | None:
    """`timeout=N` of a Keep-Alive header (`timeout=5, max=100`); None when absent or odd."""
    for part in value.split(b","):
        key, _, number = part.strip(b" \t").partition(b"=")
        if key.lower() == b"timeout" and _DIGITS.fullmatch(number.strip(b' \t"')):
            return float(number.strip(b' \t"'))
    return None


def _decode(body: bytes, encoding: bytes) -> bytes:
    wbits = zlib.MAX_WBITS | 16 if encoding in (b"gzip", b"x-gzip") else zlib.MAX_WBITS
    for bits in (wbits, -zlib.MAX_WBITS):  # "deflate" is sometimes sent raw, without zlib header
        try:
            d = zlib.decompressobj(bits)
            out = d.decompress(body, MAX_BODY)
            if d.unconsumed_tail:
                raise UpstreamBadAnswer(f"answer larger than {MAX_BODY} bytes")
            return out
        except zlib.error:
            if encoding != b"deflate" or bits < 0:
                break
    raise UpstreamBadAnswer(f"answer not valid {encoding.decode()}")
