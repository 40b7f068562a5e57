"""Failed-login throttling by address: the one policy of both logins (legacy API and console).

Owns the counts of recent failures: per (address, user) and per address, each the times of the
last few failures within a sliding window, in a bounded table (oldest entries dropped first).
An address is throttled for a user when that user failed there THROTTLE_FAILURES times within
THROTTLE_SECONDS, or when any users failed there THROTTLE_ADDRESS_FAILURES times. What a
throttled caller gets (refused unverified, proven credentials still passing) is the login's.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable
from typing import Generic, TypeVar

THROTTLE_FAILURES = 20  # failures for one user from one address within THROTTLE_SECONDS,
THROTTLE_ADDRESS_FAILURES = 100  # or for any users from one address, and its unproven
THROTTLE_SECONDS = 60.0  # credentials are refused unverified (proven ones still pass)
THROTTLE_LIMIT = 10_000  # (address, user) pairs and addresses tracked at most (oldest first)

U = TypeVar("U", bound=Hashable)


class FailureThrottle(Generic[U]):
    """Recent login failures by address and user (`U`: how the login names a user)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: OrderedDict[tuple[str, U | None], deque[float]] = OrderedDict()

    def throttled(self, source: str, user: U) -> bool:
        """Whether `source` has failed too often lately, for `user` or for anyone."""
        return self._recent((source, user)) >= THROTTLE_FAILURES or (
            self._recent((source, None)) >= THROTTLE_ADDRESS_FAILURES
        )

    def fail(self, source: str, user: U) -> None:
        """Count one failure of `user` from `source`."""
        now = self._clock()
        for key, keep in (
            ((source, user), THROTTLE_FAILURES),
            ((source, None), THROTTLE_ADDRESS_FAILURES),
        ):
            times = self._failures.get(key)
            if times is None:
                times = self._failures[key] = deque(maxlen=keep)
            self._failures.move_to_end(key)
            times.append(now)
        while len(self._failures) > THROTTLE_LIMIT:
            self._failures.popitem(last=False)

    def forget(self, users: Collection[U]) -> None:
        """Drop the per-user counts of these users (their credentials changed); the counts of
        their addresses stay."""
        for key in [k for k in self._failures if k[1] is not None and k[1] in users]:
            del self._failures[key]

    def _recent(self, key: tuple[str, U | None]) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        cutoff = self._clock() - THROTTLE_SECONDS
        while times and times[0] < cutoff:
            times.popleft()
        return len(times)
