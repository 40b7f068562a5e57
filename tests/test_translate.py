"""Table-driven tests of the pure translation functions and the strict legacy query parser."""

from __future__ import annotations

import contextlib
import time
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bc_proxy.config import DEFAULT_STATUS_MAP
from bc_proxy.errors import BadRequest
from bc_proxy.legacy.forms import parse_qs_strict
from bc_proxy.store import LegacyRecord
from bc_proxy.translate import (
    BULK_LIMIT,
    IN_KEYS,
    STATUS_KEYS,
    RecipientOutcome,
    SendRequest,
    bulk_bodies,
    bulk_outcomes,
    form_encode,
    legacy_status,
    parse_send,
    record_pairs,
    rejection_code,
    render_queue,
    render_record,
    single_form,
    single_outcome,
    split_recipients,
    upstream_reason,
)

# -- split_recipients -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("6421000000", ("6421000000",)),
        ("+6421000000", ("6421000000",)),
        ("6421000000 6421000001", ("6421000000", "6421000001")),
        ("6421000000,6421000001", ("6421000000", "6421000001")),
        ("6421000000, +6421000001 ,6421000002", ("6421000000", "6421000001", "6421000002")),
        ("6421000000;6421000001", ("6421000000", "6421000001")),
        ("  6421000000\t\n6421000001  ", ("6421000000", "6421000001")),
        (",,6421000000,,", ("6421000000",)),
        ("6421000000 6421000000 +6421000000", ("6421000000",)),
        ("++6421000000", ("6421000000",)),
        ("6421000001 6421000000", ("6421000001", "6421000000")),
        ("", ()),
        (" , + ; ", ()),
    ],
)
def test_split_recipients(to: str, expected: tuple[str, ...]) -> None:
    """Numbers split on spaces, commas, semicolons; lose a leading '+'; ordered and unique."""
    assert split_recipients(to) == expected


# -- parse_send -------------------------------------------------------------------------------

BASE = {"to": "6421000000", "body": "hi"}


@pytest.mark.parametrize(
    ("params", "default_from", "recipients", "message_id", "options"),
    [
        (BASE, None, ("6421000000",), None, ()),
        (BASE, "552", ("6421000000",), None, (("from", "552"),)),
        ({**BASE, "from": "2190"}, "552", ("6421000000",), None, (("from", "2190"),)),
        ({**BASE, "rateCode": "R1"}, "552", ("6421000000",), None, (("rateCode", "R1"),)),
        (
            {**BASE, "from": "", "rateCode": "R1"},
            None,
            ("6421000000",),
            None,
            (("rateCode", "R1"),),
        ),
        ({**BASE, "messageId": ""}, None, ("6421000000",), None, ()),
        ({**BASE, "messageId": "m" * 36}, None, ("6421000000",), "m" * 36, ()),
        ({**BASE, "messageId": "1700000000.1234"}, None, ("6421000000",), "1700000000.1234", ()),
        (
            {**BASE, "fragmentationLimit": "0"},
            None,
            ("6421000000",),
            None,
            (("fragmentationLimit", "0"),),
        ),
        (
            {**BASE, "fragmentationLimit": "3"},
            None,
            ("6421000000",),
            None,
            (("fragmentationLimit", "3"),),
        ),
        ({**BASE, "fragmentationLimit": ""}, None, ("6421000000",), None, ()),
        (
            {**BASE, "schedule": "1893456000"},
            None,
            ("6421000000",),
            None,
            (("schedule", "1893456000"),),
        ),
        (
            {**BASE, "contentType": "text/plain"},
            None,
            ("6421000000",),
            None,
            (("contentType", "text/plain"),),
        ),
        ({**BASE, "to": "1, +2 3"}, None, ("1", "2", "3"), None, ()),
        ({**BASE, "body": " "}, None, ("6421000000",), None, ()),
        ({**BASE, "userId": "u", "password": "p", "foo": "bar"}, None, ("6421000000",), None, ()),
    ],
)
def test_parse_send_accepts(
    params: dict[str, str],
    default_from: str | None,
    recipients: tuple[str, ...],
    message_id: str | None,
    options: tuple[tuple[str, str], ...],
) -> None:
    """Valid sends become a SendRequest with only pass-through options (and default from)."""
    req = parse_send(params, default_from)
    assert req.recipients == recipients
    assert req.body == params["body"]
    assert req.message_id == message_id
    assert dict(req.options) == dict(options)


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"body": "hi"}, "to"),
        ({"to": "", "body": "hi"}, "to"),
        ({"to": "   ", "body": "hi"}, "to"),
        ({"to": "+ ,", "body": "hi"}, "to"),
        ({"to": "6421000000"}, "body"),
        ({**BASE, "body": ""}, "body"),
        ({**BASE, "messageId": "m" * 37}, "messageId"),
        ({**BASE, "from": "552", "rateCode": "R1"}, "rateCode"),
        ({**BASE, "fragmentationLimit": "4"}, "fragmentationLimit"),
        ({**BASE, "fragmentationLimit": "-1"}, "fragmentationLimit"),
        ({**BASE, "fragmentationLimit": "x"}, "fragmentationLimit"),
        ({**BASE, "fragmentationLimit": "1.5"}, "fragmentationLimit"),
        ({**BASE, "fragmentationLimit": " 2"}, "fragmentationLimit"),
        ({**BASE, "fragmentationLimit": "\u00b2"}, "fragmentationLimit"),  # superscript two
        ({**BASE, "fragmentationLimit": "\u0663"}, "fragmentationLimit"),  # Arabic-Indic three
        ({**BASE, "fragmentationLimit": "99999999999999999999"}, "fragmentationLimit"),
        ({**BASE, "schedule": "tomorrow"}, "schedule"),
        ({**BASE, "schedule": "\u00b9\u00b2"}, "schedule"),
        ({**BASE, "schedule": "-5"}, "schedule"),
    ],
)
def test_parse_send_rejects(params: dict[str, str], word: str) -> None:
    """Invalid legacy sends raise BadRequest with a one-line reason naming the parameter."""
    with pytest.raises(BadRequest) as info:
        parse_send(params, "552")
    assert info.value.status == 400
    assert word in info.value.reason
    assert "\n" not in info.value.reason


