"""Delivery reports against the time a send's row was written, and its unknown outcomes.

A report that names a send before its outcome is known proves Connexus took it: an unknown
outcome after it (the sms/out answer timed out, the call was cut short, the row expired) is
`accepted`, with no "Outcome unknown" ERR after the report. A report kept unmatched from before
a send's row was written is another message's (its id reused): it is never given to that send,
nor does it keep that send's own report out. Through the real gateway on 127.0.0.1 and the
emulator, on SQLite and PostgreSQL; the rules as tables; the new statements' plans.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

import pytest

from bc_proxy.connexus.emulator_state import FIRST_MESSAGE_ID
from bc_proxy.store import DlrEvent, SendIntent
from bc_proxy.store.postgres import dlr, matching, sends
from bc_proxy.store.postgres.store import PostgresStore
from bc_proxy.store.rules import (
    REPORT_CLOCK_TOLERANCE_SECONDS,
    Rules,
    SendFacts,
    SendState,
    TenantRules,
    only_settled,
    settled_state,
)
from bc_proxy.store.sqlite.sends import reported_refs
from bc_proxy.store.sqlite.store import SQLiteStore
from tests import pg
from tests.conftest import (
    WEBHOOK_SECRET,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
    writer_conn,
)
from tests.pg import pg_url  # noqa: F401  (fixture)

HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
TOLERANCE = REPORT_CLOCK_TOLERANCE_SECONDS
POLL = "acme"
Age = Callable[[str, float], Awaitable[None]]


# -- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reported", "expected"),
    [
        ("unknown", True, "accepted"),
        ("unknown", False, "unknown"),
        ("accepted", True, "accepted"),
        ("rejected", True, "rejected"),  # a definitive refusal stands (and is sent again)
        ("rejected", False, "rejected"),
    ],
)
def test_settled_state(state: SendState, reported: bool, expected: SendState) -> None:
    """Only an unknown outcome gives way to a report."""
    assert settled_state(state, reported) == expected


def test_only_settled_drops_the_records_of_reported_rows() -> None:
    """A row a report settled `accepted` gets no status record; the others as before."""
    statuses = [(0, "a"), (1, "b"), (2, None), (3, "c")]
    kept = only_settled(statuses, lambda x: x[1], {"a", "b"}, reported={"a", "c"})
    assert [i for i, _ in kept] == [1, 2]


def send(id: int, created_at: float | None, recipient: str = "641") -> SendFacts:
    return SendFacts(id, POLL, recipient, "552", f"L{id}", created_at)


@pytest.mark.parametrize(
    ("candidates", "stored_at", "expected"),
    [
        ([send(1, 100.0)], None, send(1, 100.0)),  # a fresh report: every send counts
        ([send(1, 100.0)], 100.0 - TOLERANCE, send(1, 100.0)),  # at the tolerance: counts
        ([send(1, 100.0)], 99.0 - TOLERANCE, None),
        ([send(1, 100.0)], 200.0, send(1, 100.0)),
        ([send(1, None)], 0.0, send(1, None)),  # time not looked up: counts
        ([send(1, 10.0), send(2, 500.0, "642")], 20.0, send(1, 10.0)),  # the later one is not
        ([send(1, 10.0), send(2, 500.0, "642")], 600.0, "ambiguous"),
    ],
)
def test_attribute_dlr_by_the_time_a_report_was_stored(
    candidates: list[SendFacts], stored_at: float | None, expected: SendFacts | str | None
) -> None:
    """A report kept unmatched goes only to sends written before it (within the tolerance)."""
    assert Rules.attribute_dlr(candidates, stored_at) == expected


@pytest.mark.parametrize(
    ("found", "stored_at", "other"),
    [
        (send(1, 1000.0), 1000.0 - 2 * TOLERANCE, True),
        (send(1, 1000.0), 1000.0 - TOLERANCE / 2, False),
        (send(1, 1000.0), 2000.0, False),
        ("ambiguous", 0.0, False),
        (None, 2000.0 - 2 * TOLERANCE, True),  # naming no send yet, under a long-kept key
        (None, 2000.0 - TOLERANCE / 2, False),  # a repeat within the tolerance
    ],
)
def test_other_message(found: SendFacts | str | None, stored_at: float, other: bool) -> None:
    """A report about a send written after the kept one, or naming no send yet under a key
    kept longer than the tolerance, is a new event, not its repeat (now: 2000)."""
    assert Rules.other_message(found, stored_at, 2000.0) is other


def test_dlr_key_range_holds_every_report_of_the_id_and_no_other() -> None:
    """The event keys of an id's reports, whatever their code, and no other id's."""
    low, high = Rules.dlr_key_range("12")
    inside = [Rules.dlr_key("12", s) for s in (0, 1, 16, 99, 123456)]
    outside = [Rules.dlr_key(i, 1) for i in ("1", "123", "12a", "11", "13", "120")]
    assert all(low <= k < high for k in inside)
    assert not any(low <= k < high for k in outside)


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, cfg: dict[str, Any]) -> str:
    """The store backend of the gateway `cfg` configures."""
    name = cast(str, request.param)
    if name == "postgres":
        cfg["store"]["url"] = request.getfixturevalue("pg_url")
    return name


def aging(client: GatewayClient, backend: str, cfg: dict[str, Any]) -> Age:
    """Makes the reports kept unmatched under an id look stored `seconds` earlier (a report
    kept from before: the test cannot wait for the clock)."""
    sql = "UPDATE records SET created_at = created_at - {} WHERE ref = {} AND tenant IS NULL"

    async def age(ref: str, seconds: float) -> None:
        if backend == "sqlite":
            cur = writer_conn(client).execute(sql.format("?", "?"), (seconds, ref))
            assert cur.rowcount == 1
        else:
            await pg.execute(cfg["store"]["url"], sql.format("$1", "$2"), seconds, ref)

    return age


async def drain(client: GatewayClient) -> list[dict[str, str]]:
    """Every status record waiting, polled one by one until 204."""
    out: list[dict[str, str]] = []
    while True:
        async with client.get("/api/1/sms/status", params=creds()) as resp:
            if resp.status == 204:
                return out
            assert resp.status == 200, await resp.text()
            parsed = parse_qs(await resp.text(), keep_blank_values=True)
            out.append({k: v[0] for k, v in parsed.items()})
        assert len(out) < 20, out


@pytest.mark.parametrize("dlr_id", ["connexus", "client"])
async def test_a_report_that_beats_the_send_answer_is_matched_once(
    connexus: Connexus,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    backend: str,
    dlr_id: str,
) -> None:
    """The report lands while sms/out's answer is still delayed. By the id the gateway sent
    ("client"), it names the written-ahead row at once; by Connexus's own id, it is kept
    unmatched, and the settle that brings that id finds it (on PostgreSQL, in the settle's own
    statement, bc_settle_sends). Either way: one RCV record, right after the 204."""
    connexus.emu.dlr_id = dlr_id  # type: ignore[assignment]
    client = await gateway(cfg)
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    connexus.emu.auto_dlr = 1  # DELIVRD, fired as the message is taken
    connexus.emu.send_response_delay = 0.5
    form = creds(to="6421000001", body="hi", messageId="L-early")
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    assert [d[1] for d in connexus.emu.webhook_deliveries] == [200]
    records = await drain(client)
    assert [(r["statusCode"], r["inReplyToId"]) for r in records] == [("RCV", "L-early")]


async def test_a_delivered_sms_whose_answer_timed_out_does_not_end_on_err(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], backend: str
) -> None:
    """Connexus reports by the messageId the gateway sent (the "client" reading), and its
    report comes before its answer to sms/out, which comes too late: the call's outcome is
    unknown (500), but the report proves Connexus has the SMS. The client gets RCV and no ERR
    after it, and its retry is answered as a repeat of an accepted send: 204, not sent."""
    connexus.emu.dlr_id = "client"
    cfg["upstream"]["timeout_seconds"] = 1
    client = await gateway(cfg)
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    connexus.emu.auto_dlr = 1  # DELIVRD, fired as the message is taken
    connexus.emu.send_response_delay = 1.5
    form = creds(to="6421000001", body="hi", messageId="L-1")
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 500, await resp.text()
    assert [d[1] for d in connexus.emu.webhook_deliveries] == [200]
    records = await drain(client)
    assert [(r["statusCode"], r["inReplyToId"]) for r in records] == [("RCV", "L-1")]
    connexus.emu.send_response_delay = 0.0
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    assert len(connexus.emu.sent) == 1
    assert await drain(client) == []


async def test_a_report_kept_from_before_a_send_is_not_its_report(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], backend: str
) -> None:
    """A report about a message sent outside the gateway, kept unmatched, names the Connexus
    id a later gateway send gets. It is not that send's: the client hears nothing about L-9
    until Connexus reports on it, and that report, the same id and code as the old one, is
    delivered (not dropped as its repeat)."""
    client = await gateway(cfg)
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    reused = str(FIRST_MESSAGE_ID)  # the id Connexus gives the next message
    await connexus.emu.fire_dlr(reused, 2)  # UNDELIV, about that other message
    assert connexus.emu.webhook_deliveries[-1][1] == 200
    await aging(client, backend, cfg)(reused, 2 * TOLERANCE)
    form = creds(to="6421000001,6421000002", body="hi", messageId="L-9")
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    (first,) = [s for s in connexus.emu.sent if s.message_id == reused]
    assert await drain(client) == []
    await connexus.emu.report(first, 2)
    assert connexus.emu.webhook_deliveries[-1][1] == 200
    records = await drain(client)
    assert [(r["from"], r["statusCode"], r["inReplyToId"]) for r in records] == [
        (first.to, "NRCV", "L-9")
    ]


async def test_an_early_report_under_a_key_kept_from_before_is_delivered(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], backend: str
) -> None:
    """A send's report beats its sms/out answer (it names no send yet: the row has no Connexus
    id), and its key (id and code) is held by a report kept long before about another message
    with the same id. It is a new event, not a repeat (a repeat is answered 200 and never sent
    again, and the settle passes over the old report as too old: the client heard nothing),
    so the settle gives it to the send."""
    client = await gateway(cfg)
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    reused = str(FIRST_MESSAGE_ID)  # the id Connexus gives the next message
    await connexus.emu.fire_dlr(reused, 1)  # DELIVRD, about that other message
    await aging(client, backend, cfg)(reused, 2 * TOLERANCE)
    connexus.emu.auto_dlr = 1  # DELIVRD, fired as the message is taken
    connexus.emu.send_response_delay = 0.3  # the report comes before the answer
    form = creds(to="6421000001", body="hi", messageId="L-7")
    async with client.post("/api/1/sms/out", data=form) as resp:
        assert resp.status == 204, await resp.text()
    assert [d[1] for d in connexus.emu.webhook_deliveries] == [200, 200]
    records = await drain(client)
    assert [(r["statusCode"], r["inReplyToId"]) for r in records] == [("RCV", "L-7")]


# -- the upkeep pass (PostgreSQL: SQLite matches in the settle's own transaction) ---------------


async def test_the_upkeep_pass_skips_reports_kept_from_before_their_send(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reports left unmatched whose settle's look was lost: the pass matches the one stored
    after its send, not the older one about another message with the same id (which, oldest
    first and never matched, would otherwise fill each of its chunks, one report here)."""
    monkeypatch.setattr(matching, "WAITING_CHUNK", 1)
    store = PostgresStore(pg_url, Rules({POLL: TenantRules()}), replica="A")
    await store.open()
    try:
        assert (await store.add_dlr(DlrEvent("cx-old", 1, "DELIVRD"))).outcome == "unmatched"
        await pg.execute(pg_url, "UPDATE records SET created_at = created_at - $1", 2 * TOLERANCE)
        assert (await store.add_dlr(DlrEvent("cx-new", 1, "DELIVRD"))).outcome == "unmatched"
        for lid, cid in (("L-old", "cx-old"), ("L-new", "cx-new")):
            plan = await store.begin_send(
                SendIntent(POLL, lid, ("6421000001",), "552"), time.time()
            )
            await pg.execute(  # a settle committed, its look lost
                pg_url,
                "UPDATE sends SET state = 'accepted', connexus_id = $2 WHERE upstream_ref = $1",
                plan.to_send[0].upstream_ref,
                cid,
            )
        assert await store.match_waiting_reports() == 1
        record = await store.claim(POLL, "status")
        assert record is not None
        assert record.in_reply_to == "L-new"
        assert await store.claim(POLL, "status") is None
        assert await store.match_waiting_reports() == 0
    finally:
        await store.close()


