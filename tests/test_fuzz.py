"""Hypothesis fuzzing (fixed seed) of the legacy and webhook endpoints of the real app on
127.0.0.1 with a real SQLite store; invariants after every case (see docs/reliability.md). One
event loop is driven by hand; BC_PROXY_FUZZ_CASES raises the case count (default 10,000).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bc_proxy import keys
from bc_proxy.app import create_app
from bc_proxy.config import parse
from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from bc_proxy.metrics import Metrics
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEGACY_PASSWORD,
    LEGACY_USER,
    WEBHOOK_SECRET,
    config_dict,
)

TOTAL = int(os.environ.get("BC_PROXY_FUZZ_CASES", "10000"))
LEGACY_CASES = TOTAL * 7 // 10
WEBHOOK_CASES = TOTAL - LEGACY_CASES
SECRETS = (LEGACY_PASSWORD, CLIENT_SECRET, WEBHOOK_SECRET)
IN_KEYS = {"messageId", "from", "to", "body", "rateCode", "inReplyToId"}
STATUS_KEYS = {"messageId", "from", "to", "statusCode", "inReplyToId", "error"}
QUEUE = re.compile(rb"inCount=(\d+)&statusCount=(\d+)")
HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"


def fuzz(cases: int) -> settings:
    """Fixed seed (derandomize), no example database, no deadline: the same cases every run.
    No shrinking: the rig keeps state across cases, so a failure is reported as it happened."""
    return settings(
        max_examples=cases,
        phases=(Phase.explicit, Phase.generate),
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Rig:
    """The gateway, the emulator and the model, on one hand-driven loop."""

    loop: asyncio.AbstractEventLoop
    base: str
    good: aiohttp.ClientSession  # from 127.0.0.1
    bad: aiohttp.ClientSession  # wrong credentials, from 127.0.0.2 (its own login throttle)
    emu: Emulator
    runners: list[web.AppRunner]
    app: web.Application
    model: dict[str, int] = field(default_factory=lambda: {"in": 0, "status": 0})
    handed: set[str] = field(default_factory=set)
    seen_mo: set[str] = field(default_factory=set)
    cases: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "route status" -> count
    started: float = field(default_factory=time.perf_counter)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


async def _start(tmp: Path) -> Rig:
    emu = Emulator(clients={CLIENT_ID: CLIENT_SECRET})
    emu_runner = web.AppRunner(create_emulator_app(emu), access_log=None)
    await emu_runner.setup()
    emu_site = web.TCPSite(emu_runner, "127.0.0.1", 0)
    await emu_site.start()
    port = emu_runner.addresses[0][1]
    cfg = config_dict(tmp, f"http://127.0.0.1:{port}/api/connexus")
    cfg["upstream"]["mo_query_interval_seconds"] = 0
    cfg["log"] = {"requests": False, "level": "error"}
    cfg["tenants"][0]["opt_out"] = False  # STOP bodies would block handsets: not modelled
    app = create_app(parse(cfg), metrics=Metrics(process=False))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    gw_port = runner.addresses[0][1]
    good = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    bad = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1, local_addr=("127.0.0.2", 0))
    )
    loop = asyncio.get_running_loop()
    return Rig(loop, f"http://127.0.0.1:{gw_port}", good, bad, emu, [runner, emu_runner], app)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Gateway + emulator on loopback, a fresh SQLite store; torn down after the test."""
    loop = asyncio.new_event_loop()
    r = loop.run_until_complete(_start(tmp_path))
    try:
        yield r
    finally:
        for s in (r.good, r.bad):
            loop.run_until_complete(s.close())
        for runner in r.runners:
            loop.run_until_complete(runner.cleanup())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- cases: hypothesis draws (choices, bytes) pairs, decoded into requests --------------------
#
# Drawing an integer of choices and a byte string per case, in batches of BATCH, keeps
# hypothesis's own cost near 1 ms a case (builds of text and dictionaries cost 6-9 ms); the
# bytes are decoded into parameters, raw bodies and JSON, so hypothesis still steers content.

BATCH = 10
DRAW = st.tuples(st.integers(0, 2**48), st.binary(max_size=120))
CASES = st.lists(DRAW, min_size=BATCH, max_size=BATCH)
ROUTES = ("out", "test", "in", "status", "queue")
METHODS = ("GET", "POST", "GET", "POST", "POST", "GET", "POST", "other")
OTHER_METHODS = ("PUT", "DELETE", "HEAD", "PATCH")
AUTHS = ("query", "form", "basic", "query", "form", "basic", "wrong", "none", "garbage_basic")
ENCODINGS = ("form", "multipart", "query", "raw", "json", "form_charset")
CTYPES = ("", "text/plain", "application/json", "a/b/c", "multipart/form-data",
          "application/x-www-form-urlencoded; charset=latin-1")  # fmt: skip