# -- Connexus request bodies ------------------------------------------------------------------


def _req(n: int, options: tuple[tuple[str, str], ...] = ()) -> SendRequest:
    return SendRequest(tuple(f"64{i:08d}" for i in range(n)), "body", "legacy-1", options)


def test_single_form_uses_upstream_ref_not_legacy_id() -> None:
    """The one-recipient form carries the upstream ref as messageId and the pass-through options."""
    form = single_form(_req(1, (("from", "552"), ("rateCode", "R"))), "6400000000", "bcREF")
    assert form == {
        "to": "6400000000",
        "body": "body",
        "messageId": "bcREF",
        "from": "552",
        "rateCode": "R",
    }


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (2, [2]),
        (BULK_LIMIT, [200]),
        (BULK_LIMIT + 1, [200, 1]),
        (450, [200, 200, 50]),
        (1000, [200] * 5),
    ],
)
def test_bulk_bodies_chunk_at_200(n: int, sizes: list[int]) -> None:
    """Bulk bodies hold at most 200 recipients each, in order, once each, and no messageId."""
    req = _req(n, (("from", "552"), ("fragmentationLimit", "2"), ("schedule", "1893456000")))
    bodies = bulk_bodies(req, req.recipients)
    assert [len(b["to"]) for b in bodies] == sizes
    assert [r for b in bodies for r in b["to"]] == list(req.recipients)
    for b in bodies:
        assert "messageId" not in b  # one id for many recipients could not be attributed
        assert b["body"] == "body"
        assert b["from"] == "552"
        assert b["fragmentationLimit"] == 2  # a JSON number
        assert b["schedule"] == "1893456000"
        assert "legacy-1" not in str(b)


