"""The `Store` contract: one suite, written only against the Protocol, run on every backend.

To run it on another backend, add its name to BACKENDS and teach `backend_url` to hand out an
empty store (one per test) for it; nothing else here may know which backend it talks to.
"""

from __future__ import annotations

import asyncio
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
    SendRecord,
    StatusRecord,
    Store,
    open_store,
)

BACKENDS = ["sqlite", "sqlite-fsync"]  # the second also fsyncs each commit group

POLL = "acme"  # polls everything
OTHER = "beta"  # polls everything; must never see acme's records
PUSH = "pusher"  # status records are pushed only
BOTH = "both"  # status records are pushed and kept for polling
HOUR = 3600.0
DELIVERY = {
    POLL: Delivery(),
    OTHER: Delivery(),
    PUSH: Delivery(push_status=True, keep_for_polling=False, max_age_seconds=HOUR),
    BOTH: Delivery(push_status=True, keep_for_polling=True, max_age_seconds=HOUR),
}
HANDSET = "6421000001"
SENDER = "552"


def backend_url(backend: str, tmp_path: Path) -> str:
    """A store URL naming an empty store that only this test uses."""
    if backend in ("sqlite", "sqlite-fsync"):
        return f"sqlite:///{tmp_path / 'contract.db'}"
    raise AssertionError(f"no URL recipe for backend {backend!r}")


@dataclass
class Opened:
    """Every store a test opened on one URL, closed at teardown."""

    url: str
    fsync: bool = False
    stores: list[Store] = field(default_factory=list)

    async def open(self) -> Store:
        store = open_store(self.url, DELIVERY, fsync=self.fsync)
        await store.open()
        self.stores.append(store)
        return store


OPENED = pytest.StashKey[Opened]()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, empty store of each backend; closed after the test."""
    backend = cast(str, request.param)
    opened = Opened(backend_url(backend, tmp_path), fsync=backend.endswith("-fsync"))
    request.node.stash[OPENED] = opened
    first = await opened.open()
    yield first
    for s in reversed(opened.stores):
        await s.close()


@pytest.fixture
def reopen(request: pytest.FixtureRequest, store: Store) -> Callable[[], Awaitable[Store]]:
    """Open another store on the same URL as `store` (after closing it: a restart)."""
    opened: Opened = request.node.stash[OPENED]
    return opened.open


# -- helpers ---------------------------------------------------------------------------------


def send(
    n: int = 1,
    *,
    tenant: str = POLL,
    recipient: str = HANDSET,
    legacy_id: str | None = None,
    connexus_id: str | None = "",
    upstream_ref: str | None = "",
    sender: str = SENDER,
) -> SendRecord:
    """Send number `n`; ids default to L<n> (legacy), cx-<n> (Connexus), up-<n> (upstream)."""
    return SendRecord(
        tenant=tenant,
        legacy_id=f"L{n}" if legacy_id is None else legacy_id,
        recipient=recipient,
        sender=sender,
        connexus_id=f"cx-{n}" if connexus_id == "" else connexus_id,
        upstream_ref=f"up-{n}" if upstream_ref == "" else upstream_ref,
    )


def dlr(message_id: str, status: int = 1, text: str = "DELIVRD") -> DlrEvent:
    return DlrEvent(message_id=message_id, status=status, status_text=text)


def mo(
    message_id: str,
    *,
    sender: str = HANDSET,
    to: str = SENDER,
    body: str = "hello",
    related_id: str | None = None,
    owner: str | None = None,
) -> MoEvent:
    return MoEvent(message_id, sender, to, body, related_id, owner)


async def drain(store: Store, tenant: str, kind: Kind) -> list[LegacyRecord]:
    """Claim and ack every pollable record of (tenant, kind), oldest first."""
    out: list[LegacyRecord] = []
    while (record := await store.claim(tenant, kind)) is not None:
        await store.ack(record)
        out.append(record)
        assert len(out) <= 100, "ack does not consume: the same records keep coming back"
    return out


async def only(store: Store, tenant: str, kind: Kind) -> LegacyRecord:
    """The single pollable record of (tenant, kind), consumed."""
    records = await drain(store, tenant, kind)
    assert len(records) == 1, records
    return records[0]


def later(seconds: float = 1.0) -> float:
    return time.time() + seconds


# -- delivery reports -------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["connexus_id", "upstream_ref"])
async def test_dlr_matches_send(store: Store, by: str) -> None:
    """A delivery report found by either id becomes a status record of the send's tenant."""
    s = send(1, tenant=OTHER, upstream_ref=store.upstream_ref())
    await store.record_sends([send(2), s])
    result = await store.add_dlr(dlr(cast(str, getattr(s, by)), 2, "UNDELIV"))
    assert result == IngestResult(stored=True, tenant=OTHER)
    assert await store.claim(POLL, "status") is None
    rec = await only(store, OTHER, "status")
    assert (rec.tenant, rec.kind) == (OTHER, "status")
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to) == (HANDSET, SENDER, "L1")
    assert rec.dlr_status == 2
    assert rec.receipt_id
    assert len(rec.receipt_id) <= 50
    assert rec.body == ""


