"""The store seam: record types, the `Store` Protocol every backend implements, and `open_store`.

Owns what is durable: sends per recipient (written ahead of the upstream call, then settled),
legacy records waiting for poll or push (claimed under leases owned by a replica), sweep marks,
blocked handsets and rejected webhooks. Business rules live in `rules.py`, wake-ups in
`waker.py`; backends (`sqlite/`, `postgres/`) own SQL and commit batching only.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from bc_proxy.store.rules import KINDS, Delivery, Kind, Rules, SendState, TenantRules
from bc_proxy.store.waker import LocalWaker, Waker

__all__ = [
    "KINDS",
    "Delivery",
    "DlrEvent",
    "IngestResult",
    "Kind",
    "LegacyRecord",
    "LocalWaker",
    "MoEvent",
    "PlannedRecipient",
    "RejectedWebhook",
    "Rules",
    "SendIntent",
    "SendPlan",
    "SendState",
    "Settlement",
    "StatusRecord",
    "Store",
    "SweepMark",
    "TenantRules",
    "WaitingStat",
    "Waker",
    "new_replica_id",
    "open_store",
    "sqlite_path",
]

Outcome = Literal["stored", "duplicate", "unmatched", "ambiguous", "assigned"]


# -- sends ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendIntent:
    """A legacy send about to go upstream: what the write-ahead rows record."""

    tenant: str
    legacy_id: str | None  # the legacy client's messageId (None: no idempotency possible)
    recipients: tuple[str, ...]
    sender: str  # from / rateCode / default_from ("" if none)


@dataclass(frozen=True, slots=True)
class PlannedRecipient:
    """One recipient the store wrote ahead as `pending`: send it upstream now."""

    recipient: str
    upstream_ref: str  # names this row only; a single send carries it as Connexus messageId


@dataclass(frozen=True, slots=True)
class SendPlan:
    """What `begin_send` decided, recipient by recipient.

    `to_send`: new pending rows, to forward. `repeats`: recipients of an earlier send with the
    same tenant, messageId and recipient inside the idempotency window, with that send's state
    (`accepted`, `unknown`, or `pending` while the first call is still in flight): never
    forwarded again. `blocked`: handsets that opted out (a NUR record was stored for each).
    """

    to_send: tuple[PlannedRecipient, ...]
    repeats: tuple[tuple[str, SendState], ...] = ()
    blocked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settlement:
    """The upstream outcome of one pending recipient (by its upstream ref)."""

    upstream_ref: str
    state: SendState  # accepted, rejected or unknown
    connexus_id: str | None = None  # Connexus message_id when the answer gave one
    sender: str = ""  # the sender Connexus reported, when the intent had none


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """A status record bc-proxy makes itself (a recipient rejected, blocked or of unknown fate)."""

    tenant: str
    recipient: str
    sender: str
    legacy_id: str | None
    status_code: str  # legacy code (NUR, ERR, INF)
    error: str
    upstream_ref: str | None = None  # the send row it reports on, when there is one


# -- inbound ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DlrEvent:
    """A Connexus delivery report, as received: its identity is (message_id, status)."""

    message_id: str  # the Connexus message_id, or the messageId bc-proxy sent upstream
    status: int  # Connexus statusCode
    status_text: str  # Connexus status name (DELIVRD, ...), "" when absent


@dataclass(frozen=True, slots=True)
class MoEvent:
    """A Connexus incoming SMS, as received (webhook, mo/query or pull): identity messageId."""

    message_id: str
    sender: str  # the handset, without '+'
    to: str  # the short code / number it was sent to, without '+'
    body: str
    related_id: str | None = None  # Connexus relatedMessageId
    received_at: str = ""  # Connexus timestamp as given (sweep marks), "" when absent


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What an ingest did, and for which tenant (None: kept unmatched).

    stored: a new record; duplicate: the same event was already stored; unmatched: stored with
    no tenant (nobody receives it yet); ambiguous: a report whose id names several recipients,
    stored unmatched; assigned: an unmatched message given to a tenant by the sweep.
    """

    outcome: Outcome
    tenant: str | None

    @property
    def stored(self) -> bool:
        return self.outcome != "duplicate"


@dataclass(frozen=True, slots=True)
class SweepMark:
    """How far the missed-webhook sweep of one tenant's account has read `mo/query`."""

    tenant: str
    last_time: str  # Connexus timestamp of the newest message seen ("YYYY-MM-DD HH:MM:SS")
    last_id: str  # its messageId
    updated_at: float


