"""Store contract on cancelled callers, every backend: a settle_send still commits; a
begin_send cancelled before its group ran writes nothing.

The send path relies on it instead of shielding the settle in a task of its own
(legacy/routes.py `_forward`): the SMS may be out, so its outcome must not be rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bc_proxy.store import Settlement, StatusRecord, Store
from tests.test_store_contract import HANDSET, POLL, SENDER, intent, opened, store

__all__ = ["opened", "store"]  # the contract suite's fixtures, every backend


async def test_settle_commits_when_its_caller_is_cancelled(store: Store) -> None:
    plan = await store.begin_send(intent("L1"), time.time())
    ref = plan.to_send[0].upstream_ref
    status = StatusRecord(POLL, HANDSET, SENDER, "L1", "ERR", "outcome unknown", ref)
    task = asyncio.ensure_future(store.settle_send([Settlement(ref, "accepted", "cx-1")], [status]))
    await asyncio.sleep(0)  # the task runs until it waits for the commit
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 5
    while True:
        again = await store.begin_send(intent("L1"), time.time())
        if again.repeats == ((HANDSET, "accepted"),):
            break
        assert again.repeats == ((HANDSET, "pending"),), again
        assert time.monotonic() < deadline, "the cancelled settle never committed"
        await asyncio.sleep(0.02)
    rec = await store.claim(POLL, "status")
    assert rec is not None
    assert (rec.status_code, rec.in_reply_to) == ("ERR", "L1")


async def test_begin_cancelled_before_its_commit_writes_nothing(store: Store) -> None:
    """A begin_send whose caller is cancelled while it waits for its group writes no pending
    row: the client's retry is then sent, not answered as a repeat of a send that never was."""
    task = asyncio.ensure_future(store.begin_send(intent("L9"), time.time()))
    await asyncio.sleep(0)  # the task runs until it waits for its group
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    plan = await store.begin_send(intent("L9"), time.time())
    assert plan.repeats == ()
    assert [p.recipient for p in plan.to_send] == [HANDSET]
