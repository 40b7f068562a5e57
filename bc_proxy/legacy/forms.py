"""Exact legacy wire formats: strict parsing of query strings and form bodies.

Owns merging the raw query string with the body (the first value of a key wins, query
before body, as a servlet container's getParameter did), `+` as space, and rejecting
malformed percent-encoding, non-UTF-8 bytes and control characters (other than tab, CR, LF)
with a 400 rather than guessing, the same for every body encoding. Only form-encoded and
multipart bodies (or a body without any Content-Type header) are read; the body must arrive
within `server.read_timeout_seconds` (408), and a client that goes away while sending it is
`ClientGone` (a 499 outcome, never a 500). Does not own what the parameters mean.
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote_plus

from aiohttp import web

from bc_proxy import keys
from bc_proxy.errors import BadRequest, ClientGone, PayloadTooLarge, RequestTimeout

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"


def check_value(value: str) -> None:
    """Refuse NUL and other control characters (tab, CR and LF are text); raises BadRequest."""
    if _CONTROL.search(value):
        raise BadRequest("Parameters contain control characters")


def parse_qs_strict(text: str, into: dict[str, str]) -> None:
    """Parse `a=1&b=2` into `into` (first value of a key wins); raises BadRequest."""
    if not text:
        return
    check_value(text)  # literal control characters, once for the whole text
    escaped = "%" in text
    if escaped and _BAD_PERCENT.search(text):
        raise BadRequest("Malformed percent-encoding")
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if escaped and "%" in part:  # decoding may give control characters: check what it gave
            try:
                k = unquote_plus(key, errors="strict")
                v = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                raise BadRequest("Parameters are not valid UTF-8") from None
            check_value(k)
            check_value(v)
        else:
            k = key.replace("+", " ")
            v = value.replace("+", " ")
        if k not in into:
            into[k] = v


def raw_query(request: web.Request) -> str:
    """The query string exactly as sent (aiohttp's `query_string` is already decoded)."""
    _, _, query = request.raw_path.partition("?")
    return query.partition("#")[0]


def _media_type(request: web.Request) -> str:
    """The Content-Type's media type as sent ("" without the header); aiohttp's own parse
    turns an unparseable value into application/octet-stream, which must not pass as a form."""
    raw = request.headers.get("Content-Type")
    if raw is None:
        return ""
    return raw.partition(";")[0].strip().lower()


async def read_params(request: web.Request, max_body: int) -> dict[str, str]:
    """Merge the query string and the form body into one dict of legacy parameters."""
    params: dict[str, str] = {}
    parse_qs_strict(raw_query(request), params)
    if request.method == "GET" and not request.body_exists:
        return params
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("Request body too large")
    ctype = _media_type(request)
    timeout = request.app[keys.SETTINGS].server.read_timeout_seconds
    try:
        if ctype != _MULTIPART and request.content.is_eof():
            body = await request.read()  # all of it has arrived: nothing to wait for
        else:
            async with asyncio.timeout(timeout):
                if ctype == _MULTIPART:
                    await _read_multipart(request, params)
                    return params
                body = await request.read()
    except TimeoutError:
        raise RequestTimeout("Request body not received in time") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body too large") from None
    except ConnectionError:  # the client went away while sending its body
        raise ClientGone("client closed the connection while sending") from None
    if not body:
        return params
    if len(body) > max_body:
        raise PayloadTooLarge("Request body too large")
    if ctype not in ("", _FORM):
        raise BadRequest(f"Unsupported Content-Type {ctype[:60]}; send a form body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Body is not valid UTF-8 form data") from None
    parse_qs_strict(text.strip("\r\n"), params)
    return params


async def _read_multipart(request: web.Request, params: dict[str, str]) -> None:
    try:
        form = await request.post()
    except (ValueError, LookupError):  # LookupError: a part declared an unknown charset
        raise BadRequest("Malformed multipart body") from None
    for k, v in form.items():
        if isinstance(v, str) and k not in params:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from an exotic part charset
                raise BadRequest("Parameters are not valid UTF-8") from None
            check_value(k)
            check_value(v)
            params[k] = v
