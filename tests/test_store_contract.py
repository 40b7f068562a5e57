"""The `Store` contract: one suite, written only against the Protocol, run on every backend.

To run it on another backend, add its name to BACKENDS and teach `backend_url` to hand out an
empty store (one per test) for it; nothing else here may know which backend it talks to.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from bc_proxy.errors import StoreError
from bc_proxy.store import (
    Delivery,
    DlrEvent,
    IngestResult,
    Kind,
    LegacyRecord,
    MoEvent,
    Rules,
    SendIntent,
    SendState,
    Settlement,
    StatusRecord,
    Store,
    SweepMark,
    TenantRules,
    open_store,
)
from bc_proxy.store.rules import (
    BLOCKED_ERROR,
    DEFAULT_IDEMPOTENCY_WINDOW,
    REPORT_CLOCK_TOLERANCE_SECONDS,
)
from bc_proxy.translate import UNKNOWN_OUTCOME
from tests import pg

BACKENDS = ["sqlite", "sqlite-fsync", "postgres"]  # sqlite-fsync also fsyncs each commit group

POLL = "acme"  # polls everything; owns SENDER
OTHER = "beta"  # polls everything; owns OTHER_NUMBER; must never see acme's records
PUSH = "pusher"  # status records are pushed only
BOTH = "both"  # status records are pushed and kept for polling
QUIET = "quiet"  # STOP/START are ordinary messages for it
HOUR = 3600.0
HANDSET = "6421000001"
SENDER = "552"
OTHER_NUMBER = "2190"
UNLISTED = "999"  # nobody's number
TENANTS = {
    POLL: TenantRules(senders=(SENDER,)),
    OTHER: TenantRules(senders=(OTHER_NUMBER,)),
    PUSH: TenantRules(delivery=Delivery(push_status=True, max_age_seconds=HOUR)),
    BOTH: TenantRules(
        delivery=Delivery(push_status=True, keep_for_polling=True, max_age_seconds=HOUR)
    ),
    QUIET: TenantRules(opt_out=False, senders=("3000",)),
}
RULES = Rules(TENANTS)


def backend_url(backend: str, tmp_path: Path) -> str:
    """A store URL naming an empty store that only this test uses."""
    if backend in ("sqlite", "sqlite-fsync"):
        return f"sqlite:///{tmp_path / 'contract.db'}"
    if backend == "postgres":  # a fresh schema (tests/pg.py: skipped when the server is down)
        return pg.schema_url_sync()
    raise AssertionError(f"no URL recipe for backend {backend!r}")


@dataclass
class Opened:
    """Every store a test opened on one URL, closed at teardown."""

    url: str
    fsync: bool = False
    stores: list[Store] = field(default_factory=list)

    async def open(self, rules: Rules = RULES, **kwargs: Any) -> Store:
        store = open_store(self.url, rules, fsync=self.fsync, **kwargs)
        await store.open()
        self.stores.append(store)
        return store


OPENED = pytest.StashKey[Opened]()
Reopen = Callable[..., Awaitable[Store]]


@pytest.fixture(params=BACKENDS)
async def opened(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opened]:
    """Opens stores of each backend on one empty database; closes them after the test."""
    backend = cast(str, request.param)
    o = Opened(backend_url(backend, tmp_path), fsync=backend.endswith("-fsync"))
    yield o
    for s in reversed(o.stores):
        await s.close()


@pytest.fixture
async def store(opened: Opened) -> Store:
    """An open, empty store of each backend with the RULES tenants."""
    return await opened.open()


@pytest.fixture
def reopen(opened: Opened, store: Store) -> Reopen:
    """Open another store on the same database as `store` (after closing it: a restart)."""
    return opened.open


# -- helpers ---------------------------------------------------------------------------------


def intent(
    legacy_id: str | None = "L1", *recipients: str, tenant: str = POLL, sender: str = SENDER
) -> SendIntent:
    return SendIntent(tenant, legacy_id, recipients or (HANDSET,), sender)


async def sent(
    store: Store,
    n: int,
    *,
    tenant: str = POLL,
    recipient: str = HANDSET,
    legacy_id: str | None = "",
    state: SendState = "accepted",
    connexus_id: str | None = "",
) -> str:
    """Send number `n` (legacy id L<n>, Connexus id cx-<n>), settled; returns its upstream ref."""
    lid = f"L{n}" if legacy_id == "" else legacy_id
    plan = await store.begin_send(intent(lid, recipient, tenant=tenant), time.time())
    (planned,) = plan.to_send
    cid = f"cx-{n}" if connexus_id == "" else connexus_id
    await store.settle_send([Settlement(planned.upstream_ref, state, cid)])
    return planned.upstream_ref


def dlr(message_id: str, status: int = 1, text: str = "DELIVRD") -> DlrEvent:
    return DlrEvent(message_id=message_id, status=status, status_text=text)


def mo(
    message_id: str,
    *,
    sender: str = HANDSET,
    to: str = SENDER,
    body: str = "hello",
    related_id: str | None = None,
) -> MoEvent:
    return MoEvent(message_id, sender, to, body, related_id)


async def drain(store: Store, tenant: str, kind: Kind) -> list[LegacyRecord]:
    """Claim and ack every pollable record of (tenant, kind), oldest first."""
    out: list[LegacyRecord] = []
    while (record := await store.claim(tenant, kind)) is not None:
        assert await store.ack(record)
        out.append(record)
        assert len(out) <= 2000, "ack does not consume: the same records keep coming back"
    return out


async def only(store: Store, tenant: str, kind: Kind) -> LegacyRecord:
    """The single pollable record of (tenant, kind), consumed."""
    records = await drain(store, tenant, kind)
    assert len(records) == 1, records
    return records[0]


def later(seconds: float = 1.0) -> float:
    return time.time() + seconds


# -- sends: write-ahead and idempotency -------------------------------------------------------


async def test_begin_send_plans_every_recipient_with_its_own_ref(store: Store) -> None:
    """A new send plans each recipient once, in order, each with its own short upstream ref."""
    recipients = tuple(f"64{i:08d}" for i in range(50))
    plan = await store.begin_send(intent("L1", *recipients), time.time())
    assert [p.recipient for p in plan.to_send] == list(recipients)
    refs = [p.upstream_ref for p in plan.to_send]
    assert len(set(refs)) == 50
    assert max(len(r) for r in refs) <= 36
    assert (plan.repeats, plan.blocked) == ((), ())


@pytest.mark.parametrize(
    ("state", "repeat"),
    [("accepted", True), ("unknown", True), ("pending", True), ("rejected", False)],
)
async def test_retry_within_window_by_earlier_state(
    store: Store, state: SendState, repeat: bool
) -> None:
    """A retry repeats an accepted, unknown or pending send, and sends a rejected one again."""
    plan = await store.begin_send(intent("L1"), time.time())
    if state != "pending":
        await store.settle_send([Settlement(plan.to_send[0].upstream_ref, state, None)])
    again = await store.begin_send(intent("L1"), time.time())
    if repeat:
        assert again.repeats == ((HANDSET, state),)
        assert again.to_send == ()
    else:
        assert again.repeats == ()
        assert [p.recipient for p in again.to_send] == [HANDSET]
        assert again.to_send[0].upstream_ref != plan.to_send[0].upstream_ref


async def test_retry_after_window_is_sent_again(store: Store) -> None:
    """A retry of an accepted send after the idempotency window is a new send."""
    now = time.time()
    plan = await store.begin_send(intent("L1"), now)
    await store.settle_send([Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-1")])
    inside = await store.begin_send(intent("L1"), now + DEFAULT_IDEMPOTENCY_WINDOW - 60)
    assert inside.repeats == ((HANDSET, "accepted"),)
    outside = await store.begin_send(intent("L1"), now + DEFAULT_IDEMPOTENCY_WINDOW + 60)
    assert [p.recipient for p in outside.to_send] == [HANDSET]


async def test_send_without_legacy_id_is_never_a_repeat(store: Store) -> None:
    """Without a legacy messageId every send is forwarded."""
    for _ in range(3):
        plan = await store.begin_send(intent(None), time.time())
        assert [p.recipient for p in plan.to_send] == [HANDSET]


async def test_repeat_is_per_tenant_and_recipient(store: Store) -> None:
    """The same messageId from another tenant, or to a new recipient, is not a repeat."""
    await store.begin_send(intent("L1", HANDSET), time.time())
    other = await store.begin_send(intent("L1", HANDSET, tenant=OTHER), time.time())
    assert [p.recipient for p in other.to_send] == [HANDSET]
    more = await store.begin_send(intent("L1", HANDSET, "6421000002"), time.time())
    assert [p.recipient for p in more.to_send] == ["6421000002"]
    assert more.repeats == ((HANDSET, "pending"),)


async def test_concurrent_identical_sends_forward_once(store: Store) -> None:
    """Two identical sends at the same moment: one is forwarded, the other is a repeat."""
    plans = await asyncio.gather(*(store.begin_send(intent("L1"), time.time()) for _ in range(2)))
    assert sorted(len(p.to_send) for p in plans) == [0, 1]
    assert sorted(p.repeats for p in plans) == [(), ((HANDSET, "pending"),)]


async def test_duplicate_recipient_in_one_call_is_forwarded_once(store: Store) -> None:
    """A recipient listed twice in one call with a messageId is forwarded once."""
    plan = await store.begin_send(intent("L1", HANDSET, HANDSET), time.time())
    assert [p.recipient for p in plan.to_send] == [HANDSET]
    assert plan.repeats == ((HANDSET, "pending"),)


async def test_duplicate_recipient_without_message_id_is_forwarded_once(store: Store) -> None:
    """Without a messageId too: a number named twice in one call is sent once."""
    plan = await store.begin_send(intent(None, HANDSET, "6421000002", HANDSET), time.time())
    assert [p.recipient for p in plan.to_send] == [HANDSET, "6421000002"]
    assert plan.repeats == ((HANDSET, "pending"),)


async def test_group_of_sends_plans_each_call_on_its_own(store: Store) -> None:
    """Many calls at one moment (one group commit): each gets its own plan, in its own order;
    a blocked handset and a repeat are decided per call."""
    await store.add_mo(mo("stop-1", sender="6421000009", body="STOP"), account=None)
    await sent(store, 1, recipient="6421000008")
    calls = [intent(f"G{i}", f"64210001{i:02d}", "6421000009") for i in range(20)]
    calls.append(intent("L1", "6421000008", "6421000007"))
    plans = await asyncio.gather(*(store.begin_send(c, time.time()) for c in calls))
    for i, plan in enumerate(plans[:20]):
        assert [p.recipient for p in plan.to_send] == [f"64210001{i:02d}"]
        assert plan.blocked == ("6421000009",)
    assert [p.recipient for p in plans[20].to_send] == ["6421000007"]
    assert plans[20].repeats == (("6421000008", "accepted"),)
    assert len({p.upstream_ref for plan in plans for p in plan.to_send}) == 21
    nur = [r for r in await drain(store, POLL, "status") if r.msisdn_from == "6421000009"]
    assert len(nur) == 20
    assert {r.status_code for r in nur} == {"NUR"}


async def test_expire_pending_writes_one_unknown_outcome_record(store: Store) -> None:
    """An expired pending send gets the status record a live send writes for an unknown
    outcome (ERR), once: a second expiry finds nothing and writes nothing."""
    plan = await store.begin_send(intent("L7", HANDSET, "6421000002"), time.time())
    await store.settle_send([Settlement(plan.to_send[1].upstream_ref, "accepted", "cx-7")])
    assert await store.expire_pending(later()) == 1
    assert await store.expire_pending(later()) == 0
    record = await only(store, POLL, "status")
    assert (record.status_code, record.error) == ("ERR", UNKNOWN_OUTCOME)
    assert (record.msisdn_from, record.msisdn_to, record.in_reply_to) == (HANDSET, SENDER, "L7")
    again = await store.begin_send(intent("L7", HANDSET), time.time())
    assert again.repeats == ((HANDSET, "unknown"),)


async def test_a_settle_after_expiry_does_not_contradict_it(store: Store) -> None:
    """A settle that comes after expiry (a retried settle, a slow one) leaves the row
    `unknown`: the client already has its ERR record, and a retry stays unresolved."""
    plan = await store.begin_send(intent("L11"), time.time())
    assert await store.expire_pending(later()) == 1
    await store.settle_send([Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-11")])
    again = await store.begin_send(intent("L11"), time.time())
    assert again.repeats == ((HANDSET, "unknown"),)
    record = await only(store, POLL, "status")
    assert (record.status_code, record.error) == ("ERR", UNKNOWN_OUTCOME)


async def test_a_settle_repeated_after_its_commit_stores_its_statuses_once(store: Store) -> None:
    """A settle committed twice (retried after a commit whose answer was lost) stores its
    refusal once; one after expiry stores none (the ERR record stands alone); a status
    record naming no send row is stored whenever given."""
    plan = await store.begin_send(intent("L12", HANDSET, "6421000002"), time.time())
    a, b = plan.to_send
    settle = [
        Settlement(a.upstream_ref, "accepted", "cx-12"),
        Settlement(b.upstream_ref, "rejected"),
    ]
    refusal = StatusRecord(POLL, b.recipient, SENDER, "L12", "NUR", "invalid", b.upstream_ref)
    await store.settle_send(settle, [refusal])
    await store.settle_send(settle, [refusal])
    rec = await only(store, POLL, "status")
    assert (rec.msisdn_from, rec.status_code) == (b.recipient, "NUR")
    late = await store.begin_send(intent("L13"), time.time())
    assert await store.expire_pending(later()) == 1
    (c,) = late.to_send
    await store.settle_send(
        [Settlement(c.upstream_ref, "rejected")],
        [StatusRecord(POLL, HANDSET, SENDER, "L13", "NUR", "invalid", c.upstream_ref)],
    )
    rec = await only(store, POLL, "status")
    assert (rec.in_reply_to, rec.status_code, rec.error) == ("L13", "ERR", UNKNOWN_OUTCOME)


async def test_two_settles_of_one_row_at_once_store_its_status_once(store: Store) -> None:
    """Two settles of one row committed together (one group): one status record, and a
    status record naming a row the call does not settle is not stored."""
    plan = await store.begin_send(intent("L14", HANDSET, "6421000002"), time.time())
    a, b = plan.to_send
    settle = [Settlement(a.upstream_ref, "rejected")]
    refusal = StatusRecord(POLL, a.recipient, SENDER, "L14", "NUR", "invalid", a.upstream_ref)
    stray = StatusRecord(POLL, b.recipient, SENDER, "L14", "NUR", "invalid", b.upstream_ref)
    await asyncio.gather(
        store.settle_send(settle, [refusal]), store.settle_send(settle, [refusal, stray])
    )
    rec = await only(store, POLL, "status")
    assert rec.msisdn_from == a.recipient


async def test_expire_pending_record_is_placed_by_the_tenants_rules(store: Store) -> None:
    """The unknown-outcome record of a push tenant's expired send is pushed, not polled."""
    await store.begin_send(intent("L8", tenant=PUSH), time.time())
    assert await store.expire_pending(later()) == 1
    pushes = await store.claim_pushes(later(), 10)
    assert [(r.tenant, r.status_code) for r in pushes] == [(PUSH, "ERR")]
    assert await store.claim(PUSH, "status") is None


