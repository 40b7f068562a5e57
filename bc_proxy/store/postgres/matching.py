"""Late matching of delivery reports in PostgreSQL: a report that arrived before the Connexus
id it names was stored with a send is kept unmatched, and given to its send later.

An ingest commits an unmatched report first and then looks for a send it names
(`recheck_unmatched`), under the advisory locks of the ids (`locked_candidates`). A settle
looks for unmatched reports naming the Connexus ids it sets in its own statement
(`bc_settle_sends`, migration 11): after its update, it takes the same locks, then looks, and
holds them until its commit. So an ingest whose commit came after the settle's look waits for
the settle's commit before it looks, and sees its rows; an ingest whose look came first had
committed before the settle's look began, which sees the report. Either way one of the two
sees the other (or both do): no report is left unmatched by the race. A settle that runs as a
transaction (status records, unknown outcomes) or is recovered looks after its commit instead
(`match_late`), which the ingest's look after its own commit equally covers. The matching
itself runs under the ids' advisory locks (`match_reports`), so two matchers of one id run one
after the other.

A report is matched only to a send written before it was stored (`Rules.attribute_dlr` with
the report's time, and the same condition in the upkeep pass's SQL): one kept from before is
about another message that had the same id, and stays unmatched.

A look that fails leaves the report unmatched. After an ingest it fails the ingest (the
webhook answers 503), and each repeat of the report while its row is unmatched looks again
(the store's add_dlr), so Connexus's retry repairs it. After a settle (or an ingest of a
pulled report, which nobody repeats) the failure is logged, and the upkeep job's pass
(`match_waiting`, every 30 s on one replica) finds the report and its now known send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from bc_proxy.errors import StoreError
from bc_proxy.store.postgres.db import Conn, Db, Wakes
from bc_proxy.store.postgres.schema import LOCK_CLASS_REPORT
from bc_proxy.store.rules import REPORT_CLOCK_TOLERANCE_SECONDS, Rules, SendFacts

log = logging.getLogger(__name__)

FACTS = "id, tenant, recipient, sender, legacy_id"
_S_FACTS = ", ".join(f"s.{c.strip()}" for c in FACTS.split(","))
CANDIDATES = (
    f"SELECT m, {_S_FACTS}, s.created_at FROM unnest($1::text[]) AS m JOIN sends AS s "
    f"ON s.connexus_id = m UNION SELECT m, {_S_FACTS}, s.created_at "
    "FROM unnest($1::text[]) AS m JOIN sends AS s ON s.upstream_ref = m"
)
# CANDIDATES under the ids' locks (migration 11).
LOCKED_CANDIDATES = (
    "SELECT o_m AS m, o_id AS id, o_tenant AS tenant, o_recipient AS recipient, "
    "o_sender AS sender, o_legacy_id AS legacy_id, o_created_at AS created_at "
    "FROM bc_report_candidates($1::text[])"
)
# Report ids are locked (sorted, each once) by whoever matches unmatched reports to a send.
LOCK_REPORT_IDS = (
    f"SELECT count(pg_advisory_xact_lock({LOCK_CLASS_REPORT}, h)) FROM "
    "(SELECT DISTINCT hashtext(i) AS h FROM unnest($1::text[]) AS i ORDER BY h) AS s"
)
UNMATCHED = (
    "SELECT DISTINCT ref FROM records WHERE tenant IS NULL AND NOT ambiguous "
    "AND kind = 'status' AND ref = ANY($1::text[])"
)
# Recent unmatched reports ($2: stored after) whose send is known by now (a look that failed
# left them): `records_unmatched_recent`, each ref probed in the two send indexes it may name.
# Only recent ones: a report for a message sent outside the gateway never matches, and they
# are kept until purge; the look that failed came right after the report's send settled. Only
# sends written before the report (Rules.sent_after): a report older than every send its id
# names is another message's, and would fill every chunk of every pass.
_BEFORE_REPORT = f"s.created_at <= r.created_at + {REPORT_CLOCK_TOLERANCE_SECONDS!r}"
WAITING_KNOWN = (
    "SELECT r.ref FROM records r WHERE r.tenant IS NULL AND NOT r.ambiguous "
    "AND r.kind = 'status' AND r.created_at > $2 AND r.ref IS NOT NULL "
    f"AND (EXISTS (SELECT 1 FROM sends s WHERE s.connexus_id = r.ref AND {_BEFORE_REPORT}) "
    f"OR EXISTS (SELECT 1 FROM sends s WHERE s.upstream_ref = r.ref AND {_BEFORE_REPORT})) "
    "ORDER BY r.created_at LIMIT $1"
)
WAITING_CHUNK = 500  # report ids matched by one statement, oldest first
WAITING_CHUNKS = 20  # statements one pass runs at most (while each fills its chunk)
WAITING_WINDOW = 3600.0  # seconds: how far back a pass looks (an outage longer is not covered)


def facts(row: Any) -> SendFacts:
    """The facts of a CANDIDATES row (its send's creation time included)."""
    return SendFacts(
        row["id"],
        row["tenant"],
        row["recipient"],
        row["sender"],
        row["legacy_id"],
        row["created_at"],
    )


async def candidates(conn: Conn, message_ids: Sequence[str]) -> dict[str, list[SendFacts]]:
    """Send rows each report id may name: by Connexus id or by our upstream ref."""
    return _by_id(await conn.fetch(CANDIDATES, list(message_ids)))


async def locked_candidates(conn: Conn, message_ids: Sequence[str]) -> dict[str, list[SendFacts]]:
    """`candidates` read under the ids' locks, after every settle holding one has committed (an
    ingest's look after its own commit; see the module docstring). In a transaction the locks
    are held until its end, else for the statement."""
    return _by_id(await conn.fetch(LOCKED_CANDIDATES, list(message_ids)))


def _by_id(rows: Sequence[Any]) -> dict[str, list[SendFacts]]:
    out: dict[str, list[SendFacts]] = {}
    for r in rows:
        out.setdefault(r["m"], []).append(facts(r))
    return out


async def match_late(db: Db, rules: Rules, message_ids: list[str]) -> None:
    """After a settle's commit: reports kept unmatched under ids it made known get their send.

    The settle is committed whatever happens here; a failure is logged, not raised (the
    report stays unmatched, as if it had come with an id nobody knows)."""
    try:
        async with db.conn("match reports") as conn:
            waiting = [r["ref"] for r in await conn.fetch(UNMATCHED, message_ids)]
    except StoreError as exc:
        log.warning("late report matching failed after a settle: %s", exc)
        return
    await match_known(db, rules, waiting)


async def match_known(db: Db, rules: Rules, message_ids: list[str]) -> None:
    """After a settle's commit: reports it found waiting under these ids (its own look, in
    bc_settle_sends, or match_late's) get their send; a failure is logged, as match_late's."""
    if not message_ids:
        return
    try:
        async with db.tx("match reports") as (conn, wakes):
            await match_reports(conn, rules, sorted(message_ids), time.time(), wakes)
    except StoreError as exc:
        log.warning("late report matching failed after a settle: %s", exc)


async def match_waiting(db: Db, rules: Rules) -> int:
    """The upkeep job's pass: reports of the last hour still unmatched although a send they
    name is stored (a look after a settle or an ingest failed) get their send; how many ids
    were matched."""
    since = time.time() - WAITING_WINDOW
    total = 0
    for _ in range(WAITING_CHUNKS):  # oldest first: none ages out of the window behind others
        async with db.conn("match reports") as conn:
            rows = await conn.fetch(WAITING_KNOWN, WAITING_CHUNK, since)
        if not rows:
            break
        async with db.tx("match reports") as (conn, wakes):
            matched = await match_reports(
                conn, rules, sorted({r["ref"] for r in rows}), time.time(), wakes
            )
        total += len(matched)
        if len(rows) < WAITING_CHUNK:
            break
    return total


async def recheck_unmatched(db: Db, rules: Rules, message_id: str) -> str | None:
    """After an ingest committed an unmatched report, or met one stored unmatched before: if
    a send it names exists now (its settle committed meanwhile), match it; the tenant it went
    to, else None."""
    async with db.conn("match reports") as conn:
        sends = await locked_candidates(conn, [message_id])
    if rules.attribute_dlr(sends.get(message_id, [])) is None:
        return None
    async with db.tx("match reports") as (conn, wakes):
        matched = await match_reports(conn, rules, [message_id], time.time(), wakes)
    return matched.get(message_id)


_STILL_WAITING = "tenant IS NULL AND NOT ambiguous AND ref = $2"


async def match_reports(
    conn: Conn, rules: Rules, message_ids: list[str], now: float, wakes: Wakes
) -> dict[str, str]:
    """Give delivery reports kept unmatched under these ids to the one send they name among
    those written before each report was stored (under the ids' advisory locks); the tenant
    each matched id went to."""
    await conn.fetchval(LOCK_REPORT_IDS, message_ids)
    waiting = await conn.fetch(
        "SELECT id, ref, created_at FROM records WHERE tenant IS NULL AND NOT ambiguous "
        "AND kind = 'status' AND ref = ANY($1::text[]) ORDER BY id",
        message_ids,
    )
    sends = await candidates(conn, sorted({row["ref"] for row in waiting}))
    matched: dict[str, str] = {}
    for row in waiting:
        found = rules.attribute_dlr(sends.get(row["ref"], []), row["created_at"])
        if found is None:
            continue
        # Each UPDATE repeats the SELECT's conditions: a row a report under its key took over
        # meanwhile (dlr._take_keys: key and ref given up, the newer row carries the event on)
        # is not the event any more, and matching it too would deliver the report twice.
        if found == "ambiguous":
            await conn.execute(
                f"UPDATE records SET ambiguous = true WHERE id = $1 AND {_STILL_WAITING}",
                row["id"],
                row["ref"],
            )
            continue
        p = rules.placement(found.tenant, "status", now)
        done = await conn.execute(
            "UPDATE records SET tenant = $3, send_id = $4, msisdn_from = $5, msisdn_to = $6, "
            "in_reply_to = $7, pollable = $8, push_due = $9, push_deadline = $10 "
            f"WHERE id = $1 AND {_STILL_WAITING}",
            row["id"],
            row["ref"],
            found.tenant,
            found.id,
            found.recipient,
            found.sender,
            found.legacy_id or "",
            p.pollable,
            p.push_due,
            p.push_deadline,
        )
        if done != "UPDATE 1":
            continue
        matched[row["ref"]] = found.tenant
        if p.waiting:
            wakes.add((found.tenant, "status"))
    return matched
