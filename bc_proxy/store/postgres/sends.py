"""Sends in PostgreSQL: write-ahead `pending` rows, their settlement, and expiry of lost calls.

Owns the SQL of begin_send (a group of calls at a time: `bc_send_facts` takes the advisory lock
of every (tenant, legacy messageId) pair, so two replicas never both write a pending row for one
key, and returns the facts `Rules.plan` decides on; then one insert), settle_send (a group of
settlements in one statement, then the late matching of delivery reports: matching.py),
expire_pending, and the recovery of a group whose COMMIT answer was lost. A row settled or
expired with an unknown outcome that a delivery report is attributed to already is made
`accepted` instead, with no ERR record (`settled_state`; looked up for those rows only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bc_proxy.errors import StoreError
from bc_proxy.store import (
    PlannedRecipient,
    SendIntent,
    SendPlan,
    SendState,
    Settlement,
    StatusRecord,
)
from bc_proxy.store.postgres.abandoned import SeenKey, mark_seen
from bc_proxy.store.postgres.db import Conn, Db, Wakes
from bc_proxy.store.postgres.matching import match_known, match_late
from bc_proxy.store.postgres.records import NewRecord, insert_timed
from bc_proxy.store.postgres.schema import LOCK_CLASS_GROUP, lock_send_keys
from bc_proxy.store.rules import BLOCKED_ERROR, Rules, new_ref, only_settled, settled_state
from bc_proxy.translate import UNKNOWN_OUTCOME

log = logging.getLogger(__name__)

_LOCK_SEND_KEYS = "SELECT " + lock_send_keys("$1::text[]", "$2::text[]")
_LOCK_GROUP = f"SELECT pg_advisory_xact_lock({LOCK_CLASS_GROUP}, hashtext($1::text))"
# The event key of a NUR record begin_send writes for a blocked handset (with a new ref): how
# recover_begins finds a group that stored only those.
NUR_MARK = "bc-nur:"
_INSERT_SENDS = (
    "INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, created_at) "
    "SELECT t, l, r, s, 'pending', u, c "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[]) "
    "AS x(t, l, r, s, u, c)"
)
SETTLE = (
    "UPDATE sends SET state = s.state, settled_at = $5, "
    "connexus_id = coalesce(s.connexus_id, sends.connexus_id), "
    "sender = CASE WHEN sends.sender = '' THEN s.sender ELSE sends.sender END "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
    "AS s(ref, state, connexus_id, sender) WHERE sends.upstream_ref = s.ref "
    "AND sends.state = 'pending' "
    "RETURNING sends.id, sends.upstream_ref, sends.connexus_id"
)
# SETTLE and the look for reports that beat it, in one statement (migration 11; matching.py).
SETTLE_AND_LOOK = (
    "SELECT o_id AS id, o_ref AS upstream_ref, o_connexus_id AS connexus_id, o_waiting AS waiting "
    "FROM bc_settle_sends($1::text[], $2::text[], $3::text[], $4::text[], $5::float8)"
)
_EXPIRE = (
    "UPDATE sends SET state = 'unknown', settled_at = $2 WHERE id IN ("
    "SELECT id FROM sends WHERE state = 'pending' AND created_at < $1 "
    "ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED) AND state = 'pending' "
    "RETURNING id, tenant, recipient, sender, legacy_id, upstream_ref"
)
# Of these send rows, those a delivery report is attributed to (`records_reports`).
REPORTED = (
    "SELECT DISTINCT send_id FROM records WHERE send_id = ANY($1::bigint[]) "
    "AND send_id IS NOT NULL AND dlr_status IS NOT NULL"
)
# Rows just settled or expired `unknown` in this transaction that a report proves sent.
PROVEN = "UPDATE sends SET state = 'accepted' WHERE id = ANY($1::bigint[]) AND state = 'unknown'"
EXPIRE_CHUNK = 500


@dataclass(frozen=True, slots=True)
class BeginWrite:
    """One begin_send call waiting for its group.

    `planned`: the plan its latest attempt made (set by begin_sends before the commit), and
    `marks`: the event keys of the NUR records it wrote for blocked handsets, so that after a
    group whose COMMIT answer was lost `recover_begins` can tell whether the group committed
    and answer with what it committed. `refs_tried`: the upstream refs every attempt planned,
    rejected if its caller never gets a plan (abandoned.py)."""

    intent: SendIntent
    now: float
    planned: list[SendPlan] = field(default_factory=list, compare=False)
    marks: list[str] = field(default_factory=list, compare=False)
    refs_tried: list[str] = field(default_factory=list, compare=False)  # of every attempt

    def key(self) -> object:
        """Calls of one (tenant, messageId) never share a group: the later one must see the
        earlier one's pending rows."""
        i = self.intent
        return self if i.legacy_id is None else (i.tenant, i.legacy_id)