FAILS = (None, None, None, 500, 503, 400)
KEYS = ("to", "body", "messageId", "from", "rateCode", "contentType", "fragmentationLimit",
        "schedule", "userId", "password", "x", "")  # fmt: skip
NASTY = ("", "\x00", "a\x01b", "%", "%zz", "%00", "+", "&", "=", "\r\n", "é", "💥", "a" * 200,
         "6421000900", "+6421000901", "6421000902,6421000903", "552", "x" * 37, "3", "4",
         "6421000900 6421000901")  # fmt: skip


class Choices:
    """Successive small choices taken from one integer."""

    def __init__(self, n: int) -> None:
        self.n = n

    def pick(self, options: tuple[Any, ...]) -> Any:
        self.n, i = divmod(self.n, len(options))
        return options[i]


def decode_params(blob: bytes, valid_send: bool) -> dict[str, str]:
    """Parameters from bytes: chunks split at 0xff, first byte a key, the rest its value (a
    NASTY value when the first byte's high bit is set); a valid to/body first if asked."""
    params = {"to": "6421000900", "body": "fuzz"} if valid_send else {}
    for chunk in blob.split(b"\xff")[:6]:
        if not chunk:
            continue
        key = KEYS[chunk[0] % len(KEYS)]
        if chunk[0] & 0x80:
            value = NASTY[chunk[0] % len(NASTY)]
        else:
            value = chunk[1:].decode("utf-8", "replace")
        params[key] = value
    return params


def decode_json(blob: bytes) -> Any:
    """A JSON value from bytes (a tag byte, then content), nested at most 3 deep."""
    pos = 0

    def take(depth: int) -> Any:
        nonlocal pos
        if pos >= len(blob):
            return None
        tag = blob[pos]
        pos += 1
        kind = tag % 9 if depth < 3 else tag % 7
        if kind == 0:
            return None
        if kind == 1:
            return bool(tag & 0x10)
        if kind in (2, 3):
            raw = blob[pos : pos + 4]
            pos += 4
            n = int.from_bytes(raw, "big", signed=True)
            return n if kind == 2 else n / 7.0
        if kind in (4, 5, 6):
            size = tag >> 4
            raw = blob[pos : pos + size]
            pos += size
            return raw.decode("utf-8", "replace")
        size = (tag >> 4) % 4
        if kind == 7:
            return [take(depth + 1) for _ in range(size)]
        return {str(take(depth + 1)): take(depth + 1) for _ in range(size)}

    return take(0)


@dataclass
class LegacyCase:
    route: str
    method: str
    auth: str
    encoding: str
    params: dict[str, str]
    raw: bytes
    ctype: str
    upstream_fail: int | None


def legacy_of(n: int, blob: bytes) -> LegacyCase:
    """The legacy request a draw stands for."""
    c = Choices(n)
    route, method = c.pick(ROUTES), c.pick(METHODS)
    if method == "other":  # one case in eight: a method the legacy API never had
        method = c.pick(OTHER_METHODS)
    return LegacyCase(
        route=route,
        method=method,
        auth=c.pick(AUTHS),
        encoding=c.pick(ENCODINGS),
        ctype=c.pick(CTYPES),
        upstream_fail=c.pick(FAILS),
        params=decode_params(blob, c.pick((True, False))),
        raw=blob,
    )


def _form(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())


def build(case: LegacyCase) -> tuple[str, dict[str, str], bytes | aiohttp.FormData | None]:
    """The request of a case: (path with query, headers, body)."""
    params = dict(case.params)
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    if case.auth in ("query", "form"):
        (query if case.auth == "query" else params).update(
            userId=LEGACY_USER, password=LEGACY_PASSWORD
        )
    elif case.auth == "basic":
        token = base64.b64encode(f"{LEGACY_USER}:{LEGACY_PASSWORD}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif case.auth == "wrong":
        params.update(userId=LEGACY_USER, password=LEGACY_PASSWORD + "x")
    elif case.auth == "garbage_basic":
        headers["Authorization"] = "Basic !!" + case.raw.hex()[:10]
    body: bytes | aiohttp.FormData | None = None
    if case.encoding == "query":
        query.update(params)
    elif case.encoding == "multipart":
        form = aiohttp.FormData()
        for k, v in params.items():
            form.add_field(k, v)
        body = form
    elif case.encoding == "raw":
        body = case.raw
        if case.ctype:
            headers["Content-Type"] = case.ctype
    elif case.encoding == "json":
        body = json.dumps(params).encode()
        headers["Content-Type"] = "application/json"
    else:
        body = _form(params).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded" + (
            "; charset=utf-8" if case.encoding == "form_charset" else ""
        )
    path = f"/api/1/sms/{case.route}"
    if query:
        path += "?" + _form(query)
    return path, headers, body