async def test_expire_pending_makes_calls_unknown(store: Store) -> None:
    """Pending rows older than the cut-off become unknown, and a retry is then not re-sent."""
    await store.begin_send(intent("L1"), time.time())
    assert await store.expire_pending(time.time() - HOUR) == 0
    assert await store.expire_pending(later()) == 1
    assert await store.expire_pending(later()) == 0
    again = await store.begin_send(intent("L1"), time.time())
    assert again.repeats == ((HANDSET, "unknown"),)


async def test_blocked_handset_gets_a_nur_record(store: Store) -> None:
    """A handset that sent STOP is not planned; a NUR status record says it is blocked."""
    await store.add_mo(mo("m-stop", body="STOP"), account=None)
    await drain(store, POLL, "in")
    seen = store.waker.generation(POLL, "status")
    plan = await store.begin_send(intent("L1", HANDSET, "6421000002"), time.time())
    assert store.waker.generation(POLL, "status") != seen
    assert [p.recipient for p in plan.to_send] == ["6421000002"]
    assert plan.blocked == (HANDSET,)
    rec = await only(store, POLL, "status")
    assert (rec.status_code, rec.error) == ("NUR", BLOCKED_ERROR)
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to) == (HANDSET, SENDER, "L1")
    assert await store.begin_send(intent("L1", HANDSET, tenant=OTHER), time.time()) != plan


async def test_blocked_is_per_tenant(store: Store) -> None:
    """A STOP to one tenant does not block the handset for another."""
    await store.add_mo(mo("m-stop", body="STOP"), account=None)
    plan = await store.begin_send(intent("L1", tenant=OTHER), time.time())
    assert [p.recipient for p in plan.to_send] == [HANDSET]
    assert plan.blocked == ()


async def test_settle_records_statuses_and_wakes(store: Store) -> None:
    """Status records given to settle_send are pollable with their code, error and send."""
    plan = await store.begin_send(intent("L1", HANDSET, "6421000002"), time.time())
    a, b = plan.to_send
    seen = store.waker.generation(POLL, "status")
    await store.settle_send(
        [Settlement(a.upstream_ref, "accepted", "cx-a"), Settlement(b.upstream_ref, "rejected")],
        [StatusRecord(POLL, b.recipient, SENDER, "L1", "NUR", "invalid number", b.upstream_ref)],
    )
    assert store.waker.generation(POLL, "status") != seen
    rec = await only(store, POLL, "status")
    assert (rec.status_code, rec.error, rec.dlr_status) == ("NUR", "invalid number", None)
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to) == (b.recipient, SENDER, "L1")
    assert (await store.add_dlr(dlr("cx-a"))).tenant == POLL


async def test_status_without_legacy_id_or_ref(store: Store) -> None:
    """A status record with no legacy messageId and no send has inReplyToId ''."""
    await store.settle_send([], [StatusRecord(POLL, HANDSET, SENDER, None, "ERR", "bad")])
    rec = await only(store, POLL, "status")
    assert (rec.in_reply_to, rec.status_code, rec.error) == ("", "ERR", "bad")


async def test_status_of_push_tenant_is_pushed(store: Store) -> None:
    """A status record for a push-only tenant goes to the push queue, not to polling."""
    await store.settle_send([], [StatusRecord(PUSH, HANDSET, SENDER, "L1", "NUR", "x")])
    assert await store.claim(PUSH, "status") is None
    assert [p.status_code for p in await store.claim_pushes(later(), 10)] == ["NUR"]


# -- delivery reports -------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["connexus_id", "upstream_ref"])
async def test_dlr_matches_its_send(store: Store, by: str) -> None:
    """A report found by either id becomes a status record of the send's tenant and recipient."""
    await sent(store, 2)
    ref = await sent(store, 1, tenant=OTHER)
    result = await store.add_dlr(dlr("cx-1" if by == "connexus_id" else ref, 2, "UNDELIV"))
    assert result == IngestResult("stored", OTHER)
    assert await store.claim(POLL, "status") is None
    rec = await only(store, OTHER, "status")
    assert (rec.tenant, rec.kind) == (OTHER, "status")
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to) == (HANDSET, SENDER, "L1")
    assert (rec.dlr_status, rec.error, rec.status_code, rec.body) == (2, "UNDELIV", "", "")
    assert 0 < len(rec.receipt_id) <= 50


