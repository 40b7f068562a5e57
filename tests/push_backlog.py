"""A push target's outage, built through the Store API: sends whose first report failed its
push (retried in an hour) and whose second report waits behind it, for the tests that count
what a push claim reads while such a backlog lies in the store."""

from __future__ import annotations

import asyncio
import time

from bc_proxy.store import DlrEvent, SendIntent, Settlement, Store

RETRY_IN = 3600.0
ARRIVING = 100  # second reports stored between two claims of the push worker


async def push_backlog(store: Store, tenant: str, sends: int) -> None:
    """`sends` sends of `tenant` (a tenant that pushes status records), each with one report
    whose push failed (next try in RETRY_IN seconds) and one held back behind it."""
    plans = await asyncio.gather(
        *(
            store.begin_send(SendIntent(tenant, None, (f"64{i:08d}",), "552"), time.time())
            for i in range(sends)
        )
    )
    await asyncio.gather(
        *(
            store.settle_send([Settlement(p.to_send[0].upstream_ref, "accepted", f"bx-{i}")])
            for i, p in enumerate(plans)
        )
    )
    await asyncio.gather(*(store.add_dlr(DlrEvent(f"bx-{i}", 2, "")) for i in range(sends)))
    while batch := await store.claim_pushes(time.time(), 500):
        await asyncio.gather(
            *(store.push_failed(r, next_at=time.time() + RETRY_IN, error="503") for r in batch)
        )
    # The second reports arrive while the first ones wait; the push worker, woken by them,
    # claims after each few (and finds nothing it may send).
    for at in range(0, sends, ARRIVING):
        chunk = range(at, min(sends, at + ARRIVING))
        await asyncio.gather(*(store.add_dlr(DlrEvent(f"bx-{i}", 1, "")) for i in chunk))
        assert await store.claim_pushes(time.time(), 10) == []
