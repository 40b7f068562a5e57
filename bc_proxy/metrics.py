"""Prometheus metrics: the metric families, their cached hot-path children, /metrics handler.

Owns metric names and label sets (all bounded: tenant names, route templates, status codes,
upstream operations, outcomes, record kinds). Metrics live in an injectable registry so tests
and several apps in one process never collide. Does not own any business logic.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from bc_proxy.loop_metrics import LoopCounter, LoopHistogram

LEGACY_ROUTES = (
    "/api/1/sms/out",
    "/api/1/sms/test",
    "/api/1/sms/in",
    "/api/1/sms/status",
    "/api/1/sms/queue",
)
UPSTREAM_OPERATIONS = (
    "token",
    "sms_out",
    "sms_out_bulk",
    "mo_query",
    "configure",
    "passthrough",
    "sms_in",
    "sms_status",
)
RECORD_KINDS = ("in", "status")
WEBHOOK_TYPES = ("mo", "dlr", "unknown")
WEBHOOK_OUTCOMES = ("stored", "duplicate", "unmatched", "ambiguous", "assigned", "rejected")
REPEAT_STATES = ("accepted", "unknown", "pending")
SETTLE_OUTCOMES = ("deferred", "recovered", "abandoned")
PUSH_OUTCOMES = ("success", "failure", "dead")
TOKEN_OUTCOMES = ("success", "failure")
NO_TENANT = "-"

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Long-polls wait up to poll_wait_seconds (at most 300): their own histogram, so the send
# latency histogram is not swamped by waits and the waits are not cut off at 30 s.
POLL_ROUTES = frozenset({"/api/1/sms/in", "/api/1/sms/status"})
_POLL_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """Every metric family of bc-proxy, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        # `_created` series double every counter and histogram for a value nobody charts.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._legacy_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._send_children: dict[str, tuple[Any, Any, Any]] = {}
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r = self.registry
        from bc_proxy import __version__  # here: bc_proxy/__init__ stays import-free

        self.build_info = Gauge(
            "bc_proxy_build_info",
            "Always 1; the labels say which bc-proxy, Python and aiohttp this process runs.",
            ["version", "python_version", "aiohttp_version"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version(), aiohttp.__version__).set(1)
        self.legacy_requests = LoopCounter(
            "bc_proxy_legacy_requests_total",
            "Legacy API requests by route template, tenant and HTTP status.",
            ["route", "tenant", "status"],
            r,
        )
        self.legacy_duration = LoopHistogram(
            "bc_proxy_legacy_request_duration_seconds",
            "Time to answer a legacy API request other than a long-poll (sends, test, queue).",
            ["route"],
            r,
            _LATENCY_BUCKETS,
        )
        self.poll_wait = LoopHistogram(
            "bc_proxy_legacy_poll_wait_seconds",
            "Time a legacy long-poll (in, status) took to answer, waiting included.",
            ["route"],
            r,
            _POLL_BUCKETS,
        )
        self.upstream_requests = LoopCounter(
            "bc_proxy_upstream_requests_total",
            "Requests to Connexus by operation and HTTP status (or timeout/error).",
            ["operation", "status"],
            r,
        )
        self.upstream_duration = LoopHistogram(
            "bc_proxy_upstream_request_duration_seconds",
            "Connexus request duration by operation.",
            ["operation"],
            r,
            _LATENCY_BUCKETS,
        )
        self.token_refreshes = Counter(
            "bc_proxy_token_refreshes_total",
            "Connexus access token fetches by tenant and outcome.",
            ["tenant", "outcome"],
            registry=r,
        )
        self.token_expiry = Gauge(
            "bc_proxy_token_expiry_timestamp_seconds",
            "Unix time the tenant's current Connexus token expires (0 when none is held).",
            ["tenant"],
            registry=r,
        )
        self.token_failing = Gauge(
            "bc_proxy_token_failing",
            "1 while the tenant's last Connexus token fetch failed (sends need a token; "
            "webhooks and polls do not), else 0.",
            ["tenant"],
            registry=r,
        )
        self.webhooks = LoopCounter(
            "bc_proxy_webhooks_total",
            "Connexus webhooks received by type and outcome.",
            ["type", "outcome"],
            r,
        )
        self.records_waiting = Gauge(
            "bc_proxy_records_waiting",
            "Legacy records stored and not yet handed to the legacy client, by tenant and kind.",
            ["tenant", "kind"],
            registry=r,
        )
        self.records_oldest_age = Gauge(
            "bc_proxy_records_oldest_age_seconds",
            "Age of the oldest waiting legacy record, by tenant and kind (0 when none wait).",
            ["tenant", "kind"],
            registry=r,
        )
        self.push_attempts = Counter(
            "bc_proxy_push_attempts_total",
            "Pushes of legacy records to the tenant's callback URL, by outcome.",
            ["tenant", "kind", "outcome"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "bc_proxy_dead_letters",
            "Records whose push gave up and wait in the dead-letter list.",
            registry=r,
        )
        self.messages_sent = LoopCounter(
            "bc_proxy_messages_sent_total",
            "Legacy send calls accepted upstream, by tenant.",
            ["tenant"],
            r,
        )
        self.recipients_sent = LoopCounter(
            "bc_proxy_recipients_sent_total",
            "Recipients accepted by Connexus, by tenant.",
            ["tenant"],
            r,
        )
        self.recipients_rejected = LoopCounter(
            "bc_proxy_recipients_rejected_total",
            "Recipients Connexus rejected inside an accepted request, by tenant.",
            ["tenant"],
            r,
        )
        self.recovered = Counter(
            "bc_proxy_recovered_messages_total",
            "Incoming messages found by the mo/query sweep that no webhook had delivered.",
            registry=r,
        )
        self.recipients_unknown = Counter(
            "bc_proxy_recipients_unknown_total",
            "Recipients whose send outcome is unknown (Connexus timed out or the gateway died "
            "mid-call): never re-sent by the gateway, a status record tells the legacy client.",
            ["tenant"],
            registry=r,
        )
        self.settles_deferred = Counter(
            "bc_proxy_settles_deferred_total",
            "Settles whose commit failed after Connexus had answered (store unreachable, "
            "read-only, full), retried in the background: deferred, then recovered or "
            "abandoned (left to expiry), by tenant.",
            ["tenant", "outcome"],
            registry=r,
        )
        self.send_repeats = Counter(
            "bc_proxy_send_repeats_total",
            "Recipients of legacy retries answered without a second upstream send, by the state "
            "of the earlier send (accepted, unknown, pending).",
            ["tenant", "state"],
            registry=r,
        )
        self.recipients_blocked = Counter(
            "bc_proxy_recipients_blocked_total",
            "Recipients not sent because the handset opted out (STOP), by tenant.",
            ["tenant"],
            registry=r,
        )
        self.records_unconfigured = Gauge(
            "bc_proxy_records_unconfigured_tenant",
            "Records kept for a tenant that is no longer in the configuration, by tenant.",
            ["tenant"],
            registry=r,
        )
        self.background_errors = Counter(
            "bc_proxy_background_errors_total",
            "Unexpected errors of a background job (each logged with its traceback; the job "
            "is restarted with backoff), by job.",
            ["job"],
            registry=r,
        )
        self.auth_refusals = Counter(
            "bc_proxy_auth_refusals_total",
            "Legacy logins refused: failure (checked and wrong) or throttled (refused unchecked "
            "after many failures from one address).",
            ["outcome"],
            registry=r,
        )
        self.rejected_webhooks = Counter(
            "bc_proxy_webhooks_rejected_total",
            "Webhook payloads we could not use, kept in the rejected-webhooks table, by reason.",
            ["reason"],
            registry=r,
        )

        self.sends_rate_limited = Counter(
            "bc_proxy_sends_rate_limited_total",
            "Legacy sends answered 429 by the tenant's send_rate_per_second (never sent), by "
            "tenant.",
            ["tenant"],
            registry=r,
        )
        self.webhooks_refused = Counter(
            "bc_proxy_webhooks_refused_total",
            "Webhook requests refused before their body was used: source (address not in "
            "webhook.allowed_sources, 403) or signature (missing or wrong HMAC, 401).",
            ["reason"],
            registry=r,
        )
        self.passthrough_requests = Counter(
            "bc_proxy_passthrough_requests_total",
            "/api/connexus passthrough requests by path (allowlisted paths, else other) and "
            "HTTP status (or timeout/error).",
            ["path", "status"],
            registry=r,
        )
        self.webhook_registrations = Counter(
            "bc_proxy_webhook_registrations_total",
            "Webhook registrations through Connexus configure, by tenant and outcome "
            "(verified, mismatch, error).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.pulls = Counter(
            "bc_proxy_pulls_total",
            "Pull-mode rounds by tenant, source (mo_query, sms_in, sms_status) and outcome "
            "(ok, error; a pulled record the store refused counts an error at each attempt).",
            ["tenant", "source", "outcome"],
            registry=r,
        )
        self.pulled_records = Counter(
            "bc_proxy_pulled_records_total",
            "Records fetched by pull mode, by tenant and source.",
            ["tenant", "source"],
            registry=r,
        )

    def initialise(self, tenants: Iterable[str]) -> None:
        """Create every bounded label combination so series exist from the first scrape."""
        names = [*tenants, NO_TENANT]
        for route in LEGACY_ROUTES:
            (self.poll_wait if route in POLL_ROUTES else self.legacy_duration).labels(route)
            for tenant in names:
                for status in ("200", "204", "400", "401", "500"):
                    self.legacy_requests.labels(route, tenant, status)
        for op in UPSTREAM_OPERATIONS:
            self.upstream_duration.labels(op)
        for tenant in names[:-1]:
            self.token_failing.labels(tenant)
            for outcome in TOKEN_OUTCOMES:
                self.token_refreshes.labels(tenant, outcome)
            self.token_expiry.labels(tenant)
            self.messages_sent.labels(tenant)
            self.recipients_sent.labels(tenant)
            self.recipients_rejected.labels(tenant)
            self.recipients_unknown.labels(tenant)
            self.recipients_blocked.labels(tenant)
            for state in REPEAT_STATES:
                self.send_repeats.labels(tenant, state)
            for outcome in SETTLE_OUTCOMES:
                self.settles_deferred.labels(tenant, outcome)
            for kind in RECORD_KINDS:
                self.records_waiting.labels(tenant, kind)
                self.records_oldest_age.labels(tenant, kind)
                for outcome in PUSH_OUTCOMES:
                    self.push_attempts.labels(tenant, kind, outcome)
        for outcome in ("failure", "throttled"):
            self.auth_refusals.labels(outcome)
        for wtype in WEBHOOK_TYPES:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhooks.labels(wtype, outcome)

    def forget_tenant(self, tenant: str) -> None:
        """A tenant left the configuration (reload): drop its gauges, which would otherwise
        keep reporting its last token and its last backlog for ever (a backlog alert that
        never clears). Records still kept for it are counted by `records_unconfigured`."""
        self._drop_token(tenant)
        for kind in RECORD_KINDS:
            for gauge in (self.records_waiting, self.records_oldest_age):
                with contextlib.suppress(KeyError):
                    gauge.remove(tenant, kind)

    def reset_token(self, tenant: str) -> None:
        """A tenant no longer holds a token (a reload moved it to password auth): its token
        gauges read 0, as a password tenant's do, not its last manager's token for ever."""
        self._drop_token(tenant)
        self.token_expiry.labels(tenant)
        self.token_failing.labels(tenant)

    def _drop_token(self, tenant: str) -> None:
        for gauge in (self.token_expiry, self.token_failing):
            with contextlib.suppress(KeyError):
                gauge.remove(tenant)

    def observe_legacy(self, route: str, tenant: str, status: int, started: float) -> None:
        """Count one legacy request and its duration (label children cached: hot path)."""
        key = (route, tenant, status)
        child = self._legacy_children.get(key)
        if child is None:
            child = self._legacy_children[key] = (
                self.legacy_requests.labels(route, tenant, str(status)),
                (self.poll_wait if route in POLL_ROUTES else self.legacy_duration).labels(route),
            )
        child[0].inc()
        child[1].observe(time.perf_counter() - started)

    def observe_send(self, tenant: str, accepted: int, rejected: int) -> None:
        """Count one accepted legacy send and its recipients (cached children: hot path)."""
        children = self._send_children.get(tenant)
        if children is None:
            children = self._send_children[tenant] = (
                self.messages_sent.labels(tenant),
                self.recipients_sent.labels(tenant),
                self.recipients_rejected.labels(tenant),
            )
        children[0].inc()
        if accepted:
            children[1].inc(accepted)
        if rejected:
            children[2].inc(rejected)

    def observe_webhook(self, wtype: str, outcome: str) -> None:
        """Count one webhook by type and outcome."""
        self.webhooks.labels(wtype, outcome).inc()

    def handler(self) -> Handler:
        """The /metrics handler (prometheus-client's aiohttp exposition)."""
        return make_aiohttp_handler(self.registry)
