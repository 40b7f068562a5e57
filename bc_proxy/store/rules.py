"""Business rules of the store, pure and shared by every backend (table-tested, no I/O).

Owns: poll/push placement of a new record, event identity (dedupe keys), routing of an incoming
SMS to a tenant, attribution of a delivery report to one recipient (and which sends a report
kept unmatched may still be about), send idempotency, which state and status records a settle
stores, STOP/START detection, and the ids bc-proxy makes (upstream refs, legacy receipt ids).
Backends fetch the facts these functions need and run the SQL; they decide nothing themselves.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Kind = Literal["in", "status"]
SendState = Literal["pending", "accepted", "rejected", "unknown"]
KINDS: tuple[Kind, Kind] = ("in", "status")
T = TypeVar("T")

REPLY_WINDOW_SECONDS = 7 * 24 * 3600.0  # a reply belongs to the latest send to its handset within
# How much later than a report kept unmatched a send may have been written and still be what it
# reports on: the replicas' clocks (the webhook's and the send's) may differ by this much.
REPORT_CLOCK_TOLERANCE_SECONDS = 60.0
DEFAULT_IDEMPOTENCY_WINDOW = 86400.0
BLOCKED_ERROR = "(Number in Blocked List)"
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT"})
START_WORDS = frozenset({"START", "UNSTOP", "SUBSCRIBE", "OPTIN"})
_WORD = re.compile(r"[A-Za-z-]+")


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
class TenantRules:
    """What the store must know of one configured tenant."""

    delivery: Delivery = Delivery()
    senders: tuple[str, ...] = ()  # incoming SMS to these numbers belong to this tenant
    opt_out: bool = True  # STOP blocks the handset, START unblocks
    idempotency_window_seconds: float = DEFAULT_IDEMPOTENCY_WINDOW


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new record goes: pollable now, and/or pushed from `push_due` until the deadline."""

    pollable: bool
    push_due: float | None
    push_deadline: float | None

    @property
    def waiting(self) -> bool:
        """Someone will take it (a poll or a push): a waiter of its tenant should wake."""
        return self.pollable or self.push_due is not None

    @property
    def push_only(self) -> bool:
        """Pushed and not kept for polling: a record waiting for a poll is stranded here."""
        return self.push_due is not None and not self.pollable


@dataclass(frozen=True, slots=True)
class RecipientPlan:
    """`Rules.plan`'s decision for one send call, recipient by recipient (in call order)."""

    to_send: tuple[str, ...] = ()
    repeats: tuple[tuple[str, SendState], ...] = ()
    blocked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SendFacts:
    """What the store knows of one send row (looked up by Connexus id or upstream ref)."""

    id: int
    tenant: str
    recipient: str
    sender: str
    legacy_id: str | None
    created_at: float | None = None  # when the row was written (None: not looked up)


@dataclass(frozen=True, slots=True)
class Route:
    """Where an incoming SMS goes: a tenant (None = unmatched) and the legacy id it answers."""

    tenant: str | None
    in_reply_to: str
    send_id: int | None = None


_UNPLACED = Placement(False, None, None)


