"""Versioned schema migrations of the PostgreSQL store, applied under an advisory lock.

Owns the table definitions (as an append-only list of migrations) and `migrate(conn)`: apply
what is pending, refuse a schema newer than this code. Never edit a released migration: add one.
"""

from __future__ import annotations

import time

from bc_proxy.errors import StoreError
from bc_proxy.store.postgres.db import Conn

# Two-key advisory locks (a key space apart from exclusive()'s one-key locks).
LOCK_CLASS_MIGRATE = 0x6263_0001
LOCK_CLASS_SEND = 0x6263_0002
LOCK_CLASS_REPORT = 0x6263_0003
# A begin group's one statement (bc_begin_fresh), by its first planned ref: held until the
# statement's transaction ends, so that a recovery waits for it (keyless calls take no key
# lock to wait on).
LOCK_CLASS_GROUP = 0x6263_0004


def send_key(tenant: str, legacy_id: str, recipient: str) -> str:
    """SQL for the idempotency key of a send, one text value: (tenant, legacy messageId,
    recipient), length-prefixed so that different triples never make the same key."""
    return (
        f"length({tenant})::text || ':' || {tenant} || "
        f"length({legacy_id})::text || ':' || {legacy_id} || {recipient}"
    )


def lock_send_keys(tenants: str, legacy_ids: str) -> str:
    """SQL taking the advisory lock of each (tenant, legacy messageId) pair of two text arrays,
    sorted and each once, for the transaction: what bc_send_facts does (migration 3) and what
    a recovery after a lost COMMIT waits on. Without the leading SELECT/PERFORM keyword."""
    return (
        f"count(pg_advisory_xact_lock({LOCK_CLASS_SEND}, k.h)) FROM ("
        "SELECT DISTINCT hashtext(x.t || chr(1) || x.l) AS h "
        f"FROM unnest({tenants}, {legacy_ids}) AS x(t, l) WHERE x.l IS NOT NULL ORDER BY 1) AS k"
    )


