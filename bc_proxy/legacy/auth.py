"""Legacy credential checks: userId/password from params or HTTP Basic, in constant time.

Owns finding the tenant for a legacy caller. Plain passwords compare with
`hmac.compare_digest`; argon2 hashes verify off the event loop, and a verified password is
remembered (as a keyed digest, never in clear) so the send path pays for argon2 once.
Does not own what a tenant may do.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bc_proxy.config import TenantSettings
from bc_proxy.errors import Unauthorized

_CACHE_LIMIT = 1024


class Authenticator:
    """Maps legacy credentials to a tenant name, or raises Unauthorized."""

    def __init__(self, tenants: Iterable[TenantSettings]) -> None:
        self._key = secrets.token_bytes(32)
        self._hasher = PasswordHasher()
        self._plain: dict[str, tuple[str, bytes]] = {}
        self._hashed: dict[str, tuple[str, str]] = {}
        for t in tenants:
            if t.legacy.password is not None:
                self._plain[t.legacy.user_id] = (
                    t.name,
                    self._digest(t.legacy.password.get_secret_value()),
                )
            elif t.legacy.password_hash is not None:
                self._hashed[t.legacy.user_id] = (t.name, t.legacy.password_hash.get_secret_value())
        self._dummy = self._digest(secrets.token_hex(16))
        self._verified: dict[tuple[str, bytes], str] = {}

    def _digest(self, password: str) -> bytes:
        return hmac.new(
            self._key, password.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).digest()

    async def authenticate(self, user: str | None, password: str | None) -> str:
        """The tenant name for these credentials; Unauthorized otherwise."""
        if not user or password is None:
            raise Unauthorized("Missing credentials")
        digest = self._digest(password)
        plain = self._plain.get(user)
        if plain is not None or user not in self._hashed:
            expected = plain[1] if plain is not None else self._dummy
            if hmac.compare_digest(digest, expected) and plain is not None:
                return plain[0]
            raise Unauthorized("Invalid credentials")
        tenant, stored = self._hashed[user]
        cached = self._verified.get((user, digest))
        if cached is not None:
            return cached
        ok = await asyncio.get_running_loop().run_in_executor(None, self._verify, stored, password)
        if not ok:
            raise Unauthorized("Invalid credentials")
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
        self._verified[(user, digest)] = tenant
        return tenant

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False


def credentials(
    params: Mapping[str, str], authorization: str | None
) -> tuple[str | None, str | None]:
    """userId/password from the merged params, else from `Authorization: Basic`."""
    user, password = params.get("userId"), params.get("password")
    if user is not None and password is not None:
        return user, password
    if authorization and authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
        except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII input
            return None, None
        u, sep, p = decoded.partition(":")
        if sep:
            return u, p
    return user, password


def hash_password(password: str) -> str:
    """An argon2id hash usable as `legacy.password_hash`."""
    return PasswordHasher().hash(password)
