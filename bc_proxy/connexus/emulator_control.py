"""The Connexus emulator's control paths under /_emulator/: script its behaviour, fire incoming
SMS and delivery reports, list what was sent, revoke tokens.

Owns the control surface only (JSON in, JSON out); the state it changes lives in
`emulator_state`, the emulated Connexus API in `emulator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from bc_proxy.connexus.emulator_state import DLR_ID_READINGS, Emulator

EMULATOR_KEY = web.AppKey("connexus_emulator", Emulator)


def scalar_text(value: Any) -> str | None:
    """A scalar parameter as a string (JSON numbers too); None for missing or non-scalars."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


_SCRIPT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "latency": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0,
    "send_response_delay": lambda v: (
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
    ),
    "fail_next": lambda v: isinstance(v, list) and all(type(s) is int for s in v),
    "fail_token_next": lambda v: isinstance(v, list) and all(type(s) is int for s in v),
    "reject": lambda v: isinstance(v, dict) and all(isinstance(r, str) for r in v.values()),
    "insufficient_funds": lambda v: isinstance(v, bool),
    "auto_dlr": lambda v: v is None or type(v) is int,
    "token_ttl": lambda v: type(v) is int and v > 0,
    "webhook_url": lambda v: v is None or isinstance(v, str),
    "configure_ignored": lambda v: isinstance(v, bool),
    "dlr_id": lambda v: v in DLR_ID_READINGS,
    "dlr_timestamp": lambda v: isinstance(v, bool),
    "dlr_details": lambda v: isinstance(v, bool),
}


def _script_state(emu: Emulator) -> dict[str, Any]:
    return {name: getattr(emu, name) for name in _SCRIPT_FIELDS}


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text='{"error": "expected a JSON object"}', content_type="application/json"
        )
    return data


async def _control_script(request: web.Request) -> web.Response:
    emu = request.config_dict[EMULATOR_KEY]
    if request.method == "POST":
        data = await _json_object(request)
        bad = [k for k, v in data.items() if k not in _SCRIPT_FIELDS or not _SCRIPT_FIELDS[k](v)]
        if bad:
            return web.json_response({"error": f"invalid fields: {', '.join(bad)}"}, status=400)
        for key, value in data.items():
            setattr(emu, key, value)
    return web.json_response(_script_state(emu))


async def _control_mo(request: web.Request) -> web.Response:
    data = await _json_object(request)
    sender, to, body = (
        scalar_text(data.get("from")),
        scalar_text(data.get("to")),
        scalar_text(data.get("body")),
    )
    if not sender or not to or body is None:
        return web.json_response({"error": "from, to and body are required"}, status=400)
    related = scalar_text(data.get("relatedMessageId"))
    account = scalar_text(data.get("account"))
    payload = await request.config_dict[EMULATOR_KEY].fire_mo(
        sender,
        to,
        body,
        related_message_id=related,
        deliver=data.get("deliver", True) is not False,
        account=account,
    )
    return web.json_response(payload)


async def _control_dlr(request: web.Request) -> web.Response:
    data = await _json_object(request)
    message_id, code = scalar_text(data.get("messageId")), data.get("statusCode")
    if not message_id or type(code) is not int:
        return web.json_response({"error": "messageId and integer statusCode required"}, status=400)
    stamp = data.get("timestamp")
    if stamp is not None and type(stamp) is not int:
        return web.json_response({"error": "timestamp must be an integer"}, status=400)
    emu = request.config_dict[EMULATOR_KEY]
    return web.json_response(await emu.fire_dlr(message_id, code, timestamp=stamp))


async def _control_sent(request: web.Request) -> web.Response:
    return web.json_response([asdict(m) for m in request.config_dict[EMULATOR_KEY].sent])


async def _control_revoke(request: web.Request) -> web.Response:
    request.config_dict[EMULATOR_KEY].revoke_tokens()
    return web.json_response({"revoked": True})


def add_control_routes(app: web.Application) -> None:
    """Register the /_emulator/ control paths."""
    app.router.add_get("/_emulator/script", _control_script)
    app.router.add_post("/_emulator/script", _control_script)
    app.router.add_post("/_emulator/mo", _control_mo)
    app.router.add_post("/_emulator/dlr", _control_dlr)
    app.router.add_get("/_emulator/sent", _control_sent)
    app.router.add_post("/_emulator/revoke", _control_revoke)
