"""Pending rows nobody will send: the upstream refs of begin_send calls whose caller never got
their plan, and their rejection.

A begin_send call whose caller got an error, or was gone (cancelled) by the time its group
answered, never reaches Connexus: its handler answered 500 or stopped. Its pending rows may
still exist: a group whose COMMIT answer was lost while the database stayed unreachable (so
recovery could not tell), or a group that committed after its caller was cancelled. Left
`pending`, they would answer the legacy retry `upstream.unknown_retry_status` (204 by default)
without sending anything, and expiry would later say "outcome unknown" for an SMS that never
left. So their refs are kept here and the rows made `rejected` (the request was never written:
a retry sends again): inside the next begin group of this replica, before its facts are read
(a retry arriving here cannot see them pending), and by a background flush with backoff when no
group comes. Only rows still `pending` change; an expired row (`unknown`) keeps its state.
What is left unflushed when the process stops is expired as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from bc_proxy.store.postgres.db import Conn, Db

REJECT = (
    "UPDATE sends SET state = 'rejected', settled_at = $2 "
    "WHERE upstream_ref = ANY($1::text[]) AND state = 'pending'"
)
MAX_REFS = 100_000  # refs kept at most (a long outage under load); older ones expire instead
KEEP_SECONDS = 3600.0  # past any expiry of pending rows: nothing left to reject
FIRST_RETRY_SECONDS = 0.2
MAX_RETRY_SECONDS = 2.0

log = logging.getLogger(__name__)


class Abandoned:
    """The refs of begin_send calls whose caller never got the plan, until rejected."""

    def __init__(self, db: Db) -> None:
        self._db = db
        self._refs: dict[str, float] = {}  # ref -> monotonic time it was abandoned
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False
        self.rejected = 0  # rows made `rejected` (diagnostics, tests)

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, refs: Iterable[str]) -> None:
        now = time.monotonic()
        for ref in refs:
            if len(self._refs) >= MAX_REFS:
                log.warning("abandoned sends: %d refs kept, the rest left to expiry", MAX_REFS)
                break
            self._refs[ref] = now
        if self._stopped:
            return
        if self._refs and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def reject(self, conn: Conn) -> list[str]:
        """Reject the rows of every ref kept, in the caller's transaction (or autocommit); the
        refs handled, to pass to `done` once that has committed."""
        cutoff = time.monotonic() - KEEP_SECONDS
        for ref in [r for r, t in self._refs.items() if t < cutoff]:
            del self._refs[ref]
        refs = list(self._refs)
        if refs:
            status = await conn.execute(REJECT, refs, time.time())
            self._count(status)
        return refs

    def done(self, refs: list[str]) -> None:
        for ref in refs:
            self._refs.pop(ref, None)

    def _count(self, status: str) -> None:
        with contextlib.suppress(ValueError, IndexError):
            self.rejected += int(status.split()[-1])

    async def _flush(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while self._refs:
            await asyncio.sleep(delay)
            try:
                async with self._db.conn("reject abandoned sends") as conn:
                    refs = await self.reject(conn)
            except Exception as exc:  # unreachable, restarting: again, later
                log.info("abandoned sends: rejection failed (%s); retrying", exc)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
            else:
                self.done(refs)
                delay = FIRST_RETRY_SECONDS

    async def stop(self) -> None:
        """The store is closing: one last rejection (callers cancelled by the shutdown), then
        no more; what is left expires at the next start."""
        self._stopped = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._refs:
            try:
                async with self._db.conn("reject abandoned sends") as conn:
                    self.done(await self.reject(conn))
            except Exception as exc:
                log.info("abandoned sends: %d left to expiry (%s)", len(self._refs), exc)