@dataclass(frozen=True, slots=True)
class RejectedWebhook:
    """A webhook payload we could not use, kept verbatim (bounded table)."""

    id: int
    received_at: float
    reason: str
    body: bytes


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LegacyRecord:
    """A record waiting for the legacy client (incoming message or status update)."""

    id: int
    tenant: str
    kind: Kind
    receipt_id: str  # the legacy `messageId`: unique, <= 50 chars
    msisdn_from: str
    msisdn_to: str
    body: str
    rate_code: str
    in_reply_to: str
    status_code: str  # legacy code, or "" when `dlr_status` must be mapped
    dlr_status: int | None
    error: str
    created_at: float
    push_attempts: int = 0
    push_error: str = ""
    push_deadline: float | None = None  # when pushing gives up (dead letter)
    # The end of the lease this record was claimed under (claim, claim_pushes): it names that
    # claim, so its ack / release / push_failed land on it alone, never on a later claim of
    # the same record by the same replica (its lease expired, or a reload placed it again).
    lease_end: float | None = None


@dataclass(frozen=True, slots=True)
class WaitingStat:
    """Records waiting (pollable or push pending) for one tenant and kind."""

    tenant: str
    kind: Kind
    count: int
    oldest_created_at: float | None


# -- the seam ---------------------------------------------------------------------------------