async def test_dlr_by_ref_of_a_pending_send_is_matched(store: Store) -> None:
    """A report by our upstream ref that beats the upstream answer is matched at once."""
    plan = await store.begin_send(intent("L1"), time.time())
    result = await store.add_dlr(dlr(plan.to_send[0].upstream_ref))
    assert result == IngestResult("stored", POLL)
    assert (await only(store, POLL, "status")).in_reply_to == "L1"


async def test_dlr_without_legacy_id_has_empty_in_reply_to(store: Store) -> None:
    """A send the legacy client gave no messageId yields a status record with inReplyToId ''."""
    await sent(store, 1, legacy_id=None)
    await store.add_dlr(dlr("cx-1"))
    assert (await only(store, POLL, "status")).in_reply_to == ""


async def test_early_dlr_is_matched_when_its_connexus_id_is_known(store: Store) -> None:
    """A report naming a Connexus id not known yet waits unmatched, then goes to its send."""
    result = await store.add_dlr(dlr("cx-7"))
    assert result == IngestResult("unmatched", None)
    for tenant in TENANTS:
        assert await store.claim(tenant, "status") is None
    seen = store.waker.generation(POLL, "status")
    await sent(store, 7)
    assert store.waker.generation(POLL, "status") != seen
    rec = await only(store, POLL, "status")
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to, rec.dlr_status) == (
        HANDSET,
        SENDER,
        "L7",
        1,
    )


async def test_early_dlr_for_push_tenant_is_pushed_once_matched(store: Store) -> None:
    """An early report matched to a push tenant's send enters the push queue, not polling."""
    await store.add_dlr(dlr("cx-1"))
    await sent(store, 1, tenant=PUSH)
    assert await store.claim(PUSH, "status") is None
    pushes = await store.claim_pushes(later(), 10)
    assert [(p.tenant, p.in_reply_to) for p in pushes] == [(PUSH, "L1")]


async def test_ambiguous_dlr_is_never_attributed(store: Store) -> None:
    """A report whose id names two recipients is kept unmatched, and stays so."""
    plan = await store.begin_send(intent("L1", HANDSET, "6421000002"), time.time())
    await store.settle_send([Settlement(p.upstream_ref, "accepted", "cx-1") for p in plan.to_send])
    assert await store.add_dlr(dlr("cx-1")) == IngestResult("ambiguous", None)
    await sent(store, 9, connexus_id="cx-1")  # more news about that id changes nothing
    for tenant in TENANTS:
        assert await store.claim(tenant, "status") is None


async def test_early_dlr_turning_ambiguous_is_never_attributed(store: Store) -> None:
    """An early report whose id, once settled, names two recipients is never attributed."""
    await store.add_dlr(dlr("cx-1"))
    plan = await store.begin_send(intent("L1", HANDSET, "6421000002"), time.time())
    await store.settle_send([Settlement(p.upstream_ref, "accepted", "cx-1") for p in plan.to_send])
    await sent(store, 9, recipient="6421000009", connexus_id="cx-1")
    for tenant in TENANTS:
        assert await store.claim(tenant, "status") is None


async def test_duplicate_dlr_ignores_details(store: Store) -> None:
    """The same (message id, status) twice is one record, whatever else differs."""
    await sent(store, 1)
    assert await store.add_dlr(dlr("cx-1", 1, "DELIVRD")) == IngestResult("stored", POLL)
    assert await store.add_dlr(dlr("cx-1", 1, "")) == IngestResult("duplicate", POLL)
    assert len(await drain(store, POLL, "status")) == 1
    assert not (await store.add_dlr(dlr("cx-1"))).stored  # consumed is still a duplicate


async def test_duplicate_early_dlr_is_stored_once(store: Store) -> None:
    """A retried report that arrived before its send is still one record once matched."""
    await store.add_dlr(dlr("cx-1"))
    assert not (await store.add_dlr(dlr("cx-1"))).stored
    await sent(store, 1)
    assert len(await drain(store, POLL, "status")) == 1


async def test_an_unknown_outcome_of_a_reported_send_is_accepted_without_err(
    store: Store,
) -> None:
    """A report by our ref (it beat the sms/out answer) names a pending row; the answer is
    then lost (`unknown`, with its ERR record): a report proves Connexus took that one, so it
    is settled `accepted` with no ERR after its report, and a retry is a repeat of an accepted
    send. The other recipient, not reported, keeps its unknown outcome and ERR."""
    plan = await store.begin_send(intent("L21", HANDSET, "6421000002"), time.time())
    a, b = plan.to_send
    assert await store.add_dlr(dlr(a.upstream_ref, 2, "UNDELIV")) == IngestResult("stored", POLL)
    await store.settle_send(
        [Settlement(a.upstream_ref, "unknown"), Settlement(b.upstream_ref, "unknown")],
        [
            StatusRecord(POLL, p.recipient, SENDER, "L21", "ERR", UNKNOWN_OUTCOME, p.upstream_ref)
            for p in plan.to_send
        ],
    )
    records = await drain(store, POLL, "status")
    assert [(r.msisdn_from, r.dlr_status, r.status_code) for r in records] == [
        (HANDSET, 2, ""),
        ("6421000002", None, "ERR"),
    ]
    again = await store.begin_send(intent("L21", HANDSET, "6421000002"), time.time())
    assert again.to_send == ()
    assert again.repeats == ((HANDSET, "accepted"), ("6421000002", "unknown"))
    assert await store.expire_pending(later()) == 0


async def test_expiry_of_a_reported_send_accepts_it_without_err(store: Store) -> None:
    """A pending row a report names (its process died mid-call, or its deferred settle was
    abandoned) expires `accepted`, with no unknown-outcome ERR after its report, whatever the
    report's code; an unreported one beside it still expires `unknown` with its ERR."""
    reported = await store.begin_send(intent("L22"), time.time())
    (ref,) = [p.upstream_ref for p in reported.to_send]
    await store.begin_send(intent("L23"), time.time())
    assert (await store.add_dlr(dlr(ref, 99, "ODD"))).outcome == "stored"
    assert await store.expire_pending(later()) == 2
    assert await store.expire_pending(later()) == 0
    records = await drain(store, POLL, "status")
    assert [(r.in_reply_to, r.dlr_status, r.status_code) for r in records] == [
        ("L22", 99, ""),
        ("L23", None, "ERR"),
    ]
    assert (await store.begin_send(intent("L22"), time.time())).repeats == ((HANDSET, "accepted"),)
    assert (await store.begin_send(intent("L23"), time.time())).repeats == ((HANDSET, "unknown"),)


@pytest.mark.parametrize(
    ("sent_later", "matched"),
    [(REPORT_CLOCK_TOLERANCE_SECONDS / 2, True), (REPORT_CLOCK_TOLERANCE_SECONDS * 2, False)],
    ids=["within-the-clock-tolerance", "a-send-written-later"],
)
async def test_a_report_kept_from_before_a_send_is_not_given_to_it(
    store: Store, sent_later: float, matched: bool
) -> None:
    """A report kept unmatched goes to a send its id names later only if that send was
    written before the report was stored (give or take the clocks' tolerance). Otherwise it
    was about another message with the same id (sent outside the gateway): it stays
    unmatched, and that send's own report with the same id and code is stored, not dropped
    as a repeat of it."""
    assert await store.add_dlr(dlr("cx-31", 2, "UNDELIV")) == IngestResult("unmatched", None)
    plan = await store.begin_send(intent("L31"), time.time() + sent_later)
    await store.settle_send([Settlement(plan.to_send[0].upstream_ref, "accepted", "cx-31")])
    early = await drain(store, POLL, "status")
    assert [r.in_reply_to for r in early] == (["L31"] if matched else [])
    own = await store.add_dlr(dlr("cx-31", 2, "UNDELIV"))
    assert own == IngestResult("duplicate" if matched else "stored", POLL)
    assert (await store.add_dlr(dlr("cx-31", 2, "UNDELIV"))) == IngestResult("duplicate", POLL)
    late = await drain(store, POLL, "status")
    assert [(r.in_reply_to, r.dlr_status) for r in late] == ([] if matched else [("L31", 2)])
    for tenant in TENANTS:
        assert await store.claim(tenant, "status") is None


async def test_dlrs_with_different_status_are_distinct(store: Store) -> None:
    """Two reports with different statusCode for one message are two records, oldest first."""
    await sent(store, 1)
    assert (await store.add_dlr(dlr("cx-1", 8, "ACCEPTD"))).stored
    assert (await store.add_dlr(dlr("cx-1", 1, "DELIVRD"))).stored
    records = await drain(store, POLL, "status")
    assert [r.dlr_status for r in records] == [8, 1]
    assert records[0].receipt_id != records[1].receipt_id


# -- incoming messages ------------------------------------------------------------------------


async def test_mo_to_owned_number_goes_to_owner(store: Store) -> None:
    """An incoming message to a tenant's number goes to it with all its fields."""
    result = await store.add_mo(mo("m1", to=OTHER_NUMBER, body="yes please"), account=POLL)
    assert result == IngestResult("stored", OTHER)
    assert await store.claim(POLL, "in") is None
    rec = await only(store, OTHER, "in")
    assert (rec.kind, rec.msisdn_from, rec.msisdn_to, rec.body) == (
        "in",
        HANDSET,
        OTHER_NUMBER,
        "yes please",
    )
    assert rec.in_reply_to == ""
    assert 0 < len(rec.receipt_id) <= 50