# -- reading Connexus answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            {"success": True, "message_id": "1158493", "to": "6421000000", "from": "552"},
            RecipientOutcome("6421000000", "accepted", "1158493", sender="552"),
        ),
        (
            {"success": True, "message_id": 7, "to": "+6421000000"},
            RecipientOutcome("6421000000", "accepted", "7"),
        ),
        # The one number asked for, however the answer writes it (Connexus may normalise it).
        (
            {"success": True, "message_id": "8", "to": "0064 21 000 000"},
            RecipientOutcome("6421000000", "accepted", "8"),
        ),
        (
            {"success": False, "to": "+64-21-000-000", "error": "Invalid number"},
            RecipientOutcome("6421000000", "rejected", None, error="Invalid number"),
        ),
        (
            {"success": False, "to": "6421000000", "error": "Invalid number"},
            RecipientOutcome("6421000000", "rejected", None, error="Invalid number"),
        ),
        (
            {"success": True, "message_id": "", "to": "6421000000"},
            RecipientOutcome("6421000000", "accepted", ""),
        ),
        # A 2xx is a sent message unless it says "success": false (issue 9, point 7).
        (
            {"success": "true", "message_id": "1"},
            RecipientOutcome("6421000000", "accepted", "1"),
        ),
        ({"status": "queued"}, RecipientOutcome("6421000000", "accepted", "")),
        ({"success": None}, RecipientOutcome("6421000000", "accepted", "")),
        (
            {"success": False, "status": "rejected"},
            RecipientOutcome("6421000000", "rejected", None, error="rejected"),
        ),
        (
            {"success": False, "message": "x" * 500},
            RecipientOutcome("6421000000", "rejected", None, error="x" * 200),
        ),
        # A 2xx that says nothing readable: the message went out, its Connexus id is unknown.
        (None, RecipientOutcome("6421000000", "accepted", "")),
        ([1, 2], RecipientOutcome("6421000000", "accepted", "")),
    ],
)
def test_single_outcome(answer: Any, expected: RecipientOutcome) -> None:
    """A single-send 2xx answer is a sent message unless it says success false (then a reason)."""
    assert single_outcome(answer, "6421000000") == expected


def test_bulk_outcomes_maps_each_recipient_once() -> None:
    """Bulk answers give one outcome per recipient; unmentioned ones are of unknown outcome."""
    answer = {
        "messages": [
            {"success": True, "message_id": "1", "to": "641"},
            {"success": False, "to": "642", "error": "Invalid number"},
            {"success": True, "message_id": "3", "to": "641"},  # duplicate: first wins
            "junk",
            {"success": True, "message_id": "5"},  # no `to`: positional fallback (index 4)
        ]
    }
    out = bulk_outcomes(answer, ["641", "642", "643", "644", "645"])
    by = {o.recipient: o for o in out}
    assert len(out) == len(by) == 5
    assert by["641"].connexus_id == "1"
    assert by["642"] == RecipientOutcome("642", "rejected", None, error="Invalid number")
    assert by["645"].connexus_id == "5"
    assert by["643"] == RecipientOutcome(
        "643", "unknown", None, error="not acknowledged by Connexus"
    )
    assert by["644"].state == "unknown"
    assert by["644"].connexus_id is None