class Store(Protocol):
    """What bc-proxy needs from durable storage. Every method is safe to call concurrently,
    from any number of replicas sharing one database (where the backend allows replicas).

    Claims are leases: a row records which replica (`replica`) holds it and until when; an
    expired lease is free again, so a crashed replica's claims come back by themselves.
    """

    waker: Waker
    replica: str  # this instance's lease owner id
    rules: Rules  # read at each operation: assigning new rules (a reload) takes effect at once

    async def open(self) -> None:
        """Connect, apply pending schema migrations (refusing a newer schema), start helpers."""

    async def close(self) -> None:
        """Finish pending writes, give back this replica's poll claims, close (idempotent).

        Its push leases are kept: an attempt abandoned at shutdown may have reached its
        receiver, so its record is pushed again (after a restart, or by another replica) only
        once the lease expires, as after a crash."""

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached."""

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema to the latest version this code knows: (from, to)."""

    # -- sends (write-ahead, then settled) --

    async def begin_send(self, intent: SendIntent, now: float) -> SendPlan:
        """Commit `pending` rows for the recipients to forward, before any upstream call.

        A recipient whose latest send with the same tenant and legacy messageId lies inside the
        tenant's idempotency window and is `accepted`, `unknown` or `pending` is a repeat (not
        written, not to be sent); one that was `rejected` is sent again. Without a legacy
        messageId nothing is a repeat. Blocked handsets get a NUR status record instead.

        A call whose caller is cancelled before its commit starts writes nothing: no `pending`
        row is left that nobody sends, which a retry would answer as a repeat (never sending
        it) and expiry would report as an unknown outcome.
        """

    async def settle_send(
        self, settlements: Sequence[Settlement], statuses: Sequence[StatusRecord] = ()
    ) -> None:
        """Record the upstream outcome of pending rows and the status records it produced, in one
        commit; delivery reports that arrived before their Connexus id was known are matched.
        Only rows still `pending` change: one that expiry made `unknown` meanwhile keeps that
        state (its ERR record is out; a late settle must not contradict it). A status record
        naming a send row (`upstream_ref`) is stored only if this call settles that row, so a
        settle repeated after a commit whose answer was lost stores nothing twice. A row settled
        `unknown` that a delivery report names already becomes `accepted` (the report proves
        Connexus took it: `rules.settled_state`), and its status records are not stored.
        Reports kept unmatched are matched only to sends written before they were stored
        (`Rules.attribute_dlr`).

        Once called, the commit happens even if the caller is cancelled while it waits (the
        write is queued before the first suspension): a send's outcome is never lost to a
        shutdown's cancellation, and the send path needs no task of its own to shield it."""

    async def match_waiting_reports(self) -> int:
        """Delivery reports still unmatched although a send they name, written before them, is
        stored now (the match that follows a settle or an ingest failed, and nobody repeats the
        report) get their send; how many report ids were matched. Run by the upkeep job, on
        one replica."""

    async def expire_pending(self, before: float) -> int:
        """Pending rows created before `before` become `unknown` (their call died); how many.

        Each gets, in the same commit, the status record a live send writes for an unknown
        outcome (ERR, `translate.UNKNOWN_OUTCOME`), placed by the rules; one that a delivery
        report names already becomes `accepted` instead, with no record (`rules.settled_state`;
        counted all the same). A row is expired once, even by several replicas expiring at the
        same time."""

    # -- inbound --

    async def add_dlr(self, event: DlrEvent) -> IngestResult:
        """Store a delivery report once per (message id, status), matched to its one recipient.

        A report kept unmatched with the same id and status is another event when this one
        names a send written after it was stored, or names no send yet and that one was kept
        longer than the clocks' tolerance (`Rules.other_message`): it then gives up its key
        (naming no send, its ref too), stays unmatched, and this one is stored."""

    async def add_mo(self, event: MoEvent, *, account: str | None) -> IngestResult:
        """Store an incoming message once per messageId, routed by `Rules.route_mo`.

        `account`: the tenant whose Connexus account this is known to come from (a tenant's own
        webhook secret, the sweep or pull of that account). An already stored unmatched message
        is assigned to `account` (outcome `assigned`). STOP/START update the blocked list.
        """

    async def reject_webhook(self, body: bytes, reason: str) -> None:
        """Keep an unusable webhook payload verbatim; the oldest go past the table's cap."""

    async def rejected_webhooks(self, limit: int = 100) -> list[RejectedWebhook]:
        """Newest first."""

    async def sweep_mark(self, tenant: str) -> SweepMark | None: ...

    async def set_sweep_mark(self, mark: SweepMark) -> None: ...

    async def blocked(self, tenant: str) -> list[str]:
        """Handsets that opted out of this tenant's messages."""

    # -- polling (leases) --

    async def claim(self, tenant: str, kind: Kind) -> LegacyRecord | None:
        """Lease the oldest pollable record of (tenant, kind) whose lease is free or expired."""

    async def ack(self, record: LegacyRecord) -> bool:
        """Consume a claimed record if the claim that returned it still holds it (this replica,
        that lease); False otherwise."""

    async def release(self, record: LegacyRecord) -> None:
        """Give a claimed record back at once (the client went away) and wake waiting polls;
        nothing when the claim that returned it no longer holds it."""

    async def queue_depth(self, tenant: str) -> tuple[int, int]:
        """(inCount, statusCount) of pollable records (without a scan on the event loop)."""

    async def waiting(self) -> list[WaitingStat]:
        """Pollable or push-pending records by tenant and kind (tenants no longer configured
        included), with the oldest one's creation time."""

    # -- push (leases, in order per message) --

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        """Lease records whose push is due, of tenants that push that kind, oldest first; a
        record is not due while an earlier record of the same send awaits its push."""

    async def push_done(self, record: LegacyRecord) -> None:
        """Delivered: no more pushes, while a push is due, whichever claim holds it now (a
        success that lands after its lease expired still finishes the record: pushing it
        again would deliver it twice)."""

    async def push_failed(self, record: LegacyRecord, *, next_at: float | None, error: str) -> None:
        """Reschedule a failed push at `next_at`, or dead-letter it when `next_at` is None
        (only while the claim that returned `record` holds it)."""

    async def dead_letters(self, limit: int | None = None) -> list[LegacyRecord]:
        """The dead letters, oldest first; the first `limit` of them when given (the console
        shows 100 of however many there are)."""

    async def dead_letter_count(self) -> int: ...

    async def replay(self, ids: Sequence[int] | None, now: float) -> int:
        """Move dead letters (all, or these ids) back to the push queue; returns how many."""

    async def place_stranded(self) -> None:
        """Place again the records another configuration placed: those waiting for a push
        (or dead-lettered) that the current `rules` no longer make become pollable, and those
        waiting for a poll (never pushed, not being handed over) whose kind the rules now only
        push are pushed instead. So none is left where neither a push nor a poll takes it.
        `open` does this at start, a reload after assigning new `rules`. One being pushed or
        polled at that moment may be delivered both ways (at least once)."""

    # -- housekeeping --

    async def purge(self, before: float) -> int:
        """Delete consumed records and settled sends older than `before`; rows deleted."""

    def exclusive(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Hold a cluster-wide lock for a singleton job (sweep, purge) if free: yields whether
        this replica got it. A backend with one process per database always gets it."""


LEASE_SECONDS = 15.0  # a poll or push claim of a replica that died comes back after this


def open_store(
    url: str,
    rules: Rules,
    *,
    fsync: bool = False,
    replica: str | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> Store:
    """Build the backend named by a SQLAlchemy-style URL (call `await store.open()` next).

    `replica`: the lease owner id (default: host name, pid and a random suffix).
    """
    if url.startswith("sqlite:///"):
        from bc_proxy.store.sqlite import SQLiteStore

        return SQLiteStore(
            sqlite_path(url), rules, fsync=fsync, replica=replica, lease_seconds=lease_seconds
        )
    if url.startswith(("postgresql://", "postgres://")):
        from bc_proxy.store.postgres import PostgresStore

        return PostgresStore(url, rules, replica=replica, lease_seconds=lease_seconds)
    raise ValueError(f"unknown store url scheme: {url.split(':', 1)[0]}")


def new_replica_id() -> str:
    """A lease owner id unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


def sqlite_path(url: str) -> str:
    """sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db ; sqlite:///:memory: too."""
    return url[len("sqlite:///") :]
