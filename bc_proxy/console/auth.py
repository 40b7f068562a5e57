"""Console credentials and CSRF tokens.

Owns checking `Authorization: Basic` against `console.user` / `console.password_hash`: argon2
verifies on one dedicated thread (never on the event loop, at most one at a time); a verified
or refused login is remembered as a keyed digest (never in clear), a refusal for a minute.
CSRF tokens are an HMAC of the verified login under a per-process key: bound to that login.
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

REALM = 'Basic realm="bc-proxy console", charset="UTF-8"'
_REMEMBERED = 16  # verified credential digests kept
_REFUSED_KEPT = 1024  # refused credential digests kept ...
_REFUSED_SECONDS = 60.0  # ... and refused from memory this long (no argon2 run)


class ConsoleAuth:
    """Checks console logins and makes and checks their CSRF tokens."""

    def __init__(self, user: str, password_hash: str) -> None:
        self._user = user.encode()
        self._hash = password_hash
        self._key = secrets.token_bytes(32)
        self._hasher = PasswordHasher()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bc-console-argon2")
        self._lock = asyncio.Lock()  # one verification at a time: argon2 takes 64 MiB
        self._verified: set[bytes] = set()
        self._refused: dict[bytes, float] = {}

    def _digest(self, user: str, password: str) -> bytes:
        material = f"{user}\x00{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, material, hashlib.sha256).digest()

    async def check(self, authorization: str | None) -> bytes | None:
        """The login's keyed digest when the Basic credentials are the console's; else None."""
        user, password = _basic(authorization)
        if user is None or password is None:
            return None
        digest = self._digest(user, password)
        if digest in self._verified:
            return digest
        now = time.monotonic()
        if now - self._refused.get(digest, -_REFUSED_SECONDS) < _REFUSED_SECONDS:
            return None
        user_ok = hmac.compare_digest(user.encode("utf-8", "surrogatepass"), self._user)
        async with self._lock:
            if digest in self._verified:
                return digest
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._pool, self._verify, password)
        if not (ok and user_ok):
            if len(self._refused) >= _REFUSED_KEPT:
                self._refused.clear()
            self._refused[digest] = now
            return None
        if len(self._verified) >= _REMEMBERED:
            self._verified.clear()
        self._verified.add(digest)
        return digest

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
