"""Delivery reports in PostgreSQL, stored a group at a time (group commit).

Owns the SQL of add_dlr: the candidate sends of every report in the group in one query,
`Rules.attribute_dlr` per report, one insert deduped by event key. A report stored unmatched
is looked at again after its commit (`matching.recheck_unmatched`, called by the store), as a
settle looks for unmatched reports after its own: whichever commits second sees the other.
So is a repeat of a report still stored unmatched: the recheck after the first delivery may
have failed (the webhook answered 503), and Connexus's retry is the one chance left. Unless
`Rules.other_message` says it is another event (it names a send written after that row was
stored, or names no send yet and that row is long past): that row was about another message
with the same id, and gives up its key (naming no send, its ref too; it stays unmatched).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bc_proxy.store import DlrEvent, IngestResult, Outcome
from bc_proxy.store.postgres.db import Conn, Db, Wakes
from bc_proxy.store.postgres.matching import candidates
from bc_proxy.store.postgres.records import NewRecord, insert_keyed
from bc_proxy.store.rules import Rules, SendFacts


@dataclass(frozen=True, slots=True)
class DlrWrite:
    """One add_dlr call waiting for its group."""

    event: DlrEvent
    key: str
    now: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class DlrStored:
    """What add_dlr did, and whether its row is committed unmatched (stored now, or by an
    earlier delivery of the same report): then its send is looked for again."""

    result: IngestResult
    unmatched: bool = False


# Repeats only: the rows stored before, as they are now.
STORED = (
    "SELECT id, event_key, tenant, ambiguous, created_at FROM records "
    "WHERE event_key = ANY($1::text[])"
)
# Rows kept unmatched whose key a report about a later send takes: they stay, keyless (by id:
# `NOT ambiguous` here would let a plan read every unmatched report, `records_unmatched`).
RELEASE_KEYS = (
    "UPDATE records SET event_key = NULL, ref = CASE WHEN id = ANY($2::bigint[]) THEN NULL "
    "ELSE ref END WHERE id = ANY($1::bigint[]) AND tenant IS NULL"
)


def record_of(w: DlrWrite, found: SendFacts | str | None) -> NewRecord:
    """The status record of a report: the send's parties when it names one send."""
    send = found if isinstance(found, SendFacts) else None
    return NewRecord(
        send.tenant if send else None,
        "status",
        event_key=w.key,
        ref=w.event.message_id,
        send_id=send.id if send else None,
        msisdn_from=send.recipient if send else "",
        msisdn_to=send.sender if send else "",
        in_reply_to=(send.legacy_id or "") if send else "",
        dlr_status=w.event.status,
        error=w.event.status_text,
        ambiguous=found == "ambiguous",
    )


async def store_dlrs(db: Db, rules: Rules, writes: list[DlrWrite]) -> list[DlrStored]:
    """Store a group of reports (distinct event keys): two statements and no explicit
    transaction. The candidates are read first; the insert and its NOTIFY are one statement
    (atomic by itself). A settle committing in between is caught by the post-commit checks
    (module docstring), as one committing just after would be. A group with repeats reads
    their rows once more (a third statement, never on the path of new reports), and a repeat
    of a key kept unmatched for another message takes that key (`_take_keys`)."""
    ids = sorted({w.event.message_id for w in writes})
    async with db.conn("add dlr") as conn:
        sends = await candidates(conn, ids)
        found = {i: rules.attribute_dlr(sends.get(i, [])) for i in ids}
        records = [record_of(w, found[w.event.message_id]) for w in writes]
        values = {w.key: r.values(rules, w.now) for r, w in zip(records, writes, strict=True)}
        # Sorted by key: two replicas inserting the same keys wait on each other in one order.
        rows = sorted(values.values(), key=_key)
        wakes: Wakes = {
            (r.tenant, "status")
            for r, w in zip(records, writes, strict=True)
            if r.tenant is not None and r.wakes(rules, w.now)
        }
        inserted = await insert_keyed(conn, rows, notify=wakes)
        before = await _stored_before(conn, [w.key for w in writes if w.key not in inserted])
        stale = [
            w.key
            for w in writes
            if (old := before.get(w.key)) is not None
            and old["tenant"] is None
            and not old["ambiguous"]
            and rules.other_message(found[w.event.message_id], old["created_at"], w.now)
        ]
        if stale:
            named = {w.key: found[w.event.message_id] for w in writes}
            orphans = [before[k]["id"] for k in stale if named[k] is None]
            taken = await _take_keys(
                conn, [before[k]["id"] for k in stale], orphans, stale, values, wakes
            )
            inserted |= taken
            before.update(await _stored_before(conn, [k for k in stale if k not in taken]))
    results: list[DlrStored] = []
    fired: Wakes = set()
    for w, record in zip(writes, records, strict=True):
        tenant = record.tenant
        if w.key not in inserted:
            results.append(_repeat(before.get(w.key), tenant))
        elif tenant is None:
            outcome: Outcome = "ambiguous" if record.ambiguous else "unmatched"
            results.append(DlrStored(IngestResult(outcome, None), not record.ambiguous))
        else:
            if (tenant, "status") in wakes:
                fired.add((tenant, "status"))
            results.append(DlrStored(IngestResult("stored", tenant)))
    db.fire(fired)
    return results


async def _stored_before(conn: Conn, keys: list[str]) -> dict[str, Any]:
    """The rows of repeated reports, read after the insert: each is committed by then (the
    insert waited for the transaction that stored it)."""
    if not keys:
        return {}
    return {r["event_key"]: r for r in await conn.fetch(STORED, keys)}


async def _take_keys(
    conn: Conn,
    old_ids: list[int],
    orphans: list[int],
    keys: list[str],
    values: dict[str, tuple[Any, ...]],
    wakes: Wakes,
) -> set[str]:
    """Reports whose keys rows kept unmatched for other messages hold (`old_ids`): those rows
    give up their keys (they stay, unmatched and keyless; `orphans`, superseded by a report
    naming no send yet, give up their refs too) and the reports are inserted, in one
    transaction; the keys inserted (another replica taking the same key first inserts it)."""
    async with conn.transaction():
        await conn.execute(RELEASE_KEYS, old_ids, orphans)
        return await insert_keyed(conn, sorted((values[k] for k in keys), key=_key), notify=wakes)


def _repeat(row: Any, tenant: str | None) -> DlrStored:
    """A repeat, with the tenant its row has; one still unmatched is looked at again."""
    if row is None:  # purged since: nothing left to match
        return DlrStored(IngestResult("duplicate", tenant))
    unmatched = row["tenant"] is None and not row["ambiguous"]
    return DlrStored(IngestResult("duplicate", row["tenant"]), unmatched)


def _key(row: tuple[object, ...]) -> str:
    return str(row[2])  # event_key