async def test_dlr_without_legacy_id_has_empty_in_reply_to(store: Store) -> None:
    """A send the legacy client gave no messageId yields a status record with inReplyToId ''."""
    await store.record_sends([send(1, legacy_id="")])
    await store.add_dlr(dlr("cx-1"))
    assert (await only(store, POLL, "status")).in_reply_to == ""


@pytest.mark.parametrize("by", ["connexus_id", "upstream_ref"])
async def test_dlr_before_send_is_matched_when_send_lands(store: Store, by: str) -> None:
    """An early report is held unclaimable, then goes to the send's tenant and wakes its polls."""
    ref = store.upstream_ref()
    result = await store.add_dlr(dlr("cx-7" if by == "connexus_id" else ref))
    assert result == IngestResult(stored=True, tenant=None)
    for tenant in DELIVERY:
        assert await store.claim(tenant, "status") is None
    seen = store.notifier.generation(POLL, "status")
    await store.record_sends([send(7, upstream_ref=ref)])
    assert store.notifier.generation(POLL, "status") != seen
    rec = await only(store, POLL, "status")
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to) == (HANDSET, SENDER, "L7")
    assert rec.dlr_status == 1


async def test_early_dlr_for_push_tenant_is_pushed_once_matched(store: Store) -> None:
    """An early report matched to a push tenant's send enters the push queue, not the poll queue."""
    await store.add_dlr(dlr("cx-1"))
    await store.record_sends([send(1, tenant=PUSH)])
    assert await store.claim(PUSH, "status") is None
    pushes = await store.claim_pushes(later(), 10)
    assert [(p.tenant, p.in_reply_to) for p in pushes] == [(PUSH, "L1")]


async def test_duplicate_dlr_is_stored_once(store: Store) -> None:
    """The same report delivered twice (a webhook retry) yields one legacy record."""
    await store.record_sends([send(1)])
    first = await store.add_dlr(dlr("cx-1"))
    second = await store.add_dlr(dlr("cx-1"))
    assert first.stored
    assert not second.stored
    assert len(await drain(store, POLL, "status")) == 1


async def test_duplicate_early_dlr_is_stored_once(store: Store) -> None:
    """A retried report that arrived before its send is still one record once the send lands."""
    await store.add_dlr(dlr("cx-1"))
    assert not (await store.add_dlr(dlr("cx-1"))).stored
    await store.record_sends([send(1)])
    assert len(await drain(store, POLL, "status")) == 1


async def test_dlrs_with_different_status_are_distinct(store: Store) -> None:
    """Two reports with different statusCode for one message are two records, oldest first."""
    await store.record_sends([send(1)])
    assert (await store.add_dlr(dlr("cx-1", 8, "ACCEPTD"))).stored
    assert (await store.add_dlr(dlr("cx-1", 1, "DELIVRD"))).stored
    records = await drain(store, POLL, "status")
    assert [r.dlr_status for r in records] == [8, 1]
    assert records[0].receipt_id != records[1].receipt_id


async def test_rejected_recipient_status_record(store: Store) -> None:
    """A StatusRecord given to record_sends is a pollable status record with its code and error."""
    seen = store.notifier.generation(POLL, "status")
    await store.record_sends(
        [send(1), send(2, recipient="6421000002", connexus_id=None)],
        [StatusRecord(POLL, "6421000002", SENDER, "L2", "NUR", "invalid number")],
    )
    assert store.notifier.generation(POLL, "status") != seen
    rec = await only(store, POLL, "status")
    assert (rec.status_code, rec.error, rec.dlr_status) == ("NUR", "invalid number", None)
    assert (rec.msisdn_from, rec.msisdn_to, rec.in_reply_to) == ("6421000002", SENDER, "L2")


async def test_rejected_recipient_without_legacy_id(store: Store) -> None:
    """A StatusRecord with no legacy messageId has inReplyToId ''."""
    await store.record_sends([], [StatusRecord(POLL, HANDSET, SENDER, None, "ERR", "bad")])
    rec = await only(store, POLL, "status")
    assert (rec.in_reply_to, rec.status_code) == ("", "ERR")