async def test_mo_to_owner_replying_to_its_send(store: Store) -> None:
    """An owned message from a handset the owner recently sent to replies to that send."""
    await sent(store, 1, tenant=OTHER)
    await sent(store, 2, tenant=POLL)
    await store.add_mo(mo("m1", to=OTHER_NUMBER), account=None)
    assert (await only(store, OTHER, "in")).in_reply_to == "L1"


@pytest.mark.parametrize("by", ["connexus_id", "upstream_ref"])
async def test_mo_routed_by_related_id(store: Store, by: str) -> None:
    """A reply naming its original message goes to that send's tenant, inReplyToId its id."""
    ref = await sent(store, 1, tenant=OTHER)
    await sent(store, 2, tenant=POLL)  # a later send to the same handset
    related = "cx-1" if by == "connexus_id" else ref
    result = await store.add_mo(mo("m1", to=UNLISTED, related_id=related), account=POLL)
    assert result == IngestResult("stored", OTHER)
    assert (await only(store, OTHER, "in")).in_reply_to == "L1"
    assert await store.claim(POLL, "in") is None


async def test_mo_routed_by_latest_send_to_handset(store: Store) -> None:
    """Without owner or related id, the latest send to that handset decides."""
    await sent(store, 1, tenant=POLL)
    await sent(store, 2, tenant=OTHER)
    await sent(store, 3, tenant=POLL, recipient="64999")
    result = await store.add_mo(mo("m1", to=UNLISTED), account=POLL)
    assert result == IngestResult("stored", OTHER)
    assert (await only(store, OTHER, "in")).in_reply_to == "L2"


async def test_mo_routed_by_account(store: Store) -> None:
    """A message nothing else matches goes to the account it came from."""
    await sent(store, 1, tenant=OTHER, recipient="64999")
    assert await store.add_mo(mo("m1", to=UNLISTED), account=POLL) == IngestResult("stored", POLL)
    assert (await only(store, POLL, "in")).in_reply_to == ""


@pytest.mark.parametrize("order", ["webhook-first", "sweep-first"])
async def test_unlisted_number_same_tenant_whichever_path_first(store: Store, order: str) -> None:
    """A message to an unlisted number ends at the same tenant whether the webhook or the
    account's sweep brings it first."""
    event = mo("m1", to=UNLISTED)
    if order == "webhook-first":
        assert await store.add_mo(event, account=None) == IngestResult("unmatched", None)
        for tenant in TENANTS:
            assert await store.claim(tenant, "in") is None
        assert await store.add_mo(event, account=OTHER) == IngestResult("assigned", OTHER)
    else:
        assert await store.add_mo(event, account=OTHER) == IngestResult("stored", OTHER)
        assert await store.add_mo(event, account=None) == IngestResult("duplicate", OTHER)
    assert await store.add_mo(event, account=POLL) == IngestResult("duplicate", OTHER)
    assert (await only(store, OTHER, "in")).body == "hello"


async def test_unmatched_routed_by_the_same_rule_when_seen_again(store: Store) -> None:
    """An unmatched message seen again after a send to its handset exists goes to that send's
    tenant by the one routing rule, even with no account known (both backends alike)."""
    event = mo("m1", sender="64888", to=UNLISTED)
    assert await store.add_mo(event, account=None) == IngestResult("unmatched", None)
    await sent(store, 1, tenant=OTHER, recipient="64888")
    assert await store.add_mo(event, account=None) == IngestResult("assigned", OTHER)
    assert await store.add_mo(event, account=POLL) == IngestResult("duplicate", OTHER)
    assert (await only(store, OTHER, "in")).body == "hello"


async def test_assignment_wakes_the_tenant(store: Store) -> None:
    """Assigning an unmatched message wakes the long-polls of its new tenant."""
    await store.add_mo(mo("m1", to=UNLISTED), account=None)
    seen = store.waker.generation(POLL, "in")
    await store.add_mo(mo("m1", to=UNLISTED), account=POLL)
    assert store.waker.generation(POLL, "in") != seen


async def test_duplicate_mo_is_stored_once(store: Store) -> None:
    """The same incoming messageId (webhook retry or sweep) is stored once."""
    assert (await store.add_mo(mo("m1"), account=None)).stored
    again = await store.add_mo(mo("m1", body="other"), account=POLL)
    assert again == IngestResult("duplicate", POLL)
    assert [r.body for r in await drain(store, POLL, "in")] == ["hello"]


@pytest.mark.parametrize(
    ("body", "blocked"),
    [("STOP", True), (" stop. ", True), ("Opt-Out", True), ("stop it", False), ("hi", False)],
)
async def test_stop_blocks_the_handset(store: Store, body: str, blocked: bool) -> None:
    """A STOP message (one word) blocks the handset for its tenant; it is still delivered."""
    await store.add_mo(mo("m1", body=body), account=None)
    assert await store.blocked(POLL) == ([HANDSET] if blocked else [])
    assert await store.blocked(OTHER) == []
    assert (await only(store, POLL, "in")).body == body


async def test_start_unblocks_the_handset(store: Store) -> None:
    """START after STOP unblocks the handset: it is sent to again."""
    await store.add_mo(mo("m1", body="STOP"), account=None)
    await store.add_mo(mo("m2", body="STOP"), account=None)  # twice is harmless
    await store.add_mo(mo("m3", body="start"), account=None)
    assert await store.blocked(POLL) == []
    plan = await store.begin_send(intent("L1"), time.time())
    assert [p.recipient for p in plan.to_send] == [HANDSET]


async def test_stop_ignored_where_opt_out_is_off(store: Store) -> None:
    """A tenant with opt_out off gets STOP as an ordinary message and blocks nobody."""
    await store.add_mo(mo("m1", to="3000", body="STOP"), account=None)
    assert await store.blocked(QUIET) == []


async def test_stop_of_unmatched_message_applies_once_assigned(store: Store) -> None:
    """An unmatched STOP blocks the handset for the tenant it is assigned to."""
    await store.add_mo(mo("m1", to=UNLISTED, body="STOP"), account=None)
    assert await store.blocked(OTHER) == []
    await store.add_mo(mo("m1", to=UNLISTED, body="STOP"), account=OTHER)
    assert await store.blocked(OTHER) == [HANDSET]


# -- polling: claims are leases ---------------------------------------------------------------


async def test_claim_oldest_first_and_ack_consumes(store: Store) -> None:
    """claim hands out the oldest record; ack consumes it and lowers queue_depth."""
    for i in range(3):
        await store.add_mo(mo(f"m{i}", body=f"b{i}"), account=None)
    assert await store.queue_depth(POLL) == (3, 0)
    first = await store.claim(POLL, "in")
    assert first is not None
    assert first.body == "b0"
    assert await store.ack(first) is True
    assert await store.ack(first) is False  # already consumed
    assert await store.queue_depth(POLL) == (2, 0)
    assert [r.body for r in await drain(store, POLL, "in")] == ["b1", "b2"]
    assert await store.queue_depth(POLL) == (0, 0)


async def test_claimed_record_is_hidden_until_released(store: Store) -> None:
    """A claimed record is not claimed again; release makes it the next claim."""
    await store.add_mo(mo("m1"), account=None)
    claimed = await store.claim(POLL, "in")
    assert claimed is not None
    assert await store.claim(POLL, "in") is None
    assert await store.queue_depth(POLL) == (1, 0)  # claimed is not consumed
    await store.release(claimed)
    again = await store.claim(POLL, "in")
    assert again is not None
    assert again.id == claimed.id


