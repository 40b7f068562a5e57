"""settling.drain against a store whose commits fail on cue (a stand-in for the Store's one
method a settle uses): the shutdown's last attempts happen before the store closes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import cast

from bc_proxy.errors import StoreError
from bc_proxy.legacy import settling
from bc_proxy.metrics import Metrics
from bc_proxy.store import SendIntent, Settlement, StatusRecord, Store


class FailsOnce:
    """settle_send fails its first commit (read-only), then commits; each call is logged,
    and one made after `closed` is set is logged as such."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closed = False

    async def settle_send(
        self, settlements: Sequence[Settlement], statuses: Sequence[StatusRecord] = ()
    ) -> None:
        await asyncio.sleep(0.01)
        if self.closed:
            self.calls.append("after close")
            raise StoreError("store is closed")
        self.calls.append("commit")
        if len(self.calls) == 1:
            raise StoreError("attempt to write a readonly database")


async def test_a_settle_failing_while_the_gateway_drains_retries_before_the_store_closes() -> None:
    """A cut-short settle (shutdown) whose first commit fails while `drain` is already
    waiting: its retry, started after drain began, still makes its last attempt before drain
    returns (and the store closes), not after."""
    store = FailsOnce()
    metrics = Metrics(process=False)
    intent = SendIntent("acme", "L1", ("6421000001",), "552")
    as_store = cast(Store, store)
    settling.settle_cut_short(as_store, metrics, intent, {"6421000001": "bc-ref"}, time.time() + 30)
    await settling.drain(as_store, 5.0)
    store.closed = True  # what the gateway does next
    await asyncio.sleep(0.3)
    assert store.calls == ["commit", "commit"]
