"""Pull mode (`tenants[].inbound.mode: pull`): fetch a tenant's traffic instead of taking webhooks.

Owns what one tenant's pull loop does (pull_jobs.py starts and stops the loops): every
`pull_interval_seconds` it sweeps `mo/query` (the recovery sweep and its marks), then drains
Connexus's Bulletin-compatible `sms/in` and `sms/status` polls (one record a call, consumed by
Connexus as it answers) into the same store ingest as webhooks (`add_mo(account=tenant)`,
`add_dlr`), so dedupe and translation are the webhooks' own.
Connexus forgets a poll record as it answers, so a fetched record is held until the store takes
it (retried with backoff, nothing else fetched meanwhile), a shutdown lets the fetch and its
commit finish within a grace, and a reload that retires a tenant's loop lets them finish at
their own pace; what cannot be stored is kept in the rejected-webhooks table or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import ClientError, web

from bc_proxy import keys
from bc_proxy.config import DEFAULT_STATUS_MAP
from bc_proxy.connexus.client import ConnexusClient
from bc_proxy.connexus.models import MAX_ID, Unusable, parse_mo, webhook_body
from bc_proxy.errors import BcProxyError, GatewayError, StoreError, StoreRefused
from bc_proxy.log import get_logger, loggable
from bc_proxy.recovery import sweep_tenant
from bc_proxy.store import DlrEvent, MoEvent
from bc_proxy.translate import form_encode

log = get_logger("bc_proxy.pull")

DRAIN_LIMIT = 500  # records taken from one poll endpoint in one round (the rest: next round)
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
UNKNOWN_STATUS = 0  # a legacy code no Connexus code maps to: the record says ERR + the code
STORE_RETRY_FIRST = 0.5  # seconds before a refused store write of a held record is retried,
STORE_RETRY_MAX = 30.0  # doubling up to this: the record has no other copy, so never give up
POISON_AFTER = 5  # refusals of a record's data after which it is kept aside (if the store is up)


def mo_from_record(record: Mapping[str, str]) -> MoEvent | None:
    """An `sms/in` record as the incoming SMS it reports; None when unusable."""
    try:
        return parse_mo(
            {
                "messageId": record.get("messageId"),
                "from": record.get("from"),
                "to": record.get("to"),
                "body": record.get("body"),
                "relatedMessageId": record.get("inReplyToId") or None,
            }
        )
    except Unusable:
        return None


def inverse_status_map(table: Mapping[int, str]) -> dict[str, int]:
    """Legacy code -> the lowest Connexus statusCode the tenant's map turns into it."""
    out: dict[str, int] = {}
    for code in sorted(table):
        out.setdefault(table[code], code)
    return out


# Legacy code -> Connexus statusCode, by the table Connexus itself renders `sms/status` records
# with (Bulletin's: DEFAULT_STATUS_MAP). A tenant's or the global `status_map` applies when the
# stored code is rendered for the legacy client, as for a webhook's report; inverting the
# tenant's map instead read the example config's `16: NRCV` back as no code at all (ERR).
CONNEXUS_CODES = inverse_status_map(DEFAULT_STATUS_MAP)


def dlr_from_record(
    record: Mapping[str, str], inverse: Mapping[str, int] = CONNEXUS_CODES
) -> DlrEvent | None:
    """An `sms/status` record as a delivery report about the message in `inReplyToId` (the id
    Connexus's webhook reports carry); None without one."""
    message_id = record.get("inReplyToId", "")
    legacy = record.get("statusCode", "")
    if not message_id or len(message_id) > MAX_ID or not legacy:
        return None
    code = inverse.get(legacy)
    if code is None:
        return DlrEvent(message_id, UNKNOWN_STATUS, (record.get("error") or legacy)[:40])
    return DlrEvent(message_id, code, "")


def loggable_body(event: MoEvent | DlrEvent) -> dict[str, object]:
    """`webhook_body` for a log line: a decimal messageId as a number (webhooks may carry
    either), which the log scrubber leaves readable; it masks phone-shaped strings, so the
    handset numbers stay masked while the id a report needs survives."""
    body = webhook_body(event)
    mid = event.message_id
    if mid.isascii() and mid.isdigit() and str(int(mid)) == mid:
        body["messageId"] = int(mid)
    return body


async def fetch_one(client: ConnexusClient, tenant: str, path: str) -> bytes | None:
    """One Bulletin-style poll of `path` (sms/in, sms/status): its record's form body, None on
    204."""
    op = path.replace("/", "_")
    extra = client.password_params(tenant) or {}
    started = time.perf_counter()
    metrics = client.metrics
    try:
        status, body, _ = await client.request(
            tenant, "POST", f"{client.base}/{path}", form_encode(extra.items()), _FORM
        )
    except TimeoutError:
        metrics.upstream_requests.labels(op, "timeout").inc()
        raise GatewayError(f"{path} did not answer in time") from None
    except ClientError as exc:
        metrics.upstream_requests.labels(op, "error").inc()
        raise GatewayError(f"{path} unreachable ({type(exc).__name__})") from None
    metrics.upstream_requests.labels(op, str(status)).inc()
    metrics.upstream_duration.labels(op).observe(time.perf_counter() - started)
    if status == 204:
        return None
    if status != 200:
        raise GatewayError(f"{path} answered {status}")
    return body


