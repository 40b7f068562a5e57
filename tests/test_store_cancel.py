"""Store contract on cancelled and concurrent callers, every backend: a settle_send still
commits; a begin_send cancelled before its group ran writes nothing; identical sends at once
are forwarded once whatever groups they land in.

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


async def test_many_identical_sends_at_once_forward_once(store: Store) -> None:
    """12 identical calls at once, among calls of 30 other keys: each key is forwarded once.
    On PostgreSQL the identical ones land in different groups in flight at the same time (one
    key never twice in a group), so this is what the groups' advisory locks must serialize."""
    now = time.time()
    calls = [intent("SAME") for _ in range(12)]
    calls += [intent(f"K{i}", f"64210002{i:02d}") for i in range(30)]
    plans = await asyncio.gather(*(store.begin_send(c, now) for c in calls))
    same = plans[:12]
    assert sorted(len(p.to_send) for p in same) == [0] * 11 + [1]
    assert sorted(p.repeats for p in same) == [()] + [((HANDSET, "pending"),)] * 11
    assert all(len(p.to_send) == 1 and p.repeats == () for p in plans[12:])
    again = await asyncio.gather(*(store.begin_send(c, now) for c in calls[11:]))
    assert all(p.to_send == () for p in again)