@dataclass(frozen=True)
class Rules:
    """The configured tenants, as the store sees them; every method is pure."""

    tenants: Mapping[str, TenantRules] = field(default_factory=dict)
    _owners: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owners: dict[str, str] = {}
        for name, t in self.tenants.items():
            for s in t.senders:
                owners.setdefault(s.lstrip("+"), name)
        object.__setattr__(self, "_owners", owners)

    # -- placement --

    def delivery(self, tenant: str) -> Delivery:
        t = self.tenants.get(tenant)
        return t.delivery if t is not None else Delivery()

    def placement(self, tenant: str | None, kind: Kind, now: float) -> Placement:
        """A record of an unknown tenant waits unplaced; a configured one is polled or pushed."""
        if tenant is None:
            return _UNPLACED
        if tenant not in self.tenants:
            return Placement(True, None, None)  # a removed tenant: kept, never dropped
        d = self.tenants[tenant].delivery
        if d.pushes(kind):
            return Placement(d.pollable(kind), now, now + d.max_age_seconds)
        return Placement(True, None, None)

    def push_tenants(self, kind: Kind) -> list[str]:
        """Tenants whose records of this kind are pushed (the only ones a push worker claims)."""
        return sorted(n for n, t in self.tenants.items() if t.delivery.pushes(kind))

    def unconfigured(self, tenants: Sequence[str]) -> list[str]:
        """Those of `tenants` that the configuration no longer has."""
        return sorted({t for t in tenants if t not in self.tenants})

    # -- identity --

    @staticmethod
    def dlr_key(message_id: str, status: int) -> str:
        """A delivery report's identity: never its timestamp or details."""
        return f"dlr:{message_id}:{status}"

    @staticmethod
    def dlr_key_range(message_id: str) -> tuple[str, str]:
        """The keys of every report naming `message_id`, whatever its status: those from the
        first to before the second (in binary order)."""
        return f"dlr:{message_id}:", f"dlr:{message_id};"

    @staticmethod
    def mo_key(message_id: str) -> str:
        return f"mo:{message_id}"

    # -- routing --

    def owner(self, to: str) -> str | None:
        """The tenant whose `senders` list this number."""
        return self._owners.get(to.lstrip("+"))

    def route_mo(
        self,
        to: str,
        *,
        related: SendFacts | None,
        latest: SendFacts | None,
        account: str | None,
    ) -> Route:
        """One rule whichever path brings the message first (webhook, sweep, pull):

        1. `to` is in a tenant's `senders` -> that tenant (inReplyToId from the send it relates
           to, else the latest send of that tenant to the handset, when the facts are theirs);
        2. it relates (relatedMessageId) to a known send -> that send's tenant;
        3. the latest send to the handset within 7 days -> that send's tenant;
        4. the account it came from is known -> that tenant;
        5. exactly one tenant is configured -> it;
        6. otherwise unmatched, until a path that knows the account assigns it.
        Steps 1-3 use only facts every path has, so the account never overrides them.
        """
        owner = self.owner(to)
        if owner is not None:
            for facts in (related, latest):
                if facts is not None and facts.tenant == owner:
                    return Route(owner, facts.legacy_id or "", facts.id)
            return Route(owner, "")
        for facts in (related, latest):
            if facts is not None:
                return Route(facts.tenant, facts.legacy_id or "", facts.id)
        if account is not None:
            return Route(account, "")
        if len(self.tenants) == 1:
            return Route(next(iter(self.tenants)), "")
        return Route(None, "")

    @classmethod
    def attribute_dlr(
        cls, candidates: Sequence[SendFacts], stored_at: float | None = None
    ) -> SendFacts | Literal["ambiguous"] | None:
        """The one recipient a report's id names; "ambiguous" when it could be several.

        `stored_at`: when a report kept unmatched was stored, for a later match. Only the sends
        written before it count (`sent_after`): a send written later that has the same id is
        another message's (a tenant's own numeric messageIds reported by Connexus, per-account
        Connexus ids), however long the report was kept."""
        if stored_at is not None:
            candidates = [c for c in candidates if not cls.sent_after(c, stored_at)]
        recipients = {(c.tenant, c.recipient) for c in candidates}
        if not candidates:
            return None
        if len(recipients) > 1:
            return "ambiguous"
        return max(candidates, key=lambda c: c.id)

    @staticmethod
    def sent_after(send: SendFacts, stored_at: float) -> bool:
        """Whether `send` was written after a report stored at `stored_at` (by more than the
        clocks' tolerance), so that report is not about it: a report comes after its send's
        row, which is committed before the upstream call."""
        return (
            send.created_at is not None
            and send.created_at > stored_at + REPORT_CLOCK_TOLERANCE_SECONDS
        )

    @classmethod
    def other_message(cls, found: SendFacts | str | None, stored_at: float, now: float) -> bool:
        """A report whose event key a report kept unmatched (stored at `stored_at`) already
        holds is a new event, not a repeat of that one (`found`: what `attribute_dlr` makes of
        it now):
        - when it names a send written after that one was stored: that one was about another
          message with the same id;
        - when it names no send yet and that one was stored longer ago than the clocks'
          tolerance (`forgotten`): a send's report that beats its `sms/out` answer, under a key
          a report of another message kept long before. It would be answered as a repeat
          (never retried by Connexus), and the settle then passes over the old one as too
          old: the send's report was lost.
        Otherwise it is the same event."""
        if isinstance(found, SendFacts):
            return cls.sent_after(found, stored_at)
        return found is None and cls.forgotten(stored_at, now)

    @staticmethod
    def forgotten(stored_at: float, now: float) -> bool:
        """Whether a report kept unmatched since `stored_at` gives up its ref as well as its
        key to a new report naming no send yet (`other_message`): older than the clocks'
        tolerance, it is not what that send's settle should find (if it was the same event,
        the new one carries it on)."""
        return stored_at < now - REPORT_CLOCK_TOLERANCE_SECONDS

    # -- sends --

    def window(self, tenant: str) -> float:
        t = self.tenants.get(tenant)
        return t.idempotency_window_seconds if t is not None else DEFAULT_IDEMPOTENCY_WINDOW

    @staticmethod
    def is_repeat(state: str) -> bool:
        """An earlier send in this state is not forwarded again (rejected ones are)."""
        return state in ("accepted", "unknown", "pending")

    @classmethod
    def plan(
        cls,
        recipients: Sequence[str],
        latest: Mapping[str, SendState],
        blocked: Collection[str],
    ) -> RecipientPlan:
        """What to do with each recipient of a send call.

        `latest`: the state of each recipient's latest earlier send with the same tenant and
        legacy messageId inside the idempotency window (empty without a messageId); `blocked`:
        the recipients that opted out. A repeat (`is_repeat`) is never forwarded, whether
        blocked or not; a blocked handset is not sent (it gets a NUR record); the rest are sent.
        A number named twice in one call is sent once: its next mention is a repeat of the
        pending send (with or without a messageId); a repeated or blocked number's next mention
        is dropped (listed once).
        """
        to_send: list[str] = []
        repeats: list[tuple[str, SendState]] = []
        out: list[str] = []
        seen: set[str] = set()
        for recipient in recipients:
            if recipient in seen:
                if recipient in to_send:
                    repeats.append((recipient, "pending"))
                continue
            seen.add(recipient)
            state = latest.get(recipient)
            if state is not None and cls.is_repeat(state):
                repeats.append((recipient, state))
            elif recipient in blocked:
                out.append(recipient)
            else:
                to_send.append(recipient)
        return RecipientPlan(tuple(to_send), tuple(repeats), tuple(out))

    # -- opt-out --

    def opt_out_command(self, tenant: str | None, body: str) -> Literal["stop", "start"] | None:
        """STOP / START as the whole message (a word, case and punctuation ignored)."""
        if tenant is None:
            return None
        t = self.tenants.get(tenant)
        if t is None or not t.opt_out:
            return None
        words = _WORD.findall(body)
        if len(words) != 1:
            return None
        word = words[0].upper().replace("-", "")
        if word in STOP_WORDS:
            return "stop"
        if word in START_WORDS:
            return "start"
        return None