# -- plans of the new statements ----------------------------------------------------------------

# name: (SQL, parameter types, arguments of one execution, the index it must use)
STATEMENTS = {
    "reported sends": (sends.REPORTED, "bigint[]", "ARRAY[5::bigint]", "records_reports"),
    "proven sends": (sends.PROVEN, "bigint[]", "ARRAY[5::bigint]", "sends_pkey"),
    "stored reports": (dlr.STORED, "text[]", "ARRAY['dlr:cx5:1']", "records_event_key_key"),
    "release keys": (
        dlr.RELEASE_KEYS,
        "bigint[], bigint[]",
        "ARRAY[5::bigint], ARRAY[5::bigint]",
        "records_pkey",
    ),
}
WHOLE_TABLE = re.compile(r"Seq Scan|Hash Join|Merge Join")


@pytest.mark.parametrize(("rows", "vacuum"), [(0, False), (300, False), (3000, True)])
async def test_the_new_statements_plan_index_lookups(
    pg_url: str,  # noqa: F811
    rows: int,
    vacuum: bool,
) -> None:
    """On the store's own pool (its planner settings), empty, never analyzed and analyzed."""
    async with pg.started_db(pg_url, migrated=True) as db:
        async with db.conn("plans", session=True) as conn:
            await conn.execute(
                "INSERT INTO sends (tenant, recipient, state, upstream_ref, created_at) "
                "SELECT 'b', '641', 'accepted', 'u' || g, 1 FROM generate_series(1, $1::int) g",
                rows,
            )
            await conn.execute(
                "INSERT INTO records (tenant, kind, event_key, send_id, dlr_status, receipt_id, "
                "created_at) SELECT 'b', 'status', 'dlr:cx' || g || ':1', g, "
                "CASE WHEN g % 2 = 0 THEN 1 END, 'r' || g, 1 "
                "FROM generate_series(1, $1::int) g",
                rows,
            )
            if vacuum:
                await conn.execute("VACUUM ANALYZE sends")
                await conn.execute("VACUUM ANALYZE records")
        problems = []
        for i, (name, (sql, types, args, index)) in enumerate(STATEMENTS.items()):
            async with db.conn("plans", session=True) as conn:
                await conn.execute(f"PREPARE p{i} ({types}) AS {sql}")
                plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE p{i} ({args})"))
                await conn.execute(f"DEALLOCATE p{i}")
            if WHOLE_TABLE.search(plan) or not re.search(rf"(using|Scan on) {index} ", plan):
                problems.append(f"{name}: not by {index}:\n{plan}")
        assert not problems, "\n\n".join(problems)


async def test_sqlite_finds_the_reports_of_a_ref_by_the_event_key_index(tmp_path: Path) -> None:
    """The look for reports naming pending rows probes the event key index, never a scan."""
    store = SQLiteStore(str(tmp_path / "s.db"), Rules({POLL: TenantRules()}))
    await store.open()
    try:
        plan = await store.begin_send(SendIntent(POLL, "L1", ("6421000001",), "552"), time.time())
        (ref,) = [p.upstream_ref for p in plan.to_send]
        await store.add_dlr(DlrEvent(ref, 4, "QUEUED"))
        await store.add_dlr(DlrEvent(ref + "0", 4, "QUEUED"))  # another id sharing its start
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    try:
        rules = Rules()
        assert reported_refs(conn, rules, [ref, "bc-none"]) == {ref}
        low, high = rules.dlr_key_range(ref)
        detail = " ".join(
            str(r[3])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT 1 FROM records WHERE event_key >= ? AND event_key < ? "
                "LIMIT 1",
                (low, high),
            )
        )
    finally:
        conn.close()
    assert re.search(r"SEARCH records USING (COVERING )?INDEX sqlite_autoindex_records", detail)