def _fields(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass(frozen=True, slots=True)
class Puller:
    """One pull-mode tenant's job: its rounds, and the record it holds between fetch and commit."""

    app: web.Application
    tenant: str
    # Set when the job is cancelled: a held record's retries end with one last attempt.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by a reload after which the tenant no longer pulls: nothing more is asked for, and
    # the record held is stored as usual (its fetch ends by its own timeout, its commit is
    # retried until it lands): the process goes on, so nothing needs cutting short.
    retired: asyncio.Event = field(default_factory=asyncio.Event)

    def stopping(self) -> bool:
        """No further record is asked for once shutdown began or the job was cancelled."""
        return self.stop.is_set() or self.app[keys.RUNTIME].shutting_down

    def asking(self) -> bool:
        """Whether to ask Connexus for more: neither stopping nor retired."""
        return not self.stopping() and not self.retired.is_set()

    async def run(self) -> None:
        """A round every `pull_interval_seconds` (as now configured), until shutdown or stop."""
        interval = 1.0
        loop = asyncio.get_running_loop()
        while self.asking():
            started = loop.time()
            if (t := self.app[keys.RUNTIME].tenants.get(self.tenant)) is not None:
                interval = t.inbound.pull_interval_seconds
            try:
                await self.pull_once()
            except Exception as exc:  # a bug here must not end the job nor wait its restart
                log.exception("pull_round_failed", tenant=self.tenant, error=loggable(exc))
            with contextlib.suppress(TimeoutError):  # the next round, or retired meanwhile
                await asyncio.wait_for(
                    self.retired.wait(), max(interval - (loop.time() - started), 0.0)
                )

    async def pull_once(self) -> dict[str, str]:
        """One round: mo/query sweep, sms/in, sms/status; outcome per source.

        A failing source is logged and counted; the others still run."""
        metrics = self.app[keys.METRICS]
        outcomes: dict[str, str] = {}
        for source in ("mo_query", "sms_in", "sms_status"):
            if not self.asking():
                break
            try:
                if source == "mo_query":
                    count = await sweep_tenant(self.app, self.tenant)
                else:
                    count = await self.drain("in" if source == "sms_in" else "status")
            except BcProxyError as exc:
                outcomes[source] = "error"
                metrics.pulls.labels(self.tenant, source, "error").inc()
                log.error("pull_failed", tenant=self.tenant, source=source, error=str(exc)[:200])
                continue
            outcomes[source] = "ok"
            metrics.pulls.labels(self.tenant, source, "ok").inc()
            if count:
                metrics.pulled_records.labels(self.tenant, source).inc(count)
        return outcomes

    async def drain(self, kind: str) -> int:
        """Take `sms/in` (`in`) or `sms/status` (`status`) records until none is left (or the
        round's limit, or shutdown), each stored before the next is asked for; how many."""
        path = "sms/in" if kind == "in" else "sms/status"
        taken = 0
        while taken < DRAIN_LIMIT and self.asking():
            if not await self._unbroken(self._take_one(path)):
                break
            taken += 1
        return taken

    async def _unbroken(self, work: Coroutine[Any, Any, bool]) -> bool:
        """Run `work` (a fetch and its commit) to its end even if this job is cancelled
        meanwhile, for up to half the shutdown timeout: between Connexus's answer and our
        commit, the record exists only here."""
        task = asyncio.create_task(work, name=f"bc-proxy pull {self.tenant} record")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.stop.set()
            grace = self.app[keys.SETTINGS].server.shutdown_timeout_seconds / 2
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while not task.done() and (left := deadline - loop.time()) > 0:
                # A further cancel (the app's jobs stopped twice) does not cut the grace short.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task}, timeout=left)
            if not task.done():
                # A fetch still on its way may be a record Connexus already handed out;
                # one already fetched is logged by _commit on the way out.
                log.error("pulled_fetch_abandoned", tenant=self.tenant, grace_s=grace)
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # stopping either way: a failed fetch is not news
            raise

    async def _take_one(self, path: str) -> bool:
        """Fetch one record of `path` and store it (or keep it if unusable); False when none."""
        raw = await fetch_one(self.app[keys.CLIENT], self.tenant, path)
        if raw is None:
            return False
        record = _fields(raw)
        event = mo_from_record(record) if path == "sms/in" else dlr_from_record(record)
        source = path.replace("/", "_")
        if event is None:
            await self._keep_unusable(source, raw)
        else:
            await self._commit(source, event)
        return True

    async def _commit(self, source: str, event: MoEvent | DlrEvent) -> None:
        """Store `event`, retrying a refusing store with growing pauses and nothing else
        fetched meanwhile; once stopping, one last attempt, then keep it for the operator."""
        delay = STORE_RETRY_FIRST
        refusals = 0  # of the data itself: a timeout or a lock proves nothing about the record
        try:
            while (error := await self._ingest(source, event, delay)) is not None:
                refusals += isinstance(error, StoreRefused)
                if self.stopping():  # as soon as a shutdown begins, beside the server's drain
                    await self._keep_unstored(source, event)
                    return
                if refusals >= POISON_AFTER and await self._keep_refused(source, event):
                    return  # the store is up and refuses this record alone: the round goes on
                await self._pause(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
        except BaseException:
            # Cancelled past the grace, or a store bug: the log line is the record's last copy.
            self._log_unstored(source, event, "not kept: the job ended mid-write")
            raise

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, cut short by a stop or by the start of a shutdown."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while not self.stopping() and (left := end - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), min(left, 0.25))

    async def _ingest(
        self, source: str, event: MoEvent | DlrEvent, retry_in: float
    ) -> StoreError | None:
        """One store write of a pulled event; the store's error (logged, counted as a pull
        error) when it failed."""
        store = self.app[keys.STORE]
        try:
            if isinstance(event, DlrEvent):
                await store.add_dlr(event)
            else:
                await store.add_mo(event, account=self.tenant)
        except StoreError as exc:
            self.app[keys.METRICS].pulls.labels(self.tenant, source, "error").inc()
            log.error(
                "pulled_record_store_failed",
                tenant=self.tenant,
                source=source,
                error=str(exc)[:200],
                retry_in_s=None if self.stopping() else retry_in,
            )
            return exc
        return None

    async def _keep_refused(self, source: str, event: MoEvent | DlrEvent) -> bool:
        """A record whose data the store refused POISON_AFTER times: kept with the rejected
        webhooks if the store takes that (it is up, and refuses this record alone); False when
        it refuses that too (the record stays held)."""
        reason = f"{source}_refused"
        if not await self._reject(json.dumps(webhook_body(event)).encode(), reason):
            return False
        self.app[keys.METRICS].rejected_webhooks.labels(reason).inc()
        log.error("pulled_record_not_stored", tenant=self.tenant, source=source, kept=reason)
        return True

    async def _keep_unstored(self, source: str, event: MoEvent | DlrEvent) -> None:
        """A record the store still refuses at stop: into the rejected-webhooks table as its
        webhook body, else (the store is down) into the log."""
        reason = f"{source}_not_stored"
        if await self._reject(json.dumps(webhook_body(event)).encode(), reason):
            log.error("pulled_record_not_stored", tenant=self.tenant, source=source, kept=reason)
        else:
            self._log_unstored(source, event, "not kept: the store refused it too")

    def _log_unstored(self, source: str, event: MoEvent | DlrEvent, kept: str) -> None:
        # A report's last copy, as a webhook body to POST to the webhook URL (it holds no phone
        # number for the log's scrubber to mask). An incoming SMS would come out with its
        # numbers masked, and re-injected so it would be stored wrong for good: its id only,
        # as the mo/query sweep stores it again from Connexus.
        if isinstance(event, DlrEvent):
            log.error(
                "pulled_record_not_stored",
                tenant=self.tenant,
                source=source,
                kept=kept,
                reinject=loggable_body(event),
            )
        else:
            log.error(
                "pulled_record_not_stored",
                tenant=self.tenant,
                source=source,
                kept=kept,
                message_id=event.message_id,
                recovered_by="the mo/query sweep",
            )

    async def _keep_unusable(self, source: str, raw: bytes) -> None:
        """A record we cannot use: kept verbatim with the rejected webhooks (or logged)."""
        reason = f"{source}_unusable"
        try:
            kept = await self._reject(raw, reason)
        except BaseException:  # cancelled past the shutdown's grace: the log is its last copy
            record = _fields(raw)
            log.error("pulled_record_unusable", tenant=self.tenant, source=source, record=record)
            raise
        if kept:
            self.app[keys.METRICS].rejected_webhooks.labels(reason).inc()
            log.warning("pulled_record_unusable", tenant=self.tenant, source=source, kept=reason)
            return
        # Decoded, so that the log's scrubber masks the phone numbers in it ("%2B64..." it
        # would not recognise).
        record = _fields(raw)
        log.error("pulled_record_unusable", tenant=self.tenant, source=source, record=record)

    async def _reject(self, body: bytes, reason: str) -> bool:
        try:
            await self.app[keys.STORE].reject_webhook(body, reason)
        except StoreError as exc:
            log.error("pulled_record_not_kept", tenant=self.tenant, reason=reason, error=str(exc))
            return False
        return True
