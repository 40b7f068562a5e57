"""The emulator's Bulletin-compatible polls: Connexus `sms/in` and `sms/status` (migration table).

Owns their wire answer as the Bulletin Connect polls gave it: one record a call as
`application/x-www-form-urlencoded` with every key present, consumed as it is handed out, or
204 with an empty body when none waits. The queues themselves live in `emulator_state`.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from bc_proxy.connexus.emulator_state import IN_KEYS, STATUS_KEYS, Emulator

FORM = "application/x-www-form-urlencoded"


def poll_answer(emu: Emulator, kind: str, account: str) -> web.Response:
    """The next unread record of `kind` (`in` or `status`) for `account`, consumed; or 204."""
    record = emu.take(kind, account)
    if record is None:
        return web.Response(status=204)
    keys = IN_KEYS if kind == "in" else STATUS_KEYS
    body = urlencode([(k, record.get(k, "")) for k in keys])
    return web.Response(status=200, body=body.encode(), headers={"Content-Type": FORM})
