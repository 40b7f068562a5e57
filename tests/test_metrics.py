"""Every metric family of bc_proxy/metrics.py moves when its behaviour happens, series exist from
the first scrape, and no label value is ever a phone number or a message id."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from bc_proxy import __version__
from bc_proxy.backlog import refresh_gauges
from bc_proxy.metrics import (
    LEGACY_ROUTES,
    NO_TENANT,
    PUSH_OUTCOMES,
    RECORD_KINDS,
    REPEAT_STATES,
    SETTLE_OUTCOMES,
    TOKEN_OUTCOMES,
    UPSTREAM_OPERATIONS,
    WEBHOOK_OUTCOMES,
    WEBHOOK_TYPES,
    Metrics,
)
from bc_proxy.recovery import sweep_tenant
from tests.conftest import (
    WEBHOOK_SECRET,
    AiohttpServer,
    Connexus,
    GatewayClient,
    GatewayFactory,
    creds,
    with_tenant,
)

OUT = "/api/1/sms/out"
HOOK = f"/webhooks/connexus/{WEBHOOK_SECRET}"
PHONE_A = "64211110001"
PHONE_B = "64211110002"
PHONE_C = "64211110003"
HANDSET = "64277770004"
FAMILIES = {
    "bc_proxy_legacy_requests",
    "bc_proxy_legacy_request_duration_seconds",
    "bc_proxy_upstream_requests",
    "bc_proxy_upstream_request_duration_seconds",
    "bc_proxy_token_refreshes",
    "bc_proxy_token_expiry_timestamp_seconds",
    "bc_proxy_token_failing",
    "bc_proxy_build_info",
    "bc_proxy_legacy_poll_wait_seconds",
    "bc_proxy_webhooks",
    "bc_proxy_records_waiting",
    "bc_proxy_records_oldest_age_seconds",
    "bc_proxy_push_attempts",
    "bc_proxy_dead_letters",
    "bc_proxy_messages_sent",
    "bc_proxy_recipients_sent",
    "bc_proxy_recipients_rejected",
    "bc_proxy_recovered_messages",
}


def value(m: Metrics, name: str, **labels: str) -> float:
    """A sample's value; the series must exist (every family here is pre-initialised or hit)."""
    got = m.registry.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return got


def maybe(m: Metrics, name: str, **labels: str) -> float:
    """A sample's value, 0 when the series was never created."""
    return m.registry.get_sample_value(name, labels) or 0.0


def legacy(m: Metrics, tenant: str, status: str, route: str = OUT) -> float:
    return value(m, "bc_proxy_legacy_requests_total", route=route, tenant=tenant, status=status)


def upstream(m: Metrics, operation: str, status: str) -> float:
    return maybe(m, "bc_proxy_upstream_requests_total", operation=operation, status=status)


def upstream_count(m: Metrics, operation: str) -> float:
    return value(m, "bc_proxy_upstream_request_duration_seconds_count", operation=operation)


async def send(client: GatewayClient, to: str, body: str = "hello", **extra: str) -> int:
    resp = await client.post(OUT, data=creds(to=to, body=body, **extra))
    await resp.read()
    return resp.status


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `check()` holds (background workers move some samples)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def refreshed(app: web.Application, check: Callable[[], bool]) -> None:
    """Refresh the backlog gauges until `check()` holds."""
    deadline = time.monotonic() + 5.0
    await refresh_gauges(app)
    while not check():
        assert time.monotonic() < deadline, "gauges did not settle"
        await asyncio.sleep(0.02)
        await refresh_gauges(app)


def _quiet(cfg: dict[str, Any]) -> dict[str, Any]:
    """No periodic mo/query sweep, so only the test moves the mo_query samples."""
    out = dict(cfg)
    out["upstream"] = {**cfg["upstream"], "mo_query_interval_seconds": 0}
    return out


