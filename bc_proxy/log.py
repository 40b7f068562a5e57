"""Structured logging with structlog: JSON off a terminal, readable console output on one.

Owns the processor chain shared by structlog loggers and the stdlib loggers (aiohttp's
included): phone numbers masked, every configured secret scrubbed from every value as a last
line of defence. Does not decide what is logged; callers bind request id, tenant and route.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_PHONE_KEYS = frozenset({"to", "from", "msisdn", "recipient", "handset"})
_DIGITS = re.compile(r"\d")


def mask_number(value: str) -> str:
    """Keep the last three digits of a phone number: 64211234567 -> ********567."""
    if len(value) <= 3:
        return "*" * len(value)
    return _DIGITS.sub("*", value[:-3]) + value[-3:]


class _Scrubber:
    """Processor: mask phone numbers by key and replace any secret found in any string."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _clean(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return value

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                if key in _PHONE_KEYS:
                    event[key] = mask_number(value)
                elif self.secrets:
                    event[key] = self._clean(value)
            elif isinstance(value, BaseException):
                event[key] = self._clean(repr(value))
        return event


class _ParseErrorFilter(logging.Filter):
    """aiohttp logs a request it cannot parse with the parser's message, which quotes the raw
    request line - and a password in its query string, encoded in ways no scrubber knows. Keep
    the error's class, drop its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.msg = f"{record.msg} ({type(exc).__name__}, status {exc.code})"
        return True


def setup(
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger once for the process."""
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    scrub = _Scrubber(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer()
    )
    lvl = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            scrub,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrub,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_bc_proxy", False):
            root.removeHandler(old)
    handler._bc_proxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    # The access log would print the webhook path, secret included: bc-proxy logs requests itself.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ParseErrorFilter) for f in server.filters):
        server.addFilter(_ParseErrorFilter())


def get_logger(name: str = "bc_proxy") -> Any:
    return structlog.get_logger(name)