async def begin_sends(
    conn: Conn, wakes: Wakes, rules: Rules, writes: list[BeginWrite]
) -> list[SendPlan]:
    """Plan a group of send calls (distinct keys) and write their pending rows, inside the
    caller's transaction: the facts in one call, the rows in one insert.

    A plan that answers a call from a `pending` row of an earlier one marks that row
    (abandoned.mark_seen): a pending row abandoned by its own caller is then never rejected,
    and expires with its ERR record. If the row stopped being pending between the facts and
    the mark (rejected meanwhile), the facts are read again and the group planned anew."""
    tenants, legacy_ids, recipients, since = fact_keys(rules, writes)
    # Each failed mark settled a pending row for good (the key locks, held meanwhile, keep new
    # rows out): a group plans at most once per key it asked about, plus one.
    for _ in range(len(tenants) + 1):
        rows = await conn.fetch(
            "SELECT latest, is_blocked FROM bc_send_facts($1::text[], $2::text[], $3::text[], "
            "$4::float8[]) ORDER BY n",
            tenants,
            legacy_ids,
            recipients,
            since,
        )
        group = plan_group(rules, writes, iter(rows))
        seen = group.pending_repeats
        if not seen or await mark_seen(conn, seen) == set(seen):
            break
    else:
        raise StoreError("begin send: the facts kept changing while planned")
    for w, plan in zip(writes, group.plans, strict=True):
        w.refs_tried.extend(p.upstream_ref for p in plan.to_send)
    if group.send_rows:
        rows_by_column = (list(c) for c in zip(*group.send_rows, strict=True))
        await conn.execute(_INSERT_SENDS, *rows_by_column)
    await insert_statuses(conn, wakes, rules, group.statuses, {}, group.marks)
    return group.plans


def fact_keys(
    rules: Rules, writes: list[BeginWrite]
) -> tuple[list[str], list[str | None], list[str], list[float]]:
    """The facts a group is planned on, as bc_send_facts's four arrays: tenant, legacy
    messageId, recipient and window start, one entry per recipient of each call in order."""
    tenants: list[str] = []
    legacy_ids: list[str | None] = []
    recipients: list[str] = []
    since: list[float] = []
    for w in writes:
        window_start = w.now - rules.window(w.intent.tenant)
        for recipient in w.intent.recipients:
            tenants.append(w.intent.tenant)
            legacy_ids.append(w.intent.legacy_id)
            recipients.append(recipient)
            since.append(window_start)
    return tenants, legacy_ids, recipients, since


@dataclass
class PlannedGroup:
    """What a group's plans write: pending rows (send_rows, in _INSERT_SENDS's columns), NUR
    records for blocked handsets and their event keys (marks), and the pending rows of earlier
    calls a retry was answered from (pending_repeats: marked, abandoned.mark_seen)."""

    plans: list[SendPlan] = field(default_factory=list)
    send_rows: list[tuple[Any, ...]] = field(default_factory=list)
    statuses: list[tuple[StatusRecord, float]] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    pending_repeats: list[SeenKey] = field(default_factory=list)


def plan_group(rules: Rules, writes: list[BeginWrite], rows: Iterator[Any]) -> PlannedGroup:
    """Plan each call of a group by `Rules.plan` on its facts (`rows`: one mapping with
    `latest` and `is_blocked` per entry of fact_keys), recording each call's plan and marks on
    it (recover_begins reads them)."""
    group = PlannedGroup()
    for w in writes:
        intent = w.intent
        latest: dict[str, SendState] = {}
        blocked: set[str] = set()
        for recipient in intent.recipients:
            row = next(rows)
            if row["latest"] is not None:
                latest[recipient] = _state(row["latest"])
            if row["is_blocked"]:
                blocked.add(recipient)
        decided = rules.plan(intent.recipients, latest, blocked)
        to_send = tuple(PlannedRecipient(r, new_ref()) for r in decided.to_send)
        group.send_rows.extend(
            (intent.tenant, intent.legacy_id, p.recipient, intent.sender, p.upstream_ref, w.now)
            for p in to_send
        )
        lid = intent.legacy_id
        group.statuses.extend(
            (StatusRecord(intent.tenant, h, intent.sender, lid, "NUR", BLOCKED_ERROR), w.now)
            for h in decided.blocked
        )
        if lid is not None:
            window_start = w.now - rules.window(intent.tenant)
            group.pending_repeats.extend(  # answered from a stored row (not a repeat in the call)
                SeenKey(intent.tenant, lid, r, window_start)
                for r in {r for r, state in decided.repeats if state == "pending"}
                if latest.get(r) == "pending"
            )
        plan = SendPlan(to_send, decided.repeats, decided.blocked)
        w.planned[:] = [plan]
        w.marks[:] = [f"{NUR_MARK}{new_ref()}" for _ in decided.blocked]
        group.marks.extend(w.marks)
        group.plans.append(plan)
    return group


