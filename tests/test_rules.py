"""Table tests of the store's pure business rules (bc_proxy/store/rules.py): no I/O, no backend."""

from __future__ import annotations

import os
import time

import pytest

from bc_proxy.store.rules import (
    BLOCKED_ERROR,
    DEFAULT_IDEMPOTENCY_WINDOW,
    Delivery,
    Kind,
    Placement,
    Route,
    Rules,
    SendFacts,
    TenantRules,
    new_ref,
    only_settled,
    receipt_id,
)

NOW = 1_700_000_000.0
DAY = 86400.0
RULES = Rules(
    {
        "poll": TenantRules(senders=("552", "+2190")),
        "push": TenantRules(delivery=Delivery(push_in=True, push_status=True)),
        "both": TenantRules(
            delivery=Delivery(push_status=True, keep_for_polling=True, max_age_seconds=60),
            senders=("3000",),
            idempotency_window_seconds=600,
        ),
        "quiet": TenantRules(opt_out=False, senders=("4000",)),
    }
)


def facts(id: int, tenant: str, recipient: str = "641", legacy_id: str | None = None) -> SendFacts:
    return SendFacts(id, tenant, recipient, "552", legacy_id if legacy_id is not None else f"L{id}")


# -- delivery and placement -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delivery", "pushes_in", "pushes_status", "polls_in", "polls_status"),
    [
        (Delivery(), False, False, True, True),
        (Delivery(push_status=True), False, True, True, False),
        (Delivery(push_in=True, push_status=True), True, True, False, False),
        (Delivery(push_status=True, keep_for_polling=True), False, True, True, True),
    ],
)
def test_delivery_pushes_and_polls(
    delivery: Delivery, pushes_in: bool, pushes_status: bool, polls_in: bool, polls_status: bool
) -> None:
    """A kind is pushed when configured, and polled unless pushed (or kept for polling)."""
    assert (delivery.pushes("in"), delivery.pushes("status")) == (pushes_in, pushes_status)
    assert (delivery.pollable("in"), delivery.pollable("status")) == (polls_in, polls_status)


@pytest.mark.parametrize(
    ("tenant", "kind", "placement"),
    [
        (None, "in", Placement(False, None, None)),  # unmatched: nobody gets it yet
        ("gone", "status", Placement(True, None, None)),  # removed tenant: kept, pollable
        ("poll", "in", Placement(True, None, None)),
        ("push", "in", Placement(False, NOW, NOW + 48 * 3600)),
        ("push", "status", Placement(False, NOW, NOW + 48 * 3600)),
        ("both", "status", Placement(True, NOW, NOW + 60)),
        ("both", "in", Placement(True, None, None)),
    ],
)
def test_placement(tenant: str | None, kind: Kind, placement: Placement) -> None:
    """A new record is placed by its tenant's delivery settings."""
    assert RULES.placement(tenant, kind, NOW) == placement


def test_push_tenants_and_unconfigured() -> None:
    """Push tenants are listed per kind, sorted; unconfigured names are picked out."""
    assert RULES.push_tenants("in") == ["push"]
    assert RULES.push_tenants("status") == ["both", "push"]
    assert RULES.unconfigured(["poll", "gone", "x", "gone"]) == ["gone", "x"]
    assert RULES.delivery("gone") == Delivery()


# -- identity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_id", "status", "key"),
    [("cx-1", 1, "dlr:cx-1:1"), ("cx-1", 2, "dlr:cx-1:2"), ("bc0123", 16, "dlr:bc0123:16")],
)
def test_dlr_key(message_id: str, status: int, key: str) -> None:
    """A report's identity is its message id and status, nothing else."""
    assert Rules.dlr_key(message_id, status) == key


def test_mo_key() -> None:
    """An incoming message's identity is its messageId."""
    assert Rules.mo_key("m-1") == "mo:m-1"
    assert Rules.mo_key("m-1") != Rules.dlr_key("m-1", 1)


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "to"), [("poll", "552"), ("poll", "+552"), ("poll", "2190"), (None, "999")]
)
def test_owner(owner: str | None, to: str) -> None:
    """A number belongs to the tenant listing it, with or without '+'."""
    assert RULES.owner(to) == owner


def test_first_tenant_listing_a_number_owns_it() -> None:
    """Two tenants listing one number: the first one configured owns it."""
    rules = Rules({"a": TenantRules(senders=("1",)), "b": TenantRules(senders=("1",))})
    assert rules.owner("1") == "a"


@pytest.mark.parametrize(
    ("to", "related", "latest", "account", "route"),
    [
        # 1. an owned number: the owner, replying to its own send when the facts are its own
        ("552", None, None, "push", Route("poll", "")),
        ("552", facts(1, "poll"), None, None, Route("poll", "L1", 1)),
        ("552", facts(1, "push"), facts(2, "poll"), None, Route("poll", "L2", 2)),
        ("552", facts(1, "push"), facts(2, "push"), "push", Route("poll", "")),
        # 2. it relates to a known send
        ("999", facts(1, "push"), facts(2, "poll"), "poll", Route("push", "L1", 1)),
        # 3. the latest send to the handset
        ("999", None, facts(2, "both"), "poll", Route("both", "L2", 2)),
        ("999", None, facts(2, "both", legacy_id=""), None, Route("both", "", 2)),
        # 4. the account it came from
        ("999", None, None, "push", Route("push", "")),
        # 6. otherwise unmatched (several tenants configured)
        ("999", None, None, None, Route(None, "")),
    ],
)
def test_route_mo(
    to: str,
    related: SendFacts | None,
    latest: SendFacts | None,
    account: str | None,
    route: Route,
) -> None:
    """An incoming message is routed by number owner, related send, latest send, account."""
    assert RULES.route_mo(to, related=related, latest=latest, account=account) == route


