"""Exact legacy wire formats: strict parsing of query strings and form bodies.

Owns merging the raw query string with the body (the first value of a key wins, query
before body, as a servlet container's getParameter did), `+` as space, and rejecting
malformed percent-encoding and non-UTF-8 bytes with a 400 rather than guessing.
Does not own what the parameters mean.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from aiohttp import web

from bc_proxy.errors import BadRequest, PayloadTooLarge

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORM_TYPES = ("", "application/x-www-form-urlencoded", "text/plain", "application/octet-stream")


def parse_qs_strict(text: str, into: dict[str, str]) -> None:
    """Parse `a=1&b=2` into `into` (first value of a key wins); raises BadRequest."""
    if not text:
        return
    if "%" in text and _BAD_PERCENT.search(text):
        raise BadRequest("Malformed percent-encoding")
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        try:
            k = unquote_plus(key, errors="strict")
            v = unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("Parameters are not valid UTF-8") from None
        if "\x00" in k or "\x00" in v:
            raise BadRequest("Parameters contain NUL bytes")
        if k not in into:
            into[k] = v


def raw_query(request: web.Request) -> str:
    """The query string exactly as sent (aiohttp's `query_string` is already decoded)."""
    _, _, query = request.raw_path.partition("?")
    return query.partition("#")[0]


async def read_params(request: web.Request, max_body: int) -> dict[str, str]:
    """Merge the query string and the form body into one dict of legacy parameters."""
    params: dict[str, str] = {}
    parse_qs_strict(raw_query(request), params)
    if request.method == "GET" and not request.body_exists:
        return params
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("Request body too large")
    ctype = request.content_type if "Content-Type" in request.headers else ""
    if ctype == "multipart/form-data":
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge("Request body too large") from None
        except (ValueError, LookupError):  # LookupError: a part declared an unknown charset
            raise BadRequest("Malformed multipart body") from None
        for k, v in form.items():
            if isinstance(v, str) and k not in params:
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate from an exotic part charset
                    raise BadRequest("Parameters are not valid UTF-8") from None
                params[k] = v
        return params
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body too large") from None
    if not body:
        return params
    if len(body) > max_body:
        raise PayloadTooLarge("Request body too large")
    if ctype not in _FORM_TYPES:
        raise BadRequest(f"Unsupported Content-Type {ctype[:60]}; send a form body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Body is not valid UTF-8 form data") from None
    parse_qs_strict(text.strip("\r\n"), params)
    return params
