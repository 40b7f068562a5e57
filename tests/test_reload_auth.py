"""A reload landing while a password check is in flight: the check's answer by the old tenants is
neither remembered nor given; the call is answered by the tenants now in force (a rotated
password refused, a removed tenant 401 and never 500, a moved user id as its new tenant), and a
rotated user's failure count starts again.

Unit tests drive the real `Authenticator` step by step (deterministic: a check on the hash
thread cannot finish before the test gives the loop back); the HTTP tests use the real gateway
with a deliberately slow hash so that the reload lands while the call's check runs.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from bc_proxy import keys
from bc_proxy.config import TenantSettings, parse
from bc_proxy.errors import Unauthorized
from bc_proxy.legacy.auth import Authenticator
from bc_proxy.reload import apply
from bc_proxy.throttle import THROTTLE_FAILURES
from tests.conftest import LEGACY_USER, Connexus, GatewayClient, GatewayFactory

OLD, NEW = "old-pass-123456", "new-pass-123456"
SLOW = PasswordHasher(time_cost=4)  # ~0.1 s a check: the reload lands while it runs
FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
NAT = "203.0.113.7"


def tenant(
    name: str, user: str, *, password: str | None = None, hashed: str | None = None
) -> TenantSettings:
    secret = {"password": password} if hashed is None else {"password_hash": hashed}
    legacy = {"user_id": user, **secret}
    return TenantSettings.model_validate(
        {"name": name, "legacy": legacy, "connexus": {"client_id": "c", "client_secret": "s"}}
    )


@pytest.fixture
async def auth() -> AsyncIterator[Authenticator]:
    a = Authenticator([tenant("acme", "acme-user", hashed=FAST.hash(OLD))])
    yield a
    a.close()


def started(*calls: Any) -> list[asyncio.Task[str]]:
    return [asyncio.ensure_future(c) for c in calls]


async def outcomes(tasks: list[asyncio.Task[str]]) -> list[str]:
    """Each call's tenant, or "401"."""
    out = []
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Unauthorized):
            out.append("401")
        else:
            assert isinstance(result, str), result
            out.append(result)
    return out


async def test_a_check_in_flight_when_the_password_rotates_is_refused(
    auth: Authenticator,
) -> None:
    """Two calls share a check of the old password (the second joins the first); the password
    is rotated while it runs, and a third call with the old password comes after: all three
    are refused, the old password stays refused, the new one works."""
    first = started(auth.authenticate("acme-user", OLD), auth.authenticate("acme-user", OLD))
    await asyncio.sleep(0)  # the first's check is on the hash thread, the second waits on it
    auth.replace_tenants([tenant("acme", "acme-user", hashed=FAST.hash(NEW))])
    after = started(auth.authenticate("acme-user", OLD))  # must not join the stale check
    assert await outcomes(first + after) == ["401", "401", "401"]
    assert await outcomes(started(auth.authenticate("acme-user", OLD))) == ["401"]
    assert await auth.authenticate("acme-user", NEW) == "acme"


async def test_a_user_id_moved_during_its_check_is_its_new_tenants(auth: Authenticator) -> None:
    same = FAST.hash(OLD)
    auth.replace_tenants([tenant("acme", "acme-user", hashed=same)])
    calls = started(auth.authenticate("acme-user", OLD))
    await asyncio.sleep(0)
    auth.replace_tenants(
        [
            tenant("acme", "acme-other", password="acme-other-pass"),
            tenant("beta", "acme-user", hashed=same),
        ]
    )
    assert await outcomes(calls) == ["beta"]
    assert await auth.authenticate("acme-user", OLD) == "beta"


async def test_a_tenant_removed_during_its_check_is_refused(auth: Authenticator) -> None:
    calls = started(auth.authenticate("acme-user", OLD), auth.authenticate("acme-user", OLD))
    await asyncio.sleep(0)
    auth.replace_tenants([tenant("beta", "beta-user", password="beta-pass")])
    assert await outcomes(calls) == ["401", "401"]
    assert await outcomes(started(auth.authenticate("acme-user", OLD))) == ["401"]


async def test_a_rotation_restarts_that_users_failure_count() -> None:
    """A client throttled for its failures with an old password gets in with the rotated one
    at once; a user whose credentials did not change stays throttled."""
    auth = Authenticator(
        [tenant("acme", "acme-user", password=OLD), tenant("beta", "beta-user", password=OLD)]
    )
    try:
        for user in ("acme-user", "beta-user"):
            for i in range(THROTTLE_FAILURES):
                with pytest.raises(Unauthorized):
                    await auth.authenticate(user, f"wrong-{i}", source=NAT)
        auth.replace_tenants(
            [tenant("acme", "acme-user", password=NEW), tenant("beta", "beta-user", password=OLD)]
        )
        assert await auth.authenticate("acme-user", NEW, source=NAT) == "acme"
        with pytest.raises(Unauthorized):  # still throttled: its right password unverified
            await auth.authenticate("beta-user", OLD, source=NAT)
    finally:
        auth.close()


