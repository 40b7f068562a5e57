"""`bc-proxy serve` with one part of the send path removed, for the CPU budget (bench/budget.py).

    python bench/ablate.py PART --config gw.yaml

PART is one of: none, metrics, store, auth, upstream, access-log. Each removal replaces that
part with the cheapest stand-in that keeps the rest of the path doing its work (a plan with
fresh refs instead of the write-ahead commit, an accepted outcome instead of the upstream call,
...). Never for production: the guarantees go with the part.

`fast-log` is not a removal but a prototype of the cheaper access-log path issue 13 asks for:
the same JSON line (same keys, request id bound, the configured scrubber applied once) rendered
once with json.dumps and written to the log stream, without structlog's processor chain, the
stdlib LogRecord and the formatter's second chain; and a request id from os.urandom instead of
16 calls to secrets.choice.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

PARTS = ("none", "metrics", "store", "auth", "upstream", "access-log", "fast-log")


def remove(part: str) -> None:
    """Monkeypatch `part` away before the app is built."""
    if part == "metrics":
        from bc_proxy.metrics import Metrics

        def nothing(*args: Any, **kwargs: Any) -> None:
            return None

        Metrics.observe_legacy = nothing  # type: ignore[method-assign]
        Metrics.observe_send = nothing  # type: ignore[method-assign]
    elif part == "store":
        from bc_proxy.store import PlannedRecipient, SendIntent, SendPlan
        from bc_proxy.store.rules import new_ref
        from bc_proxy.store.sqlite.store import SQLiteStore

        async def begin_send(self: Any, intent: SendIntent, now: float) -> SendPlan:
            planned = tuple(PlannedRecipient(r, new_ref()) for r in intent.recipients)
            return SendPlan(planned, (), ())

        async def settle_send(self: Any, *args: Any) -> None:
            return None

        SQLiteStore.begin_send = begin_send  # type: ignore[method-assign]
        SQLiteStore.settle_send = settle_send  # type: ignore[method-assign,assignment]
    elif part == "auth":
        from bc_proxy.legacy.auth import Authenticator

        async def authenticate(self: Any, user: Any, password: Any, source: Any = None) -> str:
            return "bench"

        Authenticator.authenticate = authenticate  # type: ignore[method-assign]
    elif part == "upstream":
        from bc_proxy.connexus.client import ConnexusClient
        from bc_proxy.connexus.outcomes import SendOutcome
        from bc_proxy.translate import RecipientOutcome

        async def send(self: Any, tenant: str, req: Any, planned: Sequence[Any]) -> Any:
            return SendOutcome(
                [RecipientOutcome(p.recipient, "accepted", "1158493") for p in planned], None
            )

        ConnexusClient.send = send  # type: ignore[method-assign]
    elif part == "access-log":
        from bc_proxy import edge

        class Quiet:
            def __getattr__(self, name: str) -> Any:
                return lambda *args, **kwargs: None

        edge.log = Quiet()
    elif part == "fast-log":
        fast_log()
    elif part != "none":
        raise SystemExit(f"unknown part {part!r}: one of {', '.join(PARTS)}")


def fast_log() -> None:
    """The render-once access-log prototype (see the module docstring)."""
    import datetime
    import json
    import os
    import re

    from bc_proxy import edge
    from bc_proxy import log as bclog

    structured = edge.log
    sane = getattr(bclog, "_SANE_ID", re.compile(r"[A-Za-z0-9._:-]{1,64}"))
    scrubbers = getattr(bclog, "_SCRUB", [])
    request_id = getattr(bclog, "REQUEST_ID", None)
    letters = b"abcdefghjkmnpqrstvwxyz"
    table = bytes(letters[i % len(letters)] for i in range(256))

    def new_request_id(incoming: str | None = None) -> str:
        if incoming and sane.fullmatch(incoming):
            return incoming
        return os.urandom(16).translate(table).decode()

    class Access:
        def info(self, event: str, **fields: Any) -> None:
            if event != "request":
                structured.info(event, **fields)
                return
            rid = None if request_id is None else request_id.get()
            line: dict[str, Any] = {"request_id": rid} if rid is not None else {}
            line.update(fields)
            line["event"] = event
            line["level"] = "info"
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            line["timestamp"] = now.isoformat() + "Z"
            for scrub in scrubbers:
                scrub(None, "info", line)
            sys.stderr.write(json.dumps(line) + "\n")

        def __getattr__(self, name: str) -> Any:
            return getattr(structured, name)

    edge.log = Access()
    if hasattr(edge, "new_request_id"):
        edge.new_request_id = new_request_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    remove(args.part)
    from bc_proxy.cli import main as cli_main

    return cli_main(["serve", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
