"""Group commit: writes of one kind queued while a group is in flight share the next one.

Owns the queue, the writer tasks per kind (one, or a few for sends: groups in flight at
once), cutting groups (size cap, never the same key twice, so a group equals its writes run
one after another) and the fallback: a group that
fails is retried write by write, so one write that cannot be stored fails alone. A group is
one transaction of a few statements whatever its size (the bulk function's set-based SQL).
A batcher built with `run` instead of `bulk` leaves transactions to that function (a group
that is one statement needs none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from bc_proxy.errors import StoreError
from bc_proxy.store.postgres.db import Conn, Db, Wakes, describe, store_error

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")
Bulk = Callable[[Conn, Wakes, list[I]], Awaitable[list[R]]]
Run = Callable[[list[I]], Awaitable[list[R]]]
Recover = Callable[[list[I]], Awaitable[list[R] | None]]
Abandon = Callable[[I], None]

MAX_GROUP = 500
log = logging.getLogger(__name__)


class Batcher(Generic[I, R]):
    """Runs `bulk` over the items queued together, in one transaction per group."""

    def __init__(
        self,
        db: Db,
        what: str,
        bulk: Bulk[I, R] | None,
        key: Callable[[I], Hashable],
        max_group: int = MAX_GROUP,
        *,
        run: Run[I, R] | None = None,
        droppable: bool = False,
        writers: int = 1,
        recover: Recover[I, R] | None = None,
        abandoned: Abandon[I] | None = None,
    ) -> None:
        self.db = db
        self.what = what
        self.bulk = bulk
        self.run = run if run is not None else self._in_transaction
        self.key = key
        self.max_group = max_group
        # An item whose caller was cancelled before its group ran is not written (a
        # write-ahead row nobody will act on); without it, a queued item is always written.
        self.droppable = droppable
        # Groups in flight at once. One writer makes each group wait for the previous one's
        # commit (a WAL flush); several overlap those waits. Items of one key in two groups at
        # once are serialized by the bulk function's own locks (begin_send's advisory locks).
        self.writers = max(1, writers)
        # After a failed group or write, whose COMMIT may have reached the server with only
        # its answer lost: the results it committed, or None (not committed: retry or fail).
        self.recover = recover
        # Told of each item whose caller never gets its result: failed, or cancelled by the
        # time its group answered (what it may have written nobody will act on).
        self.abandoned = abandoned
        self.groups = 0  # committed groups (diagnostics, tests)
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: I) -> R:
        if not self.db.started:
            raise StoreError("store is closed")
        loop = self._loop
        if loop is None:  # bound at first use (asyncio.get_running_loop is a getpid call)
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if len(self._running) < self.writers:
            task = loop.create_task(self._write())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await fut

    async def drain(self) -> None:
        """Wait until every queued write is answered (close)."""
        while self._running:
            await asyncio.shield(next(iter(self._running)))

    def _cut(self) -> list[tuple[I, asyncio.Future[R]]]:
        if self.droppable:
            self._queue = [(item, fut) for item, fut in self._queue if not fut.cancelled()]
        seen: set[Hashable] = set()
        n = 0
        for item, _ in self._queue[: self.max_group]:
            k = self.key(item)
            if k in seen:
                break
            seen.add(k)
            n += 1
        group, self._queue = self._queue[:n], self._queue[n:]
        return group

    async def _write(self) -> None:
        group: list[tuple[I, asyncio.Future[R]]] = []
        try:
            while self._queue:
                group = self._cut()
                await self._write_group(group)
        finally:
            # Off the running set now, not in a done callback a loop iteration later: a write
            # submitted meanwhile would find the set full and no writer left to run it.
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            # Normally the queue is empty here. A writer cancelled at loop shutdown fails its
            # group and whatever is queued, so that nobody hangs.
            for item, fut in group + self._queue:
                if not fut.done():
                    self._give_up(item, fut, StoreError("store is closing"))
            self._queue = []

    async def _in_transaction(self, items: list[I]) -> list[R]:
        assert self.bulk is not None
        async with self.db.tx(self.what) as (conn, wakes):
            return await self.bulk(conn, wakes, items)

    async def _write_group(self, group: list[tuple[I, asyncio.Future[R]]]) -> None:
        unknown = False  # the group failed and whether it committed could not be told
        if len(group) > 1:
            try:
                results = await self.run([item for item, _ in group])
            except Exception as exc:  # whatever it was, each write is retried alone
                log.info(
                    "%s: group of %d failed (%s); one by one", self.what, len(group), describe(exc)
                )
                recovered = await self._recovered(group)
                if recovered:
                    return
                unknown = recovered is None
            else:
                self.groups += 1
                for (item, fut), result in zip(group, results, strict=True):
                    self._answer(item, fut, result)
                return
        for item, fut in group:
            if self.droppable and fut.cancelled():
                if unknown and self.abandoned is not None:  # its group may have committed it
                    self.abandoned(item)
                continue
            if unknown and await self._recovered([(item, fut)]):
                continue  # it committed with its group: not written twice
            try:
                (result,) = await self.run([item])
            except Exception as exc:  # a write never leaves its caller hanging
                if not await self._recovered([(item, fut)]):
                    err = exc if isinstance(exc, StoreError) else store_error(exc, self.what)
                    self._give_up(item, fut, err)
            else:
                self.groups += 1
                self._answer(item, fut, result)

    async def _recovered(self, group: list[tuple[I, asyncio.Future[R]]]) -> bool | None:
        """Answer a failed group from `recover` when it committed after all: True when
        answered, False when it did not commit, None when that could not be told."""
        if self.recover is None:
            return False
        try:
            results = await self.recover([item for item, _ in group])
        except Exception as exc:
            log.info(
                "%s: could not tell whether a failed group committed (%s)",
                self.what,
                describe(exc),
            )
            return None
        if results is None:
            return False
        log.info("%s: a group of %d committed although it failed; answered", self.what, len(group))
        self.groups += 1
        for (item, fut), result in zip(group, results, strict=True):
            self._answer(item, fut, result)
        return True

    def _answer(self, item: I, fut: asyncio.Future[R], result: R) -> None:
        if not fut.done():
            fut.set_result(result)
        elif self.abandoned is not None:  # cancelled meanwhile: nobody acts on what it wrote
            self.abandoned(item)

    def _give_up(self, item: I, fut: asyncio.Future[R], exc: StoreError) -> None:
        _fail(fut, exc)
        if self.abandoned is not None:
            self.abandoned(item)


def _fail(fut: asyncio.Future[R], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