def test_route_mo_single_tenant() -> None:
    """5. With exactly one tenant configured, an otherwise unmatched message is its."""
    rules = Rules({"only": TenantRules()})
    assert rules.route_mo("999", related=None, latest=None, account=None) == Route("only", "")


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([], None),
        ([facts(1, "poll")], facts(1, "poll")),
        ([facts(1, "poll"), facts(3, "poll")], facts(3, "poll")),  # same recipient: the latest
        ([facts(1, "poll"), facts(2, "poll", recipient="642")], "ambiguous"),
        ([facts(1, "poll"), facts(2, "push")], "ambiguous"),  # same handset, two tenants
    ],
)
def test_attribute_dlr(candidates: list[SendFacts], expected: SendFacts | str | None) -> None:
    """A report goes to the one recipient its id names; several recipients are ambiguous."""
    assert Rules.attribute_dlr(candidates) == expected


# -- sends ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "window"), [("poll", DEFAULT_IDEMPOTENCY_WINDOW), ("both", 600), ("gone", DAY)]
)
def test_window(tenant: str, window: float) -> None:
    """The idempotency window is the tenant's, or the default one day."""
    assert RULES.window(tenant) == window


@pytest.mark.parametrize(
    ("state", "repeat"),
    [("accepted", True), ("unknown", True), ("pending", True), ("rejected", False)],
)
def test_is_repeat(state: str, repeat: bool) -> None:
    """Only a rejected earlier send is forwarded again."""
    assert Rules.is_repeat(state) is repeat


def test_new_ref_is_short_unique_and_time_ordered() -> None:
    """Upstream refs are 23 characters, unique, and sort by creation time."""
    refs = []
    for _ in range(2000):
        refs.append(new_ref())
    assert all(len(r) == 23 and r.startswith("bc") for r in refs)
    assert len(set(refs)) == len(refs)
    time.sleep(0.002)
    later = new_ref()
    assert all(r[:15] <= later[:15] for r in refs)
    assert [r[:15] for r in refs] == sorted(r[:15] for r in refs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_new_ref_differs_in_a_forked_child() -> None:
    """A forked worker does not repeat its parent's refs: the random part of a ref comes from
    a generator the child reseeds (two processes can stamp the same microsecond)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next refs' random parts, then gone (never back into pytest)
        try:
            os.close(read)
            os.write(write, ",".join(new_ref()[15:] for _ in range(20)).encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = [new_ref()[15:] for _ in range(20)]
    with os.fdopen(read, "rb") as pipe:
        theirs = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    assert len(theirs) == 20
    assert set(mine).isdisjoint(theirs)


def test_receipt_id_is_unique_and_short() -> None:
    """Receipt ids are unique and within the legacy 50 characters."""
    ids = {receipt_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(0 < len(i) <= 50 for i in ids)


# -- opt-out ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "body", "command"),
    [
        ("poll", "STOP", "stop"),
        ("poll", "stop", "stop"),
        ("poll", "  Stop!! ", "stop"),
        ("poll", "STOPALL", "stop"),
        ("poll", "unsubscribe", "stop"),
        ("poll", "Opt-Out", "stop"),
        ("poll", "cancel", "stop"),
        ("poll", "quit", "stop"),
        ("poll", "END", "stop"),
        ("poll", "START", "start"),
        ("poll", "unstop", "start"),
        ("poll", "Opt-in", "start"),
        ("poll", "subscribe.", "start"),
        ("poll", "stop please", None),
        ("poll", "please stop", None),
        ("poll", "STOP STOP", None),
        ("poll", "", None),
        ("poll", "stopped", None),
        ("poll", "hello", None),
        ("quiet", "STOP", None),  # opt-out handling off for this tenant
        ("gone", "STOP", None),  # not configured
        (None, "STOP", None),  # unmatched: no tenant to block for
    ],
)
def test_opt_out_command(tenant: str | None, body: str, command: str | None) -> None:
    """STOP/START are recognised as the whole message, one word, case and punctuation ignored."""
    assert RULES.opt_out_command(tenant, body) == command


def test_blocked_error_text() -> None:
    """The NUR error of a blocked handset is the legacy platform's exact text."""
    assert BLOCKED_ERROR == "(Number in Blocked List)"


@pytest.mark.parametrize(
    ("refs", "settled", "kept"),
    [
        ([None, "a", "b"], {"a", "b"}, [0, 1, 2]),  # no row named, or rows this settle changed
        (["a", "b"], {"b"}, [1]),  # row a was no longer pending (settled before, or expired)
        (["a", "a", None, None], {"a"}, [0, 2, 3]),  # one per row; rowless ones all kept
        (["a"], set(), []),
    ],
)
def test_only_settled(refs: list[str | None], settled: set[str], kept: list[int]) -> None:
    statuses = list(enumerate(refs))
    assert [i for i, _ in only_settled(statuses, lambda x: x[1], settled)] == kept
