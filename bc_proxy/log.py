"""Structured logging with structlog: JSON off a terminal, console output on one. Owns the
processor chain shared by structlog and stdlib loggers: the request id bound to every line of a
request (`REQUEST_ID`, set by bc_proxy/edge.py for the request a route handles), phone numbers
masked in every string value (`mask_phones`), every configured secret and every bearer token
scrubbed (`mask_tokens`, `loggable`), by the same rules for text shown outside the logs
(`scrub_text`). The access line, one per request, has its own writer (bc_proxy/access_log.py),
installed by `setup`. Does not decide what is logged."""

from __future__ import annotations

import logging
import random
import re
import sys
from collections.abc import Callable, Iterable, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import structlog
from aiohttp.http_exceptions import HttpProcessingError

if TYPE_CHECKING:
    from bc_proxy.config import Settings

PHONE_KEYS = frozenset({"to", "from", "msisdn", "recipient", "handset"})
MEMO_MAX = 1024  # scrubbed access-line values remembered (tenants x routes x methods)
_DIGITS = re.compile(r"\d")
# A phone number anywhere in a string: 7-15 digits, not glued to letters or digits, so that
# hex ids, receipt ids like "m-1234" and timestamps inside words stay readable.
_PHONE = re.compile(r"(?<![A-Za-z0-9])\+?\d{7,15}(?![A-Za-z0-9])")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_RID_ALPHABET = b"abcdefghjkmnpqrstvwxyz"  # letters only: a generated id is never masked
# Random bytes mapped onto the alphabet in one C call (hot path: one id per request).
_RID_TABLE = bytes(_RID_ALPHABET[i % len(_RID_ALPHABET)] for i in range(256))

REQUEST_ID: ContextVar[str | None] = ContextVar("bc_proxy_request_id", default=None)


def new_request_id(incoming: str | None = None) -> str:
    """The client's X-Request-Id when it is sane (1-64 of A-Z a-z 0-9 . _ : -), else a new one."""
    if incoming and _SANE_ID.fullmatch(incoming):
        return incoming
    # Not a secret (it is echoed to the client): the fast PRNG, no system call.
    return random.randbytes(16).translate(_RID_TABLE).decode("ascii")


