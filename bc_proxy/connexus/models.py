"""Connexus webhook payloads (untrusted input) -> the store's `DlrEvent` / `MoEvent`.

Only the fields bc-proxy uses are checked: `type` and `messageId`; for `dlr` an integer
`statusCode`; for `mo` `from`, `to` and `body`. Everything else may be absent, null, of any
type or unknown. A payload we cannot use raises `Unusable` with a reason from `REASONS`.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

from bc_proxy.store import DlrEvent, MoEvent

WebhookType = Literal["mo", "dlr", "unknown"]

# The bounded set of rejection reasons (metric label values; never client text).
REASONS: Final = (
    "bad_json",
    "not_an_object",
    "unknown_type",
    "bad_message_id",
    "bad_status_code",
    "bad_from",
    "bad_to",
    "bad_body",
)
MAX_ID = 100
MAX_NUMBER = 40
MAX_BODY = 10_000
MAX_STATUS_TEXT = 40
MAX_STATUS_CODE = 2**31 - 1
_EXPLAIN: Final = {
    "bad_json": "the body is not JSON",
    "not_an_object": "the body is not a JSON object",
    "unknown_type": "type must be mo or dlr",
    "bad_message_id": f"messageId must be a non-empty string or integer (<= {MAX_ID} chars)",
    "bad_status_code": "statusCode must be a non-negative integer",
    "bad_from": f"from must be a non-empty string or integer (<= {MAX_NUMBER} chars)",
    "bad_to": f"to must be a non-empty string or integer (<= {MAX_NUMBER} chars)",
    "bad_body": f"body must be a string (<= {MAX_BODY} chars)",
}


class Unusable(ValueError):
    """A webhook payload without a usable field we need; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, wtype: WebhookType = "unknown") -> None:
        super().__init__(_EXPLAIN[reason])
        self.reason = reason
        self.wtype: WebhookType = wtype


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scalar_id(v: object, limit: int) -> str | None:
    """A non-empty string or integer as a string (at most `limit` chars); None otherwise."""
    if _int(v):
        v = str(v)
    if isinstance(v, str) and 0 < len(v) <= limit:
        return v
    return None


def _optional_id(v: object) -> str | None:
    """An optional id (relatedMessageId): kept when usable, ignored when odd."""
    return _scalar_id(v, MAX_ID)


def parse_dlr(data: dict[str, Any]) -> DlrEvent:
    """A delivery report's identity: (messageId, statusCode) and the status text, nothing else."""
    message_id = _scalar_id(data.get("messageId"), MAX_ID)
    if message_id is None:
        raise Unusable("bad_message_id", "dlr")
    code = data.get("statusCode")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= MAX_STATUS_CODE:
        raise Unusable("bad_status_code", "dlr")
    text = data.get("status")
    status_text = text[:MAX_STATUS_TEXT] if isinstance(text, str) else ""
    return DlrEvent(message_id=message_id, status=code, status_text=status_text)


def parse_mo(data: dict[str, Any]) -> MoEvent:
    """An incoming SMS: messageId, from (without '+'), to (without '+'), body, relatedMessageId."""
    message_id = _scalar_id(data.get("messageId"), MAX_ID)
    if message_id is None:
        raise Unusable("bad_message_id", "mo")
    sender = _scalar_id(data.get("from"), MAX_NUMBER)
    if sender is None or not sender.lstrip("+"):
        raise Unusable("bad_from", "mo")
    to = _scalar_id(data.get("to"), MAX_NUMBER)
    if to is None or not to.lstrip("+"):
        raise Unusable("bad_to", "mo")
    body = data.get("body")
    if not isinstance(body, str) or len(body) > MAX_BODY:
        raise Unusable("bad_body", "mo")
    return MoEvent(
        message_id=message_id,
        sender=sender.lstrip("+"),
        to=to.lstrip("+"),
        body=body,
        related_id=_optional_id(data.get("relatedMessageId")),
    )


def parse_webhook(raw: bytes) -> DlrEvent | MoEvent:
    """Parse one webhook body; raises `Unusable` when a field we use is missing or unusable."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError: ValueErrors
        raise Unusable("bad_json") from None
    if not isinstance(data, dict):
        raise Unusable("not_an_object")
    wtype = data.get("type")
    if wtype == "dlr":
        return parse_dlr(data)
    if wtype == "mo":
        return parse_mo(data)
    raise Unusable("unknown_type")


def webhook_body(event: MoEvent | DlrEvent) -> dict[str, object]:
    """The event as the Connexus webhook that carries it: what an operator POSTs to the
    webhook URL to re-inject it (ingest dedupes, so a second copy is harmless)."""
    if isinstance(event, DlrEvent):
        return {
            "type": "dlr",
            "messageId": event.message_id,
            "statusCode": event.status,
            "status": event.status_text,
        }
    return {
        "type": "mo",
        "messageId": event.message_id,
        "from": event.sender,
        "to": event.to,
        "body": event.body,
        "relatedMessageId": event.related_id,
    }