# -- through the gateway --


@functools.cache
def slow_old_hash() -> str:
    return SLOW.hash(OLD)


def slow_hashed(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with acme's legacy password OLD behind a slow hash, plus tenant `other`."""
    out = copy.deepcopy(cfg)
    out["tenants"][0]["legacy"] = {"user_id": LEGACY_USER, "password_hash": slow_old_hash()}
    other = copy.deepcopy(out["tenants"][0])
    other.update(
        name="other",
        legacy={"user_id": "other-legacy", "password": "other-pass-123"},
        connexus={"client_id": "cid_other", "client_secret": "csk_other"},
        default_from="999",
        senders=["999"],
    )
    out["tenants"].append(other)
    return out


async def checking(client: GatewayClient) -> None:
    """Until a call's argon2 check runs on the gateway's hash thread (5 s at most)."""
    inflight = client.app[keys.AUTH]._inflight
    for _ in range(1000):
        if inflight:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no password check started")


def sends(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "bc-proxy.db") as conn:
        count: int = conn.execute("SELECT count(*) FROM sends").fetchone()[0]
    return count


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


OLD_AUTH = basic(LEGACY_USER, OLD)


@pytest.mark.parametrize(
    "path",
    [
        "/api/1/sms/out",
        "/api/1/sms/test",
        "/api/1/sms/in",
        "/api/1/sms/status",
        "/api/1/sms/queue",
        "/api/connexus/sms/balance",
    ],
)
async def test_a_removed_tenants_call_in_flight_is_401_never_500(
    connexus: Connexus,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    tmp_path: Path,
    path: str,
) -> None:
    """The tenant is removed while its call's password check runs: that call and the next
    with the same credentials are 401; nothing is written, nothing goes upstream."""
    base = slow_hashed(cfg)
    client = await gateway(base)
    form = {"to": "6421000001", "body": "x"}
    call = asyncio.ensure_future(client.post(path, data=form, headers=OLD_AUTH))
    await checking(client)
    removed = copy.deepcopy(base)
    removed["tenants"] = removed["tenants"][1:]
    await apply(client.app, parse(removed))
    first = await call
    later = await client.post(path, data=form, headers=OLD_AUTH)
    assert (first.status, later.status) == (401, 401)
    assert await later.text() == "Invalid credentials\n"
    assert connexus.emu.sms_out_requests() == []
    assert not [r for r in connexus.emu.requests if r.path.endswith("/sms/balance")]
    assert sends(tmp_path) == 0


async def test_a_password_rotated_during_a_call_is_refused_then_and_after(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    base = slow_hashed(cfg)
    client = await gateway(base)
    call = asyncio.ensure_future(client.get("/api/1/sms/queue", headers=OLD_AUTH))
    await checking(client)
    rotated = copy.deepcopy(base)
    rotated["tenants"][0]["legacy"]["password_hash"] = FAST.hash(NEW)
    await apply(client.app, parse(rotated))
    assert (await call).status == 401
    assert (await client.get("/api/1/sms/queue", headers=OLD_AUTH)).status == 401
    new = await client.get("/api/1/sms/queue", headers=basic(LEGACY_USER, NEW))
    assert new.status == 200


async def test_a_user_id_moved_during_a_call_is_answered_as_its_new_tenant(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """LEGACY_USER moves from acme to `other` while its balance call's check runs: that call
    and the next get other's balance (its own Connexus account), never acme's."""
    connexus.emu.balances = {"cid_demo": "11.00", "cid_other": "22.00"}
    base = slow_hashed(cfg)
    client = await gateway(base)
    call = asyncio.ensure_future(client.post("/api/connexus/sms/balance", headers=OLD_AUTH))
    await checking(client)
    moved = copy.deepcopy(base)
    moved["tenants"][1]["legacy"] = base["tenants"][0]["legacy"]
    moved["tenants"][0]["legacy"] = {"user_id": "acme-renamed", "password": "acme-pass-123"}
    await apply(client.app, parse(moved))
    first = await call
    later = await client.post("/api/connexus/sms/balance", headers=OLD_AUTH)
    assert (first.status, later.status) == (200, 200)
    assert [(await r.json())["balance"] for r in (first, later)] == ["22.00", "22.00"]
