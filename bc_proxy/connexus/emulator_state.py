"""State of the Connexus emulator: scripted behaviour, records of traffic, outgoing webhooks.

Owns token issue, the log of incoming messages (kept sorted by received time so `mo/query`
pages and date filters cost a bisect, not a scan), and the `mo`/`dlr` webhooks it fires,
including which reading of the API its delivery reports follow (`dlr_id`, timestamp, details).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp

DEFAULT_CLIENTS = {"cid_demo": "csk_demo"}
DEFAULT_USERS = {"demo@example.org": "demo-password"}
FIRST_MESSAGE_ID = 1158493
WEBHOOK_RETRIES = 3
WEBHOOK_TIMEOUT = 5.0
DLR_STATUS_NAMES = {1: "DELIVRD", 2: "UNDELIV", 4: "QUEUED", 8: "ACCEPTD", 16: "UNDELIV"}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DLR_ID_READINGS = ("connexus", "client")

DlrId = Literal["connexus", "client"]
PULL_QUEUE_MAX = 100_000  # records kept per account for sms/in and sms/status (oldest dropped)
LEGACY_STATUS = {1: "RCV", 2: "NRCV", 4: "SNT", 8: "SNT", 16: "NUR"}
IN_KEYS = ("messageId", "from", "to", "body", "rateCode", "inReplyToId")
STATUS_KEYS = ("messageId", "from", "to", "statusCode", "inReplyToId", "error")


@dataclass(slots=True)
class SentMessage:
    """One recipient accepted or rejected by sms/out."""

    message_id: str
    to: str
    body: str
    sender: str
    upstream_message_id: str | None
    accepted: bool
    error: str
    # who sent it: its reports go to that account's webhook and sms/status queue
    account: str | None = field(default=None, compare=False)


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request to an API path; status is 0 until it has been answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Emulator:
    """Emulated Connexus state: scripted behaviour (plain attributes) and records of traffic.

    `dlr_id`: which id a delivery report carries, `connexus` (its own message_id) or `client`
    (the messageId the client sent, its message_id when it sent none). `dlr_timestamp` and
    `dlr_details`: whether reports carry those fields at all.
    """

    def __init__(
        self,
        *,
        clients: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        token_ttl: int = 86400,
        dlr_id: DlrId = "connexus",
        dlr_timestamp: bool = True,
        dlr_details: bool = True,
    ) -> None:
        if dlr_id not in DLR_ID_READINGS:
            raise ValueError(f"dlr_id must be one of {', '.join(DLR_ID_READINGS)}")
        self.clients = dict(DEFAULT_CLIENTS if clients is None else clients)
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.token_ttl = token_ttl
        self.dlr_id: DlrId = dlr_id
        self.dlr_timestamp = dlr_timestamp
        self.dlr_details = dlr_details
        self.latency = 0.0
        self.fail_next: list[int] = []
        self.fail_token_next: list[int] = []
        self.reject: dict[str, str] = {}
        self.insufficient_funds = False
        self.send_response_delay = 0.0
        self.auto_dlr: int | None = None
        self.webhook_url: str | None = None  # every account's, unless it configured its own
        self.webhook_urls: dict[str, str | None] = {}  # per account, set through configure
        self.configure_ignored = False  # configure answers success but changes nothing
        self.balances: dict[str, str] = {}  # per account sms/balance (default 125.50)
        # sms/in and sms/status (the Bulletin-compatible polls): one record a call, consumed
        self._pull: dict[tuple[str, str | None], deque[dict[str, str]]] = {}
        self._receipts = itertools.count(1)
        self.token_requests = 0
        self.requests: list[RecordedRequest] = []
        self.sent: list[SentMessage] = []
        self.mo: list[dict[str, Any]] = []  # sorted by receivedTime (ties: arrival order)
        self._mo_times: list[str] = []  # receivedTime of self.mo, for bisect
        self.webhook_deliveries: list[tuple[dict[str, Any], int]] = []
        self._tokens: dict[str, tuple[float, str]] = {}  # token -> (expiry, account)
        self._mo_accounts: list[str | None] = []  # the account each of self.mo arrived at
        self._message_ids = itertools.count(FIRST_MESSAGE_ID)
        self._mo_ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- tokens --

    def issue_token(self, account: str = "") -> str:
        """Issue a fresh bearer token of `account` (a client_id) valid for token_ttl seconds."""
        now = time.monotonic()
        if len(self._tokens) > 1000:  # keep long benchmark runs from growing without bound
            self._tokens = {t: v for t, v in self._tokens.items() if v[0] > now}
        token = "wst_" + secrets.token_hex(20)
        self._tokens[token] = (now + self.token_ttl, account)
        return token

    def token_account(self, token: str) -> str | None:
        """The account of a token that was issued, not revoked and not expired; else None."""
        entry = self._tokens.get(token)
        if entry is None or time.monotonic() >= entry[0]:
            return None
        return entry[1]

    def token_valid(self, token: str) -> bool:
        """Whether token was issued, not revoked and not expired."""
        return self.token_account(token) is not None

    def revoke_tokens(self) -> None:
        """Invalidate every issued token; the next use of any of them gets 401."""
        self._tokens.clear()

    def sms_out_requests(self) -> list[RecordedRequest]:
        """The recorded requests to sms/out."""
        path = "/api/connexus/sms/out"
        return [r for r in self.requests if r.path.rstrip("/") == path]

    def next_message_id(self) -> str:
        return str(next(self._message_ids))

    # -- incoming messages --

    def record_mo(
        self,
        from_: str,
        to: str,
        body: str,
        *,
        related_message_id: str | None = None,
        received_at: datetime | None = None,
        account: str | None = None,
    ) -> dict[str, Any]:
        """Log an incoming message for mo/query without any webhook; the mo/query entry.

        `account` (a client_id or user): only that account's mo/query lists it (None: every
        account does)."""
        when = received_at or datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        received = when.astimezone(UTC).strftime(TIME_FORMAT)
        record: dict[str, Any] = {
            "messageId": str(next(self._mo_ids)),
            "from": from_,
            "to": to,
            "body": body,
            "receivedTime": received,
            "timestamp": int(when.timestamp()),
        }
        if related_message_id is not None:
            record["relatedMessageId"] = related_message_id
        at = bisect.bisect_right(self._mo_times, received)
        self._mo_times.insert(at, received)
        self._mo_accounts.insert(at, account)
        self.mo.insert(at, record)
        legacy = {
            "messageId": record["messageId"],
            "from": from_.lstrip("+"),
            "to": to,
            "body": body,
            "rateCode": "",
            "inReplyToId": related_message_id or "",
        }
        self._queue("in", account).append(legacy)
        return record

    def mo_window(
        self, start: str | None, end: str | None, account: str | None = None
    ) -> list[dict[str, Any]]:
        """Messages of `account` with start <= receivedTime <= end (Y-m-d H:i:s), oldest first."""
        lo = 0 if start is None else bisect.bisect_left(self._mo_times, start)
        hi = len(self.mo) if end is None else bisect.bisect_right(self._mo_times, end)
        if all(a is None for a in self._mo_accounts[lo:hi]):
            return self.mo[lo:hi]
        return [
            m
            for m, a in zip(self.mo[lo:hi], self._mo_accounts[lo:hi], strict=True)
            if a is None or a == account
        ]

    async def fire_mo(
        self,
        from_: str,
        to: str,
        body: str,
        *,
        related_message_id: str | None = None,
        deliver: bool = True,
        received_at: datetime | None = None,
        account: str | None = None,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        """Record an incoming message for mo/query, POST it to the webhook; return the payload.

        `webhook_url`: this account's webhook, instead of the emulator-wide one."""
        record = self.record_mo(
            from_,
            to,
            body,
            related_message_id=related_message_id,
            received_at=received_at,
            account=account,
        )
        payload: dict[str, Any] = {
            "type": "mo",
            "messageId": record["messageId"],
            "from": from_,
            "to": to,
            "body": body,
            "timestamp": record["timestamp"],
            "encoding": "text/plain",
            "network": "emulator",
        }
        url = webhook_url or self.webhook_url_of(account)
        if deliver and url:
            record["callbackUrl"] = url
            status, text = await self._post_webhook(url, payload)
            if status:
                record["callbackStatus"] = str(status)
            if text:
                record["callbackResponse"] = text[:255]
        return payload

    # -- delivery reports --

    def report_id(self, sent: SentMessage) -> str:
        """The id a delivery report about `sent` carries under the configured reading."""
        if self.dlr_id == "client" and sent.upstream_message_id:
            return sent.upstream_message_id
        return sent.message_id

    def dlr_payload(
        self, message_id: str, status_code: int, *, timestamp: int | None = None
    ) -> dict[str, Any]:
        """A delivery report as this emulator's reading shapes it."""
        payload: dict[str, Any] = {
            "type": "dlr",
            "messageId": message_id,
            "status": DLR_STATUS_NAMES.get(status_code, "UNKNOWN"),
            "statusCode": status_code,
        }
        if self.dlr_timestamp:
            payload["timestamp"] = int(time.time()) if timestamp is None else timestamp
        if self.dlr_details:
            payload["details"] = {"smsc": "emulator", "smscid": secrets.token_hex(8)}
        return payload

    async def fire_dlr(
        self,
        message_id: str,
        status_code: int,
        *,
        timestamp: int | None = None,
        sent: SentMessage | None = None,
    ) -> dict[str, Any]:
        """Queue a delivery report for sms/status and POST it to the sender's webhook (if set);
        return the payload. `sent`: the message it is about (else looked up by id)."""
        payload = self.dlr_payload(message_id, status_code, timestamp=timestamp)
        if sent is None:
            sent = next(
                (m for m in reversed(self.sent) if message_id in (self.report_id(m), m.message_id)),
                None,
            )
        account = sent.account if sent is not None else None
        code = LEGACY_STATUS.get(status_code, "ERR")
        self._queue("status", account).append(
            {
                "messageId": f"r{next(self._receipts)}",
                "from": sent.to if sent is not None else "",
                "to": sent.sender if sent is not None else "",
                "statusCode": code,
                "inReplyToId": message_id,
                "error": "" if code != "ERR" else payload["status"],
            }
        )
        url = self.webhook_url_of(account)
        if url:
            await self._post_webhook(url, payload)
        return payload

    def webhook_url_of(self, account: str | None) -> str | None:
        """The webhook an account's events go to: its own, else the emulator-wide one."""
        if account is not None and self.webhook_urls.get(account):
            return self.webhook_urls[account]
        return self.webhook_url

    def configure(self, account: str, url: str | None) -> None:
        """configure POST: the account's webhook (and the emulator-wide one, the last set)."""
        if not self.configure_ignored:
            self.webhook_urls[account] = url
            self.webhook_url = url

    def _queue(self, kind: str, account: str | None) -> deque[dict[str, str]]:
        key = (kind, account)
        queue = self._pull.get(key)
        if queue is None:
            queue = self._pull[key] = deque(maxlen=PULL_QUEUE_MAX)
        return queue

    def take(self, kind: str, account: str) -> dict[str, str] | None:
        """Consume the oldest unread sms/in (`in`) or sms/status (`status`) record of an account
        (records of no known account are anyone's); None when there is none."""
        for key in ((kind, account), (kind, None)):
            queue = self._pull.get(key)
            if queue:
                return queue.popleft()
        return None

    def unread(self, kind: str, account: str | None) -> int:
        """How many sms/in or sms/status records wait for the account (its own only)."""
        return len(self._pull.get((kind, account), ()))

    async def report(
        self, sent: SentMessage, status_code: int, *, timestamp: int | None = None
    ) -> dict[str, Any]:
        """Fire the delivery report of one sent recipient, by the configured id reading."""
        return await self.fire_dlr(
            self.report_id(sent), status_code, timestamp=timestamp, sent=sent
        )

    def spawn_report(self, sent: SentMessage, status_code: int) -> None:
        """Fire a delivery report in the background (auto_dlr: it may beat the send's answer)."""
        task = asyncio.create_task(self.report(sent, status_code))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle --

    async def close(self) -> None:
        """Cancel background webhook tasks and close the webhook ClientSession."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post_webhook(self, url: str, payload: dict[str, Any]) -> tuple[int, str]:
        # Like the real service: a receiver that does not answer 200 is retried up to 3 times.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
            )
        status, text = 0, ""
        for attempt in range(1, WEBHOOK_RETRIES + 2):
            try:
                async with self._session.post(url, json=payload) as resp:
                    status = resp.status
                    text = await resp.text(errors="replace")
            except (aiohttp.ClientError, TimeoutError):
                status, text = 0, ""
            self.webhook_deliveries.append((payload, status))
            if status == 200 or attempt > WEBHOOK_RETRIES:
                break
            await asyncio.sleep(0.05 * attempt)
        return status, text
