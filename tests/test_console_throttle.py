"""The console login is bounded in cost: failures are throttled per address and user like the
legacy login's (credentials already verified still pass), and at most a few checks wait for
the argon2 thread, the rest refused at once, so a flood cannot queue ahead of the operator.

argon2 is real (the console's hash); a spy on argon2's `PasswordHasher.verify` counts its
runs and, where a test needs it, holds the one that is running."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from argon2 import PasswordHasher

from bc_proxy.console.auth import ConsoleAuth
from bc_proxy.throttle import THROTTLE_ADDRESS_FAILURES, THROTTLE_FAILURES
from tests.conftest import GatewayFactory
from tests.test_console import CONSOLE_USER, basic, console_cfg, console_hash

WAITING = 8  # checks that may wait for the argon2 thread (bc_proxy.console.auth._WAITING)


class Argon2Spy:
    """Counts argon2 verifications; while `gate` is clear, each waits for it (bounded)."""

    def __init__(self) -> None:
        self.runs = 0
        self.running = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()


@pytest.fixture
def argon2_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Argon2Spy]:
    spy = Argon2Spy()
    original = PasswordHasher.verify

    def verify(self: PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        with spy._lock:
            spy.runs += 1
        spy.running.set()
        spy.gate.wait(10)
        return original(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", verify)
    yield spy
    spy.gate.set()  # never leave the argon2 thread waiting


async def test_guesses_are_throttled_per_address_and_user(
    gateway: GatewayFactory, cfg: dict[str, Any], argon2_spy: Argon2Spy
) -> None:
    """40 different wrong passwords from one address: argon2 runs for the first 20 only, the
    rest get the same 401 at once; the operator's login, verified before, still works."""
    client = await gateway(console_cfg(cfg))
    assert (await client.get("/console", headers=basic())).status == 200
    assert argon2_spy.runs == 1
    started = time.perf_counter()
    for i in range(40):
        resp = await client.get("/console", headers=basic(password=f"guess-{i}"))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith('Basic realm="bc-proxy console"')
        if i == THROTTLE_FAILURES - 1:
            started = time.perf_counter()
    throttled = time.perf_counter() - started
    assert argon2_spy.runs == 1 + THROTTLE_FAILURES
    assert throttled < 1.0, f"20 throttled refusals took {throttled:.2f} s"
    assert (await client.get("/console", headers=basic())).status == 200
    assert argon2_spy.runs == 1 + THROTTLE_FAILURES


async def test_a_flood_of_checks_waits_in_a_bounded_queue(
    gateway: GatewayFactory, cfg: dict[str, Any], argon2_spy: Argon2Spy
) -> None:
    """30 fresh guesses at once while argon2 is busy: one runs, 8 wait, 21 are refused at
    once without argon2; once the queue drains the operator logs in with one argon2 run."""
    client = await gateway(console_cfg(cfg))
    argon2_spy.gate.clear()
    flood = [
        asyncio.ensure_future(client.get("/console", headers=basic(password=f"x{i}")))
        for i in range(30)
    ]
    try:
        assert await asyncio.to_thread(argon2_spy.running.wait, 5)
        # The held check and those waiting for it cannot finish: wait the others out.
        finished, _ = await asyncio.wait(flood, timeout=2.0)
        done = [f.result() for f in finished]
        assert len(done) == 30 - 1 - WAITING, f"{len(done)} answered while argon2 was busy"
        assert {r.status for r in done} == {401}
        assert argon2_spy.runs == 1
    finally:
        argon2_spy.gate.set()
    answers: list[ClientResponse] = await asyncio.gather(*flood)
    assert {r.status for r in answers} == {401}
    assert argon2_spy.runs == 1 + WAITING
    started = time.perf_counter()
    assert (await client.get("/console", headers=basic())).status == 200
    assert time.perf_counter() - started < 2.0
    assert argon2_spy.runs == 2 + WAITING


async def test_a_throttled_address_does_not_lock_out_another_or_proven_logins(
    argon2_spy: Argon2Spy,
) -> None:
    """By address (`source`): a flooding address is throttled, another address's operator
    gets in at once; the flooder's unproven credentials are refused unverified whatever the
    user name, its proven ones pass; very many failures for any users throttle the address."""
    auth = ConsoleAuth(CONSOLE_USER, console_hash())
    right = basic()["Authorization"]
    flooder, operator = "203.0.113.9", "198.51.100.7"

    def guess(user: str, password: str) -> str:
        return basic(user, password)["Authorization"]

    try:
        for i in range(THROTTLE_FAILURES):
            assert await auth.check(guess(CONSOLE_USER, f"g{i}"), flooder) is None
        runs = argon2_spy.runs
        assert runs == THROTTLE_FAILURES
        assert await auth.check(right, flooder) is None  # unproven: refused unverified
        assert argon2_spy.runs == runs
        flood = [
            asyncio.ensure_future(auth.check(guess(CONSOLE_USER, f"h{i}"), flooder))
            for i in range(50)
        ]
        started = time.perf_counter()
        login = await auth.check(right, operator)
        assert time.perf_counter() - started < 1.0
        assert login is not None
        assert await asyncio.gather(*flood) == [None] * 50
        assert argon2_spy.runs == runs + 1  # the operator's only
        assert await auth.check(right, flooder) == login  # proven now: passes when throttled
        assert argon2_spy.runs == runs + 1

        # Any user names from one address: a repeated refusal counts without argon2, and
        # past THROTTLE_ADDRESS_FAILURES a new name (existing or not) is not verified.
        other = "192.0.2.1"
        users = [f"nobody{i}" for i in range(THROTTLE_ADDRESS_FAILURES // THROTTLE_FAILURES)]
        runs = argon2_spy.runs
        for name in users:
            for _ in range(THROTTLE_FAILURES):
                assert await auth.check(guess(name, "wrong"), other) is None
        assert argon2_spy.runs == runs + len(users)  # one per name, the repeats free
        assert await auth.check(guess("someone-else", "pw"), other) is None
        assert await auth.check(guess(CONSOLE_USER, "pw"), other) is None
        assert argon2_spy.runs == runs + len(users)
        assert await auth.check(right, other) == login  # proven
    finally:
        auth.close()