@pytest.mark.parametrize("answer", [None, {}, {"messages": "x"}, [], "text"])
def test_bulk_outcomes_unreadable_answer_accepts_all(answer: Any) -> None:
    """A 2xx bulk answer without a messages list accepted everyone, ids unknown: calling it a
    failure would make the legacy client send the whole call again."""
    out = bulk_outcomes(answer, ["1", "2"])
    assert [(o.recipient, o.state, o.connexus_id) for o in out] == [
        ("1", "accepted", ""),
        ("2", "accepted", ""),
    ]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"success": False, "error": "Insufficient funds"}, "Insufficient funds"),
        ({"success": False, "message": "Account suspended", "messages": None}, "Account suspended"),
        ({"success": False}, "rejected"),
    ],
)
def test_bulk_outcomes_refusal_of_the_whole_call_rejects_all(answer: Any, reason: str) -> None:
    """A 2xx bulk answer that says `"success": false` and lists no messages refused the call,
    as the same answer to a single send does: every recipient rejected with the reason (a NUR,
    INF or ERR record each), never accepted (204, no record, the SMS silently lost)."""
    out = bulk_outcomes(answer, ["641", "642"])
    assert out == [
        RecipientOutcome("641", "rejected", None, error=reason),
        RecipientOutcome("642", "rejected", None, error=reason),
    ]
    assert single_outcome(answer, "641") == out[0]  # the two readings agree


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("Invalid destination number", "NUR"),
        ("Number blocked", "NUR"),
        ("recipient rejected", "NUR"),
        ("Unknown prefix", "NUR"),
        ("Insufficient funds", "INF"),
        ("Low balance", "INF"),
        ("no credit", "INF"),
        ("Server error", "ERR"),
        ("Connexus error 500", "ERR"),
        ("not acknowledged by Connexus", "ERR"),
        ("", "ERR"),
    ],
)
def test_rejection_code(reason: str, code: str) -> None:
    """A send-time rejection reason maps to NUR, INF or ERR."""
    assert rejection_code(reason) == code


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"message": "Bad  thing\nhappened"}, "Bad thing happened"),
        ({"error_description": "Invalid client"}, "Invalid client"),
        ({"error": "Missing parameters"}, "Missing parameters"),
        ({"message": "", "error": "fallback"}, "fallback"),
        ({"error": 42}, "default"),
        ({"message": "y" * 300}, "y" * 200),
        (None, "default"),
        ("oops", "default"),
    ],
)
def test_upstream_reason(answer: Any, expected: str) -> None:
    """Upstream error reasons are one short line, or the default when there is none."""
    assert upstream_reason(answer, "default") == expected


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        (1, "DELIVRD", ("RCV", "")),
        (2, "UNDELIV", ("NRCV", "")),
        (4, "QUEUED", ("SNT", "")),
        (8, "ACCEPTD", ("SNT", "")),
        (16, "UNDELIV", ("NUR", "")),
        (32, "EXPIRED", ("ERR", "EXPIRED (32)")),
        (0, "", ("ERR", "UNKNOWN (0)")),
    ],
)
def test_legacy_status_default_table(status: int, text: str, expected: tuple[str, str]) -> None:
    """Report codes map by the section 4 table; others are ERR with the raw status."""
    assert legacy_status(status, text, DEFAULT_STATUS_MAP) == expected


# -- legacy records ---------------------------------------------------------------------------


def _record(**kw: Any) -> LegacyRecord:
    base: dict[str, Any] = {
        "id": 1,
        "tenant": "acme",
        "kind": "status",
        "receipt_id": "r1",
        "msisdn_from": "6421000000",
        "msisdn_to": "552",
        "body": "",
        "rate_code": "",
        "in_reply_to": "",
        "status_code": "",
        "dlr_status": None,
        "error": "",
        "created_at": time.time(),
    }
    base.update(kw)
    return LegacyRecord(**base)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            _record(status_code="NUR", error="Invalid number", in_reply_to="m-1"),
            {"statusCode": "NUR", "error": "Invalid number", "inReplyToId": "m-1"},
        ),
        (_record(dlr_status=1), {"statusCode": "RCV", "error": ""}),
        (_record(dlr_status=64, error="WEIRD"), {"statusCode": "ERR", "error": "WEIRD (64)"}),
        (_record(), {"statusCode": "ERR", "inReplyToId": ""}),
    ],
)
def test_status_record_pairs(record: LegacyRecord, expected: dict[str, str]) -> None:
    """Status records carry exactly the six legacy keys in order, with the mapped status code."""
    pairs = record_pairs(record, DEFAULT_STATUS_MAP)
    assert tuple(k for k, _ in pairs) == STATUS_KEYS
    got = dict(pairs)
    assert got["messageId"] == "r1"
    assert got["from"] == "6421000000"
    assert got["to"] == "552"
    assert got["statusCode"] in {"SNT", "RCV", "NUR", "NRCV", "EXP", "ERR", "INF"}
    for key, value in expected.items():
        assert got[key] == value