async def recover_begins(db: Db, writes: list[BeginWrite]) -> list[SendPlan] | None:
    """After a group of begin_send calls failed with its outcome unknown (a connection lost
    while its COMMIT was on the wire): the plans it committed, or None when it did not
    commit, or when that cannot be told (no pending row to look for).

    The group is one transaction, so one of its pending rows (or NUR records) found means all
    of it committed. Without this, the calls would be retried one by one: each would find its
    own pending rows and be answered as a repeat, and nobody would send them (until expiry
    said "unknown"); and NUR records would be stored twice. A group of repeats only wrote
    nothing: retrying it writes nothing either."""
    plans = [w.planned[0] for w in writes if w.planned]
    refs = [p.upstream_ref for plan in plans for p in plan.to_send]
    marks = [m for w in writes for m in w.marks]
    if len(plans) < len(writes) or not (refs or marks):
        return None
    keyed = [w.intent for w in writes if w.intent.legacy_id is not None]
    async with db.tx("recover begin send") as (conn, _):
        # The group's advisory locks first: if its transaction is still committing on the
        # server (the connection dropped, the backend not yet done), this waits for its end:
        # its own lock (a one-statement group: fresh.py), then its calls' key locks.
        if refs:
            await conn.fetchval(_LOCK_GROUP, refs[0])
        await conn.fetchval(
            _LOCK_SEND_KEYS, [i.tenant for i in keyed], [i.legacy_id for i in keyed]
        )
        found = await conn.fetchval(
            "SELECT (SELECT count(*) FROM sends WHERE upstream_ref = ANY($1::text[])) "
            "+ (SELECT count(*) FROM records WHERE event_key = ANY($2::text[]))",
            refs,
            marks,
        )
    return plans if found else None


def _state(state: str) -> SendState:
    if state in ("accepted", "unknown", "rejected"):
        return state  # type: ignore[return-value]
    return "pending"


@dataclass(frozen=True, slots=True)
class SettleWrite:
    """One settle_send call waiting for its group."""

    settlements: tuple[Settlement, ...]
    statuses: tuple[StatusRecord, ...]
    now: float = field(default_factory=time.time)


async def settle_sends(db: Db, rules: Rules, writes: list[SettleWrite]) -> list[None]:
    """Settle a group of calls in one commit. Without status records or unknown outcomes, one
    statement in autocommit, which also looks for reports that beat it (bc_settle_sends);
    else a transaction, with the look after its commit (match_late). Then the late matching of
    the reports found (see the module docstring). Status records: `Rules.only_settled`, by
    the rows the UPDATE changed from `pending`, none for a row it settled `unknown` that a
    report names (`_proven`)."""
    settlements = sorted((s for w in writes for s in w.settlements), key=lambda s: s.upstream_ref)
    statuses = [(s, w.now) for w in writes for s in w.statuses]
    now = max(w.now for w in writes)
    args = (
        [s.upstream_ref for s in settlements],
        [s.state for s in settlements],
        [s.connexus_id for s in settlements],
        [s.sender for s in settlements],
        now,
    )
    rows: list[Any] = []
    unknown = {s.upstream_ref for s in settlements if s.state == "unknown"}
    if statuses or unknown:
        async with db.tx("settle send") as (conn, wakes):
            if settlements:
                rows = await conn.fetch(SETTLE, *args)
            send_ids = {r["upstream_ref"]: r["id"] for r in rows}
            proven = await _proven(conn, {r: i for r, i in send_ids.items() if r in unknown})
            settled = only_settled(statuses, lambda x: x[0].upstream_ref, send_ids, proven)
            if settled:
                await insert_statuses(conn, wakes, rules, settled, send_ids)
        known = sorted({r["connexus_id"] for r in rows if r["connexus_id"]})
        if known:
            await match_late(db, rules, known)
    elif settlements:
        async with db.conn("settle send") as conn:
            rows = await conn.fetch(SETTLE_AND_LOOK, *args)
        await match_known(db, rules, sorted({r["connexus_id"] for r in rows if r["waiting"]}))
    return [None] * len(writes)