async def test_release_wakes_waiting_polls(store: Store) -> None:
    """Releasing a claim wakes the long-polls waiting on its tenant and kind."""
    await store.add_mo(mo("m1"), account=None)
    claimed = await store.claim(POLL, "in")
    assert claimed is not None
    w = store.waker
    waiter = asyncio.ensure_future(w.wait(POLL, "in", w.generation(POLL, "in"), 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await store.release(claimed)
    assert await asyncio.wait_for(waiter, 1) is True


async def test_expired_lease_is_claimed_again(opened: Opened) -> None:
    """A claim never acked comes back after the lease; the old holder's ack then fails."""
    store = await opened.open(lease_seconds=0.2)
    await store.add_mo(mo("m1"), account=None)
    first = await store.claim(POLL, "in")
    assert first is not None
    assert await store.claim(POLL, "in") is None
    await asyncio.sleep(0.3)
    me = store.replica
    store.replica = "another-replica"  # the next claim is another replica's
    second = await store.claim(POLL, "in")
    assert second is not None
    assert second.id == first.id
    store.replica = me
    assert await store.ack(first) is False
    await store.release(first)  # not ours any more: changes nothing
    store.replica = "another-replica"
    assert await store.claim(POLL, "in") is None
    assert await store.ack(second) is True
    assert await store.queue_depth(POLL) == (0, 0)


async def test_close_releases_this_replicas_leases(store: Store, reopen: Reopen) -> None:
    """A claim not acked before close() is free at once after a restart."""
    await store.add_mo(mo("m1"), account=None)
    assert await store.claim(POLL, "in") is not None
    await store.close()
    again = await reopen()
    assert (await only(again, POLL, "in")).body == "hello"


async def test_concurrent_claims_are_disjoint(store: Store) -> None:
    """Concurrent claims never share a record, and each gets one while enough are waiting."""
    for i in range(10):
        await store.add_mo(mo(f"m{i}"), account=None)
    got = await asyncio.gather(*(store.claim(POLL, "in") for _ in range(11)))
    ids = [r.id for r in got if r is not None]
    assert len(ids) == 10
    assert len(set(ids)) == 10


async def test_concurrent_pollers_get_each_record_exactly_once(store: Store) -> None:
    """Pollers claiming and acking at once hand every record out exactly once."""
    total = 400
    plan = await store.begin_send(intent("L1", *(f"64{i:08d}" for i in range(total))), time.time())
    await store.settle_send(
        [Settlement(p.upstream_ref, "accepted", f"cx-{i}") for i, p in enumerate(plan.to_send)]
    )
    await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}")) for i in range(total)))
    handed: list[str] = []

    async def poller() -> None:
        while (record := await store.claim(POLL, "status")) is not None:
            handed.append(record.msisdn_from)
            assert await store.ack(record)

    await asyncio.wait_for(asyncio.gather(*(poller() for _ in range(8))), 20)
    assert sorted(handed) == sorted(f"64{i:08d}" for i in range(total))
    assert await store.queue_depth(POLL) == (0, 0)


async def test_tenants_are_isolated(store: Store) -> None:
    """A tenant never sees, claims or counts another tenant's records."""
    await sent(store, 1)
    await store.add_dlr(dlr("cx-1"))
    await store.add_mo(mo("m1"), account=None)
    assert await store.claim(OTHER, "status") is None
    assert await store.claim(OTHER, "in") is None
    assert await store.queue_depth(OTHER) == (0, 0)
    assert await store.queue_depth(POLL) == (1, 1)


# -- push -------------------------------------------------------------------------------------


async def _pushed_status(store: Store, n: int = 1, tenant: str = PUSH, status: int = 1) -> None:
    await sent(store, n, tenant=tenant, recipient=f"64{n:08d}")
    assert (await store.add_dlr(dlr(f"cx-{n}", status))).stored


async def test_push_only_record_is_pushed_once_not_polled(store: Store) -> None:
    """A push-only tenant's record is not pollable and is leased to one claimer only."""
    seen = store.waker.generation(PUSH, "status")
    await _pushed_status(store)
    assert store.waker.generation(PUSH, "status") != seen  # the push worker is woken
    assert await store.claim(PUSH, "status") is None
    assert await store.queue_depth(PUSH) == (0, 0)
    pushes = await store.claim_pushes(later(), 10)
    assert [(p.tenant, p.kind, p.in_reply_to, p.push_attempts) for p in pushes] == [
        (PUSH, "status", "L1", 0)
    ]
    assert await store.claim_pushes(later(), 10) == []
    await store.push_done(pushes[0])
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


async def test_claim_pushes_respects_limit_and_due_time(store: Store) -> None:
    """claim_pushes returns at most `limit` due records, oldest first, none of them twice."""
    for i in range(5):
        await _pushed_status(store, n=i)
    assert await store.claim_pushes(time.time() - 60, 10) == []  # nothing due a minute ago
    a = await store.claim_pushes(later(), 2)
    b = await store.claim_pushes(later(), 2)
    c = await store.claim_pushes(later(), 2)
    assert [len(a), len(b), len(c)] == [2, 2, 1]
    assert [r.in_reply_to for r in a + b + c] == [f"L{i}" for i in range(5)]


async def test_pushes_keep_order_per_send(store: Store) -> None:
    """A send's second report is not pushed while its first awaits its push, then it is."""
    await _pushed_status(store, n=1, status=8)
    await store.add_dlr(dlr("cx-1", 1))
    await _pushed_status(store, n=2)
    first = await store.claim_pushes(later(), 10)
    assert [(r.in_reply_to, r.dlr_status) for r in first] == [("L1", 8), ("L2", 1)]
    assert await store.claim_pushes(later(), 10) == []
    await store.push_failed(first[0], next_at=time.time() - 1, error="HTTP 503")
    (retry,) = await store.claim_pushes(later(), 10)  # the first again, not the second
    assert retry.id == first[0].id
    seen = store.waker.generation(PUSH, "status")
    await store.push_done(retry)
    assert store.waker.generation(PUSH, "status") != seen
    (second,) = await store.claim_pushes(later(), 10)
    assert (second.in_reply_to, second.dlr_status) == ("L1", 1)


async def test_a_claim_past_held_back_reports_still_takes_its_limit(store: Store) -> None:
    """Held-back reports among the oldest due do not shrink a claim, nor stretch it past its
    limit: it takes the next free ones, oldest first, exactly `limit` of them."""
    await _pushed_status(store, n=1, status=8)
    await store.add_dlr(dlr("cx-1", 1))  # held back behind the first
    for n in (2, 3, 4):
        await _pushed_status(store, n=n)
    a = await store.claim_pushes(later(), 2)
    assert [(r.in_reply_to, r.dlr_status) for r in a] == [("L1", 8), ("L2", 1)]
    b = await store.claim_pushes(later(), 1)
    assert [r.in_reply_to for r in b] == ["L3"]


async def test_a_report_held_back_by_a_failing_push_goes_right_after_it(store: Store) -> None:
    """A report that arrives while its send's first report waits for a retry is held back
    through every retry of it (claims meanwhile find nothing), and goes as soon as the first
    is delivered: its wait ends with the first's, not later."""
    await _pushed_status(store, n=1, status=8)
    (first,) = await store.claim_pushes(later(), 10)
    retry_at = time.time() + 600
    await store.push_failed(first, next_at=retry_at, error="HTTP 503")
    await store.add_dlr(dlr("cx-1", 1))
    assert await store.claim_pushes(later(), 10) == []
    assert await store.claim_pushes(later(), 10) == []
    (again,) = await store.claim_pushes(retry_at + 1, 10)
    assert again.id == first.id
    await store.push_failed(again, next_at=retry_at + 600, error="HTTP 503")
    assert await store.claim_pushes(retry_at + 2, 10) == []
    (third,) = await store.claim_pushes(retry_at + 601, 10)
    assert third.id == first.id
    await store.push_done(third)
    (second,) = await store.claim_pushes(retry_at + 601, 10)
    assert (second.in_reply_to, second.dlr_status) == ("L1", 1)


async def _push_sends(store: Store, sends: range, status: int = 8) -> None:
    """Sends number `sends` of PUSH (Connexus ids cx-<n>), settled, each with one report."""
    plans = await asyncio.gather(
        *(store.begin_send(intent(None, f"64{i:08d}", tenant=PUSH), time.time()) for i in sends)
    )
    await asyncio.gather(
        *(
            store.settle_send([Settlement(p.to_send[0].upstream_ref, "accepted", f"cx-{i}")])
            for i, p in zip(sends, plans, strict=True)
        )
    )
    await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}", status)) for i in sends))


async def _first_reports_failing(store: Store, sends: range, retry_at: float) -> None:
    """`_push_sends`, each first report's push failed (its retry due at `retry_at`)."""
    await _push_sends(store, sends)
    while batch := await store.claim_pushes(time.time(), 500):
        await asyncio.gather(*(store.push_failed(r, next_at=retry_at, error="503") for r in batch))


async def test_reports_held_back_unseen_until_their_blocker_is_due_do_not_stall_claims(
    store: Store,
) -> None:
    """Second reports that no claim looked at before their first reports' retry came due sort
    ahead of those first reports. Claims must still take the first reports, `limit` at a time
    (not pass over the held-back ones until they run out of reading and return nothing)."""
    retry_at = time.time() + 100
    await _first_reports_failing(store, range(40), retry_at)
    await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}", 1)) for i in range(40)))
    got = [await store.claim_pushes(retry_at + 1, limit) for limit in (1, 1, 5, 20)]
    assert [len(batch) for batch in got] == [1, 1, 5, 20]
    assert {r.dlr_status for batch in got for r in batch} == {8}