async def test_rejected_recipient_of_push_tenant_is_pushed(store: Store) -> None:
    """A StatusRecord for a push-only tenant goes to the push queue, not to polling."""
    await store.record_sends([], [StatusRecord(PUSH, HANDSET, SENDER, "L1", "NUR", "x")])
    assert await store.claim(PUSH, "status") is None
    assert [p.status_code for p in await store.claim_pushes(later(), 10)] == ["NUR"]


# -- incoming messages ------------------------------------------------------------------------


async def test_mo_routed_by_owner(store: Store) -> None:
    """An incoming message to a tenant's sender goes to that tenant with all its fields."""
    result = await store.add_mo(mo("m1", body="yes please", owner=OTHER), fallback_tenant=POLL)
    assert result == IngestResult(stored=True, tenant=OTHER)
    assert await store.claim(POLL, "in") is None
    rec = await only(store, OTHER, "in")
    assert (rec.kind, rec.msisdn_from, rec.msisdn_to) == ("in", HANDSET, SENDER)
    assert rec.body == "yes please"
    assert rec.in_reply_to == ""
    assert rec.receipt_id
    assert len(rec.receipt_id) <= 50


async def test_mo_owner_replying_to_its_send_gets_in_reply_to(store: Store) -> None:
    """An owned incoming message from a handset the owner recently sent to replies to that send."""
    await store.record_sends([send(1, tenant=OTHER), send(2, tenant=POLL)])
    await store.add_mo(mo("m1", owner=OTHER), fallback_tenant=None)
    assert (await only(store, OTHER, "in")).in_reply_to == "L1"


@pytest.mark.parametrize("by", ["connexus_id", "upstream_ref"])
async def test_mo_routed_by_related_id(store: Store, by: str) -> None:
    """A reply naming its original message goes to that send's tenant, inReplyToId its legacy id."""
    ref = store.upstream_ref()
    related = "cx-1" if by == "connexus_id" else ref
    await store.record_sends([send(1, tenant=OTHER, upstream_ref=ref)])
    await store.record_sends([send(2, tenant=POLL)])  # a later send to the same handset
    result = await store.add_mo(mo("m1", related_id=related), fallback_tenant=POLL)
    assert result == IngestResult(stored=True, tenant=OTHER)
    assert (await only(store, OTHER, "in")).in_reply_to == "L1"
    assert await store.claim(POLL, "in") is None


async def test_mo_routed_by_latest_send_to_handset(store: Store) -> None:
    """Without owner or related id, the latest send to that handset decides tenant and reply."""
    await store.record_sends([send(1, tenant=POLL)])
    await store.record_sends([send(2, tenant=OTHER), send(3, tenant=POLL, recipient="64999")])
    result = await store.add_mo(mo("m1"), fallback_tenant=POLL)
    assert result.tenant == OTHER
    assert (await only(store, OTHER, "in")).in_reply_to == "L2"


async def test_mo_fallback_tenant(store: Store) -> None:
    """A message nothing matches goes to the fallback tenant."""
    await store.record_sends([send(1, tenant=OTHER, recipient="64999")])
    result = await store.add_mo(mo("m1"), fallback_tenant=POLL)
    assert result == IngestResult(stored=True, tenant=POLL)
    assert (await only(store, POLL, "in")).in_reply_to == ""


async def test_mo_unmatched_without_fallback_is_kept_but_unclaimable(store: Store) -> None:
    """With no match and no fallback the message is stored (deduplicated) but nobody polls it."""
    assert await store.add_mo(mo("m1"), fallback_tenant=None) == IngestResult(True, None)
    for tenant in DELIVERY:
        assert await store.claim(tenant, "in") is None
    assert await store.has_mo(["m1"]) == {"m1"}


async def test_duplicate_mo_is_stored_once(store: Store) -> None:
    """The same incoming messageId (webhook retry or mo/query recovery) is stored once."""
    assert (await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)).stored
    again = await store.add_mo(mo("m1", owner=POLL, body="other"), fallback_tenant=POLL)
    assert not again.stored
    assert [r.body for r in await drain(store, POLL, "in")] == ["hello"]


async def test_has_mo(store: Store) -> None:
    """has_mo reports exactly the stored incoming ids, consumed or not."""
    assert await store.has_mo([]) == set()
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    await store.add_mo(mo("m2", owner=POLL), fallback_tenant=None)
    await store.record_sends([send(3)])
    await store.add_dlr(dlr("m3"))  # a delivery report is not an incoming message
    await drain(store, POLL, "in")
    assert await store.has_mo(["m1", "m2", "m3", "m4"]) == {"m1", "m2"}


# -- claim / ack / release --------------------------------------------------------------------


