"""A group of begin_send calls in one round trip, when none of them was seen before.

Owns how a begin-send group reaches PostgreSQL. Nearly every send call is new: no send with its
(tenant, messageId, recipient) inside the idempotency window and no blocked handset. Such a
group is planned on those facts here (by `Rules.plan`, as any group), and written by
`bc_begin_fresh` (migration 10) as one statement in its own transaction: the key locks, the
facts, and the pending rows only if the facts are those the plan was made on. One round trip
instead of four (BEGIN, facts, insert, COMMIT). Otherwise (a retry, a blocked handset) nothing
was written, and the group is planned again on the facts read, in a transaction
(sends.begin_sends), as before.

A group holding a call whose (tenant, messageId) this process began lately (`SeenKeys`: a
retry, most likely) skips the statement, which would write nothing for it.

The recovery of a group whose answer was lost (sends.recover_begins) holds as it does for a
transaction: each call's plan is recorded before the statement, and the statement commits all of
its rows or none.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

from bc_proxy.store import SendPlan
from bc_proxy.store.postgres.db import Db
from bc_proxy.store.postgres.sends import BeginWrite, begin_sends, fact_keys, plan_group
from bc_proxy.store.rules import Rules

SEEN_KEYS = 10_000  # recent (tenant, messageId) keys kept as the retry hint (SeenKeys)
# The facts of a call nobody sent before: no send with its key in the window, not blocked.
FRESH_FACTS = {"latest": None, "is_blocked": False}
BEGIN_FRESH = (
    "SELECT bc_begin_fresh($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], "
    "$6::text[], $7::text[], $8::text[], $9::text[], $10::float8[])"
)


class SeenKeys:
    """The (tenant, messageId) keys this process began lately, newest last (bounded).

    A hint only: a group holding a call whose key is here is most likely a retry, which the
    one statement would refuse after a wasted round trip, so it goes to the transaction at
    once. A retry that reached another replica, or came after its key was dropped, still gets
    the statement's answer: correct either way, one round trip dearer."""

    def __init__(self, limit: int = SEEN_KEYS) -> None:
        self._limit = limit
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()

    def any_of(self, writes: list[BeginWrite]) -> bool:
        return any(_key(w) in self._keys for w in writes)

    def add(self, writes: list[BeginWrite]) -> None:
        for w in writes:
            key = _key(w)
            if key is not None:
                self._keys[key] = None
                self._keys.move_to_end(key)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)


def _key(w: BeginWrite) -> tuple[str, str] | None:
    lid = w.intent.legacy_id
    return None if lid is None else (w.intent.tenant, lid)


async def begin_group(
    db: Db, rules: Rules, writes: list[BeginWrite], seen: SeenKeys | None = None
) -> list[SendPlan]:
    """Plan and write a group of begin_send calls (distinct keys): in one statement when every
    call is fresh, else in a transaction on the facts read (at once when `seen` holds one of
    their keys: a retry, most likely)."""
    plans = await _begin_group(db, rules, writes, retry=seen is not None and seen.any_of(writes))
    if seen is not None:
        seen.add(writes)
    return plans


async def _begin_group(
    db: Db, rules: Rules, writes: list[BeginWrite], *, retry: bool
) -> list[SendPlan]:
    group = plan_group(rules, writes, itertools.repeat(FRESH_FACTS))
    # Fresh facts block nobody and repeat no stored row, so these plans write pending rows
    # only (what bc_begin_fresh writes); a plan that wrote more would not be made in it.
    if not retry and not group.statuses and not group.pending_repeats:
        for w, plan in zip(writes, group.plans, strict=True):
            w.refs_tried.extend(p.upstream_ref for p in plan.to_send)
        columns: list[list[Any]] = [list(c) for c in zip(*group.send_rows, strict=True)]
        async with db.conn("begin send") as conn:
            fresh = await conn.fetchval(
                BEGIN_FRESH, *fact_keys(rules, writes), *(columns or [[]] * 6)
            )
        if fresh:
            return group.plans
    async with db.tx("begin send") as (conn, wakes):
        return await begin_sends(conn, wakes, rules, writes)