async def test_a_push_worker_behind_a_backlog_during_an_outage_keeps_claiming(
    store: Store,
) -> None:
    """A push target that hangs: the worker (20 attempts per 8 s, every one failing) is behind
    a backlog, so the second reports of sends whose first report waits for its retry are not
    looked at before that retry is due. Every claim still finds due first reports."""
    n = 400  # more held-back reports than a claim of 20 used to read (16 pages)
    now = time.time()
    await _first_reports_failing(store, range(n), now + 30)
    await _push_sends(store, range(n, 2 * n))  # the backlog the worker is behind
    await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}", 1)) for i in range(n)))  # held back
    counts = []
    for step in range(2 * n // 20 + 5):
        at = now + 1 + 8 * step
        batch = await store.claim_pushes(at, 20)
        counts.append(len(batch))
        await asyncio.gather(
            *(store.push_failed(r, next_at=at + HOUR, error="timeout") for r in batch)
        )
    assert counts[: 2 * n // 20] == [20] * (2 * n // 20), counts
    assert sum(counts) == 2 * n


async def test_reports_behind_pushes_in_flight_do_not_hide_a_free_one(store: Store) -> None:
    """20 pushes in flight, each with 210 later reports of its send due behind it (held back,
    and not deferrable: their blocker is due already). A claim passes over all of them and
    takes the free report of another send, however few it asks for."""
    await _push_sends(store, range(20))
    for status in range(100, 310):
        await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}", status)) for i in range(20)))
    await _push_sends(store, range(99, 100))
    in_flight = await store.claim_pushes(later(), 20)
    assert [r.dlr_status for r in in_flight] == [8] * 20
    (free,) = await store.claim_pushes(later(), 1)
    assert (free.in_reply_to, free.dlr_status) == ("", 8)
    assert free.msisdn_from == f"64{99:08d}"


async def test_two_claimers_push_every_record_once_and_in_order(opened: Opened) -> None:
    """Two stores on one database (two replicas) claim with varying limits and fail a third of
    their pushes (retried within 50 ms): every record is delivered exactly once, and the
    reports of each send in the order they came."""
    a, b = await opened.open(), await opened.open()
    n = 150
    await _push_sends(a, range(n))
    for status in (2, 1):
        await asyncio.gather(*(a.add_dlr(dlr(f"cx-{i}", status)) for i in range(n)))
    delivered: list[LegacyRecord] = []
    rng = random.Random(8)

    async def replica(s: Store) -> None:
        idle = 0
        while idle < 100:
            batch = await s.claim_pushes(time.time(), rng.randint(1, 7))
            if not batch:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            for r in batch:
                if rng.random() < 0.3:
                    await s.push_failed(r, next_at=time.time() + rng.random() * 0.05, error="x")
                else:
                    delivered.append(r)
                    await s.push_done(r)

    await asyncio.wait_for(asyncio.gather(replica(a), replica(b)), 60)
    ids = [r.id for r in delivered]
    assert len(ids) == len(set(ids)) == 3 * n
    by_send: dict[str, list[int]] = {}
    for r in delivered:
        by_send.setdefault(r.msisdn_from, []).append(r.id)
    assert all(order == sorted(order) for order in by_send.values()), by_send


async def test_dead_first_report_lets_the_next_go(store: Store) -> None:
    """A send's first report dead-lettered no longer holds back the next one."""
    await _pushed_status(store, n=1, status=8)
    await store.add_dlr(dlr("cx-1", 1))
    (first,) = await store.claim_pushes(later(), 10)
    await store.push_failed(first, next_at=None, error="gone")
    (second,) = await store.claim_pushes(later(), 10)
    assert second.dlr_status == 1


async def test_expired_push_lease_is_claimed_again(opened: Opened) -> None:
    """A push claim never finished comes back after the lease; the old holder's failure is void."""
    store = await opened.open(lease_seconds=0.2)
    await _pushed_status(store)
    (first,) = await store.claim_pushes(later(), 10)
    await asyncio.sleep(0.3)
    me = store.replica
    store.replica = "another-replica"
    (second,) = await store.claim_pushes(later(), 10)
    assert second.id == first.id
    store.replica = me
    await store.push_failed(first, next_at=None, error="x")  # lost the lease: no effect
    assert await store.dead_letters() == []
    store.replica = "another-replica"
    await store.push_done(second)
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_a_late_push_failure_lands_on_its_claim_alone(opened: Opened) -> None:
    """The same replica claims a record again once its lease expired (a stalled attempt; or a
    reload that placed it for polling and back): the first attempt's failure, landing late,
    is void. It neither dead-letters nor reschedules what the second attempt holds, and the
    second attempt's done finishes the record."""
    store = await opened.open(lease_seconds=0.2)
    await _pushed_status(store)
    (first,) = await store.claim_pushes(later(), 10)
    await asyncio.sleep(0.3)
    (second,) = await store.claim_pushes(later(), 10)  # same replica
    assert second.id == first.id
    await store.push_failed(first, next_at=None, error="late")
    assert await store.dead_letters() == []
    await store.push_failed(first, next_at=later(), error="late")
    assert await store.claim_pushes(later(HOUR), 10) == []  # still the second claim's
    await store.push_done(second)
    await asyncio.sleep(0.3)  # past the second lease too: nothing comes back
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


async def test_a_late_push_success_finishes_the_record_another_claim_holds(
    opened: Opened,
) -> None:
    """A push delivered, its done landing after the lease expired and the record was claimed
    again: the record is finished (delivered), and the second attempt's failure neither
    pushes it again nor dead-letters it."""
    store = await opened.open(lease_seconds=0.2)
    await _pushed_status(store)
    (first,) = await store.claim_pushes(later(), 10)
    await asyncio.sleep(0.3)
    (second,) = await store.claim_pushes(later(), 10)
    assert second.id == first.id
    await store.push_done(first)
    await store.push_failed(second, next_at=later(), error="HTTP 503")
    await store.push_failed(second, next_at=None, error="gave up")
    await asyncio.sleep(0.3)
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


@pytest.mark.parametrize("acked_first", [False, True])
async def test_a_late_push_success_of_a_record_kept_for_polling_leaves_its_poll_alone(
    opened: Opened, acked_first: bool
) -> None:
    """A record pushed and kept for polling: its push stalls past the lease and a poll claims
    it. The push's late success finishes the push without freeing the poll's claim (no second
    poll gets the record), and whether the poll acked before or after, the record is neither
    pushed again nor polled again."""
    store = await opened.open(lease_seconds=0.2)
    await _pushed_status(store, tenant=BOTH)
    (pushed,) = await store.claim_pushes(later(), 10)
    await asyncio.sleep(0.3)
    polled = await store.claim(BOTH, "status")
    assert polled is not None
    assert polled.id == pushed.id
    if acked_first:
        assert await store.ack(polled) is True
    await store.push_done(pushed)
    assert await store.claim(BOTH, "status") is None
    if not acked_first:
        assert await store.ack(polled) is True
    await asyncio.sleep(0.3)
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.claim(BOTH, "status") is None


@pytest.mark.parametrize("outcome", ["done", "failed"])
async def test_a_push_whose_record_a_late_success_finished_frees_it_for_polls(
    opened: Opened, outcome: str
) -> None:
    """A record pushed and kept for polling: push A stalls past its lease, push B claims the
    record, A's late success finishes it. B's outcome then ends B's lease, so polls get the
    record at once instead of after B's lease."""
    store = await opened.open(lease_seconds=0.2)
    await _pushed_status(store, tenant=BOTH)
    (first,) = await store.claim_pushes(later(), 10)
    await asyncio.sleep(0.3)
    (second,) = await store.claim_pushes(later(), 10)
    await store.push_done(first)
    if outcome == "done":
        await store.push_done(second)
    else:
        await store.push_failed(second, next_at=later(), error="HTTP 503")
    polled = await store.claim(BOTH, "status")
    assert polled is not None
    assert polled.id == first.id
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_a_late_ack_or_release_of_a_poll_lands_on_its_claim_alone(
    opened: Opened,
) -> None:
    """A poll stalls past its lease and the same replica's next poll claims the record: the
    first poll's late release does not free it from the second, nor does its late ack
    consume it; the second's ack does."""
    store = await opened.open(lease_seconds=0.2)
    await store.add_mo(mo("m1"), account=None)
    first = await store.claim(POLL, "in")
    assert first is not None
    await asyncio.sleep(0.3)
    second = await store.claim(POLL, "in")  # same replica
    assert second is not None
    assert second.id == first.id
    await store.release(first)
    assert await store.claim(POLL, "in") is None  # still the second poll's
    assert await store.ack(first) is False
    assert await store.ack(second) is True
    assert await store.queue_depth(POLL) == (0, 0)


async def test_a_late_release_of_a_poll_leaves_the_push_that_took_the_record(
    opened: Opened,
) -> None:
    """A record pushed and kept for polling: a poll claim stalls past its lease, a push claims
    the record; the poll's late release leaves the push's lease, so no second push starts."""
    store = await opened.open(lease_seconds=0.2)
    await _pushed_status(store, tenant=BOTH)
    polled = await store.claim(BOTH, "status")
    assert polled is not None
    await asyncio.sleep(0.3)
    (pushed,) = await store.claim_pushes(later(), 10)
    assert pushed.id == polled.id
    await store.release(polled)
    assert await store.claim_pushes(later(), 10) == []


async def test_concurrent_claim_pushes_are_disjoint(store: Store) -> None:
    """Concurrent push claimers never get the same record."""
    for i in range(6):
        await _pushed_status(store, n=i)
    batches = await asyncio.gather(*(store.claim_pushes(later(), 2) for _ in range(3)))
    ids = [r.id for batch in batches for r in batch]
    assert len(ids) == len(set(ids)) == 6


async def test_push_failed_reschedules(store: Store) -> None:
    """A failed push is hidden until next_at, then claimable again with the attempt recorded."""
    await _pushed_status(store)
    (rec,) = await store.claim_pushes(later(), 10)
    next_at = time.time() + 600
    await store.push_failed(rec, next_at=next_at, error="HTTP 503")
    assert await store.claim_pushes(later(), 10) == []
    (again,) = await store.claim_pushes(next_at + 1, 10)
    assert again.id == rec.id
    assert (again.push_attempts, again.push_error) == (1, "HTTP 503")


async def test_push_failed_without_next_at_dead_letters(store: Store) -> None:
    """push_failed(next_at=None) moves the record to the dead letters, out of the push queue."""
    await _pushed_status(store, n=1)
    await _pushed_status(store, n=2)
    first, second = await store.claim_pushes(later(), 10)
    await store.push_failed(first, next_at=None, error="ClientConnectorError")
    await store.push_done(second)
    dead = await store.dead_letters()
    assert [(d.id, d.push_error, d.push_attempts) for d in dead] == [
        (first.id, "ClientConnectorError", 1)
    ]
    assert await store.dead_letter_count() == 1
    assert await store.dead_letters(1) == dead
    assert await store.dead_letters(0) == []
    assert await store.claim_pushes(later(10 * HOUR), 10) == []
    assert await store.claim(PUSH, "status") is None


async def test_replay_places_dead_letters_by_the_rules_in_force(store: Store) -> None:
    """A dead letter replayed after new rules stopped its tenant pushing that kind (a reload,
    which moves no stranded record) is polled, not left where neither a push nor a poll
    takes it; the push queue stays empty."""
    await _pushed_status(store)
    (r,) = await store.claim_pushes(later(), 5)
    await store.push_failed(r, next_at=None, error="gone")
    store.rules = Rules({**TENANTS, PUSH: TenantRules()})  # PUSH polls from now on
    assert await store.replay(None, time.time()) == 1
    polled = await store.claim(PUSH, "status")
    assert polled is not None
    assert polled.id == r.id
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


async def test_place_stranded_makes_records_the_rules_no_longer_push_pollable(
    store: Store,
) -> None:
    """After new rules stop a tenant's pushes (a reload), place_stranded makes its records
    waiting for a push, and its dead letters, pollable; nothing is left to push."""
    await _pushed_status(store, n=1)
    await _pushed_status(store, n=2)
    (dead, waiting) = await store.claim_pushes(later(), 5)
    await store.push_failed(dead, next_at=None, error="gone")
    await store.push_failed(waiting, next_at=later(HOUR), error="HTTP 503")
    store.rules = Rules({**TENANTS, PUSH: TenantRules()})
    await store.place_stranded()
    assert [r.in_reply_to for r in await drain(store, PUSH, "status")] == ["L1", "L2"]
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


async def test_place_stranded_pushes_records_waiting_for_a_poll_the_rules_now_push(
    store: Store,
) -> None:
    """After new rules make a polling tenant only push its status records (a reload), the
    records still waiting for a poll are pushed instead, once. Where the rules push and keep
    records for polling, a poll still takes them (not stranded): they stay as they are, and
    a record pushed already is not pushed again."""
    await _pushed_status(store, n=1, tenant=POLL)
    await _pushed_status(store, n=2, tenant=BOTH)
    (both,) = await store.claim_pushes(later(), 5)
    await store.push_done(both)  # pushed, and still pollable (BOTH keeps it)
    await _pushed_status(store, n=3, tenant=OTHER)
    store.rules = Rules({**TENANTS, POLL: TENANTS[PUSH], OTHER: TENANTS[BOTH]})
    await store.place_stranded()
    (pushed,) = await store.claim_pushes(later(), 10)
    assert (pushed.tenant, pushed.in_reply_to) == (POLL, "L1")
    await store.push_done(pushed)
    assert await store.claim(POLL, "status") is None  # pushed only now
    assert [r.in_reply_to for r in await drain(store, OTHER, "status")] == ["L3"]
    assert [r.in_reply_to for r in await drain(store, BOTH, "status")] == ["L2"]
    await store.place_stranded()
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_a_record_a_poll_gives_back_after_the_rules_made_it_push_only_is_pushed(
    store: Store,
) -> None:
    """A poll holds a record while new rules make its tenant only push that kind (a reload):
    placing again skips it (it may be handed over). When the poll gives it back (the client
    went away) it is pushed, not left for polls its tenant no longer makes; an ack instead
    finishes it (delivered once)."""
    await _pushed_status(store, n=1, tenant=POLL)
    await _pushed_status(store, n=2, tenant=POLL)
    given_back = await store.claim(POLL, "status")
    acked = await store.claim(POLL, "status")
    assert given_back is not None
    assert acked is not None
    store.rules = Rules({**TENANTS, POLL: TENANTS[PUSH]})
    await store.place_stranded()
    assert await store.claim_pushes(later(), 10) == []  # both are held by their polls
    await store.release(given_back)
    assert await store.ack(acked) is True
    (pushed,) = await store.claim_pushes(later(), 10)
    assert pushed.id == given_back.id
    await store.push_done(pushed)
    assert await store.claim(POLL, "status") is None
    assert await store.queue_depth(POLL) == (0, 0)
    assert await store.claim_pushes(later(HOUR), 10) == []


@pytest.mark.parametrize("retry", [True, False])
async def test_a_push_in_flight_when_the_rules_stop_pushing_is_polled_once(
    store: Store, retry: bool
) -> None:
    """A push in flight as new rules stop its tenant's pushes: the record is polled, and the
    push's failure coming back afterwards (a retry, or a dead letter) neither brings the
    record back after its ack nor leaves it counted as waiting."""
    await _pushed_status(store)
    (r,) = await store.claim_pushes(later(), 5)
    store.rules = Rules({**TENANTS, PUSH: TenantRules()})
    await store.place_stranded()
    await store.push_failed(r, next_at=later(60) if retry else None, error="HTTP 503")
    assert [x.id for x in await drain(store, PUSH, "status")] == [r.id]
    await store.place_stranded()
    assert await drain(store, PUSH, "status") == []
    assert await store.queue_depth(PUSH) == (0, 0)
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


async def test_a_failed_push_moved_to_polling_and_back_is_pushed(store: Store) -> None:
    """A push waiting for its retry when a reload makes its tenant poll, and another makes it
    push again before anyone polled: the record is pushed (placed afresh), not left pollable
    for a tenant that does not poll."""
    await _pushed_status(store)
    (r,) = await store.claim_pushes(later(), 5)
    await store.push_failed(r, next_at=later(HOUR), error="HTTP 503")
    store.rules = Rules({**TENANTS, PUSH: TenantRules()})
    await store.place_stranded()
    store.rules = RULES
    await store.place_stranded()
    (again,) = await store.claim_pushes(later(), 5)
    assert (again.id, again.push_attempts, again.push_error) == (r.id, 0, "")
    assert await store.claim(PUSH, "status") is None


@pytest.mark.parametrize("dead", [False, True])
async def test_a_record_a_poll_acked_is_not_polled_again_when_its_push_stops(
    store: Store, dead: bool
) -> None:
    """A tenant pushes and keeps records for polling; its push target is down. A client
    polls and acks a record whose push still waits for a retry (or is dead-lettered). New
    rules stop the tenant's pushes: placed again, or replayed, the record is finished, not
    handed out a second time."""
    await _pushed_status(store, tenant=BOTH)
    (r,) = await store.claim_pushes(later(), 5)
    await store.push_failed(r, next_at=None if dead else later(60), error="HTTP 503")
    assert [x.id for x in await drain(store, BOTH, "status")] == [r.id]
    store.rules = Rules({**TENANTS, BOTH: TenantRules()})
    if dead:
        assert await store.replay(None, time.time()) == 1
    await store.place_stranded()
    assert await drain(store, BOTH, "status") == []
    assert await store.queue_depth(BOTH) == (0, 0)
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.dead_letters() == []


async def test_new_rules_take_effect_at_once_for_push_claims(store: Store) -> None:
    """Rules assigned to a running store (a reload) decide its next push claim: a tenant
    that starts pushing its status records gets them pushed."""
    await _pushed_status(store, tenant=POLL)
    assert await store.claim_pushes(later(), 10) == []
    store.rules = Rules({**TENANTS, POLL: TENANTS[PUSH]})
    await _pushed_status(store, n=2, tenant=POLL)
    assert [r.tenant for r in await store.claim_pushes(later(), 10)] == [POLL]


@pytest.mark.parametrize("select", ["all", "ids"])
async def test_replay_brings_dead_letters_back(store: Store, select: str) -> None:
    """replay(None) or replay([id]) puts dead letters back into the push queue, fresh."""
    await _pushed_status(store, n=1)
    await _pushed_status(store, n=2)
    records = await store.claim_pushes(later(), 10)
    for r in records:
        await store.push_failed(r, next_at=None, error="gone")
    assert [d.id for d in await store.dead_letters(1)] == [records[0].id]  # the oldest first
    target = records[0].id
    ids = None if select == "all" else [target]
    expected = {r.id for r in records} if select == "all" else {target}
    assert await store.replay(ids, time.time()) == len(expected)
    assert {d.id for d in await store.dead_letters()} == {r.id for r in records} - expected
    back = await store.claim_pushes(later(), 10)
    assert {b.id for b in back} == expected
    assert all(b.push_attempts == 0 for b in back)
    assert await store.replay(ids, time.time()) == 0  # not dead any more
    assert await store.replay([], time.time()) == 0


async def test_push_and_poll_tenant_gets_both(store: Store) -> None:
    """With keep_for_polling a record is polled and pushed, each consumed separately."""
    await _pushed_status(store, tenant=BOTH)
    polled = await store.claim(BOTH, "status")
    assert polled is not None
    assert await store.ack(polled)
    (pushed,) = await store.claim_pushes(later(), 10)
    assert pushed.id == polled.id
    await store.push_done(pushed)
    assert await store.claim(BOTH, "status") is None
    assert await store.claim_pushes(later(HOUR), 10) == []
    assert await store.waiting() == []


async def test_poll_tenant_records_are_never_pushed(store: Store) -> None:
    """Records of a polling-only tenant never enter the push queue."""
    await sent(store, 1)
    await store.add_dlr(dlr("cx-1"))
    await store.add_mo(mo("m1"), account=None)
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_removed_tenant_records_are_kept_and_reported(opened: Opened) -> None:
    """Records of a tenant no longer configured are never pushed, purged or dropped, and
    waiting() still reports them."""
    first = await opened.open()
    await _pushed_status(first, n=1)
    await first.add_mo(mo("m1", to=OTHER_NUMBER), account=None)
    await first.close()
    rules = Rules({POLL: TENANTS[POLL]})
    second = await opened.open(rules)
    assert await second.claim_pushes(later(HOUR), 10) == []
    await second.purge(later(HOUR))
    stats = {(w.tenant, w.kind): w.count for w in await second.waiting()}
    assert stats == {(PUSH, "status"): 1, (OTHER, "in"): 1}
    await second.close()
    third = await opened.open()  # the tenants come back: nothing was lost
    assert len(await third.claim_pushes(later(), 10)) == 1
    assert (await only(third, OTHER, "in")).msisdn_to == OTHER_NUMBER


async def test_records_waiting_for_a_dropped_push_become_pollable(opened: Opened) -> None:
    """A tenant whose push settings were removed polls the records still waiting to be pushed."""
    first = await opened.open()
    await _pushed_status(first)
    await first.close()
    second = await opened.open(Rules({**TENANTS, PUSH: TenantRules()}))
    assert (await only(second, PUSH, "status")).in_reply_to == "L1"


async def test_push_queue_survives_restart(opened: Opened) -> None:
    """Pending pushes, schedules and dead letters outlive close(); an unfinished claim keeps its
    lease through close() (its attempt may have reached the receiver) and is redone once the
    lease expires, as after a crash."""
    store = await opened.open(lease_seconds=0.5)
    for i in range(3):
        await _pushed_status(store, n=i)
    a, b, c = await store.claim_pushes(later(), 10)
    await store.push_done(a)
    next_at = time.time() + 600
    await store.push_failed(b, next_at=next_at, error="HTTP 500")
    await store.close()  # c was claimed but never finished
    again = await opened.open(lease_seconds=0.5)
    assert await again.claim_pushes(later(), 10) == []  # c's lease outlives the close
    await asyncio.sleep(0.6)
    assert [r.id for r in await again.claim_pushes(later(), 10)] == [c.id]
    assert [r.id for r in await again.claim_pushes(next_at + 1, 10)] == [b.id]


# -- counts, purge, housekeeping --------------------------------------------------------------


async def test_waiting_reports_counts_and_oldest(store: Store) -> None:
    """waiting() counts pollable or push-pending records per tenant and kind, with the oldest."""
    await sent(store, 1)
    await sent(store, 2, recipient="6421000002")
    await store.add_dlr(dlr("cx-1"))
    await asyncio.sleep(0.01)
    await store.add_dlr(dlr("cx-2"))
    await store.add_mo(mo("m1", to=OTHER_NUMBER), account=None)
    await _pushed_status(store, n=3)
    stats = {(w.tenant, w.kind): w for w in await store.waiting()}
    assert {k: w.count for k, w in stats.items()} == {
        (POLL, "status"): 2,
        (OTHER, "in"): 1,
        (PUSH, "status"): 1,
    }
    oldest = await store.claim(POLL, "status")
    assert oldest is not None
    assert stats[(POLL, "status")].oldest_created_at == pytest.approx(oldest.created_at)
    await store.ack(oldest)
    stats = {(w.tenant, w.kind): w for w in await store.waiting()}
    assert stats[(POLL, "status")].count == 1
    assert cast(float, stats[(POLL, "status")].oldest_created_at) > oldest.created_at


async def test_purge_deletes_only_finished_rows(store: Store) -> None:
    """purge(before) removes consumed records and settled sends, never what still waits."""
    for i in range(4):
        await sent(store, i, recipient=f"64{i:08d}")
        await store.add_dlr(dlr(f"cx-{i}"))
    await store.begin_send(intent("L-pending", "6400000099"), time.time())
    await _pushed_status(store, n=10)  # waiting for push
    await _pushed_status(store, n=11)  # dead letter
    await _pushed_status(store, n=12)  # pushed: consumed
    p10, p11, p12 = await store.claim_pushes(later(), 10)
    await store.push_failed(p11, next_at=None, error="gone")
    await store.push_done(p12)
    consumed = await store.claim(POLL, "status")
    assert consumed is not None
    await store.ack(consumed)
    claimed = await store.claim(POLL, "status")  # claimed, not acked: not consumed
    assert claimed is not None

    assert await store.purge(time.time() - HOUR) == 0  # nothing is that old
    assert await store.purge(later()) >= 2 + 7  # two records, seven settled sends
    assert await store.purge(later()) == 0
    await store.release(claimed)
    assert len(await drain(store, POLL, "status")) == 3
    assert [d.id for d in await store.dead_letters()] == [p11.id]
    await store.push_failed(p10, next_at=time.time(), error="retry")
    assert [r.id for r in await store.claim_pushes(later(), 10)] == [p10.id]
    again = await store.begin_send(intent("L-pending", "6400000099"), time.time())
    assert again.repeats == (("6400000099", "pending"),)  # the pending send was kept


async def test_purge_drops_unmatched_report_past_retention(store: Store) -> None:
    """An unmatched report is kept while young, and purged once past the retention."""
    await store.add_dlr(dlr("cx-1"))
    assert await store.purge(time.time() - HOUR) == 0
    assert await store.purge(later()) == 1
    await sent(store, 1)
    assert await drain(store, POLL, "status") == []


async def test_rejected_webhooks_newest_first_and_bounded(store: Store) -> None:
    """Rejected payloads are kept verbatim, newest first, and only the newest 10,000."""
    await asyncio.gather(*(store.reject_webhook(b"%d" % i, "bad json") for i in range(10_005)))
    newest = await store.rejected_webhooks(3)
    assert [(w.body, w.reason) for w in newest] == [
        (b"10004", "bad json"),
        (b"10003", "bad json"),
        (b"10002", "bad json"),
    ]
    kept = await store.rejected_webhooks(20_000)
    assert len(kept) == 10_000
    assert kept[-1].body == b"5"


async def test_sweep_marks_roundtrip(store: Store) -> None:
    """A sweep mark is per tenant and the last one set wins."""
    assert await store.sweep_mark(POLL) is None
    await store.set_sweep_mark(SweepMark(POLL, "2024-01-01 00:00:00", "m1", 1.0))
    await store.set_sweep_mark(SweepMark(POLL, "2024-01-02 00:00:00", "m2", 2.0))
    assert await store.sweep_mark(POLL) == SweepMark(POLL, "2024-01-02 00:00:00", "m2", 2.0)
    assert await store.sweep_mark(OTHER) is None


async def test_exclusive_and_ping(store: Store) -> None:
    """ping succeeds on an open store, and a singleton job's lock can be taken."""
    await store.ping()
    async with store.exclusive("sweep") as mine:
        assert mine is True


# -- durability and group commit --------------------------------------------------------------


async def test_records_and_acks_survive_restart(store: Store, reopen: Reopen) -> None:
    """Stored records, acks, sends and blocks outlive close()."""
    await sent(store, 2)
    for i in range(3):
        await store.add_mo(mo(f"m{i}", body=f"b{i}"), account=None)
    await store.add_mo(mo("m-stop", sender="6429999999", body="STOP"), account=None)
    first = await store.claim(POLL, "in")
    assert first is not None
    await store.ack(first)
    await store.close()
    again = await reopen()
    assert [r.body for r in await drain(again, POLL, "in")] == ["b1", "b2", "STOP"]
    assert not (await again.add_mo(mo("m0"), account=None)).stored
    assert (await again.add_dlr(dlr("cx-2"))).tenant == POLL
    assert await again.blocked(POLL) == ["6429999999"]


async def test_close_is_idempotent_and_refuses_later_writes(store: Store) -> None:
    """close() may be called twice; a write after close raises instead of being lost."""
    await store.close()
    await store.close()
    with pytest.raises(StoreError):
        await store.add_mo(mo("m1"), account=None)


async def test_close_waits_for_pending_writes(store: Store, reopen: Reopen) -> None:
    """Writes already submitted when close() is called are committed, not dropped."""
    writes = [asyncio.ensure_future(store.add_mo(mo(f"m{i}"), account=None)) for i in range(50)]
    await asyncio.sleep(0)
    await store.close()
    assert all(r.stored for r in await asyncio.gather(*writes))
    again = await reopen()
    assert await again.queue_depth(POLL) == (50, 0)


async def test_close_releases_long_polls(store: Store) -> None:
    """Closing the store releases its pending long-polls with False."""
    w = store.waker
    waiter = asyncio.ensure_future(w.wait(POLL, "in", w.generation(POLL, "in"), 5))
    await asyncio.sleep(0.01)
    await store.close()
    assert await asyncio.wait_for(waiter, 1) is False


async def test_storing_wakes_a_long_poll(store: Store) -> None:
    """Storing a record for a tenant wakes a long-poll on that tenant and kind only."""
    w = store.waker
    mine = asyncio.ensure_future(w.wait(POLL, "in", w.generation(POLL, "in"), 5))
    theirs = asyncio.ensure_future(w.wait(OTHER, "in", w.generation(OTHER, "in"), 0.2))
    await asyncio.sleep(0.01)
    await store.add_mo(mo("m1"), account=None)
    assert await asyncio.wait_for(mine, 2) is True
    assert await theirs is False


async def test_thousand_concurrent_dlrs(store: Store) -> None:
    """1,000 concurrent reports (group commit) all succeed and each is claimable exactly once."""
    n = 1000
    plan = await store.begin_send(intent("L1", *(f"64{i:08d}" for i in range(n))), time.time())
    await store.settle_send(
        [Settlement(p.upstream_ref, "accepted", f"cx-{i}") for i, p in enumerate(plan.to_send)]
    )
    results = await asyncio.wait_for(
        asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}")) for i in range(n))), 20
    )
    assert all(r == IngestResult("stored", POLL) for r in results)
    assert await store.queue_depth(POLL) == (0, n)
    assert {r.msisdn_from for r in await drain(store, POLL, "status")} == {
        f"64{i:08d}" for i in range(n)
    }


