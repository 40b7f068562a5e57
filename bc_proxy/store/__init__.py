"""The store seam: record types, the `Store` Protocol every backend implements, and `open_store`.

Owns what is durable (sends per recipient, legacy records waiting for poll or push) and the
in-process `Notifier` that wakes long-polls. Backends own SQL and commit batching; nothing
here does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["in", "status"]
KINDS: tuple[Kind, Kind] = ("in", "status")


@dataclass(frozen=True, slots=True)
class SendRecord:
    """One recipient of an accepted legacy send, as mapped to Connexus."""

    tenant: str
    legacy_id: str | None  # the legacy client's messageId
    recipient: str
    sender: str  # from / rateCode / default_from the message went out with ("" if none)
    connexus_id: str | None  # Connexus message_id, None when rejected
    upstream_ref: str | None  # the messageId bc-proxy sent upstream


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """A status record bc-proxy makes itself (a recipient Connexus rejected at send time)."""

    tenant: str
    recipient: str
    sender: str
    legacy_id: str | None
    status_code: str  # legacy code (NUR, ERR)
    error: str


@dataclass(frozen=True, slots=True)
class DlrEvent:
    """A Connexus delivery report, as received."""

    message_id: str  # the Connexus message_id (or the id bc-proxy sent upstream)
    status: int  # Connexus statusCode
    status_text: str  # Connexus status name (DELIVRD, ...)
    event_key: str = ""  # what else tells two reports apart (timestamp, smscid)


@dataclass(frozen=True, slots=True)
class MoEvent:
    """A Connexus incoming SMS, as received (webhook or mo/query)."""

    message_id: str
    sender: str  # the handset, without '+'
    to: str  # the short code / number it was sent to
    body: str
    related_id: str | None  # Connexus relatedMessageId
    owner: str | None  # tenant owning `to` among the configured senders, if any


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


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one tenant takes its records: polling, push per kind, or both."""

    push_in: bool = False
    push_status: bool = False
    keep_for_polling: bool = False
    max_age_seconds: float = 48 * 3600.0

    def pushes(self, kind: Kind) -> bool:
        return self.push_in if kind == "in" else self.push_status

    def pollable(self, kind: Kind) -> bool:
        return self.keep_for_polling or not self.pushes(kind)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What a webhook ingest did: stored new, or found a duplicate; matched a tenant or not."""

    stored: bool
    tenant: str | None


@dataclass(frozen=True, slots=True)
class WaitingStat:
    tenant: str
    kind: Kind
    count: int
    oldest_created_at: float | None


class Notifier:
    """Wakes long-polls of one process when a record for their tenant and kind is stored.

    A generation counter per (tenant, kind) closes the race between "found nothing" and
    "started waiting": a waiter passes the generation it saw before looking.
    """

    def __init__(self) -> None:
        self._gen: dict[tuple[str, str], int] = {}
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._any: asyncio.Event | None = None
        self.closed = False

    def generation(self, tenant: str, kind: str) -> int:
        return self._gen.get((tenant, kind), 0)

    def notify(self, tenant: str, kind: str) -> None:
        key = (tenant, kind)
        self._gen[key] = self._gen.get(key, 0) + 1
        event = self._events.pop(key, None)
        if event is not None:
            event.set()
        if self._any is not None:
            self._any.set()
            self._any = None

    async def wait_any(self, within: float) -> None:
        """Wait until anything is stored, at most `within` seconds (the push worker's nap)."""
        if self.closed:
            return
        if self._any is None:
            self._any = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._any.wait()

    async def wait(self, tenant: str, kind: str, seen: int, within: float) -> bool:
        """Wait until something is stored after generation `seen`; False on timeout/close."""
        key = (tenant, kind)
        if self.closed:
            return False
        if self._gen.get(key, 0) != seen:
            return True
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        try:
            async with asyncio.timeout(within):
                await event.wait()
        except TimeoutError:
            return False
        return not self.closed

    def close(self) -> None:
        """Release every waiter (shutdown): they answer 204 without consuming."""
        self.closed = True
        for event in self._events.values():
            event.set()
        self._events.clear()
        if self._any is not None:
            self._any.set()


class Store(Protocol):
    """What bc-proxy needs from durable storage. Every method is safe to call concurrently."""

    notifier: Notifier

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached."""

    def upstream_ref(self) -> str:
        """A new unique id (<= 36 chars) for bc-proxy to send upstream with a send.

        Delivery reports and replies can carry it instead of the Connexus message_id; a send
        recorded with it must be found by it. Only refs made here are found.
        """

    async def record_sends(
        self,
        sends: Sequence[SendRecord],
        statuses: Sequence[StatusRecord] = (),
        *,
        solo: bool = False,
    ) -> None:
        """Durably record an accepted send; match delivery reports that arrived before it.

        `solo`: no other send is in flight in this process, so a backend may commit at once
        instead of waiting a moment for others to share the commit (a latency hint only).
        """

    async def add_dlr(self, event: DlrEvent) -> IngestResult:
        """Durably store a delivery report once (deduplicated), matched to its send if known."""

    async def add_mo(self, event: MoEvent, *, fallback_tenant: str | None) -> IngestResult:
        """Durably store an incoming message once (deduplicated), routed to its tenant."""

    async def has_mo(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these Connexus incoming message ids are already stored."""

    async def claim(self, tenant: str, kind: Kind) -> LegacyRecord | None:
        """Take the oldest pollable record out of reach of other polls, without consuming it."""

    async def ack(self, record: LegacyRecord) -> None:
        """Consume a claimed record: it has been handed to the legacy client."""

    def release(self, record: LegacyRecord) -> None:
        """Give a claimed record back (the client went away before receiving it)."""

    async def queue_depth(self, tenant: str) -> tuple[int, int]:
        """(inCount, statusCount) of pollable records."""

    async def waiting(self) -> list[WaitingStat]:
        """Pollable or pushable records by tenant and kind, with the oldest one's age."""

    async def claim_pushes(self, now: float, limit: int) -> list[LegacyRecord]:
        """Claim records whose push is due (each claimed by exactly one worker)."""

    async def push_done(self, record: LegacyRecord) -> None: ...

    async def push_failed(self, record: LegacyRecord, *, next_at: float | None, error: str) -> None:
        """Reschedule a failed push at `next_at`, or dead-letter it when `next_at` is None."""

    async def dead_letters(self) -> list[LegacyRecord]: ...

    async def dead_letter_count(self) -> int: ...

    async def replay(self, ids: Sequence[int] | None, now: float) -> int:
        """Move dead letters (all, or these ids) back to the push queue; returns how many."""

    async def purge(self, before: float) -> int:
        """Delete consumed records and sends older than `before`; returns rows deleted."""


def open_store(url: str, delivery: Mapping[str, Delivery], *, fsync: bool = False) -> Store:
    """Build the backend named by a SQLAlchemy-style URL (call `await store.open()` next)."""
    if url.startswith("sqlite:///"):
        from bc_proxy.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url), delivery, fsync=fsync)
    if url.startswith(("postgresql://", "postgres://")):
        from bc_proxy.errors import ConfigError

        raise ConfigError("store.url: the PostgreSQL backend is not available in this release")
    raise ValueError(f"unknown store url scheme: {url.split(':', 1)[0]}")


def sqlite_path(url: str) -> str:
    """sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db ; sqlite:///:memory: too."""
    return url[len("sqlite:///") :]
