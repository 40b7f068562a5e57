"""`Rules.plan`, the one send-planning decision both store backends use: a table of cases."""

from __future__ import annotations

import pytest

from bc_proxy.store.rules import RecipientPlan, Rules, SendState

A, B, C = "6421000001", "6421000002", "6421000003"

CASES: list[tuple[str, tuple[str, ...], dict[str, SendState], set[str], RecipientPlan]] = [
    ("new recipients are sent in order", (A, B), {}, set(), RecipientPlan((A, B))),
    (
        "accepted earlier: repeat",
        (A,),
        {A: "accepted"},
        set(),
        RecipientPlan((), ((A, "accepted"),)),
    ),
    ("unknown earlier: repeat", (A,), {A: "unknown"}, set(), RecipientPlan((), ((A, "unknown"),))),
    ("pending earlier: repeat", (A,), {A: "pending"}, set(), RecipientPlan((), ((A, "pending"),))),
    ("rejected earlier: sent again", (A,), {A: "rejected"}, set(), RecipientPlan((A,))),
    ("blocked: not sent", (A, B), {}, {B}, RecipientPlan((A,), (), (B,))),
    (
        "a repeat wins over blocked",
        (A,),
        {A: "accepted"},
        {A},
        RecipientPlan((), ((A, "accepted"),)),
    ),
    ("rejected and blocked: blocked", (A,), {A: "rejected"}, {A}, RecipientPlan((), (), (A,))),
    ("named twice: sent once", (A, B, A), {}, set(), RecipientPlan((A, B), ((A, "pending"),))),
    ("blocked twice: listed once", (A, A), {}, {A}, RecipientPlan((), (), (A,))),
    (
        "repeat twice: listed once",
        (A, A),
        {A: "unknown"},
        set(),
        RecipientPlan((), ((A, "unknown"),)),
    ),
    ("facts of others ignored", (C,), {A: "accepted"}, {B}, RecipientPlan((C,))),
    ("no recipients", (), {}, set(), RecipientPlan()),
]


@pytest.mark.parametrize(
    ("recipients", "latest", "blocked", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_plan(
    recipients: tuple[str, ...],
    latest: dict[str, SendState],
    blocked: set[str],
    expected: RecipientPlan,
) -> None:
    assert Rules.plan(recipients, latest, blocked) == expected