def _add_request_id(
    logger: Any, name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Processor: the request id of the request being handled, where the line has none."""
    rid = REQUEST_ID.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


# A credential recognisable by its shape whoever configured it (a bearer token bc-proxy fetched
# is no configured secret): `Bearer <token>` and an OAuth answer's `access_token` value.
_TOKEN = re.compile(r"(bearer\s+|access_token['\"]?\s*[:=]\s*['\"]?)[^\s'\",;&}]+", re.IGNORECASE)


def mask_tokens(text: str) -> str:
    """Replace bearer tokens and `access_token` values in `text` with ***."""
    if "earer" in text or "EARER" in text or "access_token" in text:  # (cheap test first)
        return _TOKEN.sub(r"\1***", text)
    return text


def loggable(exc: BaseException) -> str:
    """An exception for a log line: its class and message, tokens masked. Never its repr:
    aiohttp's ClientResponseError (TooManyRedirects too) reprs its RequestInfo, whose request
    headers hold the Connexus bearer token."""
    text = str(exc)
    return mask_tokens(f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__)


def mask_phones(text: str) -> str:
    """Mask every phone number in `text`: a run of 7-15 digits (optionally after `+`) with no
    letter or digit right before or after it keeps only its last three digits. Digits glued to
    letters (hex ids) and shorter runs (ports, short codes) stay readable; values under number
    keys (`to`, `from`, ...) are masked whatever their shape, by the scrubber."""
    if len(text) < 7:
        return text
    return _PHONE.sub(lambda m: mask_number(m.group()), text)


def mask_number(value: str) -> str:
    """Keep the last three digits of a phone number: 64211234567 -> ********567."""
    if len(value) <= 3:
        return "*" * len(value)
    return _DIGITS.sub("*", value[:-3]) + value[-3:]


def scrub_text(text: str, secrets: Iterable[str] = (), *, phones: bool = True) -> str:
    """Text from Connexus or an error message made fit to show (console, `/readyz?verbose`, a
    legacy error answer) by the logs' rules: every secret the log scrubber knows and every one
    of `secrets` (4+ characters) replaced with ***, bearer tokens and `access_token` values
    masked (`mask_tokens`), phone numbers masked (`mask_phones`) unless `phones` is False (an
    answer to the client that sent them). Scrub before truncating."""
    if secrets:
        return text_scrubber(secrets, phones=phones)(text)
    text = (_SCRUB[0] if _SCRUB else _NO_SECRETS).clean(text)
    return mask_phones(text) if phones else text


def text_scrubber(secrets: Iterable[str], *, phones: bool = True) -> Callable[[str], str]:
    """`scrub_text` with `secrets` beside the configured ones (longest first across both),
    built once for many texts (a console page)."""
    scrub = Scrubber([*secrets, *(s for known in _SCRUB for s in known.secrets)])
    if phones:
        return lambda text: mask_phones(scrub.clean(text))
    return scrub.clean


class Scrubber:
    """Processor: mask phone numbers (by key, and by shape in every string value) and replace
    any secret found in any string."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets: list[str] = []
        self._memo: dict[str, str] = {}
        self.generation = 0  # counts set_secrets: what was rendered from `cached` is stale
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Scrub these (4+ characters, longest first); what `cached` remembered is forgotten."""
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._memo = {}
        self.generation += 1

    def cached(self, value: str) -> str:
        """`value` as a string value under a key that is no number key: secrets replaced, tokens
        and phone numbers masked; remembered (the access line's tenant, route and method recur
        on every request, and the scrub of each cost more than the rest of the line)."""
        # One memo for the whole call: a value scrubbed while a reload sets new secrets goes
        # into the memo it replaces (set_secrets assigns the secrets first), never the new one.
        memo = self._memo
        out = memo.get(value)
        if out is None:
            out = mask_phones(self.clean(value))
            if len(memo) >= MEMO_MAX:  # (a client's made-up methods cannot grow it)
                memo.clear()
            memo[value] = out
        return out

    def value(self, key: str, value: Any) -> Any:
        """One value of a line, scrubbed by its key and type (not remembered). The timestamp
        is our own clock (TimeStamper's, `AccessWriter.timestamp`): left as it is."""
        if key == "timestamp":
            return value
        if isinstance(value, str):
            return mask_number(value) if key in PHONE_KEYS else mask_phones(self.clean(value))
        if isinstance(value, BaseException):
            return mask_phones(self.clean(loggable(value)))
        if isinstance(value, list | tuple | dict):
            return self._deep(value)
        return value

    def clean(self, value: str) -> str:
        """`value` with every secret replaced by *** and bearer tokens masked."""
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return mask_tokens(value)

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            event[key] = self.value(key, value)
        return event

    def _deep(self, value: Any) -> Any:
        if isinstance(value, str):
            return mask_phones(self.clean(value))
        if isinstance(value, dict):
            return {k: self._deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._deep(v) for v in value]
        return value


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


_SCRUB: list[Scrubber] = []  # the scrubber of the configured chain (add_secrets extends it)
_NO_SECRETS = Scrubber(())  # scrub_text before logging is set up: tokens only


def secrets_of(settings: Settings) -> list[str]:
    """Every secret a configuration holds (passwords, client secrets, store password)."""
    out = [settings.webhook.secret.get_secret_value()]
    if settings.webhook.hmac_secret is not None:
        out.append(settings.webhook.hmac_secret.get_secret_value())
    for t in settings.tenants:
        tenant_secrets = (
            t.legacy.password,
            t.connexus.client_secret,
            t.connexus.password,
            t.webhook_secret,
        )
        for s in tenant_secrets:
            if s is not None:
                out.append(s.get_secret_value())
    store_password = urlsplit(settings.store.url).password
    if store_password:
        out.append(store_password)
    return out


def add_secrets(secrets: Iterable[str]) -> None:
    """Scrub these too from now on (a reloaded configuration's new passwords)."""
    for scrub in _SCRUB:
        scrub.set_secrets([*scrub.secrets, *secrets])


def setup(
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger once for the process."""
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    scrub = Scrubber(secrets)
    _SCRUB[:] = [scrub]
    shared: list[Any] = [
        _add_request_id,
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
    from bc_proxy import access_log  # (it imports this module)

    access_log.install(handler, scrub if not console and lvl <= logging.INFO else None)
    # The access log would print the webhook path, secret included: bc-proxy logs requests itself.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ParseErrorFilter) for f in server.filters):
        server.addFilter(_ParseErrorFilter())


def get_logger(name: str = "bc_proxy") -> Any:
    return structlog.get_logger(name)
