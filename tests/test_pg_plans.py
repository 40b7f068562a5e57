"""PostgreSQL plans of the store's hot statements stay index lookups whatever the statistics.

Plans are generic and made once per pooled connection (`db.PLANNER_SETTINGS`), so a plan made
while a table was empty or tiny is the plan used when it holds millions of rows. For each hot
statement, on tables in the states where the planner's choice used to flip (empty; one row,
vacuumed; 100 rows, vacuumed; 300 rows never analyzed; 3,000 sends to one handset, analyzed),
the plan the store's own pool makes must read no table whole (no Seq Scan, Hash or Merge Join),
the send-facts lookup and the abandoned-row statements must use their key indexes and no
other index of `sends`, an incoming SMS's latest-send lookup must read `sends_recent`
backwards (not the handset's whole history), and push claims must read `records_push_due` in
due order (not every record awaiting a push) and probe `records_push_send` for the record
before each (not walk every record awaiting a push). Statements of the lease pool are planned on it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from bc_proxy.store import open_store
from bc_proxy.store.postgres import abandoned, matching, mo, push, schema, sends
from bc_proxy.store.postgres.db import PLANNER_SETTINGS, Db
from bc_proxy.store.postgres.records import CLAIM_POLL
from tests import pg
from tests.pg import pg_url  # noqa: F401  (fixture)
from tests.push_backlog import push_backlog
from tests.test_store_contract import PUSH, RULES

FACTS = (
    schema.SEND_FACTS_QUERY.replace("p_tenants", "$1::text[]")
    .replace("p_legacy_ids", "$2::text[]")
    .replace("p_recipients", "$3::text[]")
    .replace("p_since", "$4::float8[]")
)
HANDSET = "6421000000"
# name: (SQL, parameter types, arguments of one execution)
STATEMENTS = {
    "send facts": (
        FACTS,
        "text[], text[], text[], float8[]",
        f"ARRAY['b'], ARRAY['l5'], ARRAY['{HANDSET}'], ARRAY[0.0::float8]",
    ),
    "settle": (
        sends.SETTLE,
        "text[], text[], text[], text[], float8",
        "ARRAY['u5'], ARRAY['accepted'], ARRAY['cx5'], ARRAY['552'], 1.0",
    ),
    "unmatched reports": (matching.UNMATCHED, "text[]", "ARRAY['cx5']"),
    "reject abandoned": (abandoned.REJECT, "text[], float8", "ARRAY['u5'], 1.0"),
    "latest rows": (
        abandoned.LATEST_ROWS,
        "text[], text[], text[], float8[]",
        f"ARRAY['b'], ARRAY['l5'], ARRAY['{HANDSET}'], ARRAY[0.0::float8]",
    ),
    "mark seen": (abandoned.MARK_SEEN, "bigint[]", "ARRAY[5::bigint]"),
    "report candidates": (matching.CANDIDATES, "text[]", "ARRAY['cx5']"),
    "reports waiting, send known": (matching.WAITING_KNOWN, "int, float8", "500, 0.0"),
    "mo facts": (
        mo.MO_FACTS,
        "text[], text[], text[], text[], float8[]",
        f"ARRAY['k'], ARRAY['cx5'], ARRAY['{HANDSET}'], ARRAY[NULL::text], ARRAY[0.0::float8]",
    ),
    "poll claim": (CLAIM_POLL, "text, text, text, float8", "'b', 'in', 'me', 10.0"),
    "push claim": (
        push.CLAIM,
        "float8, text[], text[], int, text, float8, float8, bigint",
        "1e12, ARRAY['b'], ARRAY['b'], 10, 'me', 10.0, '-infinity', 0",
    ),
    "push defer ahead": (
        push.DEFER_AHEAD,
        "float8, text[], text[], int, float8, bigint",
        "1e12, ARRAY['b'], ARRAY['b'], 4096, '-infinity', 0",
    ),
}
# The statements the store runs on its lease pool (db.LEASE_SETTINGS).
LEASED = {"poll claim", "push claim", "push defer ahead"}
# The indexes of `sends` some statements must probe, and no other (a partial index of pending
# rows, or a time index, read whole by a generic plan made on a small table).
INDEXES = {
    "send facts": {"sends_key"},
    "reject abandoned": {"sends_upstream_ref_key", "sends_pkey"},
    "latest rows": {"sends_key", "sends_pkey"},
    "mark seen": {"sends_pkey"},
}
# (rows of each table, VACUUM ANALYZE after filling)
STATES = [(0, False), (1, True), (100, True), (300, False), (3000, True)]
WHOLE_TABLE = re.compile(r"Seq Scan|Hash Join|Merge Join")


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Db]:  # noqa: F811
    async with pg.started_db(pg_url, pool_max=2) as d:
        yield d


async def test_pooled_connections_carry_the_planner_settings(db: Db) -> None:
    for lease in (False, True):
        async with db.conn("settings", lease=lease) as conn:
            for name, value in PLANNER_SETTINGS.items():
                assert await conn.fetchval(f"SHOW {name}") == value, (lease, name)


async def _fill(c: Any, n: int, vacuum: bool) -> None:
    await c.execute(
        "INSERT INTO sends (tenant, legacy_id, recipient, state, upstream_ref, connexus_id, "
        "created_at) SELECT 'b', 'l' || g, $1, 'accepted', 'u' || g, 'cx' || g, 1 "
        "FROM generate_series(1, $2::int) AS g",
        HANDSET,
        n,
    )
    await c.execute(
        "INSERT INTO records (tenant, kind, receipt_id, created_at, pollable, push_due) "
        "SELECT 'b', 'in', 'r' || g, 1, g % 2 = 0, CASE WHEN g % 3 = 0 THEN 1 END "
        "FROM generate_series(1, $1::int) AS g",
        n,
    )
    if vacuum:
        for table in ("sends", "records", "blocked"):
            await c.execute(f"VACUUM ANALYZE {table}")


@pytest.mark.parametrize(("rows", "vacuum"), STATES)
async def test_hot_statements_plan_index_lookups_in_every_table_state(
    db: Db, rows: int, vacuum: bool
) -> None:
    async with db.conn("plans", session=True) as conn:
        await schema.migrate(conn)
        await _fill(conn, rows, vacuum)
    problems = []
    for i, (name, (sql, types, args)) in enumerate(STATEMENTS.items()):
        # on a connection of the pool the store runs the statement on
        async with db.conn("plans", session=True, lease=name in LEASED) as conn:
            await conn.execute(f"PREPARE p{i} ({types}) AS {sql}")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE p{i} ({args})"))
            await conn.execute(f"DEALLOCATE p{i}")
        if WHOLE_TABLE.search(plan):
            problems.append(f"{name} reads a whole table:\n{plan}")
        if name in INDEXES:
            used = set(re.findall(r"using (\w+) on sends", plan))
            if used != INDEXES[name]:
                problems.append(f"{name} uses {sorted(used)}, not {INDEXES[name]}:\n{plan}")
        latest_by_time = re.search(r"Index Scan Backward using sends_recent", plan)
        if name == "mo facts" and not latest_by_time:
            problems.append(f"mo facts: the latest send not by sends_recent:\n{plan}")
        recent_only = re.search(r"Index Scan (?:Backward )?using records_unmatched_recent", plan)
        if name == "reports waiting, send known" and not recent_only:
            problems.append(f"{name}: not by records_unmatched_recent:\n{plan}")
        due_in_order = re.search(r"Index Scan using records_push_due on records r\b", plan)
        if name.startswith("push ") and not due_in_order:
            problems.append(f"{name}: due records not read in due order:\n{plan}")
        blocker_by_send = re.search(
            r"Index Scan Backward using records_push_send on records e\b", plan
        )
        if name.startswith("push ") and not blocker_by_send:
            problems.append(f"{name}: an earlier record of the send not probed by send:\n{plan}")
    assert not problems, f"{rows} rows, vacuumed={vacuum}:\n" + "\n\n".join(problems)


async def _at_version_2(conn: Any) -> None:
    """The schema as bc-proxy left it at version 2."""
    await conn.execute(
        "CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at float8 NOT NULL)"
    )
    for version, sql in enumerate(schema.MIGRATIONS[:2], 1):
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", version)


async def test_upgrade_from_version_2_finds_the_sends_it_stored(db: Db) -> None:
    async with db.conn("upgrade", session=True) as conn:
        await _at_version_2(conn)
        await conn.execute(
            "INSERT INTO sends (tenant, legacy_id, recipient, state, upstream_ref, created_at) "
            "VALUES ('b', 'm-1', $1, 'rejected', 'u1', 10), ('b', 'm-1', $1, 'accepted', 'u2', 20),"
            " ('b', 'm-12', '1', 'accepted', 'u3', 20)",
            HANDSET,
        )
        assert await schema.migrate(conn) == (2, schema.LATEST)
        rows = await conn.fetch(
            "SELECT latest FROM bc_send_facts($1::text[], $2::text[], $3::text[], $4::float8[]) "
            "ORDER BY n",
            ["b", "b", "b", "b"],
            ["m-1", "m-1", "m-1", "m-"],
            [HANDSET, HANDSET, "x", "12" + "1"],
            [0.0, 25.0, 0.0, 0.0],
        )
    # the latest of the key; none inside a later window; another recipient; and a key that would be
    # the same text as ('m-12', '1') if the parts were only concatenated
    assert [r["latest"] for r in rows] == ["accepted", None, None, None]


async def test_upgrade_to_version_3_beside_a_running_send_does_not_deadlock(
    db: Db,
    pg_url: str,  # noqa: F811
) -> None:
    # An older replica's begin_send: its facts read (the table share-locked), then, while the
    # migration waits for a lock on `sends`, its insert. Taking the share lock for the index
    # build first and the exclusive one for DROP INDEX after made a deadlock of this.
    async with db.conn("v2", session=True) as conn:
        await _at_version_2(conn)
    old_replica = await asyncpg.connect(pg_url)
    try:
        tx = old_replica.transaction()
        await tx.start()
        await old_replica.fetch(
            "SELECT * FROM bc_send_facts(ARRAY['b'], ARRAY['m-1'], ARRAY['1'], ARRAY[0.0::float8])"
        )
        async with db.conn("migrate", session=True) as conn:
            migrator = conn.get_server_pid()
            migration = asyncio.ensure_future(schema.migrate(conn))
            for _ in range(100):  # until it waits for a lock held by the old replica
                waiting = await pg.execute(
                    pg_url, "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", migrator
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting, "the migration never waited for the open send transaction"
            await old_replica.execute(
                "INSERT INTO sends (tenant, legacy_id, recipient, state, upstream_ref, created_at) "
                "VALUES ('b', 'm-1', '1', 'pending', 'u-1', 1)"
            )
            await tx.commit()
            assert await asyncio.wait_for(migration, 30) == (2, schema.LATEST)
    finally:
        await old_replica.close()


async def _mo_facts_buffers(conn: Any, handset: str) -> int:
    """Shared buffers one MO-facts lookup for `handset` touches (window: the last hour)."""
    lines = await conn.fetch(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE mo_facts "
        f"(ARRAY['k'], ARRAY['cx-none'], ARRAY['{handset}'], ARRAY[NULL::text], "
        "ARRAY[extract(epoch FROM now())::float8 - 3600])"
    )
    plan = json.loads(lines[0][0])[0]["Plan"]
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def test_latest_send_to_a_handset_does_not_read_its_older_sends(db: Db) -> None:
    """An incoming SMS's facts include the latest send to its handset inside the reply window.
    With none inside, the lookup must not walk back through the handset's older sends:
    20,000 older sends cost what 10 do (buffers touched, on the store's own pool)."""
    async with db.conn("mo", session=True) as conn:
        await schema.migrate(conn)
        for handset, n in (("6421000010", 10), ("6421020000", 20_000)):
            await conn.execute(
                "INSERT INTO sends (tenant, recipient, state, upstream_ref, created_at) "
                "SELECT 'b', $1, 'accepted', $1 || '-' || g, "
                "extract(epoch FROM now()) - 30 * 86400 + g FROM generate_series(1, $2::int) AS g",
                handset,
                n,
            )
        await conn.execute("VACUUM ANALYZE sends")
        await conn.execute(
            "PREPARE mo_facts (text[], text[], text[], text[], float8[]) AS " + mo.MO_FACTS
        )
        few = await _mo_facts_buffers(conn, "6421000010")
        many = await _mo_facts_buffers(conn, "6421020000")
        await conn.execute("DEALLOCATE mo_facts")
    assert many <= few + 3, (few, many)


async def _push_claim_buffers(url: str, sends: int) -> int:
    """Shared buffers one push claim touches (finding nothing it may send) on a fresh schema at
    `url` holding an outage's backlog of `sends` sends, after autovacuum's pass (VACUUM here:
    until then a claim also steps over the index entries its predecessors left)."""
    store = open_store(url, RULES)
    await store.open()
    try:
        await push_backlog(store, PUSH, sends)
    finally:
        await store.close()
    await pg.execute(url, "VACUUM records")
    async with pg.started_db(url) as d, d.conn("claim", session=True, lease=True) as conn:
        await conn.execute(
            "PREPARE claim (float8, text[], text[], int, text, float8, float8, bigint) AS "
            + push.CLAIM
        )
        tx = conn.transaction()
        await tx.start()
        try:
            lines = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim (extract(epoch FROM now())"
                f"::float8, ARRAY['{PUSH}'], ARRAY['{PUSH}'], 10, 'me', 30.0, '-infinity', 0)"
            )
        finally:
            await tx.rollback()
    plan = json.loads(lines[0][0])[0]["Plan"]
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def test_a_push_claim_does_not_read_the_backlog_of_a_push_targets_outage(
    pg_url: str,  # noqa: F811
) -> None:
    """During a push target's outage, each send's first report waits for its retry and its
    second is held back behind it. A claim (run for every new record) must read neither:
    2,000 sends' backlog costs what 10 do (buffers touched, on the store's lease pool)."""
    other = await pg.create_schema()
    try:
        few = await _push_claim_buffers(pg.schema_url(other), 10)
    finally:
        await pg.drop_schema(other)
    many = await _push_claim_buffers(pg_url, 2000)
    assert many <= few + 3, (few, many)
