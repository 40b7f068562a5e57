"""`bc-proxy serve` with one part of the send path removed, for the CPU budget (bench/budget.py).

    python bench/ablate.py PART --config gw.yaml

PART is one of: none, gc, metrics, store, auth, upstream, access-log (`gc`: the cyclic
collector switched off after startup, to tell what collections cost). Each removal replaces that
part with the cheapest stand-in that keeps the rest of the path doing its work (a plan with
fresh refs instead of the write-ahead commit, an accepted outcome instead of the upstream call,
...). Never for production: the guarantees go with the part.

`structlog-log` is not a removal but the access line as it was before the render-once path
(`bc_proxy.access_log`): through structlog's processor chain, the stdlib LogRecord and the
formatter's second chain, the request id bound through structlog's contextvars; so the
budget shows what that path saves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

PARTS = ("none", "gc", "metrics", "store", "auth", "upstream", "access-log", "structlog-log")


def remove(part: str) -> None:
    """Monkeypatch `part` away before the app is built."""
    if part == "gc":  # the cyclic collector off once the gateway has tuned it (bc_proxy/cli.py)
        import gc

        freeze = gc.freeze  # called once by the gateway's tuning, after its startup collection

        def freeze_then_off() -> None:
            freeze()
            gc.disable()

        gc.freeze = freeze_then_off
    elif part == "metrics":
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

        def no_line(*args: Any) -> None:
            return None

        setattr(edge, "access", no_line)  # noqa: B010 (bench-only monkeypatch)
        setattr(edge, "access_request", no_line)  # noqa: B010
    elif part == "structlog-log":
        structlog_access()
    elif part != "none":
        raise SystemExit(f"unknown part {part!r}: one of {', '.join(PARTS)}")


def structlog_access() -> None:
    """The access line as it was before issue 13's render-once path: through structlog's
    processor chain, the stdlib LogRecord and the formatter's second chain, with the request
    id bound through structlog's contextvars: what the render-once path replaced."""
    import structlog

    from bc_proxy import edge
    from bc_proxy import log as bclog

    chained = structlog.get_logger("bc_proxy.http")

    def bound_info(fields: dict[str, Any]) -> None:
        # The request id bound through structlog's contextvars for the line, as then (edge.py
        # binds it in bc_proxy.log's own context variable now).
        bound = structlog.contextvars.bind_contextvars(request_id=bclog.REQUEST_ID.get())
        try:
            chained.info("request", **fields)
        finally:
            structlog.contextvars.reset_contextvars(**bound)

    def access(fields: dict[str, Any]) -> None:
        bound_info(fields)

    def access_request(
        tenant: str, route: str, method: str, status: int, duration_ms: float
    ) -> None:
        fields = {"tenant": tenant, "route": route, "method": method, "status": status}
        bound_info({**fields, "duration_ms": duration_ms})

    setattr(edge, "access", access)  # noqa: B010
    setattr(edge, "access_request", access_request)  # noqa: B010


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
