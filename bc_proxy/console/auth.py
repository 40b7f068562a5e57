"""Console credentials and CSRF tokens.

Owns checking `Authorization: Basic` against `console.user` / `console.password_hash`: argon2
verifies on one dedicated thread (never on the event loop, at most one at a time, and at most
_WAITING checks wait for it: more are refused at once, unverified); a verified or refused login
is remembered as a keyed digest (never in clear), a refusal for a minute. Failures are throttled
as the legacy login's are (`bc_proxy.throttle`): many recent failures for
one user from one address, or very many for any users from one address, make that address's
unproven credentials be refused without any argon2 run (the same 401 for every user name);
credentials already verified keep working. Without an address (`source` None) every caller
counts as one address. CSRF tokens are an HMAC of the verified login under a per-process key:
bound to that login.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bc_proxy.throttle import FailureThrottle

REALM = 'Basic realm="bc-proxy console", charset="UTF-8"'
_REMEMBERED = 16  # verified credential digests kept
_REFUSED_KEPT = 1024  # refused credential digests kept ...
_REFUSED_SECONDS = 60.0  # ... and refused from memory this long (no argon2 run)
_WAITING = 8  # checks waiting for the argon2 thread at most; beyond, refused unverified
_UNKNOWN = "?"  # the address of callers without one (`source` None)


class ConsoleAuth:
    """Checks console logins and makes and checks their CSRF tokens."""

    def __init__(self, user: str, password_hash: str) -> None:
        self._user = user.encode()
        self._hash = password_hash
        self._key = secrets.token_bytes(32)
        self._hasher = PasswordHasher()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bc-console-argon2")
        self._lock = asyncio.Lock()  # one verification at a time: argon2 takes 64 MiB
        self._queued = 0  # checks holding or waiting for the lock
        self._verified: set[bytes] = set()
        self._refused: dict[bytes, float] = {}
        # Users by a keyed digest of their name: never kept in clear.
        self._failures: FailureThrottle[bytes] = FailureThrottle()

    def _digest(self, user: str, password: str) -> bytes:
        material = f"{user}\x00{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, material, hashlib.sha256).digest()

    async def check(self, authorization: str | None, source: str | None = None) -> bytes | None:
        """The login's keyed digest when the Basic credentials are the console's; else None
        (`source`: the client's address, for throttling failures)."""
        user, password = _basic(authorization)
        if user is None or password is None:
            return None
        digest = self._digest(user, password)
        if digest in self._verified:  # proven earlier: passes even from a throttled address
            return digest
        address = _UNKNOWN if source is None else source
        who = hmac.new(self._key, b"user\x00" + user.encode("utf-8", "surrogatepass"), "sha256")
        pair = (address, who.digest())
        refused = self._unverified(digest, pair)
        if refused is not None:
            return None if refused else digest
        if self._queued > _WAITING:  # one running and _WAITING waiting already
            return None  # not counted as a failure: nothing was verified
        user_ok = hmac.compare_digest(user.encode("utf-8", "surrogatepass"), self._user)
        self._queued += 1
        try:
            async with self._lock:
                refused = self._unverified(digest, pair)  # things changed while it waited
                if refused is not None:
                    return None if refused else digest
                loop = asyncio.get_running_loop()
                ok = await loop.run_in_executor(self._pool, self._verify, password)
        finally:
            self._queued -= 1
        if not (ok and user_ok):
            if len(self._refused) >= _REFUSED_KEPT:
                self._refused.clear()
            self._refused[digest] = time.monotonic()
            self._failures.fail(*pair)
            return None
        if len(self._verified) >= _REMEMBERED:
            self._verified.clear()
        self._verified.add(digest)
        return digest

    def _unverified(self, digest: bytes, pair: tuple[str, bytes]) -> bool | None:
        """Decided without argon2: False when proven, True when refused (throttled or
        refused lately, the latter counted again), None when argon2 must decide."""
        if digest in self._verified:
            return False
        if self._failures.throttled(*pair):
            return True
        if time.monotonic() - self._refused.get(digest, -_REFUSED_SECONDS) < _REFUSED_SECONDS:
            self._failures.fail(*pair)
            return True
        return None

    def _verify(self, password: str) -> bool:
        try:
            return self._hasher.verify(self._hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def csrf_token(self, login: bytes) -> str:
        """The CSRF token of a verified login (its digest from `check`)."""
        return hmac.new(self._key, b"csrf\x00" + login, hashlib.sha256).hexdigest()

    def csrf_ok(self, login: bytes, token: str | None) -> bool:
        """Whether `token` is this login's CSRF token (constant time)."""
        return token is not None and hmac.compare_digest(
            token.encode("ascii", "replace"), self.csrf_token(login).encode()
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _basic(authorization: str | None) -> tuple[str | None, str | None]:
    if not authorization or authorization[:6].lower() != "basic ":
        return None, None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except ValueError:
        return None, None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else (None, None)