async def test_claim_oldest_first_and_ack_consumes(store: Store) -> None:
    """claim hands out the oldest record; ack consumes it and lowers queue_depth."""
    for i in range(3):
        await store.add_mo(mo(f"m{i}", body=f"b{i}", owner=POLL), fallback_tenant=None)
    assert await store.queue_depth(POLL) == (3, 0)
    first = await store.claim(POLL, "in")
    assert first is not None
    assert first.body == "b0"
    await store.ack(first)
    assert await store.queue_depth(POLL) == (2, 0)
    rest = await drain(store, POLL, "in")
    assert [r.body for r in rest] == ["b1", "b2"]
    assert first.id not in {r.id for r in rest}
    assert await store.queue_depth(POLL) == (0, 0)


async def test_claimed_record_is_hidden_until_released(store: Store) -> None:
    """A claimed record is not claimed again; release makes it the next claim."""
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    claimed = await store.claim(POLL, "in")
    assert claimed is not None
    assert await store.claim(POLL, "in") is None
    assert await store.queue_depth(POLL) == (1, 0)  # claimed is not consumed
    store.release(claimed)
    again = await store.claim(POLL, "in")
    assert again is not None
    assert again.id == claimed.id


async def test_concurrent_claims_are_disjoint(store: Store) -> None:
    """Concurrent claims never share a record, and each gets one while enough are waiting."""
    for i in range(10):
        await store.add_mo(mo(f"m{i}", owner=POLL), fallback_tenant=None)
    got = await asyncio.gather(*(store.claim(POLL, "in") for _ in range(10)))
    ids = [r.id for r in got if r is not None]
    assert len(ids) == 10
    assert len(set(ids)) == 10
    assert await store.claim(POLL, "in") is None


async def test_concurrent_claims_with_one_record(store: Store) -> None:
    """Of two concurrent claims for a single record, exactly one gets it."""
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    got = await asyncio.gather(store.claim(POLL, "in"), store.claim(POLL, "in"))
    assert sum(r is not None for r in got) == 1


async def test_concurrent_pollers_get_each_record_exactly_once(store: Store) -> None:
    """Pollers claiming and acking at once hand every record out exactly once, none twice."""
    total = 400
    await store.record_sends([send(i, recipient=f"64{i:08d}") for i in range(total)])
    await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}")) for i in range(total)))
    handed: list[str] = []

    async def poller() -> None:
        while (record := await store.claim(POLL, "status")) is not None:
            handed.append(record.in_reply_to)  # the client has it now
            await store.ack(record)

    await asyncio.wait_for(asyncio.gather(*(poller() for _ in range(8))), 20)
    assert sorted(handed) == sorted(f"L{i}" for i in range(total))
    assert await store.queue_depth(POLL) == (0, 0)


async def test_tenants_are_isolated(store: Store) -> None:
    """A tenant never sees, claims or counts another tenant's records."""
    await store.record_sends([send(1)])
    await store.add_dlr(dlr("cx-1"))
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    claimed = await store.claim(POLL, "status")
    assert claimed is not None
    assert await store.claim(OTHER, "status") is None
    assert await store.claim(OTHER, "in") is None
    assert await store.queue_depth(OTHER) == (0, 0)
    store.release(claimed)
    assert await store.claim(OTHER, "status") is None


async def test_queue_depth_counts_per_kind(store: Store) -> None:
    """queue_depth is (in, status) of pollable records, each kind counted apart."""
    await store.record_sends([send(1), send(2)])
    await store.add_dlr(dlr("cx-1"))
    await store.add_dlr(dlr("cx-2"))
    await store.add_dlr(dlr("cx-2", 2, "UNDELIV"))
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    assert await store.queue_depth(POLL) == (1, 3)
    await drain(store, POLL, "in")
    assert await store.queue_depth(POLL) == (0, 3)


# -- durability ---------------------------------------------------------------------------------


async def test_records_and_acks_survive_restart(
    store: Store, reopen: Callable[[], Awaitable[Store]]
) -> None:
    """Stored records, acks and sends outlive close(); claims in flight do not."""
    await store.record_sends([send(1), send(2)])
    for i in range(3):
        await store.add_mo(mo(f"m{i}", body=f"b{i}", owner=POLL), fallback_tenant=None)
    first = await store.claim(POLL, "in")
    assert first is not None
    await store.ack(first)
    assert await store.claim(POLL, "in") is not None  # claimed, never handed over
    await store.close()

    again = await reopen()
    assert await again.queue_depth(POLL) == (2, 0)
    assert [r.body for r in await drain(again, POLL, "in")] == ["b1", "b2"]
    assert await again.has_mo(["m0", "m1", "m2"]) == {"m0", "m1", "m2"}
    assert not (await again.add_mo(mo("m0", owner=POLL), fallback_tenant=None)).stored
    assert (await again.add_dlr(dlr("cx-2"))).tenant == POLL  # the sends survived too
    assert (await only(again, POLL, "status")).in_reply_to == "L2"


