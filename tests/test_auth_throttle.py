"""The login throttle: keyed by address and user, proven credentials pass through it.

Unit tests of `Authenticator` with a fake clock (argon2 is not involved: plain passwords).
The HTTP-level behaviour (same 401, the metric) is in test_hardening.py.
"""

from __future__ import annotations

import pytest

from bc_proxy.config import TenantSettings
from bc_proxy.errors import Unauthorized
from bc_proxy.legacy.auth import Authenticator
from bc_proxy.throttle import THROTTLE_ADDRESS_FAILURES, THROTTLE_FAILURES, THROTTLE_SECONDS

NAT = "203.0.113.7"


def tenant(name: str, user: str, password: str) -> TenantSettings:
    return TenantSettings.model_validate(
        {
            "name": name,
            "legacy": {"user_id": user, "password": password},
            "connexus": {"client_id": "cid", "client_secret": "csk"},
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(clock: Clock) -> Authenticator:
    refusals: list[str] = []
    a = Authenticator(
        [tenant("acme", "acme-user", "acme-pass"), tenant("beta", "beta-user", "beta-pass")],
        on_refusal=refusals.append,
        clock=clock,
    )
    a.refusals = refusals  # type: ignore[attr-defined]
    return a


async def fail(auth: Authenticator, user: str, n: int, source: str = NAT) -> None:
    for i in range(n):
        with pytest.raises(Unauthorized):
            await auth.authenticate(user, f"wrong-{i}", source=source)


async def test_a_throttled_user_is_refused_even_with_the_right_password(
    auth: Authenticator,
) -> None:
    """20 failures for one user from one address: its right, never-proven password is refused
    unverified (a guesser learns nothing), counted as throttled."""
    await fail(auth, "acme-user", THROTTLE_FAILURES)
    with pytest.raises(Unauthorized):
        await auth.authenticate("acme-user", "acme-pass", source=NAT)
    assert auth.refusals[-1] == "throttled"  # type: ignore[attr-defined]


async def test_proven_credentials_pass_a_throttled_address(auth: Authenticator) -> None:
    """A client whose credentials worked before keeps working while another client behind the
    same address (a NAT, the load balancer) fails over and over with a wrong password."""
    assert await auth.authenticate("acme-user", "acme-pass", source=NAT) == "acme"
    await fail(auth, "acme-user", THROTTLE_FAILURES * 2)
    assert await auth.authenticate("acme-user", "acme-pass", source=NAT) == "acme"


async def test_one_users_failures_do_not_throttle_another_user(auth: Authenticator) -> None:
    """Below the address-wide bound, failures for one user leave other users of that address
    unthrottled, even those never proven before."""
    await fail(auth, "acme-user", THROTTLE_FAILURES)
    assert await auth.authenticate("beta-user", "beta-pass", source=NAT) == "beta"
    with pytest.raises(Unauthorized):
        await auth.authenticate("acme-user", "acme-pass", source=NAT)
    assert await auth.authenticate("acme-user", "acme-pass", source="198.51.100.1") == "acme"


async def test_many_users_failing_throttle_the_address(auth: Authenticator) -> None:
    """Failures spread over many user names from one address (a scan) throttle the address's
    unproven credentials once they reach the address-wide bound; proven ones still pass."""
    assert await auth.authenticate("acme-user", "acme-pass", source=NAT) == "acme"
    users = THROTTLE_ADDRESS_FAILURES // (THROTTLE_FAILURES - 1) + 1
    for u in range(users):
        await fail(auth, f"scan-{u}", THROTTLE_FAILURES - 1)
    with pytest.raises(Unauthorized):
        await auth.authenticate("beta-user", "beta-pass", source=NAT)
    assert auth.refusals[-1] == "throttled"  # type: ignore[attr-defined]
    assert await auth.authenticate("acme-user", "acme-pass", source=NAT) == "acme"


async def test_the_throttle_expires(auth: Authenticator, clock: Clock) -> None:
    await fail(auth, "acme-user", THROTTLE_FAILURES)
    clock.now += THROTTLE_SECONDS + 1
    assert await auth.authenticate("acme-user", "acme-pass", source=NAT) == "acme"


async def test_a_rotated_password_is_not_proven_any_more(auth: Authenticator) -> None:
    """Proof is forgotten on reload: the old password stops working at once, throttled or not."""
    assert await auth.authenticate("acme-user", "acme-pass", source=NAT) == "acme"
    auth.replace_tenants([tenant("acme", "acme-user", "new-pass")])
    with pytest.raises(Unauthorized):
        await auth.authenticate("acme-user", "acme-pass", source=NAT)
    assert await auth.authenticate("acme-user", "new-pass", source=NAT) == "acme"