def settled_state(state: SendState, reported: bool) -> SendState:
    """The state a `pending` row is settled in, given whether a delivery report is attributed
    to it already (`reported`). An unknown outcome (the answer to sms/out lost, the call cut
    short, the row expired) of a reported row is `accepted`: the report proves Connexus took
    the message. So it gets no unknown-outcome ERR record after its report, and a retry is
    answered as a repeat of an accepted send."""
    return "accepted" if reported and state == "unknown" else state


def only_settled(
    statuses: Sequence[T],
    ref_of: Callable[[T], str | None],
    settled: Collection[str],
    reported: Collection[str] = (),
) -> list[T]:
    """The status records a settle stores: each naming no send row, and for each send row this
    settle changed from `pending` (`settled`, by upstream ref) the first one naming it, unless
    a delivery report settled that row `accepted` (`reported`: see `settled_state`). So a
    settle repeated after its commit (its answer lost), one after expiry, or two settles of
    one row in one group store no record twice, and a reported row no ERR."""
    out: list[T] = []
    seen: set[str] = set()
    for st in statuses:
        ref = ref_of(st)
        if ref is None:
            out.append(st)
        elif ref in settled and ref not in seen and ref not in reported:
            seen.add(ref)
            out.append(st)
    return out


def new_ref() -> str:
    """A new upstream messageId: `bc` + microsecond time + random, 23 characters.

    Time-ordered (an index on it grows at one end), unique across replicas and restarts, and
    well under Connexus's 36-character limit. The 32 bits come from `random`, seeded from the
    OS when a process starts (workers are new interpreters) and again in a forked child. A ref
    needs to be unique, not secret (webhooks are authenticated by their secret and signature,
    never by a ref); os.urandom cost a system call per ref.
    """
    return f"bc{time.time_ns() // 1000:013x}{random.getrandbits(32):08x}"


def receipt_id() -> str:
    """A unique legacy receipt id: 32 random hex chars (128 bits), well under the 50 allowed."""
    return os.urandom(16).hex()