async def test_close_is_idempotent_and_refuses_later_writes(store: Store) -> None:
    """close() may be called twice; a write after close raises instead of being lost silently."""
    await store.close()
    await store.close()
    with pytest.raises(StoreError):
        await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)


async def test_close_waits_for_pending_writes(
    store: Store, reopen: Callable[[], Awaitable[Store]]
) -> None:
    """Writes already submitted when close() is called are committed, not dropped."""
    writes = [
        asyncio.ensure_future(store.add_mo(mo(f"m{i}", owner=POLL), fallback_tenant=None))
        for i in range(50)
    ]
    await asyncio.sleep(0)  # every write is submitted
    await store.close()
    results = await asyncio.gather(*writes)
    assert all(r.stored for r in results)
    again = await reopen()
    assert await again.queue_depth(POLL) == (50, 0)


async def test_thousand_concurrent_dlrs(store: Store) -> None:
    """1,000 concurrent reports (group commit) all succeed and each is claimable exactly once."""
    n = 1000
    await store.record_sends([send(i, recipient=f"64{i:08d}") for i in range(n)])
    results = await asyncio.wait_for(
        asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}")) for i in range(n))), 20
    )
    assert all(r == IngestResult(stored=True, tenant=POLL) for r in results)
    assert await store.queue_depth(POLL) == (0, n)
    claimed: list[LegacyRecord] = []
    while (record := await store.claim(POLL, "status")) is not None:
        claimed.append(record)
    assert len({r.id for r in claimed}) == n
    assert {r.in_reply_to for r in claimed} == {f"L{i}" for i in range(n)}
    assert {r.msisdn_from for r in claimed} == {f"64{i:08d}" for i in range(n)}
    await asyncio.gather(*(store.ack(r) for r in claimed))
    assert await store.claim(POLL, "status") is None
    assert await store.queue_depth(POLL) == (0, 0)


async def test_failing_write_does_not_sink_its_neighbours(store: Store) -> None:
    """One write that cannot be stored fails alone; the writes submitted with it are stored."""
    await store.record_sends([send(i) for i in range(20)])
    events = [dlr(f"cx-{i}") for i in range(20)]
    events[10] = DlrEvent(message_id=cast(str, object()), status=1, status_text="DELIVRD")
    results: list[Any] = await asyncio.wait_for(
        asyncio.gather(*(store.add_dlr(e) for e in events), return_exceptions=True), 10
    )
    assert isinstance(results[10], StoreError)
    del results[10]
    assert all(r == IngestResult(stored=True, tenant=POLL) for r in results)
    records = await drain(store, POLL, "status")
    assert sorted(r.in_reply_to for r in records) == sorted(f"L{i}" for i in range(20) if i != 10)
    # and the store still works afterwards
    assert (await store.add_dlr(dlr("cx-10"))).stored


# -- notifier -----------------------------------------------------------------------------------


