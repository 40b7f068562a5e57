"""The console page: pure rendering of a `View` into HTML (no I/O), every value escaped, text
from Connexus or an error (token state, registration line, push error, rejected webhook body)
scrubbed by the logs' rules (`bc_proxy.log.scrub_text`) and phone numbers masked as in the logs.

One `string.Template` skeleton; sections are tables built from escaped cells. No JavaScript:
the page refreshes itself with a meta refresh, and its one stylesheet is inline and allowed by
its hash in the Content-Security-Policy (`CSP`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from string import Template

from bc_proxy.console.recent import RecentRequest
from bc_proxy.log import mask_number, scrub_text
from bc_proxy.store import LegacyRecord, RejectedWebhook

REFRESH_SECONDS = 5
SHOWN_CHARS = 200  # of one line of Connexus or error text
BODY_CHARS = 300  # of a rejected webhook body
STYLE = (
    "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}td.n{text-align:right}.bad{color:#a00}"
    "form{display:inline;margin:0}code{font-size:12px;word-break:break-all}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="$refresh">
<meta name="referrer" content="no-referrer">
<title>bc-proxy console</title><style>$style</style></head>
<body><h1>bc-proxy console</h1><p>Generated $now UTC; refreshes every $refresh s.</p>
<h2>Tenants</h2>$tenants
<h2>Records waiting</h2>$waiting
<h2>Dead letters ($dead_count)</h2>$replay_all$dead
<h2>Upstream error rate</h2>$errors
<h2>Rejected webhooks (newest)</h2>$rejected
<h2>Last requests</h2>$recent
</body></html>
"""
)


@dataclass(frozen=True, slots=True)
class TenantRow:
    name: str
    auth: str  # token state and expiry, or password auth
    inbound: str  # webhook or pull
    webhook: str  # registration line, "" when not registering


@dataclass(frozen=True, slots=True)
class WaitingRow:
    tenant: str
    kind: str
    delivery: str  # poll, push, push+poll
    count: int
    oldest_age: float | None


@dataclass(frozen=True, slots=True)
class ErrorRate:
    errors: int
    total: int
    window_errors: int
    window_total: int
    window_seconds: float


@dataclass(frozen=True, slots=True)
class View:
    tenants: Sequence[TenantRow]
    waiting: Sequence[WaitingRow]
    dead: Sequence[LegacyRecord]
    dead_count: int
    rejected: Sequence[RejectedWebhook]
    recent: Sequence[RecentRequest]
    errors: ErrorRate


def e(value: object) -> str:
    """HTML-escaped text of any value (quotes too)."""
    return html.escape(str(value), quote=True)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """A table of cells that are already HTML (escaped by the caller)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f"<p>{e(empty)}</p>"
    header = "".join(f"<th>{e(h)}</th>" for h in head)
    return f"<table><tr>{header}</tr>{body}</table>"


def _replay_form(csrf: str, target: str, label: str) -> str:
    return (
        '<form method="post" action="/console/replay">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<input type="hidden" name="id" value="{e(target)}">'
        f'<button type="submit" name="replay" value="{e(target)}">{e(label)}</button></form>'
    )


def _rate(errors: int, total: int) -> str:
    return f"{errors} of {total} ({errors / total:.1%})" if total else "no requests"


def render(
    view: View,
    csrf: str,
    now: float | None = None,
    scrub: Callable[[str], str] = scrub_text,
) -> str:
    """The whole console page for `view`; `csrf`: the login's token for the replay forms;
    `scrub`: makes Connexus and error text fit to show (secrets, tokens, phone numbers hidden),
    applied before any truncation."""
    now = time.time() if now is None else now

    def shown(text: str, limit: int = SHOWN_CHARS) -> str:
        return e(scrub(text)[:limit])

    tenants = _table(
        ("tenant", "Connexus auth", "inbound", "webhook registration"),
        (
            (e(t.name), shown(t.auth), e(t.inbound), shown(t.webhook) if t.webhook else "-")
            for t in view.tenants
        ),
        "No tenants.",
    )
    waiting = _table(
        ("tenant", "kind", "delivery", "waiting", "oldest"),
        (
            (e(w.tenant), e(w.kind), e(w.delivery), e(w.count), e(_age(w.oldest_age)))
            for w in view.waiting
        ),
        "Nothing waiting.",
    )
    dead = _table(
        ("id", "tenant", "kind", "receipt", "from", "to", "attempts", "last error", "created", ""),
        (
            (
                e(r.id),
                e(r.tenant),
                e(r.kind),
                e(r.receipt_id),
                e(mask_number(r.msisdn_from)),
                e(mask_number(r.msisdn_to)),
                e(r.push_attempts),
                shown(r.push_error),
                e(_when(r.created_at)),
                _replay_form(csrf, str(r.id), "Replay"),
            )
            for r in view.dead
        ),
        "No dead letters.",
    )
    replay_all = _replay_form(csrf, "all", "Replay all") if view.dead_count else ""
    rate = view.errors
    recent_rate = (
        f"last {_age(rate.window_seconds)}: {_rate(rate.window_errors, rate.window_total)}"
        if rate.window_seconds >= 1
        else "recent: measured from one refresh to the next"
    )
    errors = (
        f"<p>Requests to Connexus that timed out, failed to connect or got a 5xx: "
        f"{e(recent_rate)}; since start: {e(_rate(rate.errors, rate.total))}.</p>"
    )
    rejected = _table(
        ("received", "reason", "body"),
        (
            (
                e(_when(w.received_at)),
                e(w.reason),
                "<code>" + shown(w.body.decode("utf-8", "replace"), BODY_CHARS) + "</code>",
            )
            for w in view.rejected
        ),
        "No rejected webhooks.",
    )
    recent = _table(
        ("time", "method", "route", "tenant", "status", "ms", "detail"),
        (
            (
                e(_when(r.at)),
                e(r.method),
                e(r.route),
                e(r.tenant),
                e(r.status),
                e(r.duration_ms),
                e(r.detail),
            )
            for r in view.recent
        ),
        "No requests yet.",
    )
    return _PAGE.substitute(
        refresh=REFRESH_SECONDS,
        style=STYLE,
        now=e(_when(now)),
        tenants=tenants,
        waiting=waiting,
        dead_count=e(view.dead_count),
        replay_all=replay_all,
        dead=dead,
        errors=errors,
        rejected=rejected,
        recent=recent,
    )
