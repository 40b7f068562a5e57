"""Delivery reports in PostgreSQL, stored a group at a time (group commit).

Owns the SQL of add_dlr: the candidate sends of every report in the group in one query,
`Rules.attribute_dlr` per report, one insert deduped by event key. A report stored unmatched
is looked at again after its commit (`matching.recheck_unmatched`, called by the store), as a
settle looks for unmatched reports after its own: whichever commits second sees the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bc_proxy.store import DlrEvent, IngestResult
from bc_proxy.store.postgres.db import Db, Wakes
from bc_proxy.store.postgres.matching import candidates
from bc_proxy.store.postgres.records import NewRecord, insert_keyed
from bc_proxy.store.rules import Rules, SendFacts


@dataclass(frozen=True, slots=True)
class DlrWrite:
    """One add_dlr call waiting for its group."""

    event: DlrEvent
    key: str
    now: float = field(default_factory=time.time)


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


async def store_dlrs(db: Db, rules: Rules, writes: list[DlrWrite]) -> list[IngestResult]:
    """Store a group of reports (distinct event keys): two statements and no explicit
    transaction. The candidates are read first; the insert and its NOTIFY are one statement
    (atomic by itself). A settle committing in between is caught by the post-commit checks
    (module docstring), as one committing just after would be."""
    ids = sorted({w.event.message_id for w in writes})
    async with db.conn("add dlr") as conn:
        sends = await candidates(conn, ids)
        found = {i: rules.attribute_dlr(sends.get(i, [])) for i in ids}
        records = [record_of(w, found[w.event.message_id]) for w in writes]
        # Sorted by key: two replicas inserting the same keys wait on each other in one order.
        rows = sorted(
            (r.values(rules, w.now) for r, w in zip(records, writes, strict=True)), key=_key
        )
        wakes: Wakes = {
            (r.tenant, "status")
            for r, w in zip(records, writes, strict=True)
            if r.tenant is not None and r.wakes(rules, w.now)
        }
        inserted = await insert_keyed(conn, rows, notify=wakes)
    results: list[IngestResult] = []
    fired: Wakes = set()
    for w, record in zip(writes, records, strict=True):
        tenant = record.tenant
        if w.key not in inserted:
            results.append(IngestResult("duplicate", tenant))
        elif tenant is None:
            results.append(IngestResult("ambiguous" if record.ambiguous else "unmatched", None))
        else:
            if (tenant, "status") in wakes:
                fired.add((tenant, "status"))
            results.append(IngestResult("stored", tenant))
    db.fire(fired)
    return results


def _key(row: tuple[object, ...]) -> str:
    return str(row[2])  # event_key