# -- invariants -------------------------------------------------------------------------------


def check_shape(route: str, status: int, ctype: str, body: bytes) -> None:
    """The answer is one of the legacy shapes, and carries no secret."""
    for secret in SECRETS:
        assert secret.encode() not in body, f"secret in answer: {body!r}"
    if status == 204:
        assert body == b""
    elif status == 200:
        assert ctype == "application/x-www-form-urlencoded", (status, ctype, body)
        if route == "queue":
            assert QUEUE.fullmatch(body), body
        else:
            keys = set(parse_qs(body.decode(), keep_blank_values=True))
            assert keys in (IN_KEYS, STATUS_KEYS), body
    else:
        assert status in (400, 401, 403, 404, 405, 408, 413, 429, 500), (status, body)
        assert len(body) <= 200, body
        assert body.rstrip(b"\n").count(b"\n") == 0, body
        assert ctype.startswith("text/plain"), (status, ctype)


async def queue_counts(r: Rig) -> tuple[int, int]:
    """The store's queue counts of tenant acme (what /queue answers), read in-process."""
    return await r.app[keys.STORE].queue_depth("acme")


async def settled(r: Rig, within: float = 2.0) -> None:
    """Wait (bounded) until the store's counts equal the model."""
    deadline = time.monotonic() + within
    while await queue_counts(r) != (r.model["in"], r.model["status"]):
        if time.monotonic() > deadline:
            return  # the caller's assertion reports it
        await asyncio.sleep(0.001)


async def legacy_case(r: Rig, case: LegacyCase) -> None:
    """Run one legacy case and check every invariant after it."""
    r.emu.fail_next = [case.upstream_fail] if case.upstream_fail else []
    path, headers, body = build(case)
    session = r.bad if case.auth == "wrong" else r.good
    async with session.request(case.method, r.base + path, headers=headers, data=body) as resp:
        raw = await resp.read()
        status, ctype = resp.status, resp.content_type
    r.answers[f"{case.route} {status}"] += 1
    # The case scripted an upstream 5xx and a send used it: design.md section 4 answers 500.
    used = case.route == "out" and bool(case.upstream_fail) and not r.emu.fail_next
    caused_500 = used and case.upstream_fail == 500  # 500: outcome unknown, an ERR record
    r.emu.fail_next = []
    assert status < 500 or (status == 500 and used and case.upstream_fail in (500, 503)), (
        status,
        raw,
        case,
    )
    if case.method != "HEAD":
        check_shape(case.route, status, ctype, raw)
    if status == 200 and case.route in ("in", "status"):
        record = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        receipt = f"{case.route}:{record['messageId']}"
        assert receipt not in r.handed, f"handed out twice: {record}"
        r.handed.add(receipt)
        r.model[case.route] -= 1
        await settled(r)  # the consume commits after the answer is acknowledged
    after = await queue_counts(r)
    if caused_500:  # an unknown outcome leaves one ERR status record per recipient
        assert after[0] == r.model["in"]
        assert after[1] >= r.model["status"]
        r.model["status"] = after[1]
    assert after == (r.model["in"], r.model["status"]), (case, status, raw)
    r.cases += 1


