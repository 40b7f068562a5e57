"""Pure translation between the legacy protocol and Connexus: no I/O, table-tested.

Owns legacy send validation, recipient splitting, the Connexus request bodies, reading the
Connexus send answer per recipient, the delivery-status table and legacy record rendering.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

from bc_proxy.errors import BadRequest
from bc_proxy.store import LegacyRecord, SendState

BULK_LIMIT = 200
MAX_MESSAGE_ID = 36
_SPLIT = re.compile(r"[\s,;]+")
_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")

# The `error` of the status record of a recipient whose send has no known outcome.
UNKNOWN_OUTCOME = "Outcome unknown: no usable answer from Connexus; not re-sent by the gateway"

IN_KEYS = ("messageId", "from", "to", "body", "rateCode", "inReplyToId")
STATUS_KEYS = ("messageId", "from", "to", "statusCode", "inReplyToId", "error")
PASSTHROUGH = ("from", "rateCode", "contentType", "fragmentationLimit", "schedule")


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A validated legacy send."""

    recipients: tuple[str, ...]
    body: str
    message_id: str | None
    options: tuple[tuple[str, str], ...]  # pass-through Connexus params (from, rateCode, ...)

    @property
    def sender(self) -> str:
        opts = dict(self.options)
        return opts.get("from") or opts.get("rateCode") or ""


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What became of one recipient upstream.

    `accepted`: Connexus took it (`connexus_id` its message_id, "" when the answer gave none);
    `rejected`: Connexus refused it, or the request never left the gateway (a retry may send it
    again); `unknown`: the request was written but no usable answer came back (never re-sent).
    """

    recipient: str
    state: SendState
    connexus_id: str | None = None
    error: str = ""
    sender: str = ""

    @property
    def accepted(self) -> bool:
        return self.state == "accepted"


def split_recipients(to: str) -> tuple[str, ...]:
    """Numbers separated by spaces, commas or semicolons; leading '+' dropped; de-duplicated."""
    seen: dict[str, None] = {}
    for part in _SPLIT.split(to):
        number = part.lstrip("+")
        if number:
            seen.setdefault(number, None)
    return tuple(seen)


def _ascii_digits(value: str) -> bool:
    """0-9 only: str.isdigit() also accepts '²' (int() then fails) and non-ASCII digits."""
    return value.isascii() and value.isdigit()


def parse_send(params: Mapping[str, str], default_from: str | None) -> SendRequest:
    """Validate legacy send parameters (design.md section 3); raises BadRequest."""
    to = params.get("to", "")
    body = params.get("body", "")
    if not to.strip():
        raise BadRequest("Missing parameter: to")
    if body == "":
        raise BadRequest("Missing parameter: body")
    recipients = split_recipients(to)
    if not recipients:
        raise BadRequest("Invalid parameter: to has no number")
    message_id = params.get("messageId") or None
    if message_id is not None and len(message_id) > MAX_MESSAGE_ID:
        raise BadRequest("Invalid parameter: messageId longer than 36 characters")
    if params.get("from") and params.get("rateCode"):
        raise BadRequest("Invalid parameters: from cannot be used with rateCode")
    frag = params.get("fragmentationLimit", "")
    if frag not in ("", "0", "1", "2", "3"):
        raise BadRequest("Invalid parameter: fragmentationLimit must be 0-3")
    sched = params.get("schedule", "")
    if sched != "" and not _ascii_digits(sched):
        raise BadRequest("Invalid parameter: schedule must be a Unix timestamp")
    options = [(k, params[k]) for k in PASSTHROUGH if params.get(k)]
    if default_from and not params.get("from") and not params.get("rateCode"):
        options.insert(0, ("from", default_from))
    return SendRequest(recipients, body, message_id, tuple(options))


def single_form(req: SendRequest, recipient: str, upstream_ref: str) -> dict[str, str]:
    """Form fields of a one-recipient Connexus sms/out: `messageId` is that recipient's ref."""
    form = {"to": recipient, "body": req.body, "messageId": upstream_ref}
    form.update(req.options)
    return form


def bulk_bodies(req: SendRequest, recipients: Sequence[str]) -> list[dict[str, Any]]:
    """JSON bodies of Connexus bulk sms/out, at most BULK_LIMIT recipients each.

    No `messageId`: one id would name every recipient of the chunk, and a delivery report
    carrying it could not be attributed to one of them; each recipient's Connexus `message_id`
    from the answer is what identifies it.
    """
    base: dict[str, Any] = {"body": req.body}
    for key, value in req.options:
        base[key] = int(value) if key == "fragmentationLimit" else value
    rs = list(recipients)
    return [{**base, "to": rs[i : i + BULK_LIMIT]} for i in range(0, len(rs), BULK_LIMIT)]


def _one_outcome(
    item: Mapping[str, Any], fallback_to: str, to: str | None = None
) -> RecipientOutcome:
    """A 2xx item is a sent message unless it says `"success": false`; for `to` (else the
    item's own `to`, else `fallback_to`)."""
    if to is None:
        to = str(item.get("to") or fallback_to).lstrip("+")
    sender = str(item.get("from") or "")
    if item.get("success") is not False:
        # Accepted; an answer without message_id leaves "" (reports then match by our ref).
        return RecipientOutcome(to, "accepted", str(item.get("message_id") or ""), sender=sender)
    return RecipientOutcome(to, "rejected", None, error=_refusal(item), sender=sender)