async def _proven(conn: Conn, unknown: Mapping[str, int]) -> set[str]:
    """Of rows just made `unknown` in this transaction (send id by upstream ref), those a
    delivery report is attributed to: made `accepted` (`settled_state`); their refs."""
    if not unknown:
        return set()
    reported = {r["send_id"] for r in await conn.fetch(REPORTED, list(unknown.values()))}
    proven = {
        ref for ref, i in unknown.items() if settled_state("unknown", i in reported) != "unknown"
    }
    if proven:
        await conn.execute(PROVEN, [unknown[ref] for ref in proven])
    return proven


async def recover_settles(db: Db, rules: Rules, writes: list[SettleWrite]) -> list[None] | None:
    """After a group of settle_send calls failed with its outcome unknown: [None, ...] when it
    committed after all, else None (retried call by call). Committed means a row holds the
    state a call set, settled no earlier than the call was made (a group stores the latest
    time of its calls, so a call retried alone after its group is recognised too). A row
    `unknown` proves nothing: expiry may have made it so, and taking that for the group's
    commit would drop the group's other settles. Retried after a commit, a call changes
    nothing (its rows are no longer pending, so it stores no status record either) but would
    skip the late report matching that the lost call did not get to run; that runs here."""
    settled = [(s, w.now) for w in writes for s in w.settlements]
    if not settled:
        return None
    async with db.tx("recover settle send") as (conn, _):
        # The rows FOR SHARE, whatever their state: a settle still committing on the server
        # holds them, so this waits for its end and then reads the rows it left.
        rows = await conn.fetch(
            "SELECT upstream_ref, state, settled_at FROM sends "
            "WHERE upstream_ref = ANY($1::text[]) FOR SHARE",
            [s.upstream_ref for s, _ in settled],
        )
    left = {r["upstream_ref"]: r for r in rows}
    if not any(
        (row := left.get(s.upstream_ref)) is not None
        and row["state"] == s.state != "unknown"
        and (row["settled_at"] or 0.0) >= t
        for s, t in settled
    ):
        return None
    known = sorted({s.connexus_id for s, _ in settled if s.connexus_id})
    if known:
        await match_late(db, rules, known)
    return [None] * len(writes)


async def insert_statuses(
    conn: Conn,
    wakes: Wakes,
    rules: Rules,
    statuses: Sequence[tuple[StatusRecord, float]],
    send_ids: Mapping[str, int],
    keys: Sequence[str] = (),
) -> None:
    """Store status records bc-proxy made (each with its time), placed by the rules, inside
    the caller's transaction; a send id not in `send_ids` is looked up by its ref. `keys`:
    the records' event keys, one each, when they have any."""
    refs = sorted({s.upstream_ref for s, _ in statuses if s.upstream_ref} - send_ids.keys())
    ids = dict(send_ids)
    if refs:
        rows = await conn.fetch(
            "SELECT id, upstream_ref FROM sends WHERE upstream_ref = ANY($1::text[])", refs
        )
        ids.update({r["upstream_ref"]: r["id"] for r in rows})
    event_keys: Sequence[str | None] = keys or [None] * len(statuses)
    records = [
        (
            NewRecord(
                st.tenant,
                "status",
                event_key=key,
                send_id=ids.get(st.upstream_ref or ""),
                msisdn_from=st.recipient,
                msisdn_to=st.sender,
                in_reply_to=st.legacy_id or "",
                status_code=st.status_code,
                error=st.error,
            ),
            now,
        )
        for (st, now), key in zip(statuses, event_keys, strict=True)
    ]
    await insert_timed(conn, rules, records, wakes)


async def expire_pending(db: Db, rules: Rules, before: float) -> int:
    """Pending rows created before `before` become `unknown`, each with the status record a
    live send writes for an unknown outcome, in one commit per chunk; a row a delivery report
    is attributed to becomes `accepted` instead, with no record (`_proven`). A row is expired once
    even by replicas expiring at the same time (locked rows are skipped, state re-checked)."""
    total = 0
    while True:
        now = time.time()
        async with db.tx("expire pending") as (conn, wakes):
            rows = await conn.fetch(_EXPIRE, before, now, EXPIRE_CHUNK)
            proven = await _proven(conn, {r["upstream_ref"]: r["id"] for r in rows})
            statuses = [
                (
                    StatusRecord(
                        r["tenant"],
                        r["recipient"],
                        r["sender"],
                        r["legacy_id"],
                        "ERR",
                        UNKNOWN_OUTCOME,
                        r["upstream_ref"],
                    ),
                    now,
                )
                for r in rows
                if r["upstream_ref"] not in proven
            ]
            await insert_statuses(
                conn, wakes, rules, statuses, {r["upstream_ref"]: r["id"] for r in rows}
            )
        total += len(rows)
        if len(rows) < EXPIRE_CHUNK:
            return total