@pytest.mark.timeout(600)
def test_fuzz_legacy_endpoints(rig: Rig) -> None:
    """Fuzzed legacy requests (routes, methods, auth, encodings, parameters, upstream failures)
    keep every invariant, case after case."""
    # A few records to hand out, so polls have something to give (and could give twice).
    for i in range(40):
        rig.run(_mo(rig, f"seed-{i}", "hello"))

    async def batch(draws: list[tuple[int, bytes]]) -> None:
        for n, blob in draws:
            await legacy_case(rig, legacy_of(n, blob))

    @fuzz(LEGACY_CASES // BATCH)
    @given(CASES)
    def case(draws: list[tuple[int, bytes]]) -> None:
        rig.run(batch(draws))

    case()
    elapsed = time.perf_counter() - rig.started
    print(f"\nlegacy fuzz: {rig.cases} cases in {elapsed:.1f} s; {sorted(rig.answers.items())}")
    assert rig.cases >= LEGACY_CASES


# -- webhook -----------------------------------------------------------------------------------


async def _mo(r: Rig, message_id: str, text: str) -> int:
    payload = {"type": "mo", "messageId": message_id, "from": "+6421000950", "to": "552",
               "body": text, "timestamp": int(time.time())}  # fmt: skip
    async with r.good.post(r.base + HOOK, json=payload) as resp:
        await resp.read()
        if resp.status == 200 and message_id not in r.seen_mo:
            r.seen_mo.add(message_id)
            r.model["in"] += 1
        return resp.status


WEBHOOK_KINDS = ("valid_mo", "mutated", "json", "bytes", "dlr", "wrong_secret")
MO_FIELDS = ("type", "messageId", "from", "to", "body", "timestamp", "statusCode")


@dataclass
class WebhookCase:
    kind: str  # valid_mo, mutated, json, bytes, dlr, wrong_secret
    message_id: str
    text: str
    field_name: str
    value: Any
    raw: bytes


def webhook_of(n: int, blob: bytes) -> WebhookCase:
    """The webhook request a draw stands for."""
    c = Choices(n)
    head, _, tail = blob.partition(b"\xff")
    return WebhookCase(
        kind=c.pick(WEBHOOK_KINDS),
        message_id=c.pick(("dup-1", "dup-2", "")) or head[:20].decode("utf-8", "replace") or "x",
        text=tail[:40].decode("utf-8", "replace"),
        field_name=c.pick(MO_FIELDS),
        value=decode_json(tail),
        raw=blob,
    )


async def webhook_case(r: Rig, c: WebhookCase) -> None:
    """Run one webhook case and check every invariant after it."""
    payload: Any = {"type": "mo", "messageId": "m-" + c.message_id, "from": "+6421000951",
                    "to": "552", "body": c.text, "timestamp": int(time.time())}  # fmt: skip
    path = HOOK
    if c.kind == "valid_mo":  # ids of their own: a mutated payload never takes one
        status = await _mo(r, "v-" + c.message_id, c.text)
        r.answers[f"{c.kind} {status}"] += 1
        assert status in (200, 400), status  # 400: a body the strict checks refuse
        after = await queue_counts(r)
        assert after == (r.model["in"], r.model["status"])
        r.cases += 1
        return
    if c.kind == "mutated":
        payload[c.field_name] = c.value
    elif c.kind == "json":
        payload = c.value
    elif c.kind == "dlr":
        payload = {"type": "dlr", "messageId": c.message_id, "statusCode": c.value}
    elif c.kind == "wrong_secret":
        path = "/webhooks/connexus/" + quote(c.text or "x", safe="")
    data = c.raw if c.kind == "bytes" else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    async with r.good.post(r.base + path, data=data, headers=headers) as resp:
        body = await resp.read()
        status = resp.status
    for secret in SECRETS:
        assert secret.encode() not in body
    r.answers[f"{c.kind} {status}"] += 1
    assert status in (200, 400, 401, 404, 405), (status, body, c)
    if status != 404:
        assert json.loads(body)["success"] is (status == 200), body
    after = await queue_counts(r)
    # A mutation may still be a usable incoming SMS (one more record at most); a report may
    # match nothing pollable; anything refused stores nothing pollable.
    grew = after[0] - r.model["in"]
    assert after[1] == r.model["status"]
    assert grew == 0 or (grew == 1 and status == 200 and c.kind in ("mutated", "json")), (c, body)
    r.model["in"] = after[0]
    r.cases += 1


@pytest.mark.timeout(600)
def test_fuzz_webhook(rig: Rig) -> None:
    """Fuzzed webhook requests (valid, mutated, arbitrary JSON and bytes, reports, wrong
    secrets) keep every invariant; the queue then drains with no record handed out twice."""

    async def batch(draws: list[tuple[int, bytes]]) -> None:
        for n, blob in draws:
            await webhook_case(rig, webhook_of(n, blob))

    @fuzz(WEBHOOK_CASES // BATCH)
    @given(CASES)
    def case(draws: list[tuple[int, bytes]]) -> None:
        rig.run(batch(draws))

    case()
    elapsed = time.perf_counter() - rig.started
    print(f"\nwebhook fuzz: {rig.cases} cases in {elapsed:.1f} s; {sorted(rig.answers.items())}")
    assert rig.cases >= WEBHOOK_CASES
    waiting = rig.model["in"]

    async def drain() -> None:
        q = f"/api/1/sms/in?userId={LEGACY_USER}&password={LEGACY_PASSWORD}"
        for _ in range(waiting):
            async with rig.good.get(rig.base + q) as resp:
                assert resp.status == 200
                record = parse_qs((await resp.read()).decode(), keep_blank_values=True)
                receipt = record["messageId"][0]
                assert receipt not in rig.handed
                rig.handed.add(receipt)
        async with rig.good.get(rig.base + q) as resp:
            assert resp.status == 204

    rig.run(drain())
    assert rig.run(queue_counts(rig)) == (0, 0)
