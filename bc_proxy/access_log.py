"""The access line: one JSON log line per request, written without structlog's chain.

Owns its writer, installed by `bc_proxy.log.setup` for JSON output at level info or below:
the configured scrubber's rules applied once per value (the values that recur on every line,
such as tenant, route and method, remembered: `Scrubber.cached`), one encoding, one write under
the log handler's lock. The line has the keys, order, values and timestamp format of the same
fields logged through structlog's chain and the stdlib formatter (tests/test_logs.py compares
them). A routed request's line (`access_request`) renders its recurring head once per tenant,
route and method. Console output, and a process whose logging `setup` did not configure, go
through structlog as any other line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

import structlog

from bc_proxy.log import MEMO_MAX, PHONE_KEYS, REQUEST_ID, Scrubber


def _line_encoder() -> Callable[[dict[str, Any]], str]:
    """`json.dumps(fields, default=repr)`, without building the C encoder again for every line
    (`JSONEncoder.iterencode` does: a third of the line's 36,000 instructions, callgrind). No
    circular check: the scrubber copies every container, so a line holds no cycle."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the _json accelerator
        return lambda fields: json.dumps(fields, default=repr)
    encoder = make(None, repr, encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda fields: "".join(encoder(fields, 0))


_encode = _line_encoder()


class AccessWriter:
    """The access line's writer for one configured handler and scrubber."""

    __slots__ = ("_generation", "_heads", "_prefix", "_second", "_tail", "handler", "scrub")

    def __init__(self, handler: logging.StreamHandler[TextIO], scrub: Scrubber) -> None:
        self.handler = handler
        self.scrub = scrub
        self._second = -1
        self._prefix = ""
        self._generation = -1  # the scrubber's, when the heads and the tail were rendered
        self._heads: dict[tuple[str, str, str], str] = {}
        self._tail = ("", "")

    def timestamp(self) -> str:
        """ISO 8601 in UTC with microseconds and a Z, as structlog's TimeStamper(fmt="iso")."""
        now = time.time()
        second = int(now)
        if second != self._second:  # formatted once a second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"

    def write(self, fields: dict[str, Any]) -> None:
        """The line of any fields (`fields` is consumed)."""
        scrub = self.scrub
        for key, value in fields.items():
            if type(value) is str and key not in PHONE_KEYS and key != "request_id":
                fields[key] = scrub.cached(value)
            else:  # an id is new on every line: not remembered
                fields[key] = scrub.value(key, value)
        fields["event"] = scrub.cached("request")
        rid = REQUEST_ID.get()
        if rid is not None and "request_id" not in fields:
            fields["request_id"] = scrub.value("request_id", rid)
        fields["level"] = scrub.cached("info")
        fields["timestamp"] = self.timestamp()  # not scrubbed, as in the chain (`value`)
        self._emit(_encode(fields) + "\n")

    def request(self, tenant: str, route: str, method: str, status: int, duration: float) -> None:
        """The line `write` gives for {tenant, route, method, status, duration_ms}, with its head
        (up to `"status": `) rendered once per tenant, route and method, and its event and
        level once: half the instructions of `write` (callgrind)."""
        scrub = self.scrub
        if self._generation != scrub.generation:  # a reload added secrets: render afresh
            self._heads = {}
            self._tail = (
                ', "event": ' + encode_basestring_ascii(scrub.cached("request")),
                ', "level": ' + encode_basestring_ascii(scrub.cached("info")),
            )
            self._generation = scrub.generation
        heads = self._heads
        head = heads.get((tenant, route, method))
        if head is None:
            head = (
                '{"tenant": '
                + encode_basestring_ascii(scrub.cached(tenant))
                + ', "route": '
                + encode_basestring_ascii(scrub.cached(route))
                + ', "method": '
                + encode_basestring_ascii(scrub.cached(method))
                + ', "status": '
            )
            if len(heads) >= MEMO_MAX:  # (a client's made-up methods cannot grow it)
                heads.clear()
            heads[tenant, route, method] = head
        event, level = self._tail
        rid = REQUEST_ID.get()
        request_id = (
            ""
            if rid is None
            else ', "request_id": ' + encode_basestring_ascii(scrub.value("request_id", rid))
        )
        self._emit(
            f'{head}{status!r}, "duration_ms": {duration!r}{event}{request_id}{level}'
            f', "timestamp": "{self.timestamp()}"}}\n'
        )

    def _emit(self, line: str) -> None:
        handler = self.handler
        handler.acquire()
        try:
            stream = handler.stream
            stream.write(line)
            stream.flush()
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": "request"}))
        finally:
            handler.release()


_WRITER: list[AccessWriter] = []  # set by install() (logging setup)


def install(handler: logging.StreamHandler[TextIO], scrub: Scrubber | None) -> None:
    """Write access lines to `handler` with `scrub`'s rules (None: through structlog)."""
    _WRITER[:] = [] if scrub is None else [AccessWriter(handler, scrub)]


def access(fields: dict[str, Any]) -> None:
    """The one log line of a request (`event: request`, the bound request id added), at info.
    `fields` is consumed."""
    if _WRITER:
        _WRITER[0].write(fields)
    else:
        # A new proxy each time: a cached one would keep the configuration of its first use.
        structlog.get_logger("bc_proxy.http").info("request", **fields)


def access_request(tenant: str, route: str, method: str, status: int, duration_ms: float) -> None:
    """`access` for a routed request's usual fields, in this order (edge.py): the same line."""
    plain = type(status) is int and type(duration_ms) is float and math.isfinite(duration_ms)
    if _WRITER and plain and type(tenant) is type(route) is type(method) is str:
        _WRITER[0].request(tenant, route, method, status, duration_ms)
        return
    access(
        {
            "tenant": tenant,
            "route": route,
            "method": method,
            "status": status,
            "duration_ms": duration_ms,
        }
    )