def test_render_record_round_trips_through_form_parsing() -> None:
    """A rendered record is form-encoded: reserved characters and UTF-8 survive parse_qs."""
    record = _record(
        kind="in",
        msisdn_from="6421000000",
        msisdn_to="2190",
        body="Hi & bye = 100% + ü\nline",
        rate_code="",
        in_reply_to="1700000000.1234",
    )
    raw = render_record(record, DEFAULT_STATUS_MAP)
    parsed = parse_qs(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    assert list(parsed) == list(IN_KEYS)
    assert {k: v[0] for k, v in parsed.items()} == {
        "messageId": "r1",
        "from": "6421000000",
        "to": "2190",
        "body": "Hi & bye = 100% + ü\nline",
        "rateCode": "",
        "inReplyToId": "1700000000.1234",
    }


@pytest.mark.parametrize(("i", "s"), [(0, 0), (2, 5), (123456, 7)])
def test_render_queue_exact(i: int, s: int) -> None:
    """The queue answer is exactly two pairs, inCount then statusCount."""
    assert render_queue(i, s) == f"inCount={i}&statusCount={s}".encode()


# -- parse_qs_strict --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("a=1&b=2", {"a": "1", "b": "2"}),
        ("a=1&a=2", {"a": "1"}),
        ("a", {"a": ""}),
        ("a=", {"a": ""}),
        ("=x", {"": "x"}),
        ("a=b=c", {"a": "b=c"}),
        ("&&a=1&", {"a": "1"}),
        ("a=1;b=2", {"a": "1;b=2"}),
        ("body=Hello+there", {"body": "Hello there"}),
        ("body=%2B64+1", {"body": "+64 1"}),
        ("body=%C3%BC%e2%82%ac", {"body": "ü€"}),
        ("na+me=v", {"na me": "v"}),
        ("to=64%2C65", {"to": "64,65"}),
        ("x=%26%3D", {"x": "&="}),
    ],
)
def test_parse_qs_strict_accepts(text: str, expected: dict[str, str]) -> None:
    """Well-formed query strings parse with '+' as space and the first value of a key winning."""
    into: dict[str, str] = {}
    parse_qs_strict(text, into)
    assert into == expected


def test_parse_qs_strict_keeps_earlier_values() -> None:
    """Keys already present (from the query string) are not overwritten by the body."""
    into = {"body": "from query"}
    parse_qs_strict("body=from+body&to=1", into)
    assert into == {"body": "from query", "to": "1"}


@pytest.mark.parametrize(
    "text",
    [
        "body=%zz",
        "body=%",
        "body=%4",
        "body=100%",
        "body=%E0%A4%A",
        "body=%E0%A4",
        "body=%FF",
        "body=%C3",
        "%zz=1",
        "%FF=1",
        "body=a%00b",
        "a%00=b",
        "ok=1&body=%G0",
        "body=a\x01b",  # literal control characters, not escaped: no decoding path
        "a\x00=b",
        "to=1&body=caf%C3%A9&x=\x7f",
    ],
)
def test_parse_qs_strict_rejects(text: str) -> None:
    """Malformed percent-encoding, non-UTF-8 escapes and NUL bytes raise BadRequest (400)."""
    with pytest.raises(BadRequest) as info:
        parse_qs_strict(text, {})
    assert info.value.status == 400


# Control characters other than tab, CR and LF are excluded on purpose: parse_qs_strict
# rejects them (see test_parse_qs_strict_rejects).
_CONTROLS = "".join(chr(c) for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters=_CONTROLS))


@given(st.dictionaries(_TEXT, _TEXT))
def test_urlencoded_dict_parses_back_identically(params: dict[str, str]) -> None:
    """Any dict of str params encoded with urllib.parse.urlencode parses back identically."""
    into: dict[str, str] = {}
    parse_qs_strict(urlencode(params), into)
    assert into == params


@given(st.dictionaries(_TEXT, _TEXT))
def test_percent20_encoding_parses_back_identically(params: dict[str, str]) -> None:
    """Encoding spaces as %20 instead of '+' parses back identically too."""
    into: dict[str, str] = {}
    parse_qs_strict(urlencode(params, quote_via=quote), into)
    assert into == params


@given(st.text())
def test_parse_qs_strict_raises_only_bad_request(text: str) -> None:
    """Arbitrary input either parses or raises BadRequest, never another exception."""
    with contextlib.suppress(BadRequest):
        parse_qs_strict(text, {})


@given(st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=40), max_size=6))
def test_form_encode_matches_urlencode(params: dict[str, str]) -> None:
    """The fast upstream form encoder produces exactly urllib's urlencode bytes."""
    assert form_encode(params.items()) == urlencode(params).encode()
