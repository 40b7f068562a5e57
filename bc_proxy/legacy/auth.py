"""Legacy credential checks: userId/password from params or HTTP Basic, bounded in cost.

Owns finding the tenant for a legacy caller. Plain passwords compare with
`hmac.compare_digest`; argon2 hashes verify on one dedicated thread (argon2 takes 64 MiB and
~100 ms a check, so at most HASH_THREADS run at once). A verified password is remembered as a
keyed digest (never in clear) so the send path pays for argon2 once; a refused one is
remembered for a short while so repeating it costs nothing; an unknown user pays the same
dummy verification as a wrong password, so timing does not reveal user names. Many recent
failures for one user from one address, or very many for any users from one address, make
that address's unproven credentials be refused without any verification (same 401 answer);
credentials this process has already verified keep working, so one misconfigured client
behind a NAT or the load balancer does not lock out the others. A reload (`replace_tenants`)
forgets all of that for credentials it changed, and a check still running when it lands is
done again by the new tenants: its answer by the old ones is neither remembered nor given.
Does not own what a tenant may do.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from hashlib import blake2b

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bc_proxy.config import TenantSettings
from bc_proxy.errors import Unauthorized
from bc_proxy.throttle import FailureThrottle

HASH_THREADS = 1  # argon2 verifications at once (64 MiB each)
POSITIVE_LIMIT = 1024  # remembered good credentials
NEGATIVE_SECONDS = 60.0  # a refused password is refused from memory this long
NEGATIVE_LIMIT = 4096

Outcome = Callable[[str], None]  # told "failure" or "throttled" (a metric)


class Authenticator:
    """Maps legacy credentials to a tenant name, or raises Unauthorized."""

    def __init__(
        self,
        tenants: Iterable[TenantSettings],
        *,
        on_refusal: Outcome | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._hasher = PasswordHasher()
        self._pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="bc-argon2")
        self._clock = clock
        self._on_refusal = on_refusal or (lambda outcome: None)
        self._plain: dict[str, tuple[str, bytes]] = {}
        self._hashed: dict[str, tuple[str, str]] = {}
        self._dummy = self._digest(secrets.token_hex(16))
        self._dummy_hash: str | None = None
        self._verified: dict[tuple[str, bytes], str] = {}
        self._refused: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._inflight: dict[tuple[str, bytes], asyncio.Future[str | None]] = {}
        self._generation = 0  # bumped by each replace_tenants: a check spanning one is stale
        self._failures: FailureThrottle[str] = FailureThrottle(clock)
        self.replace_tenants(tenants)

    def replace_tenants(self, tenants: Iterable[TenantSettings]) -> None:
        """Use these tenants' credentials from now on (config reload): what was verified or
        refused under the old ones is forgotten, so a rotated password stops working at once;
        a check in flight is done again by the new ones (`authenticate`), and the failure
        counts of a user whose credentials changed start again."""
        plain: dict[str, tuple[str, bytes]] = {}
        hashed: dict[str, tuple[str, str]] = {}
        for t in tenants:
            if t.legacy.password is not None:
                digest = self._digest(t.legacy.password.get_secret_value())
                plain[t.legacy.user_id] = (t.name, digest)
            elif t.legacy.password_hash is not None:
                hashed[t.legacy.user_id] = (t.name, t.legacy.password_hash.get_secret_value())
        # With any hashed tenant, every refusal costs one argon2 check (a dummy one where no
        # hash applies): a wrong password and an unknown user then take the same time.
        if hashed and self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        changed = {
            user
            for user in self._plain.keys() | self._hashed.keys() | plain.keys() | hashed.keys()
            if (self._plain.get(user), self._hashed.get(user))
            != (plain.get(user), hashed.get(user))
        }
        self._plain, self._hashed = plain, hashed
        self._verified = {}
        self._refused.clear()
        self._generation += 1
        self._inflight = {}  # new callers start their own check (a running one finishes alone)
        if changed:
            self._failures.forget(changed)

    def _digest(self, password: str) -> bytes:
        # Keyed BLAKE2b, a MAC by design: a third of the instructions of OpenSSL 3's one-shot
        # HMAC-SHA256 (6.8k against 23.5k a call, callgrind), which fetches its algorithms
        # from the provider on every call. Every request with a password pays it.
        data = password.encode("utf-8", "surrogatepass")
        return blake2b(data, key=self._key, digest_size=32).digest()

    async def authenticate(
        self, user: str | None, password: str | None, source: str | None = None
    ) -> str:
        """The tenant name for these credentials; Unauthorized otherwise (`source`: the
        client's address, for throttling failures)."""
        if not user or password is None:
            raise Unauthorized("Missing credentials")
        digest = self._digest(password)
        while True:
            tenant = self._verified.get((user, digest))
            if tenant is not None:  # proven earlier: passes even from a throttled address
                return tenant
            if source is not None and self._failures.throttled(source, user):
                self._on_refusal("throttled")
                raise Unauthorized("Invalid credentials")
            plain = self._plain.get(user)
            if plain is not None and hmac.compare_digest(digest, plain[1]):
                self._remember(user, digest, plain[0])
                return plain[0]
            if plain is None and user not in self._hashed:
                hmac.compare_digest(digest, self._dummy)  # the same work as a plain check
            generation = self._generation
            tenant = await self._slow_check(user, password, digest)
            if generation == self._generation:
                break
            # A reload landed during the check: its answer was by the old tenants.
        if tenant is None:
            self._refuse(source, user)
            raise Unauthorized("Invalid credentials")
        return tenant

    def _remember(self, user: str, digest: bytes, tenant: str) -> None:
        if len(self._verified) >= POSITIVE_LIMIT:
            self._verified.clear()
        self._verified[(user, digest)] = tenant

    async def _slow_check(self, user: str, password: str, digest: bytes) -> str | None:
        """argon2 for a hashed tenant (or a dummy one on every refusal), once per credential
        however many requests ask at once, and never again for a recently refused one. Its
        answer is remembered only if no reload landed meanwhile (the caller then asks again)."""
        key = (user, digest)
        refused_at = self._refused.get(key)
        if refused_at is not None and self._clock() - refused_at < NEGATIVE_SECONDS:
            return None
        if self._dummy_hash is None:
            return None  # no hashed tenant: a plain refusal costs no more than a plain check
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        inflight, generation = self._inflight, self._generation
        inflight[key] = fut
        try:
            hashed = self._hashed.get(user)
            stored = hashed[1] if hashed is not None else self._dummy_hash
            ok = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._verify, stored, password
            )
            tenant = hashed[0] if ok and hashed is not None else None
            if generation != self._generation:
                pass  # by the old tenants: not remembered (callers check again)
            elif tenant is not None:
                self._remember(user, digest, tenant)
            else:
                self._refused[key] = self._clock()
                self._refused.move_to_end(key)
                while len(self._refused) > NEGATIVE_LIMIT:
                    self._refused.popitem(last=False)
            fut.set_result(tenant)
            return tenant
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark it retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            del inflight[key]  # the dict it joined, replaced if a reload landed meanwhile

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def _refuse(self, source: str | None, user: str) -> None:
        self._on_refusal("failure")
        if source is not None:
            self._failures.fail(source, user)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