async def test_first_scrape_has_every_family_and_zero_series(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A fresh app's /metrics parses, holds every family, and pre-creates per-tenant series at 0."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) >= FAMILIES
    assert "process_cpu_seconds_total" in text  # the default process metrics are there too

    def sample(family: str, name: str, **labels: str) -> float:
        found = [s.value for s in families[family].samples if s.name == name and s.labels == labels]
        assert found == [0.0], f"{name}{labels}: {found}"
        return found[0]

    for route in LEGACY_ROUTES:
        for tenant in ("acme", NO_TENANT):
            for status in ("200", "204", "401", "500"):
                sample(
                    "bc_proxy_legacy_requests",
                    "bc_proxy_legacy_requests_total",
                    route=route,
                    tenant=tenant,
                    status=status,
                )
        family = (
            "bc_proxy_legacy_poll_wait_seconds"
            if route in ("/api/1/sms/in", "/api/1/sms/status")
            else "bc_proxy_legacy_request_duration_seconds"
        )
        sample(family, family + "_count", route=route)
    for outcome in TOKEN_OUTCOMES:
        sample(
            "bc_proxy_token_refreshes",
            "bc_proxy_token_refreshes_total",
            tenant="acme",
            outcome=outcome,
        )
    sample(
        "bc_proxy_token_expiry_timestamp_seconds",
        "bc_proxy_token_expiry_timestamp_seconds",
        tenant="acme",
    )
    for wtype in WEBHOOK_TYPES:
        for w_outcome in WEBHOOK_OUTCOMES:
            sample("bc_proxy_webhooks", "bc_proxy_webhooks_total", type=wtype, outcome=w_outcome)
    for kind in RECORD_KINDS:
        sample("bc_proxy_records_waiting", "bc_proxy_records_waiting", tenant="acme", kind=kind)
        sample(
            "bc_proxy_records_oldest_age_seconds",
            "bc_proxy_records_oldest_age_seconds",
            tenant="acme",
            kind=kind,
        )
        for p_outcome in PUSH_OUTCOMES:
            sample(
                "bc_proxy_push_attempts",
                "bc_proxy_push_attempts_total",
                tenant="acme",
                kind=kind,
                outcome=p_outcome,
            )
    sample("bc_proxy_dead_letters", "bc_proxy_dead_letters")
    for family in ("messages_sent", "recipients_sent", "recipients_rejected"):
        sample(f"bc_proxy_{family}", f"bc_proxy_{family}_total", tenant="acme")
    sample("bc_proxy_recovered_messages", "bc_proxy_recovered_messages_total")


async def test_legacy_requests_counted_by_route_tenant_and_status(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A 204 send counts for acme, a bad password counts 401 for "-", a 400 stays with acme."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    assert await send(client, PHONE_A) == 204
    assert legacy(m, "acme", "204") == 1
    resp = await client.post(OUT, data={"userId": "acme-legacy", "password": "nope", "to": PHONE_A})
    assert resp.status == 401
    assert legacy(m, NO_TENANT, "401") == 1
    assert legacy(m, "acme", "401") == 0
    resp = await client.post(OUT, data=creds(to=PHONE_A))  # no body
    assert resp.status == 400
    assert legacy(m, "acme", "400") == 1
    resp = await client.get("/api/1/sms/queue", params=creds())
    assert resp.status == 200
    assert legacy(m, "acme", "200", route="/api/1/sms/queue") == 1
    count = "bc_proxy_legacy_request_duration_seconds_count"
    assert value(m, count, route=OUT) == 3
    assert value(m, count, route="/api/1/sms/queue") == 1
    assert value(m, "bc_proxy_legacy_request_duration_seconds_sum", route=OUT) > 0
    # Non-legacy paths (404s, /metrics, /healthz) never become route labels.
    assert (await client.get("/api/1/sms/nope")).status == 404
    assert (await client.get("/healthz")).status == 200
    routes = {
        s.labels["route"]
        for fam in m.registry.collect()
        if fam.name == "bc_proxy_legacy_requests"
        for s in fam.samples
    }
    assert routes == set(LEGACY_ROUTES)


async def test_upstream_requests_by_operation_and_status(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Token, single and bulk sms/out and an upstream 500 are counted by operation and status."""
    m = Metrics()
    client = await gateway(_quiet(cfg), metrics=m)
    assert await send(client, PHONE_A) == 204
    assert upstream(m, "token", "200") == 1
    assert upstream(m, "sms_out", "200") == 1
    assert await send(client, f"{PHONE_A},{PHONE_B}") == 204
    assert upstream(m, "sms_out_bulk", "200") == 1
    assert upstream(m, "sms_out", "200") == 1
    connexus.emu.fail_next = [500]
    assert await send(client, PHONE_C) == 500
    assert upstream(m, "sms_out", "500") == 1
    assert legacy(m, "acme", "500") == 1
    assert upstream_count(m, "token") == 1
    assert upstream_count(m, "sms_out") == 2
    assert upstream_count(m, "sms_out_bulk") == 1
    assert upstream_count(m, "mo_query") == 0
    assert value(m, "bc_proxy_upstream_request_duration_seconds_sum", operation="sms_out") > 0


async def test_forced_token_refresh_counts_success_and_sets_expiry(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A revoked token makes the next send refresh once; both fetches count as successes."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    assert value(m, "bc_proxy_token_expiry_timestamp_seconds", tenant="acme") == 0
    assert await send(client, PHONE_A) == 204
    assert value(m, "bc_proxy_token_refreshes_total", tenant="acme", outcome="success") == 1
    expiry = value(m, "bc_proxy_token_expiry_timestamp_seconds", tenant="acme")
    assert time.time() + 86000 < expiry <= time.time() + connexus.emu.token_ttl + 1
    connexus.emu.revoke_tokens()
    assert await send(client, PHONE_B) == 204
    assert connexus.emu.token_requests == 2
    assert value(m, "bc_proxy_token_refreshes_total", tenant="acme", outcome="success") == 2
    assert value(m, "bc_proxy_token_refreshes_total", tenant="acme", outcome="failure") == 0
    assert upstream(m, "token", "200") == 2
    assert upstream(m, "sms_out", "200") == 2  # the 401 was retried inside one call
    assert value(m, "bc_proxy_token_expiry_timestamp_seconds", tenant="acme") > 0


@pytest.mark.parametrize("cause", ["token_endpoint_500", "wrong_client_secret"])
async def test_failed_token_fetch_counts_failure(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any], cause: str
) -> None:
    """A token endpoint outage or a wrong client secret counts one failed refresh and no token."""
    m = Metrics()
    if cause == "wrong_client_secret":
        tenant = cfg["tenants"][0]
        cfg = with_tenant(cfg, connexus={**tenant["connexus"], "client_secret": "csk_wrong"})
        status = "401"
    else:
        connexus.emu.fail_token_next = [500] * 10
        status = "500"
    client = await gateway(cfg, metrics=m)
    assert await send(client, PHONE_A) == 500
    assert value(m, "bc_proxy_token_refreshes_total", tenant="acme", outcome="failure") == 1
    assert value(m, "bc_proxy_token_refreshes_total", tenant="acme", outcome="success") == 0
    assert upstream(m, "token", status) >= 1
    assert value(m, "bc_proxy_token_expiry_timestamp_seconds", tenant="acme") == 0
    assert connexus.emu.sms_out_requests() == []


async def test_webhooks_counted_by_type_and_outcome(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Stored, duplicate, unmatched and rejected webhooks each move their own series."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    emu = connexus.emu
    emu.webhook_url = str(client.make_url(HOOK))

    def hooks(wtype: str, outcome: str) -> float:
        return value(m, "bc_proxy_webhooks_total", type=wtype, outcome=outcome)

    mo = await emu.fire_mo(f"+{HANDSET}", "552", "hi there")
    assert hooks("mo", "stored") == 1
    resp = await client.post(HOOK, json=mo)  # Connexus retrying the same event
    assert resp.status == 200
    assert hooks("mo", "duplicate") == 1
    assert hooks("mo", "stored") == 1
    assert await send(client, PHONE_A) == 204
    await emu.fire_dlr(emu.sent[-1].message_id, 1)
    assert hooks("dlr", "stored") == 1
    await emu.fire_dlr("999999999", 1)  # no send known for it
    assert hooks("dlr", "unmatched") == 1
    resp = await client.post("/webhooks/connexus/not-the-secret", json=mo)
    assert resp.status == 401
    resp = await client.post(HOOK, data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert hooks("unknown", "rejected") == 2
    assert hooks("mo", "rejected") == 0


async def test_records_waiting_and_oldest_age_gauges(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """refresh_gauges reports waiting records per kind and the oldest one's age, 0 when drained."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    app = client.app
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    await connexus.emu.fire_mo(HANDSET, "552", "first")
    await connexus.emu.fire_mo(HANDSET, "552", "second")
    await asyncio.sleep(0.2)
    await refresh_gauges(app)

    def waiting(kind: str) -> float:
        return value(m, "bc_proxy_records_waiting", tenant="acme", kind=kind)

    def age(kind: str) -> float:
        return value(m, "bc_proxy_records_oldest_age_seconds", tenant="acme", kind=kind)

    assert waiting("in") == 2
    assert waiting("status") == 0
    assert 0.2 <= age("in") < 30
    assert age("status") == 0
    resp = await client.get("/api/1/sms/in", params=creds())
    assert resp.status == 200
    assert "body=first" in await resp.text()
    await refreshed(app, lambda: waiting("in") == 1)  # the ack lands just after the answer
    resp = await client.get("/api/1/sms/in", params=creds())
    assert resp.status == 200
    assert "body=second" in await resp.text()
    await refreshed(app, lambda: waiting("in") == 0)
    assert age("in") == 0
    assert value(m, "bc_proxy_dead_letters") == 0


@dataclass
class Receiver:
    """A legacy push receiver: /ok answers 200, /fail answers 500; bodies are recorded."""

    server: TestServer
    got: list[tuple[str, str]]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> Receiver:
    """A real receiver server for the tenant's push URLs."""
    got: list[tuple[str, str]] = []

    async def ok(request: web.Request) -> web.Response:
        got.append(("ok", await request.text()))
        return web.Response(text="thanks")

    async def fail(request: web.Request) -> web.Response:
        got.append(("fail", await request.text()))
        return web.Response(status=500, text="down")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/fail", fail)
    return Receiver(await aiohttp_server(app, host="127.0.0.1"), got)


async def test_push_attempts_dead_letters_and_recipient_counts(
    connexus: Connexus,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
    receiver: Receiver,
) -> None:
    """Pushes count success and failure; one past its deadline counts dead and fills the gauge."""
    push = {
        "incoming_url": receiver.url("/ok"),
        "status_url": receiver.url("/fail"),
        "max_age_hours": 0.0002,  # 0.72 s: a failing push becomes a dead letter quickly
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.1,
        "timeout_seconds": 2,
    }
    m = Metrics()
    client = await gateway(with_tenant(cfg, push=push), metrics=m)
    connexus.emu.webhook_url = str(client.make_url(HOOK))
    connexus.emu.reject = {PHONE_B: "Invalid number"}

    def pushes(kind: str, outcome: str) -> float:
        return value(m, "bc_proxy_push_attempts_total", tenant="acme", kind=kind, outcome=outcome)

    # PHONE_B is rejected: its NUR status record is pushed to the failing URL.
    assert await send(client, f"{PHONE_A},{PHONE_B}", messageId="legacy-1") == 204
    assert value(m, "bc_proxy_messages_sent_total", tenant="acme") == 1
    assert value(m, "bc_proxy_recipients_sent_total", tenant="acme") == 1
    assert value(m, "bc_proxy_recipients_rejected_total", tenant="acme") == 1
    await connexus.emu.fire_mo(HANDSET, "552", "pushed in")
    await eventually(lambda: pushes("in", "success") == 1 and pushes("status", "dead") == 1)
    assert pushes("status", "failure") >= 1
    assert pushes("status", "success") == 0
    assert pushes("in", "failure") == 0
    # the counter moves just before the store commits the dead letter
    await refreshed(client.app, lambda: value(m, "bc_proxy_dead_letters") == 1)
    assert any(p == "ok" and "body=pushed+in" in b for p, b in receiver.got)
    assert any(p == "fail" and "statusCode=NUR" in b for p, b in receiver.got)


async def test_messages_and_recipients_sent_and_rejected(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """Accepted calls and recipients count per tenant; rejected ones and failed calls do not."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    connexus.emu.reject = {PHONE_C: "Blacklisted"}
    assert await send(client, PHONE_A) == 204
    assert await send(client, f"{PHONE_A} {PHONE_B};{PHONE_C}") == 204
    assert await send(client, PHONE_C) == 204  # one recipient, rejected: still 204
    connexus.emu.fail_next = [503]
    assert await send(client, PHONE_B) == 500
    assert value(m, "bc_proxy_messages_sent_total", tenant="acme") == 3
    assert value(m, "bc_proxy_recipients_sent_total", tenant="acme") == 3
    assert value(m, "bc_proxy_recipients_rejected_total", tenant="acme") == 2


async def test_recovered_messages_counted_once(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A message only mo/query knows is recovered once and counted once; mo_query is counted."""
    m = Metrics()
    client = await gateway(_quiet(cfg), metrics=m)
    app = client.app
    await connexus.emu.fire_mo(HANDSET, "552", "missed webhook", deliver=False)
    assert await sweep_tenant(app, "acme") == 1
    assert value(m, "bc_proxy_recovered_messages_total") == 1
    assert upstream(m, "mo_query", "200") == 1
    assert await sweep_tenant(app, "acme") == 0
    assert value(m, "bc_proxy_recovered_messages_total") == 1
    assert upstream(m, "mo_query", "200") == 2
    assert upstream_count(m, "mo_query") == 2
    await refresh_gauges(app)
    assert value(m, "bc_proxy_records_waiting", tenant="acme", kind="in") == 1


_BOUNDED: dict[str, Callable[[str], bool]] = {
    "route": lambda v: v in LEGACY_ROUTES,
    "tenant": lambda v: v in ("acme", NO_TENANT),
    "status": lambda v: re.fullmatch(r"[1-5]\d\d|timeout|error", v) is not None,
    "operation": lambda v: v in UPSTREAM_OPERATIONS,
    "outcome": lambda v: v
    in (
        *TOKEN_OUTCOMES,
        *WEBHOOK_OUTCOMES,
        *PUSH_OUTCOMES,
        *SETTLE_OUTCOMES,
        "throttled",
        "ok",
        "error",
    ),
    "state": lambda v: v in REPEAT_STATES,
    "job": lambda v: re.fullmatch(r"[a-z_]+", v) is not None,
    "reason": lambda v: re.fullmatch(r"[a-z_]+", v) is not None,
    "path": lambda v: re.fullmatch(r"[a-z_/]+", v) is not None,
    "source": lambda v: v in ("mo_query", "sms_in", "sms_status"),
    "version": lambda v: v == __version__,
    "python_version": lambda v: re.fullmatch(r"3\.\d+\.\d+\S*", v) is not None,
    "aiohttp_version": lambda v: re.fullmatch(r"3\.\d+\.\d+\S*", v) is not None,
    "type": lambda v: v in WEBHOOK_TYPES,
    "kind": lambda v: v in RECORD_KINDS,
    "le": lambda v: re.fullmatch(r"[0-9.e+-]+|\+Inf", v) is not None,
}


async def _busy_run(connexus: Connexus, client: GatewayClient) -> list[str]:
    """Sends, webhooks, polls and failures; returns every number and id that went by."""
    emu = connexus.emu
    emu.webhook_url = str(client.make_url(HOOK))
    emu.reject = {PHONE_C: "Invalid number"}
    assert await send(client, PHONE_A, messageId="legacy-msg-77") == 204
    assert await send(client, f"{PHONE_B},{PHONE_C}", messageId="legacy-msg-78") == 204
    emu.fail_next = [500]
    assert await send(client, PHONE_A, messageId="legacy-msg-79") == 500
    mo = await emu.fire_mo(HANDSET, "552", "reply", related_message_id=emu.sent[0].message_id)
    await emu.fire_dlr(emu.sent[0].message_id, 1)
    await emu.fire_dlr("4242424242", 2)
    await emu.fire_mo(HANDSET, "2190", "to the second sender")
    for path in ("/api/1/sms/in", "/api/1/sms/status", "/api/1/sms/status"):
        resp = await client.get(path, params=creds())
        await resp.read()
    await sweep_tenant(client.app, "acme")
    await refresh_gauges(client.app)
    ids = [s.message_id for s in emu.sent if s.message_id]
    ids += [s.upstream_message_id for s in emu.sent if s.upstream_message_id]
    ids += [str(x["messageId"]) for x in emu.mo]
    ids += ["legacy-msg-77", "legacy-msg-78", "legacy-msg-79", "4242424242", mo["messageId"]]
    return [PHONE_A, PHONE_B, PHONE_C, HANDSET, *ids]


async def test_no_label_value_is_a_phone_number_or_message_id(
    connexus: Connexus, gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """After a busy run every label value is from a bounded set, in the registry and on /metrics."""
    m = Metrics()
    client = await gateway(_quiet(cfg), metrics=m)
    forbidden = await _busy_run(connexus, client)
    seen: set[tuple[str, str]] = set()
    for fam in m.registry.collect():
        if not fam.name.startswith("bc_proxy_"):
            continue
        for s in fam.samples:
            seen.update(s.labels.items())
    resp = await client.get("/metrics")
    text = await resp.text()
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("bc_proxy_"):
            for s in fam.samples:
                seen.update(s.labels.items())
    assert seen, "no labelled samples at all"
    for name, label in seen:
        assert name in _BOUNDED, f"unexpected label {name}={label!r}"
        assert _BOUNDED[name](label), f"unbounded label value {name}={label!r}"
        for bad in forbidden:
            if len(bad) >= 3:
                assert bad not in label, f"{name}={label!r} carries {bad!r}"
    for bad in forbidden:
        if len(bad) >= 4:
            assert f'"{bad}"' not in text
    assert value(m, "bc_proxy_webhooks_total", type="mo", outcome="stored") == 2
    assert value(m, "bc_proxy_legacy_requests_total", route=OUT, tenant="acme", status="500") == 1


# Families driven by the tests of their own feature (file named beside each).
TESTED_ELSEWHERE = {
    "bc_proxy_auth_refusals",  # test_hardening.py
    "bc_proxy_background_errors",  # test_sweep.py / jobs
    "bc_proxy_passthrough_requests",  # test_passthrough.py
    "bc_proxy_pulled_records",  # test_pull.py
    "bc_proxy_pulls",  # test_pull.py
    "bc_proxy_recipients_blocked",  # test_optout.py
    "bc_proxy_recipients_unknown",  # test_send_failures.py
    "bc_proxy_records_unconfigured_tenant",  # test_backlog.py
    "bc_proxy_send_repeats",  # test_idempotency.py
    "bc_proxy_sends_rate_limited",  # rate limiter tests
    "bc_proxy_settles_deferred",  # test_faults.py
    "bc_proxy_webhook_registrations",  # test_registration.py
    "bc_proxy_webhooks_refused",  # webhook hardening tests
    "bc_proxy_webhooks_rejected",  # test_webhook_payloads.py
}


def test_metric_families_are_all_covered() -> None:
    """Metrics registers exactly the families this module or a named test drives."""
    names = {fam.name for fam in Metrics(process=False).registry.collect()}
    assert names == FAMILIES | TESTED_ELSEWHERE


async def test_no_created_series_and_build_info(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """/metrics holds no `_created` series and one bc_proxy_build_info sample at 1."""
    m = Metrics()
    client = await gateway(cfg, metrics=m)
    text = await (await client.get("/metrics")).text()
    assert "_created" not in text
    build = [
        s
        for fam in text_string_to_metric_families(text)
        if fam.name == "bc_proxy_build_info"
        for s in fam.samples
    ]
    assert len(build) == 1
    assert build[0].value == 1
    assert build[0].labels["version"] == __version__


async def test_long_poll_wait_has_its_own_histogram(
    gateway: GatewayFactory, cfg: dict[str, Any]
) -> None:
    """A long-poll's wait lands in bc_proxy_legacy_poll_wait_seconds (buckets to 300 s), not in
    the request-duration histogram that send latency alerts read."""
    m = Metrics()
    waiting = with_tenant(cfg, poll_wait_seconds=0.3)
    client = await gateway(waiting, metrics=m)
    resp = await client.get("/api/1/sms/in", params=creds())
    assert resp.status == 204
    assert value(m, "bc_proxy_legacy_poll_wait_seconds_count", route="/api/1/sms/in") == 1
    assert value(m, "bc_proxy_legacy_poll_wait_seconds_sum", route="/api/1/sms/in") >= 0.29
    assert value(
        m, "bc_proxy_legacy_poll_wait_seconds_bucket", route="/api/1/sms/in", le="300.0"
    ) == 1
    assert maybe(m, "bc_proxy_legacy_request_duration_seconds_count", route="/api/1/sms/in") == 0


def test_loop_families_render_as_prometheus_client_does() -> None:
    """The hot-path families (bc_proxy/loop_metrics.py) give the exposition text, in both
    formats, that prometheus-client's own Counter and Histogram give for the same updates:
    a value on a bucket bound counts in that bucket, one above the last bound in +Inf."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Histogram,
        disable_created_metrics,
        generate_latest,
    )
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    from bc_proxy.loop_metrics import LoopCounter, LoopHistogram

    disable_created_metrics()  # type: ignore[no-untyped-call]  # as Metrics() does
    buckets = (0.0005, 0.001, 0.25, 1.0, 30.0)
    ours, theirs = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    counters = (
        LoopCounter("x_requests_total", "Requests.", ["route", "status"], ours),
        Counter("x_requests_total", "Requests.", ["route", "status"], registry=theirs),
    )
    histograms = (
        LoopHistogram("x_seconds", "Durations.", ["route"], ours, buckets),
        Histogram("x_seconds", "Durations.", ["route"], buckets=buckets, registry=theirs),
    )
    for counter in counters:
        counter.labels(status="401", route="/c").inc()
        counter.labels("/a", 204).inc()
        counter.labels("/a", "204").inc(2.5)
        counter.labels("/b", "401")  # a series created at 0
        # Values equal as Python values name different series by their text, as theirs do.
        counter.labels("/t", 1).inc()
        counter.labels("/t", True).inc()
        counter.labels("/t", 200).inc()
        counter.labels("/t", 200.0).inc()
    for histogram in histograms:
        histogram.labels("/b")
        for amount in (0.0, 0.0005, 0.0007, 0.25, 29.0, 30.0, 31.0, 1e6):
            histogram.labels("/a").observe(amount)
        histogram.labels(route="/nan").observe(float("nan"))  # in no bucket, NaN sum
    assert generate_latest(ours) == generate_latest(theirs)
    assert openmetrics(ours) == openmetrics(theirs)  # type: ignore[no-untyped-call]
    text = generate_latest(ours).decode()
    assert 'x_seconds_bucket{le="0.0005",route="/a"} 2.0' in text
    assert 'x_seconds_bucket{le="+Inf",route="/a"} 8.0' in text
    assert 'x_requests_total{route="/a",status="204"} 3.5' in text
    with pytest.raises(ValueError, match="label count"):
        counters[0].labels("/a")
    with pytest.raises(ValueError, match="non-negative"):
        counters[0].labels("/a", "204").inc(-1)
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # registered like theirs
        LoopCounter("x_requests_total", "Again.", ["route"], ours)