def _refusal(item: Mapping[str, Any]) -> str:
    reason = item.get("error") or item.get("message") or item.get("status") or "rejected"
    return str(reason)[:200]


def single_outcome(answer: Any, recipient: str) -> RecipientOutcome:
    """Read a Connexus single-send answer (any 2xx): sent unless it says `"success": false`.

    A 2xx without a JSON body (connexus-api.txt also lists "204 Success - Message sent") means
    the message went out: calling it a failure would make the legacy client send it again.
    The outcome names `recipient`, the one number asked for, however the answer writes it.
    """
    if not isinstance(answer, dict):
        return RecipientOutcome(recipient, "accepted", "")
    return _one_outcome(answer, recipient, recipient)


def bulk_outcomes(answer: Any, recipients: Sequence[str]) -> list[RecipientOutcome]:
    """Read a Connexus bulk-send answer (any 2xx), one outcome per recipient asked for.

    A 2xx without a `messages` list accepted them all (ids unknown, see `single_outcome`),
    unless it says `"success": false` (a refusal of the whole call, as Connexus words its
    errors, "Insufficient funds" say): then it refused them all, as a single send's answer would.
    An item whose `to` is not a number we asked for (Connexus normalised it) is matched by
    position. A recipient the answer does not mention is `unknown`: nothing says it was not sent.
    """
    items = answer.get("messages") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        if isinstance(answer, dict) and answer.get("success") is False:
            reason = _refusal(answer)
            return [RecipientOutcome(r, "rejected", None, error=reason) for r in recipients]
        return [RecipientOutcome(r, "accepted", "") for r in recipients]
    wanted = set(recipients)
    out: list[RecipientOutcome] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        fallback = recipients[i] if i < len(recipients) else ""
        outcome = _one_outcome(item, fallback)
        if outcome.recipient not in wanted and fallback:
            outcome = RecipientOutcome(
                fallback, outcome.state, outcome.connexus_id, outcome.error, outcome.sender
            )
        if outcome.recipient in seen or outcome.recipient == "":
            continue
        seen.add(outcome.recipient)
        out.append(outcome)
    out.extend(
        RecipientOutcome(r, "unknown", None, error="not acknowledged by Connexus")
        for r in recipients
        if r not in seen
    )
    return out


def rejection_code(reason: str) -> str:
    """Legacy status for a recipient Connexus refused at send time: NUR, INF or ERR."""
    low = reason.lower()
    if "fund" in low or "balance" in low or "credit" in low:
        return "INF"
    if any(w in low for w in ("number", "recipient", "blocked", "invalid", "reject", "prefix")):
        return "NUR"
    return "ERR"


def upstream_reason(answer: Any, default: str) -> str:
    """A short, safe reason from a Connexus error answer."""
    if isinstance(answer, dict):
        for key in ("message", "error_description", "error"):
            value = answer.get(key)
            if isinstance(value, str) and value:
                return " ".join(value.split())[:200]
    return default


def legacy_status(dlr_status: int, status_text: str, table: Mapping[int, str]) -> tuple[str, str]:
    """(statusCode, error) of a Connexus delivery report, by the status table."""
    code = table.get(dlr_status)
    if code is None:
        return "ERR", f"{status_text or 'UNKNOWN'} ({dlr_status})"
    return code, ""


def _quote(value: str) -> str:
    return value if _SAFE.fullmatch(value) else quote_plus(value)


def form_encode(pairs: Iterable[tuple[str, str]]) -> bytes:
    """application/x-www-form-urlencoded, byte for byte what urllib's urlencode gives, faster
    (most values - numbers, ids - need no quoting at all)."""
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs).encode()


def record_pairs(record: LegacyRecord, table: Mapping[int, str]) -> tuple[tuple[str, str], ...]:
    """The legacy key/value pairs of a record, every key present."""
    if record.kind == "in":
        return (
            ("messageId", record.receipt_id),
            ("from", record.msisdn_from),
            ("to", record.msisdn_to),
            ("body", record.body),
            ("rateCode", record.rate_code),
            ("inReplyToId", record.in_reply_to),
        )
    code, error = record.status_code, record.error
    if not code:
        code, error = legacy_status(record.dlr_status or 0, record.error, table)
    return (
        ("messageId", record.receipt_id),
        ("from", record.msisdn_from),
        ("to", record.msisdn_to),
        ("statusCode", code),
        ("inReplyToId", record.in_reply_to),
        ("error", error),
    )


def render_record(record: LegacyRecord, table: Mapping[int, str]) -> bytes:
    """A record as the legacy form-encoded body (poll answer and push body alike)."""
    return form_encode(record_pairs(record, table))


def render_queue(in_count: int, status_count: int) -> bytes:
    """Exactly `inCount=N&statusCount=M`."""
    return f"inCount={in_count}&statusCount={status_count}".encode()