async def test_wait_wakes_on_notify(store: Store) -> None:
    """A waiter wakes with True when its (tenant, kind) is notified during the wait."""
    n = store.notifier
    seen = n.generation(POLL, "in")
    waiter = asyncio.ensure_future(n.wait(POLL, "in", seen, 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    n.notify(OTHER, "in")  # someone else's news
    n.notify(POLL, "status")
    await asyncio.sleep(0.01)
    assert not waiter.done()
    n.notify(POLL, "in")
    assert await asyncio.wait_for(waiter, 1) is True


async def test_wait_wakes_when_store_stores(store: Store) -> None:
    """Storing a record for a tenant wakes a long-poll waiting on that tenant and kind."""
    n = store.notifier
    seen = n.generation(POLL, "in")
    waiter = asyncio.ensure_future(n.wait(POLL, "in", seen, 5))
    await asyncio.sleep(0.01)
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    assert await asyncio.wait_for(waiter, 2) is True


async def test_wait_times_out(store: Store) -> None:
    """With nothing stored, wait answers False after about `within` seconds."""
    n = store.notifier
    start = time.monotonic()
    assert await n.wait(POLL, "in", n.generation(POLL, "in"), 0.05) is False
    assert 0.04 <= time.monotonic() - start < 1.0


async def test_wait_returns_at_once_if_generation_moved(store: Store) -> None:
    """A notify between looking and waiting is not lost: wait returns True at once."""
    n = store.notifier
    seen = n.generation(POLL, "in")
    n.notify(POLL, "in")
    start = time.monotonic()
    assert await n.wait(POLL, "in", seen, 5) is True
    assert time.monotonic() - start < 0.5


async def test_notifier_close_releases_waiters(store: Store) -> None:
    """close() releases every waiter with False, and later waits return False at once."""
    n = store.notifier
    waiters = [
        asyncio.ensure_future(n.wait(t, k, n.generation(t, k), 5))
        for t in (POLL, OTHER)
        for k in ("in", "status")
    ]
    await asyncio.sleep(0.01)
    n.close()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [False] * 4
    start = time.monotonic()
    assert await n.wait(POLL, "in", n.generation(POLL, "in"), 5) is False
    assert time.monotonic() - start < 0.5


async def test_store_close_releases_long_polls(store: Store) -> None:
    """Closing the store releases its pending long-polls with False (shutdown answers 204)."""
    n = store.notifier
    waiter = asyncio.ensure_future(n.wait(POLL, "in", n.generation(POLL, "in"), 5))
    await asyncio.sleep(0.01)
    await store.close()
    assert await asyncio.wait_for(waiter, 1) is False


# -- push queue -------------------------------------------------------------------------------


async def _pushed_status(store: Store, tenant: str = PUSH, n: int = 1) -> None:
    await store.record_sends([send(n, tenant=tenant)])
    assert (await store.add_dlr(dlr(f"cx-{n}"))).stored


async def test_push_only_record_is_pushed_once_not_polled(store: Store) -> None:
    """A push-only tenant's record is not pollable and is claimed for push by one claimer only."""
    await _pushed_status(store)
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
    assert await store.claim(PUSH, "status") is None


async def test_claim_pushes_respects_limit_and_due_time(store: Store) -> None:
    """claim_pushes returns at most `limit` due records, none of them twice."""
    for i in range(5):
        await _pushed_status(store, n=i)
    assert await store.claim_pushes(time.time() - 60, 10) == []  # nothing due a minute ago
    a = await store.claim_pushes(later(), 2)
    b = await store.claim_pushes(later(), 2)
    c = await store.claim_pushes(later(), 2)
    assert [len(a), len(b), len(c)] == [2, 2, 1]
    assert len({r.id for r in a + b + c}) == 5
    assert [r.in_reply_to for r in a + b + c] == [f"L{i}" for i in range(5)]


async def test_concurrent_claim_pushes_are_disjoint(store: Store) -> None:
    """Concurrent push claimers never get the same record."""
    for i in range(6):
        await _pushed_status(store, n=i)
    batches = await asyncio.gather(*(store.claim_pushes(later(), 2) for _ in range(3)))
    ids = [r.id for batch in batches for r in batch]
    assert len(ids) == len(set(ids))
    rest = await store.claim_pushes(later(), 10)
    assert len(ids) + len(rest) == 6


async def test_push_worker_loop_pushes_each_record_once(store: Store) -> None:
    """Claiming pushes while earlier pushes complete never hands a finished record out again."""
    total = 300
    await store.record_sends([send(i, tenant=PUSH, recipient=f"64{i:08d}") for i in range(total)])
    await asyncio.gather(*(store.add_dlr(dlr(f"cx-{i}")) for i in range(total)))
    pushed: list[str] = []
    inflight: set[asyncio.Task[None]] = set()

    async def deliver(record: LegacyRecord) -> None:
        pushed.append(record.in_reply_to)
        await store.push_done(record)

    async def worker() -> None:
        while len(pushed) < total:
            for record in await store.claim_pushes(later(), 7):
                task = asyncio.ensure_future(deliver(record))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            await asyncio.sleep(0)
        await asyncio.gather(*inflight)

    await asyncio.wait_for(worker(), 20)
    assert sorted(pushed) == sorted(f"L{i}" for i in range(total))
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_push_failed_reschedules(store: Store) -> None:
    """A failed push is hidden until next_at, then claimable again with the attempt recorded."""
    await _pushed_status(store)
    (rec,) = await store.claim_pushes(later(), 10)
    next_at = time.time() + 600
    await store.push_failed(rec, next_at=next_at, error="HTTP 503")
    assert await store.claim_pushes(later(), 10) == []
    assert await store.dead_letters() == []
    (again,) = await store.claim_pushes(next_at + 1, 10)
    assert again.id == rec.id
    assert (again.push_attempts, again.push_error) == (1, "HTTP 503")
    await store.push_done(again)
    assert await store.claim_pushes(next_at + HOUR, 10) == []


async def test_push_failed_without_next_at_dead_letters(store: Store) -> None:
    """push_failed(next_at=None) moves the record to the dead letters and out of the push queue."""
    await _pushed_status(store, n=1)
    await _pushed_status(store, n=2)
    first, second = await store.claim_pushes(later(), 10)
    await store.push_failed(first, next_at=None, error="ClientConnectorError")
    await store.push_done(second)
    dead = await store.dead_letters()
    assert [(d.id, d.push_error, d.push_attempts) for d in dead] == [
        (first.id, "ClientConnectorError", 1)
    ]
    assert await store.claim_pushes(later(10 * HOUR), 10) == []
    assert await store.claim(PUSH, "status") is None


@pytest.mark.parametrize("select", ["all", "ids"])
async def test_replay_brings_dead_letters_back(store: Store, select: str) -> None:
    """replay(None) or replay([id]) puts dead letters back into the push queue, fresh."""
    await _pushed_status(store, n=1)
    await _pushed_status(store, n=2)
    records = await store.claim_pushes(later(), 10)
    for r in records:
        await store.push_failed(r, next_at=None, error="gone")
    target = records[0].id
    ids = None if select == "all" else [target]
    replayed = await store.replay(ids, time.time())
    expected = {r.id for r in records} if select == "all" else {target}
    assert replayed == len(expected)
    assert {d.id for d in await store.dead_letters()} == {r.id for r in records} - expected
    back = await store.claim_pushes(later(), 10)
    assert {b.id for b in back} == expected
    assert all(b.push_attempts == 0 for b in back)
    assert await store.replay(ids, time.time()) == 0  # not dead any more


async def test_replay_unknown_or_empty_ids(store: Store) -> None:
    """replay of ids that are not dead letters (or of none) changes nothing."""
    await _pushed_status(store)
    (rec,) = await store.claim_pushes(later(), 10)
    assert await store.replay([], time.time()) == 0
    assert await store.replay([rec.id], time.time()) == 0  # claimed, not dead
    assert await store.replay([rec.id + 1000], time.time()) == 0
    assert await store.claim_pushes(later(), 10) == []


async def test_push_and_poll_tenant_gets_both(store: Store) -> None:
    """With keep_for_polling the record is both pushed and pollable, each consumed separately."""
    await _pushed_status(store, tenant=BOTH)
    polled = await store.claim(BOTH, "status")
    assert polled is not None
    (pushed,) = await store.claim_pushes(later(), 10)
    assert pushed.id == polled.id
    await store.ack(polled)
    await store.push_done(pushed)
    assert await store.claim(BOTH, "status") is None
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_poll_tenant_records_are_never_pushed(store: Store) -> None:
    """Records of a polling-only tenant never enter the push queue."""
    await store.record_sends([send(1)])
    await store.add_dlr(dlr("cx-1"))
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
    assert await store.claim_pushes(later(HOUR), 10) == []


async def test_push_queue_survives_restart(
    store: Store, reopen: Callable[[], Awaitable[Store]]
) -> None:
    """Pending pushes, schedules and dead letters outlive close(); an unfinished claim is redone."""
    for i in range(3):
        await _pushed_status(store, n=i)
    a, b, c = await store.claim_pushes(later(), 10)
    await store.push_done(a)
    next_at = time.time() + 600
    await store.push_failed(b, next_at=next_at, error="HTTP 500")
    await store.close()  # c was claimed but never finished

    again = await reopen()
    assert [r.id for r in await again.claim_pushes(later(), 10)] == [c.id]
    assert [r.id for r in await again.claim_pushes(next_at + 1, 10)] == [b.id]
    assert await again.dead_letters() == []


# -- waiting and purge ------------------------------------------------------------------------


async def test_waiting_reports_counts_and_oldest(store: Store) -> None:
    """waiting() counts pollable or pushable records per tenant and kind, with the oldest age."""
    before = time.time()
    await store.record_sends([send(1), send(2)])
    await store.add_dlr(dlr("cx-1"))
    await asyncio.sleep(0.01)
    await store.add_dlr(dlr("cx-2"))
    await store.add_mo(mo("m1", owner=OTHER), fallback_tenant=None)
    await _pushed_status(store, n=3)
    stats = {(w.tenant, w.kind): w for w in await store.waiting()}
    assert {k: w.count for k, w in stats.items() if w.count} == {
        (POLL, "status"): 2,
        (OTHER, "in"): 1,
        (PUSH, "status"): 1,
    }
    oldest = await store.claim(POLL, "status")
    assert oldest is not None
    assert stats[(POLL, "status")].oldest_created_at == pytest.approx(oldest.created_at)
    assert before - 1 <= oldest.created_at <= time.time() + 1
    await store.ack(oldest)
    await drain(store, OTHER, "in")
    (pushed,) = await store.claim_pushes(later(), 10)
    await store.push_done(pushed)
    stats = {(w.tenant, w.kind): w for w in await store.waiting()}
    assert {k: w.count for k, w in stats.items() if w.count} == {(POLL, "status"): 1}
    assert cast(float, stats[(POLL, "status")].oldest_created_at) > oldest.created_at


async def test_purge_deletes_only_consumed_rows(store: Store) -> None:
    """purge(before) removes consumed old rows and never one still waiting for delivery."""
    await store.record_sends([send(i) for i in range(4)])
    for i in range(4):
        await store.add_dlr(dlr(f"cx-{i}"))
    await store.add_mo(mo("m1", owner=POLL), fallback_tenant=None)
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
    assert await store.purge(later()) >= 2  # the acked record and the pushed one, at least
    assert await store.purge(later()) == 0  # what is left is all still waiting

    store.release(claimed)
    assert len(await drain(store, POLL, "status")) == 3
    assert len(await drain(store, POLL, "in")) == 1
    assert [d.id for d in await store.dead_letters()] == [p11.id]
    await store.push_failed(p10, next_at=time.time(), error="retry")  # p10 is still pending
    assert [r.id for r in await store.claim_pushes(later(), 10)] == [p10.id]


async def test_purge_keeps_unmatched_early_dlr(store: Store) -> None:
    """A report waiting for its send, younger than the retention, is not purged."""
    await store.add_dlr(dlr("cx-1"))
    await store.purge(time.time() - 3600)
    await store.record_sends([send(1)])
    assert (await only(store, POLL, "status")).in_reply_to == "L1"


async def test_purge_drops_unmatched_dlr_past_retention(store: Store) -> None:
    """A report whose send never came is purged once past the retention (it cannot match)."""
    await store.add_dlr(dlr("cx-1"))
    assert await store.purge(later()) == 1
    await store.record_sends([send(1)])
    assert await drain(store, POLL, "status") == []


async def test_ping(store: Store) -> None:
    """ping succeeds on an open store."""
    await store.ping()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_records_waiting_for_a_dropped_push_become_pollable(
    backend: str, tmp_path: Path
) -> None:
    """A tenant whose push settings were removed polls the records still waiting to be pushed."""
    url = backend_url(backend, tmp_path)
    first = open_store(url, {PUSH: Delivery(push_status=True)})
    await first.open()
    await first.record_sends([send(1, tenant=PUSH)])
    await first.add_dlr(dlr("cx-1"))
    assert await first.claim(PUSH, "status") is None
    await first.close()
    second = open_store(url, {PUSH: Delivery()})
    await second.open()
    try:
        record = await second.claim(PUSH, "status")
        assert record is not None
        assert record.in_reply_to == "L1"
    finally:
        await second.close()


async def test_solo_send_is_recorded_before_return(
    store: Store, reopen: Callable[[], Awaitable[Store]]
) -> None:
    """A send recorded with the `solo` hint is as durable on return as a grouped one."""
    await store.record_sends([send(1)], solo=True)
    await store.add_dlr(dlr("cx-1"))
    await store.close()
    again = await reopen()
    assert (await only(again, POLL, "status")).in_reply_to == "L1"


async def test_upstream_refs_are_unique_short_and_only_ours_match(store: Store) -> None:
    """Refs are unique and at most 36 chars; a report naming a ref no store made matches nothing."""
    refs = [store.upstream_ref() for _ in range(1000)]
    assert len(set(refs)) == 1000
    assert max(len(r) for r in refs) <= 36
    await store.record_sends([send(1, upstream_ref="bc1x000000", connexus_id=None)])
    result = await store.add_dlr(dlr("bc1x000000"))
    assert result.tenant is None


async def test_every_recipient_of_one_ref_is_recorded(store: Store) -> None:
    """Several recipients sharing one ref are all recorded; the report by ref names the first."""
    ref = store.upstream_ref()
    await store.record_sends(
        [send(n, recipient=f"6420000000{n}", upstream_ref=ref) for n in range(1, 4)]
    )
    for n in range(1, 4):
        await store.add_dlr(dlr(f"cx-{n}"))
    assert len(await drain(store, POLL, "status")) == 3
    await store.add_dlr(dlr(ref, 2, "UNDELIV"))
    assert (await only(store, POLL, "status")).msisdn_from == "64200000001"


async def test_solo_send_matches_an_early_report(store: Store) -> None:
    """A send recorded with the `solo` hint picks up a delivery report that arrived before it."""
    await store.add_dlr(dlr("cx-1"))
    seen = store.notifier.generation(POLL, "status")
    await store.record_sends([send(1)], solo=True)
    assert store.notifier.generation(POLL, "status") != seen
    assert (await only(store, POLL, "status")).in_reply_to == "L1"


def test_postgresql_url_is_refused_with_a_clear_message() -> None:
    """A PostgreSQL store URL is refused at open with a message, not a crash or a silent SQLite."""
    from bc_proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="PostgreSQL"):
        open_store("postgresql://u@127.0.0.1/test", DELIVERY)
