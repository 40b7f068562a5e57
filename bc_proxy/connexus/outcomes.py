"""How a Connexus sms/out call ended, per recipient: accepted, rejected or unknown.

Pure pieces of the send path the client uses: whether a request was written (an aiohttp trace
hook), the per-call result, and the table from an HTTP answer to a send state and to the legacy
answer (design.md section 4). No I/O of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from aiohttp import ClientSession, TraceRequestHeadersSentParams

from bc_proxy.errors import BadRequest, Forbidden, GatewayError, LegacyError
from bc_proxy.store import SendState
from bc_proxy.translate import RecipientOutcome, upstream_reason


class Exchange:
    """Whether the current attempt of one upstream request got as far as writing it.

    Set by the send client (wire.py) when it hands the request to the socket, or, for a send
    that goes through aiohttp (a proxy applies), by the session's `on_request_headers_sent`
    trace: a failure before that (pool wait, DNS, connect, TLS, token fetch) means Connexus
    never saw the request.
    """

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = False


async def headers_sent(
    session: ClientSession, ctx: SimpleNamespace, params: TraceRequestHeadersSentParams
) -> None:
    """The session's trace hook: the request of this exchange is (being) written."""
    exchange = ctx.trace_request_ctx
    if isinstance(exchange, Exchange):
        exchange.written = True


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """One outcome per recipient sent, and the first call-level failure (None if none)."""

    outcomes: list[RecipientOutcome]
    failure: LegacyError | None = None


def all_failed(recipients: list[str], state: SendState, reason: str) -> list[RecipientOutcome]:
    return [RecipientOutcome(r, state, None, error=reason) for r in recipients]


def send_failure_state(status: int) -> SendState | None:
    """How a non-2xx answer to sms/out leaves its recipients (None: 2xx, read the answer).

    A 3xx or 4xx is a definitive refusal (a redirect is not followed: that would be a second
    POST). 501 and 503 say the server did not take the request on (not implemented,
    unavailable). Any other 5xx (500, 502, 504, ...) leaves it open whether the message went
    out (a crash after queueing it, a proxy losing the backend's answer): unknown.
    """
    if 200 <= status < 300:
        return None
    if status < 500 or status in (501, 503):
        return "rejected"
    return "unknown"


def error_for(status: int, answer: Any, state: SendState) -> LegacyError:
    """The legacy answer for a failed sms/out (design.md section 4)."""
    if status == 400:
        return BadRequest(upstream_reason(answer, "Rejected by Connexus"))
    if status in (402, 403):
        return Forbidden(upstream_reason(answer, "Insufficient funds"))
    if status == 401:
        return GatewayError("Connexus refused the gateway's credentials")
    if state == "unknown":
        return GatewayError(f"Connexus error {status}; outcome unknown, not re-sent")
    return GatewayError(f"Connexus error {status}")