# The facts of migration 3's bc_send_facts, one row per (tenant, messageId, recipient) asked
# about (`p_` names: the function's arguments). Its only indexable condition is the key, so
# its plan is the `sends_key` probe whatever the statistics say; see migration 3.
SEND_FACTS_QUERY = f"""
    SELECT x.i,
        (SELECT (array_agg(s.state ORDER BY s.id DESC) FILTER (WHERE s.created_at > x.since))[1]
         FROM sends AS s
         WHERE s.legacy_id IS NOT NULL
           AND {send_key("s.tenant", "s.legacy_id", "s.recipient")}
             = {send_key("x.t", "x.l", "x.r")}),
        EXISTS (SELECT 1 FROM blocked AS b WHERE b.tenant = x.t AND b.handset = x.r)
    FROM unnest(p_tenants, p_legacy_ids, p_recipients, p_since)
        WITH ORDINALITY AS x(t, l, r, since, i)
    ORDER BY x.i
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: the store of the integrity and scale-out design (docs/store-design.md)
    """
    CREATE TABLE sends (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant text NOT NULL,
        legacy_id text,
        recipient text NOT NULL,
        sender text NOT NULL DEFAULT '',
        state text NOT NULL CHECK (state IN ('pending', 'accepted', 'rejected', 'unknown')),
        upstream_ref text NOT NULL UNIQUE,
        connexus_id text,
        created_at float8 NOT NULL,
        settled_at float8
    );
    CREATE INDEX sends_idempotency ON sends (tenant, legacy_id, recipient, id)
        WHERE legacy_id IS NOT NULL;
    CREATE INDEX sends_connexus ON sends (connexus_id) WHERE connexus_id IS NOT NULL;
    CREATE INDEX sends_recipient ON sends (recipient, id);
    CREATE INDEX sends_pending ON sends (created_at) WHERE state = 'pending';
    CREATE INDEX sends_created ON sends (created_at);

    CREATE TABLE records (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant text,
        kind text NOT NULL CHECK (kind IN ('in', 'status')),
        event_key text UNIQUE,
        ref text,
        send_id bigint,
        ambiguous boolean NOT NULL DEFAULT false,
        receipt_id text NOT NULL,
        msisdn_from text NOT NULL DEFAULT '',
        msisdn_to text NOT NULL DEFAULT '',
        body text NOT NULL DEFAULT '',
        rate_code text NOT NULL DEFAULT '',
        in_reply_to text NOT NULL DEFAULT '',
        status_code text NOT NULL DEFAULT '',
        dlr_status integer,
        error text NOT NULL DEFAULT '',
        created_at float8 NOT NULL,
        pollable boolean NOT NULL DEFAULT false,
        lease_owner text,
        lease_until float8,
        push_due float8,
        push_deadline float8,
        push_attempts integer NOT NULL DEFAULT 0,
        push_error text NOT NULL DEFAULT '',
        push_owner text,
        push_until float8,
        dead boolean NOT NULL DEFAULT false
    ) WITH (fillfactor = 90);
    -- No index covers the lease columns: taking a lease stays a HOT update (heap only).
    CREATE INDEX records_poll ON records (tenant, kind, id) INCLUDE (created_at)
        WHERE pollable;
    CREATE INDEX records_push ON records (id) INCLUDE (tenant, kind, created_at)
        WHERE push_due IS NOT NULL;
    CREATE INDEX records_push_send ON records (send_id, id) WHERE push_due IS NOT NULL;
    CREATE INDEX records_unmatched ON records (ref) WHERE tenant IS NULL AND NOT ambiguous;
    CREATE INDEX records_dead ON records (id) WHERE dead;
    CREATE INDEX records_finished ON records (created_at)
        WHERE NOT pollable AND push_due IS NULL AND NOT dead;

    CREATE TABLE sweep_marks (
        tenant text PRIMARY KEY,
        last_time text NOT NULL,
        last_id text NOT NULL,
        updated_at float8 NOT NULL
    );

    CREATE TABLE blocked (
        tenant text NOT NULL,
        handset text NOT NULL,
        since float8 NOT NULL,
        by_message text NOT NULL DEFAULT '',
        PRIMARY KEY (tenant, handset)
    );

    CREATE TABLE rejected_webhooks (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        received_at float8 NOT NULL,
        reason text NOT NULL,
        body bytea NOT NULL
    );
    """,
    # 2: the facts begin_send plans with, for a whole group of send calls, in one round trip:
    # the advisory locks of every (tenant, legacy messageId) first (sorted, each once), then
    # (a new snapshot, so rows committed by the lock's previous holder are seen) per recipient
    # the state of its latest send with that key inside the window, and whether it is blocked.
    f"""
    CREATE FUNCTION bc_send_facts(
        tenants text[], legacy_ids text[], recipients text[], since float8[]
    ) RETURNS TABLE (n bigint, latest text, is_blocked boolean)
    LANGUAGE plpgsql VOLATILE AS $fn$
    BEGIN
        PERFORM count(pg_advisory_xact_lock({LOCK_CLASS_SEND}, k.h)) FROM (
            SELECT DISTINCT hashtext(x.t || chr(1) || x.l) AS h
            FROM unnest(tenants, legacy_ids) AS x(t, l) WHERE x.l IS NOT NULL ORDER BY 1) AS k;
        RETURN QUERY
        SELECT x.i,
            (SELECT s.state FROM sends AS s
             WHERE s.tenant = x.t AND s.legacy_id = x.l AND s.recipient = x.r
               AND s.created_at > x.since ORDER BY s.id DESC LIMIT 1),
            EXISTS (SELECT 1 FROM blocked AS b WHERE b.tenant = x.t AND b.handset = x.r)
        FROM unnest(tenants, legacy_ids, recipients, since) WITH ORDINALITY AS x(t, l, r, since, i)
        ORDER BY x.i;
    END
    $fn$;
    """,
    # 3: send facts whose plan cannot change with the statistics. Version 2's lookup (latest
    # send with (tenant, messageId, recipient) in the window: ORDER BY id DESC LIMIT 1) could be
    # answered by four indexes, and which one the planner took depended on what the table held
    # when a connection first planned it (and kept: plans are generic, db.PLANNER_SETTINGS).
    # Seen in a benchmark: sends_recipient, which reads every send to one busy handset per call
    # (125 ms at 20,000 sends). Now one expression index holds the key and the lookup has no
    # other indexable condition; the window is a filter of the aggregate. The table lock comes
    # first: taken by CREATE INDEX (share) and then DROP INDEX (exclusive), it deadlocked with a
    # running replica's begin_send (facts read, then its insert waiting behind the build).
    # `sends` is closed to every other session for as long as the build takes (seconds per
    # million sends).
    f"""
    LOCK TABLE sends IN ACCESS EXCLUSIVE MODE;
    CREATE INDEX sends_key ON sends (({send_key("tenant", "legacy_id", "recipient")}))
        WHERE legacy_id IS NOT NULL;
    DROP INDEX sends_idempotency;
    DROP FUNCTION bc_send_facts(text[], text[], text[], float8[]);
    CREATE FUNCTION bc_send_facts(
        p_tenants text[], p_legacy_ids text[], p_recipients text[], p_since float8[]
    ) RETURNS TABLE (n bigint, latest text, is_blocked boolean)
    LANGUAGE plpgsql VOLATILE AS $fn$
    BEGIN
        PERFORM {lock_send_keys("p_tenants", "p_legacy_ids")};
        RETURN QUERY {SEND_FACTS_QUERY};
    END
    $fn$;
    """,
    # 4: the latest send to a handset by time. `sends_recipient` (recipient, id) answered "the
    # latest send to this handset in the reply window" (an incoming SMS's facts) by walking back
    # through every send to the handset until one fell inside the window: with none inside, all
    # of them, per incoming SMS. `sends_recent` orders one handset's sends by time, so the
    # lookup (ORDER BY created_at DESC, id DESC LIMIT 1) reads one entry of the window's range,
    # and no other index gives that order. Table lock first, as in version 3.
    """
    LOCK TABLE sends IN ACCESS EXCLUSIVE MODE;
    CREATE INDEX sends_recent ON sends (recipient, created_at, id);
    DROP INDEX sends_recipient;
    """,
    # 5: a pending row a retry was answered from is marked, and never rejected as abandoned
    # (store/postgres/abandoned.py). A constant default: no table rewrite.
    """
    ALTER TABLE sends ADD COLUMN repeat_seen boolean NOT NULL DEFAULT false;
    """,
    # 6: push claims read due records by due time. `records_push` (id) made a claim read every
    # record awaiting a push, due or not, in id order: during a push target's outage, each
    # claim walked the whole backlog of records waiting for their retry (48 ms per claim at
    # 20,000 sends). `records_push_due` gives the due ones first, in the order claimed, and
    # still covers the waiting counts. Table lock first, as in version 3: `records` is closed
    # to every other session while the build scans it (seconds per million records).
    """
    LOCK TABLE records IN ACCESS EXCLUSIVE MODE;
    CREATE INDEX records_push_due ON records (push_due, id) INCLUDE (tenant, kind, created_at)
        WHERE push_due IS NOT NULL;
    DROP INDEX records_push;
    """,
    # 7: a record a poll acknowledged is marked. A tenant that pushes and keeps records for
    # polling: a record acked by a poll while its push was still due kept that push (not
    # pollable, push due). A configuration that then stopped the tenant's pushes made it
    # pollable again, and the client got it a second time. The mark tells place_stranded and
    # replay that its poll is done. A constant default: no table rewrite.
    """
    ALTER TABLE records ADD COLUMN polled boolean NOT NULL DEFAULT false;
    """,
    # 8: the upkeep job's pass over delivery reports still unmatched (matching.match_waiting)
    # reads only the recent ones: reports for messages sent outside the gateway stay unmatched
    # until purge, and reading all of them every 30 s grew with them (330 ms at 200,000).
    """
    CREATE INDEX records_unmatched_recent ON records (created_at)
        WHERE tenant IS NULL AND NOT ambiguous AND kind = 'status';
    """,
    # 9: the delivery reports attributed to a send row (sends.REPORTED). A send whose outcome
    # is unknown (its answer lost, or expired) that a report already names is settled
    # `accepted`, without the ERR record of an unknown outcome that would follow its report;
    # finding those reports read every record. Built as version 8 is (a scan of `records`,
    # whose writes wait meanwhile).
    """
    CREATE INDEX records_reports ON records (send_id)
        WHERE send_id IS NOT NULL AND dlr_status IS NOT NULL;
    """,
    # 10: a group of send calls none of which was seen before, written in one statement (its
    # own transaction: one round trip instead of BEGIN, facts, insert and COMMIT). The caller
    # planned the group on the facts of a fresh call (no send with its key in the window, no
    # blocked handset) and passes the rows that plan writes; the function takes the key locks
    # as bc_send_facts does, reads the facts, and inserts the rows only if every fact is that
    # of a fresh call: true, else false with nothing written (the caller plans again on the
    # facts read, in a transaction). No rule is decided here: the facts are compared with the
    # ones the plan was made on (postgres/fresh.py). The group's own lock first (its first
    # planned ref): a connection lost while the statement runs leaves it running, and its
    # implicit transaction commits at its end; recover_begins waits for that lock before it
    # looks for the rows, as it waits for the key locks of calls with a messageId.
    f"""
    CREATE FUNCTION bc_begin_fresh(
        p_tenants text[], p_legacy_ids text[], p_recipients text[], p_since float8[],
        p_row_tenants text[], p_row_legacy_ids text[], p_row_recipients text[],
        p_row_senders text[], p_row_refs text[], p_row_created float8[]
    ) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $fn$
    BEGIN
        PERFORM pg_advisory_xact_lock({LOCK_CLASS_GROUP}, hashtext(p_row_refs[1]));
        PERFORM {lock_send_keys("p_tenants", "p_legacy_ids")};
        IF EXISTS (SELECT 1 FROM ({SEND_FACTS_QUERY}) AS f(i, latest, is_blocked)
                   WHERE f.latest IS NOT NULL OR f.is_blocked) THEN
            RETURN false;
        END IF;
        INSERT INTO sends (tenant, legacy_id, recipient, sender, state, upstream_ref, created_at)
        SELECT t, l, r, s, 'pending', u, c
        FROM unnest(p_row_tenants, p_row_legacy_ids, p_row_recipients, p_row_senders,
                    p_row_refs, p_row_created) AS x(t, l, r, s, u, c);
        RETURN true;
    END
    $fn$;
    """,
    # 11: a settle group and its look for reports that beat it, in one statement. A settle
    # looked for unmatched reports naming its Connexus ids after its commit (a second round
    # trip), and an ingest of an unmatched report looked for its send after its own commit:
    # whichever committed second saw the other. Now the two are ordered by the ids' advisory
    # locks instead (LOCK_CLASS_REPORT, the matchers' locks): bc_settle_sends updates the rows,
    # takes the locks of the Connexus ids it set, and then (a new snapshot) looks for unmatched
    # reports naming them, holding the locks until its commit; bc_report_candidates, the
    # ingest's look after its commit, takes the same locks before it reads the sends. So the
    # look of an ingest that committed after the settle's look waits for the settle's commit,
    # and sees its rows. Output columns are prefixed: plain names would be variables that
    # shadow the tables' columns inside the functions.
    f"""
    CREATE FUNCTION bc_settle_sends(
        p_refs text[], p_states text[], p_connexus_ids text[], p_senders text[], p_now float8
    ) RETURNS TABLE (o_id bigint, o_ref text, o_connexus_id text, o_waiting boolean)
    LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        v_ids bigint[];
        v_refs text[];
        v_cids text[];
    BEGIN
        WITH u AS (
            UPDATE sends SET state = s.state, settled_at = p_now,
                connexus_id = coalesce(s.connexus_id, sends.connexus_id),
                sender = CASE WHEN sends.sender = '' THEN s.sender ELSE sends.sender END
            FROM unnest(p_refs, p_states, p_connexus_ids, p_senders)
                AS s(ref, state, connexus_id, sender)
            WHERE sends.upstream_ref = s.ref AND sends.state = 'pending'
            RETURNING sends.id AS i, sends.upstream_ref AS r, sends.connexus_id AS c)
        SELECT array_agg(u.i), array_agg(u.r), array_agg(u.c) INTO v_ids, v_refs, v_cids FROM u;
        PERFORM count(pg_advisory_xact_lock({LOCK_CLASS_REPORT}, k.h)) FROM (
            SELECT DISTINCT hashtext(c) AS h FROM unnest(v_cids) AS c
            WHERE c IS NOT NULL ORDER BY 1) AS k;
        RETURN QUERY
        SELECT x.i, x.r, x.c, x.c IS NOT NULL AND EXISTS (
            SELECT 1 FROM records AS w WHERE w.tenant IS NULL AND NOT w.ambiguous
            AND w.kind = 'status' AND w.ref = x.c)
        FROM unnest(v_ids, v_refs, v_cids) AS x(i, r, c);
    END
    $fn$;
    CREATE FUNCTION bc_report_candidates(p_ids text[])
    RETURNS TABLE (o_m text, o_id bigint, o_tenant text, o_recipient text, o_sender text,
        o_legacy_id text, o_created_at float8)
    LANGUAGE plpgsql VOLATILE AS $fn$
    BEGIN
        PERFORM count(pg_advisory_xact_lock({LOCK_CLASS_REPORT}, k.h)) FROM (
            SELECT DISTINCT hashtext(i) AS h FROM unnest(p_ids) AS i ORDER BY 1) AS k;
        RETURN QUERY
        SELECT x.m, s.id, s.tenant, s.recipient, s.sender, s.legacy_id, s.created_at
        FROM unnest(p_ids) AS x(m) JOIN sends AS s ON s.connexus_id = x.m
        UNION
        SELECT x.m, s.id, s.tenant, s.recipient, s.sender, s.legacy_id, s.created_at
        FROM unnest(p_ids) AS x(m) JOIN sends AS s ON s.upstream_ref = x.m;
    END
    $fn$;
    """,
)

LATEST = len(MIGRATIONS)
# Migrating (or waiting for another replica's migration) is not bound by the command timeout.
MIGRATION_TIMEOUT = 3600.0


async def current_version(conn: Conn) -> int:
    """The schema version of the connected database (0: none yet)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))


async def migrate(conn: Conn) -> tuple[int, int]:
    """Bring the schema to LATEST under a per-schema advisory lock; (from, to) versions."""
    lock = (LOCK_CLASS_MIGRATE, "hashtext(current_schema())")
    await conn.execute(f"SELECT pg_advisory_lock({lock[0]}, {lock[1]})", timeout=MIGRATION_TIMEOUT)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version integer PRIMARY KEY, applied_at float8 NOT NULL)"
            )
        found = await current_version(conn)
        if found > LATEST:
            raise StoreError(
                f"database schema version {found} is newer than this bc-proxy knows "
                f"({LATEST}): upgrade bc-proxy (or point it at another database)"
            )
        for version in range(found + 1, LATEST + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[version - 1], timeout=MIGRATION_TIMEOUT)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )
        return found, LATEST
    finally:
        await conn.execute(f"SELECT pg_advisory_unlock({lock[0]}, {lock[1]})")