async def test_thousand_concurrent_sends(store: Store) -> None:
    """1,000 concurrent begin_send calls each get their own pending row and ref."""
    plans = await asyncio.wait_for(
        asyncio.gather(
            *(store.begin_send(intent(f"L{i}", f"64{i:08d}"), time.time()) for i in range(1000))
        ),
        20,
    )
    refs = {p.to_send[0].upstream_ref for p in plans}
    assert len(refs) == 1000
    again = await store.begin_send(intent("L7", "6400000007"), time.time())
    assert again.repeats == (("6400000007", "pending"),)


async def test_failing_write_does_not_sink_its_neighbours(store: Store) -> None:
    """One write that cannot be stored fails alone; the writes submitted with it are stored."""
    events = [mo(f"m{i}") for i in range(20)]
    events[10] = MoEvent("m10", HANDSET, SENDER, cast(str, object()))
    results: list[Any] = await asyncio.wait_for(
        asyncio.gather(*(store.add_mo(e, account=None) for e in events), return_exceptions=True),
        10,
    )
    assert isinstance(results[10], StoreError)
    del results[10]
    assert all(r == IngestResult("stored", POLL) for r in results)
    assert len(await drain(store, POLL, "in")) == 19
    assert (await store.add_mo(mo("m10"), account=None)).stored
