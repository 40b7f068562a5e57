"""The wake-up seam: long-polls and the push worker wait here for new records.

`Waker` is what routes and workers use; `LocalWaker` is the in-process implementation (the
SQLite backend's, and the PostgreSQL backend's too, fed by its LISTEN connection). A generation
counter per (tenant, kind) closes the race between "found nothing" and "started waiting": a
waiter passes the generation it saw before looking.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class Waker(Protocol):
    """Wake-ups for records stored by this process or, where the backend spans replicas, any."""

    closed: bool

    def generation(self, tenant: str, kind: str) -> int: ...

    def notify(self, tenant: str, kind: str) -> None:
        """Wake this process's waiters on (tenant, kind) and `wait_any` (no I/O)."""

    def notify_all(self) -> None:
        """Wake every waiter once (a lost notification channel came back: they re-check)."""

    async def wait(self, tenant: str, kind: str, seen: int, within: float) -> bool:
        """Wait until something is stored after generation `seen`; False on timeout or close."""

    async def wait_any(self, within: float) -> None:
        """Wait until anything is stored, at most `within` seconds (the push worker's nap)."""

    def close(self) -> None:
        """Release every waiter (shutdown): they answer 204 without consuming."""


class LocalWaker:
    """In-process wake-ups: one asyncio.Event per (tenant, kind) being waited on."""

    def __init__(self) -> None:
        self._gen: dict[tuple[str, str], int] = {}
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._any: asyncio.Event | None = None
        self.closed = False

    def generation(self, tenant: str, kind: str) -> int:
        return self._gen.get((tenant, kind), 0)

    def notify(self, tenant: str, kind: str) -> None:
        key = (tenant, kind)
        self._gen[key] = self._gen.get(key, 0) + 1
        event = self._events.pop(key, None)
        if event is not None:
            event.set()
        self._wake_any()

    def notify_all(self) -> None:
        for key in list(self._events):
            self.notify(*key)
        self._wake_any()

    def _wake_any(self) -> None:
        if self._any is not None:
            self._any.set()
            self._any = None

    async def wait_any(self, within: float) -> None:
        if self.closed:
            return
        if self._any is None:
            self._any = asyncio.Event()
        event = self._any
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await event.wait()

    async def wait(self, tenant: str, kind: str, seen: int, within: float) -> bool:
        key = (tenant, kind)
        if self.closed:
            return False
        if self._gen.get(key, 0) != seen:
            return True
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        try:
            async with asyncio.timeout(within):
                await event.wait()
        except TimeoutError:
            return False
        return not self.closed

    def close(self) -> None:
        self.closed = True
        for event in self._events.values():
            event.set()
        self._events.clear()
        if self._any is not None:
            self._any.set()
            self._any = None
